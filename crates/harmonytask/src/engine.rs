//! The engine: registration, start-up, adding tasks, status, shutdown.
//!
//! [`Engine::builder`] collects task types and settings; [`EngineBuilder::start`] registers the
//! machine and spawns the background loops, all on one `TaskTracker`: the scheduler actor, the
//! recorder, the heartbeat and the reaper. Each loop stops on a cancellation token; shutdown is
//! "cancel, then a bounded wait".

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harmonydb::{Db, ErrorKind, Timestamp, Tx, TxOptions};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, SystemClock};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::follow::Followers;
use crate::machine::{Heartbeat, NodeFlags, Ownership, Reaper};
use crate::metrics::EngineMetrics;
use crate::notify::{Hint, Listener};
use crate::recorder::Recorder;
use crate::registry::{Registry, TypeEntry};
use crate::resources::Resources;
use crate::runner::RunEnv;
use crate::scheduler::admission::downstream_order;
use crate::scheduler::{Event, Inbox, Msg, RunningCounts, Scheduler, StopReason};
use crate::status::EngineStatus;
use crate::store::prelude::*;
use crate::store::{Candidate, MachineRegister, NewTask, Store};
use crate::task::{MachineId, Task, TaskId, validate_name};

/// Scheduler event channel size; adds beyond it fall back to a poll.
const EVENTS_MAX: usize = 8192;
/// Recorder queue size.
const RECORD_QUEUE_MAX: usize = 8192;

pub use crate::registry::CompleteCallback;

/// Why the engine stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StopCause {
    Shutdown,
    Fenced(i64),
    RestartRequested,
}

/// State shared by the engine's handle and its loops.
pub(crate) struct Shared {
    pub db: Db,
    pub client: Client,
    pub store: Store,
    pub machine: MachineId,
    pub config: EngineConfig,
    pub clock: Arc<dyn Clock>,
    pub budget: Resources,
    pub registry: Arc<Registry>,
    /// The scheduler's inbox.
    pub inbox: Arc<Inbox>,
    /// Notifications are flowing (the poll can be slow).
    pub notify_healthy: AtomicBool,
    /// Wakes the heartbeat early (operator flags may have changed).
    pub wake_heartbeat: Notify,
    /// Wakes the follower loop.
    pub follow_wake: Arc<Notify>,
    pub flags: Arc<NodeFlags>,
    pub metrics: EngineMetrics,
    /// Background loops (scheduler, recorder, heartbeat, reaper, claim and poll jobs).
    pub tracker: TaskTracker,
    /// Task attempts.
    pub runs: TaskTracker,
    /// Stops the scheduler.
    pub stop: CancellationToken,
    /// Stops heartbeat and reaper.
    pub stop_liveness: CancellationToken,
    /// Fired on a fatal error (fenced).
    pub fatal: CancellationToken,
    /// Fired when the engine has fully stopped.
    done: CancellationToken,
    cause: Mutex<Option<StopCause>>,
    shutting_down: AtomicBool,
    /// Set just before this node deletes its own machine row at shutdown: a claim still in
    /// flight then fails on the owner foreign key, which is not a fence.
    unregistered: AtomicBool,
    counts: watch::Receiver<RunningCounts>,
}

impl Shared {
    /// Sends an event to the scheduler, waiting for room; a stopped scheduler is ignored.
    pub(crate) async fn send(&self, msg: impl Into<Msg>) {
        self.inbox.send(msg).await;
    }

    /// Wakes the scheduler for a pass.
    pub(crate) fn nudge(&self) {
        self.inbox.nudge();
    }

    /// Asks the scheduler to poll every type soon.
    pub(crate) fn request_poll(&self) {
        self.inbox.request_poll();
    }

    /// A hint about new or released work of `name`: poll it if it runs here.
    pub(crate) fn wake_type(&self, name: &str) {
        self.inbox.wake_type(name);
    }

    /// Wakes the follower loop when a local pair follows `from` (any pair for `None`).
    pub(crate) fn wake_followers(&self, from: Option<&str>) {
        if self.registry.follows(from) {
            self.follow_wake.notify_one();
        }
    }

    /// An adder for a registered type.
    pub(crate) fn adder(self: &Arc<Self>, ty: usize) -> TaskAdder {
        TaskAdder {
            engine: Engine {
                shared: Arc::clone(self),
            },
            name: self.registry.types[ty].name.to_string(),
        }
    }

    /// A run-now request for `name`: call its IAmBored at once if it runs here.
    pub(crate) fn run_now(&self, name: &str) {
        self.inbox.run_now(name);
    }

    /// Tells the local scheduler about tasks this process just added.
    pub(crate) fn notify_added(&self, name: &str, tasks: Vec<Candidate>) {
        if !self.inbox.added(name, tasks) {
            self.metrics.added_other(name);
        }
    }

    /// Drains and stops. `Shutdown` gives ordinary tasks the grace period, then cancels them;
    /// `RestartRequested` waits for every task to finish (an operator asked for a drain).
    pub(crate) async fn stop_with(&self, cause: StopCause) {
        let s = self;
        if s.shutting_down.swap(true, Ordering::AcqRel) || s.fatal.is_cancelled() {
            s.done.cancelled().await;
            return;
        }
        s.flags.draining.store(true, Ordering::Release);
        s.send(Event::Drain).await;
        let mut counts = s.counts.clone();
        let grace = match cause {
            StopCause::RestartRequested => Duration::MAX,
            _ => s.config.shutdown_grace,
        };
        let all_done = |c: &RunningCounts| c.total == 0;
        let only_protected = |c: &RunningCounts| c.total == c.protected;
        // 1. Grace for ordinary tasks.
        let _ = tokio::time::timeout(grace, counts.wait_for(all_done)).await;
        // 2. Cancel what is left of them, wait a bounded time for them to return.
        if !all_done(&counts.borrow()) {
            tracing::info!(
                running = counts.borrow().total,
                "grace period over; cancelling running tasks"
            );
            s.send(Event::StopRunning {
                reason: StopReason::Shutdown,
                include_protected: false,
            })
            .await;
            let _ =
                tokio::time::timeout(s.config.cancel_wait, counts.wait_for(only_protected)).await;
        }
        // 3. Time-sensitive and uninterruptible tasks are awaited.
        if counts.borrow().protected > 0 {
            tracing::info!(
                running = counts.borrow().protected,
                "waiting for time-sensitive and uninterruptible tasks"
            );
            let _ = counts.wait_for(|c| c.protected == 0).await;
        }
        // 4. Let finished attempts record their outcomes (bounded: an attempt that ignored
        //    cancellation is abandoned and its row released below).
        s.runs.close();
        let _ = tokio::time::timeout(s.config.cancel_wait, s.runs.wait()).await;
        s.stop_liveness.cancel();
        if cause == StopCause::RestartRequested
            && let Err(e) = s.store.machine_clear_restart(s.machine).await
        {
            tracing::warn!(error = %e, "could not clear the restart request");
        }
        let now = s.clock.now();
        match s.store.task_release_owned(s.machine, now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(released = n, "released tasks still owned at shutdown"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release owned tasks; they are released when this machine is reaped")
            }
        }
        s.unregistered.store(true, Ordering::Release);
        if let Err(e) = s.store.machine_unregister(s.machine).await {
            tracing::warn!(error = %e, "could not delete this machine's row; the reaper will");
        }
        {
            let mut c = s.cause.lock().unwrap_or_else(|p| p.into_inner());
            c.get_or_insert(cause);
        }
        s.stop.cancel();
        s.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.tracker.wait()).await;
        s.done.cancel();
    }

    /// Stops the engine because it can no longer run safely (its machine row is gone).
    pub(crate) fn fail(&self, err: Error) {
        if self.unregistered.load(Ordering::Acquire) {
            tracing::debug!(error = %err, "ignored after unregistering");
            return;
        }
        let cause = match &err {
            Error::Fenced(id) => StopCause::Fenced(*id),
            _ => StopCause::Fenced(self.machine.0),
        };
        {
            let mut c = self.cause.lock().unwrap_or_else(|p| p.into_inner());
            if c.is_some() {
                return;
            }
            *c = Some(cause);
        }
        tracing::error!(error = %err, "stopping: this node can no longer run tasks safely");
        self.flags.draining.store(true, Ordering::Release);
        self.fatal.cancel();
        self.stop_liveness.cancel();
        self.stop.cancel();
        self.runs.close();
        self.tracker.close();
        let done = self.done.clone();
        let runs = self.runs.clone();
        let wait = self.config.cancel_wait;
        // Not on the tracker, which is closed and being drained: this bounded wait is what
        // marks the engine done once the attempts have returned.
        tokio::spawn(async move {
            let _ = tokio::time::timeout(wait, runs.wait()).await;
            done.cancel();
        });
    }
}

/// Adds and restarts tasks without running a node: for CLIs, web handlers and other programs
/// that post work. Rows it adds have `added_by = 0` unless it belongs to an engine.
#[derive(Clone)]
pub struct Client {
    db: Db,
    clock: Arc<dyn Clock>,
    added_by: MachineId,
    notify: bool,
}

impl Client {
    /// A client on `db` using the system clock.
    pub fn new(db: Db) -> Self {
        Client {
            db,
            clock: Arc::new(SystemClock),
            added_by: MachineId(0),
            notify: true,
        }
    }

    /// Whether adds send wake-up notifications (Postgres); on by default. Turn off for
    /// backends without `NOTIFY`.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Asks a singleton type to run now. A type that no node registered as a singleton is
    /// refused with [`Error::NotSingleton`] and nothing is written.
    pub async fn run_now(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        Store::new(self.db.clone())
            .singleton_run_now(name, self.notify)
            .await
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Adds one task; see [`Engine::add_task`]. Returns the new task as a scheduler candidate.
    pub(crate) async fn add<F, Fut>(
        &self,
        name: &str,
        previous: Option<TaskId>,
        extra: F,
    ) -> Result<Option<Candidate>>
    where
        F: Fn(TaskId, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        validate_name(name)?;
        let posted = self.clock.now();
        let added_by = self.added_by;
        let notify = self.notify;
        let extra = &extra;
        let result = self
            .db
            .transaction_with(TxOptions::retry(), |tx| async move {
                let new = NewTask {
                    name,
                    posted,
                    added_by,
                    previous,
                    notify,
                };
                let c = Store::task_add(&tx, &new).await?;
                Ok(extra(c.id, tx).await?.then_some(c))
            })
            .await;
        match result {
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) => Ok(None),
            Err(e) if e.kind() == ErrorKind::UniqueViolation => {
                tracing::debug!(task_type = name, "task already queued");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn add_many<F, Fut>(
        &self,
        name: &str,
        count: usize,
        extra: F,
    ) -> Result<Vec<Candidate>>
    where
        F: Fn(Vec<TaskId>, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        validate_name(name)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let posted = self.clock.now();
        let added_by = self.added_by;
        let notify = self.notify;
        let extra = &extra;
        let new = NewTask {
            name,
            posted,
            added_by,
            previous: None,
            notify,
        };
        let added = self
            .db
            .transaction_with(TxOptions::retry(), |tx| async move {
                let added = Store::task_add_many(&tx, &new, count).await?;
                let ids = added.iter().map(|c| c.id).collect();
                Ok(extra(ids, tx).await?.then_some(added))
            })
            .await?
            .unwrap_or_default();
        Ok(added)
    }

    pub(crate) async fn restart(&self, id: TaskId) -> Result<(String, Candidate)> {
        let store = Store::new(self.db.clone());
        let now = self.clock.now();
        let name = store.task_restart(id, self.added_by, now).await?;
        let posted = store.task_get(id).await?.map_or(now, |t| t.posted_time);
        if self.notify {
            let hint = Hint::Added {
                name: name.clone(),
                task: Some((id, posted)),
            };
            store.notify(&hint.payload(self.added_by)).await?;
        }
        Ok((
            name,
            Candidate {
                id,
                posted,
                updated: now,
                retries: 0,
            },
        ))
    }

    /// Adds one task with arguments; returns its id (`None` if it was already queued).
    pub async fn add_task_with_args(
        &self,
        name: &str,
        args: &[(String, String)],
    ) -> Result<Option<TaskId>> {
        let c = self.add_with_args(name, args).await?;
        Ok(c.map(|c| c.id))
    }

    /// Adds one task with arguments. Without arguments there are no rows of the caller's to
    /// write, so the row (and its wake-up notification) goes in with one statement.
    pub(crate) async fn add_with_args(
        &self,
        name: &str,
        args: &[(String, String)],
    ) -> Result<Option<Candidate>> {
        if !args.is_empty() {
            return self
                .add(name, None, |id, tx| async move {
                    Store::task_args_insert(&tx, id, args).await?;
                    Ok(true)
                })
                .await;
        }
        validate_name(name)?;
        let posted = self.clock.now();
        let id = Store::new(self.db.clone())
            .task_insert_alone(name, posted, self.added_by, self.notify)
            .await?;
        Ok(Some(Candidate::added(id, posted)))
    }

    /// Adds `count` tasks of one type, each with the same arguments, in one transaction.
    pub async fn add_tasks_with_args(
        &self,
        name: &str,
        count: usize,
        args: &[(String, String)],
    ) -> Result<Vec<TaskId>> {
        let added = self
            .add_many(name, count, |ids, tx| async move {
                for id in ids {
                    Store::task_args_insert(&tx, id, args).await?;
                }
                Ok(true)
            })
            .await?;
        Ok(added.into_iter().map(|c| c.id).collect())
    }

    /// Re-queues a permanently failed task with its original id and posted time.
    pub async fn restart_task(&self, id: TaskId) -> Result<()> {
        self.restart(id).await.map(|_| ())
    }
}

/// Adds tasks of one type; handed to [`Task::adder`].
#[derive(Clone)]
pub struct TaskAdder {
    engine: Engine,
    name: String,
}

impl TaskAdder {
    /// The type this adder adds.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The engine's clock reading.
    pub fn now(&self) -> Timestamp {
        self.engine.now()
    }

    /// Adds one task of this type; see [`Engine::add_task`].
    pub async fn add<F, Fut>(&self, extra: F) -> Result<Option<TaskId>>
    where
        F: Fn(TaskId, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        self.engine.add_task(&self.name, extra).await
    }
}

/// Collects task types and settings; [`EngineBuilder::start`] starts the node.
pub struct EngineBuilder {
    db: Db,
    tasks: Vec<Arc<dyn Task>>,
    config: EngineConfig,
    clock: Arc<dyn Clock>,
}

impl EngineBuilder {
    /// Registers a task type.
    pub fn register(mut self, task: impl Task) -> Self {
        self.tasks.push(Arc::new(task));
        self
    }

    /// Registers a shared task type.
    pub fn register_arc(mut self, task: Arc<dyn Task>) -> Self {
        self.tasks.push(task);
        self
    }

    /// Sets the configuration.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Sets the budget instead of detecting it.
    pub fn budget(mut self, budget: Resources) -> Self {
        self.config.budget = Some(budget);
        self
    }

    /// Injects the clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Validates everything, registers this machine and starts the loops.
    pub async fn start(self) -> Result<Engine> {
        self.config.validate()?;
        let mut details = Vec::with_capacity(self.tasks.len());
        let mut seen = HashMap::new();
        for t in &self.tasks {
            let d = t.type_details();
            d.validate()?;
            if seen.insert(d.name.clone(), ()).is_some() {
                return Err(Error::DuplicateType(d.name));
            }
            details.push(d);
        }
        let may_follow: HashMap<String, Vec<String>> = details
            .iter()
            .map(|d| (d.name.clone(), d.may_follow.clone()))
            .collect();
        let downstream = downstream_order(&may_follow)?;
        let budget = self.config.budget.unwrap_or_else(crate::resources::detect);
        budget
            .validate()
            .map_err(crate::error::ConfigError::budget)?;
        let budget_units = budget.amounts();
        for d in &details {
            let (fit, short) = d.cost.amounts().how_many_fit(&budget_units);
            if fit == 0 {
                tracing::warn!(
                    task_type = %d.name,
                    resource = %short.map_or("?".to_owned(), |r| r.to_string()),
                    cost = %d.cost,
                    budget = %budget,
                    "task type can never run on this node: its cost exceeds the whole budget"
                );
            }
        }

        let store = Store::new(self.db.clone());
        let names: Vec<&str> = details.iter().map(|d| d.name.as_str()).collect();
        let machine_name = if self.config.machine_name.is_empty() {
            self.config
                .host_and_port
                .rsplit_once(':')
                .map_or(self.config.host_and_port.as_str(), |(h, _)| h)
                .to_owned()
        } else {
            self.config.machine_name.clone()
        };
        let registered = store
            .machine_register(&MachineRegister {
                host_and_port: &self.config.host_and_port,
                cpu: budget.cpu,
                ram: i64::try_from(budget.ram).unwrap_or(i64::MAX),
                gpu: budget.gpu,
                tasks: &names.join(","),
                layers: &self.config.layers.join(","),
                name: &machine_name,
                version: &self.config.version,
                now: self.clock.now(),
                dead_after: self.config.dead_after,
            })
            .await?;
        if registered.released_tasks > 0 {
            tracing::info!(
                released = registered.released_tasks,
                "released tasks still owned by an earlier run of this node"
            );
        }
        let machine = registered.id;
        // Follower pairs are registered before the node reports itself started, so that every
        // completion after `start` returns is followed.
        for d in &details {
            for f in &d.follows {
                store.follow_register(&f.from, &d.name).await?;
            }
            if d.iambored
                .as_ref()
                .is_some_and(|b| b.singleton_interval().is_some())
            {
                store.singleton_register(&d.name).await?;
            }
        }
        tracing::info!(machine = %machine, host = %self.config.host_and_port, budget = %budget, "node registered");

        let flags = Arc::new(NodeFlags::default());
        let metrics = EngineMetrics::new();
        let types: Vec<TypeEntry> = self
            .tasks
            .into_iter()
            .zip(details)
            .map(|(task, d)| TypeEntry {
                ownership: Arc::new(Ownership {
                    store: store.clone(),
                    machine,
                    flags: Arc::clone(&flags),
                    can_yield: d.can_yield,
                    uninterruptible: d.uninterruptible,
                }),
                metrics: metrics.for_type(&d.name),
                name: Arc::from(d.name.as_str()),
                details: d,
                task,
            })
            .collect();
        let cluster_limited: Vec<String> = types
            .iter()
            .filter(|t| t.details.max_cluster > 0)
            .map(|t| t.name.to_string())
            .collect();
        let registry = Arc::new(Registry::new(types));
        let (events_tx, events_rx) = mpsc::channel(EVENTS_MAX);
        let inbox = Arc::new(Inbox::new(events_tx, Arc::clone(&registry)));
        let (record_tx, record_rx) = mpsc::channel(RECORD_QUEUE_MAX);
        let (counts_tx, counts_rx) = watch::channel(RunningCounts::default());
        let client = Client {
            db: self.db.clone(),
            clock: Arc::clone(&self.clock),
            added_by: machine,
            notify: self.config.notify,
        };
        let follow_wake = Arc::new(Notify::new());
        let fatal = CancellationToken::new();
        let recorder = Recorder {
            rx: record_rx,
            store: store.clone(),
            clock: Arc::clone(&self.clock),
            machine,
            host_and_port: self.config.host_and_port.clone(),
            notify: self.config.notify,
            batch_max: self.config.record_batch_max,
            cluster_limited,
            fatal: fatal.clone(),
            followers: registry.follows(None).then(|| Arc::clone(&follow_wake)),
        };
        let run_env = Arc::new(RunEnv {
            registry: Arc::clone(&registry),
            inbox: Arc::clone(&inbox),
            recorder: record_tx,
            db: self.db.clone(),
            store: store.clone(),
            clock: Arc::clone(&self.clock),
            machine,
        });
        let shared = Arc::new(Shared {
            client,
            db: self.db,
            store,
            machine,
            config: self.config,
            clock: self.clock,
            budget,
            registry,
            inbox,
            notify_healthy: AtomicBool::new(false),
            wake_heartbeat: Notify::new(),
            follow_wake,
            flags,
            metrics,
            tracker: TaskTracker::new(),
            runs: TaskTracker::new(),
            stop: CancellationToken::new(),
            stop_liveness: CancellationToken::new(),
            fatal,
            done: CancellationToken::new(),
            cause: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
            counts: counts_rx,
        });
        let scheduler = Scheduler::new(
            Arc::clone(&shared),
            run_env,
            events_rx,
            counts_tx,
            downstream,
        );
        shared.tracker.spawn(scheduler.run(shared.stop.clone()));
        shared.tracker.spawn(recorder.run(shared.stop.clone()));
        shared.tracker.spawn(
            Heartbeat {
                shared: Arc::clone(&shared),
            }
            .run(shared.stop_liveness.clone()),
        );
        shared.tracker.spawn(
            Reaper {
                shared: Arc::clone(&shared),
            }
            .run(shared.stop_liveness.clone()),
        );
        if shared.config.notify {
            shared.tracker.spawn(
                Listener {
                    shared: Arc::clone(&shared),
                }
                .run(shared.stop_liveness.clone()),
            );
        }
        shared.tracker.spawn(
            crate::retention::Pruner {
                store: shared.store.clone(),
                clock: Arc::clone(&shared.clock),
                rule: crate::retention::PruneRule {
                    older_than: shared.config.history_keep,
                    keep_per_type: shared.config.history_keep_per_type,
                    name: None,
                },
                holder: format!(
                    "machine {} ({})",
                    shared.machine, shared.config.host_and_port
                ),
                interval: shared.config.prune_interval,
                batch_max: shared.config.prune_batch_max,
            }
            .run(shared.stop_liveness.clone()),
        );
        shared.tracker.spawn(
            Followers {
                shared: Arc::clone(&shared),
            }
            .run(shared.stop_liveness.clone()),
        );
        let engine = Engine { shared };
        for entry in &engine.shared.registry.types {
            entry.task.adder(TaskAdder {
                engine: engine.clone(),
                name: entry.name.to_string(),
            });
        }
        Ok(engine)
    }
}

/// A running node. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl Engine {
    /// Starts building an engine on `db`.
    pub fn builder(db: Db) -> EngineBuilder {
        EngineBuilder {
            db,
            tasks: Vec::new(),
            config: EngineConfig::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// This node's machine id.
    pub fn machine_id(&self) -> MachineId {
        self.shared.machine
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    /// The engine's metrics.
    pub fn metrics(&self) -> &EngineMetrics {
        &self.shared.metrics
    }

    /// The node's budget.
    pub fn budget(&self) -> Resources {
        self.shared.budget
    }

    /// Names of the types this node runs.
    pub fn task_types(&self) -> Vec<String> {
        self.shared
            .registry
            .types
            .iter()
            .map(|t| t.name.to_string())
            .collect()
    }

    /// Adds a task. `extra` runs inside the transaction that inserts the task row, with the new
    /// id, to write the caller's own rows that reference it: `Ok(true)` commits, `Ok(false)`
    /// or an error rolls back (no task). A unique violation from `extra` means "already
    /// queued" and returns `Ok(None)`. Serialization failures re-run the whole transaction.
    ///
    /// The type does not have to run on this node; nodes that run it find the task.
    pub async fn add_task<F, Fut>(&self, name: &str, extra: F) -> Result<Option<TaskId>>
    where
        F: Fn(TaskId, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        self.add_task_after(name, None, extra).await
    }

    /// Like [`Engine::add_task`], recording `previous` as the task whose completion created
    /// this one.
    pub async fn add_task_after<F, Fut>(
        &self,
        name: &str,
        previous: Option<TaskId>,
        extra: F,
    ) -> Result<Option<TaskId>>
    where
        F: Fn(TaskId, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        let added = self.shared.client.add(name, previous, extra).await?;
        Ok(added.map(|c| {
            self.shared.notify_added(name, vec![c.clone()]);
            c.id
        }))
    }

    /// Adds a task with arguments (stored in `harmony_task_args`).
    pub async fn add_task_with_args(
        &self,
        name: &str,
        args: &[(String, String)],
    ) -> Result<Option<TaskId>> {
        let added = self.shared.client.add_with_args(name, args).await?;
        Ok(added.map(|c| {
            self.shared.notify_added(name, vec![c.clone()]);
            c.id
        }))
    }

    /// Adds `count` tasks of one type in one transaction (one insert statement); `extra` gets
    /// all new ids. Returns them (empty when `extra` rolled back).
    pub async fn add_tasks<F, Fut>(&self, name: &str, count: usize, extra: F) -> Result<Vec<TaskId>>
    where
        F: Fn(Vec<TaskId>, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        let added = self.shared.client.add_many(name, count, extra).await?;
        let ids = added.iter().map(|c| c.id).collect();
        if !added.is_empty() {
            self.shared.notify_added(name, added);
        }
        Ok(ids)
    }

    /// Re-queues a permanently failed task with its original id and posted time.
    pub async fn restart_task(&self, id: TaskId) -> Result<()> {
        let (name, c) = self.shared.client.restart(id).await?;
        self.shared.notify_added(&name, vec![c]);
        Ok(())
    }

    /// Asks a singleton type to run now (see [`Client::run_now`]); this node acts on it at
    /// once when it runs the type, whatever the backend.
    pub async fn run_now(&self, name: &str) -> Result<()> {
        self.shared.client.run_now(name).await?;
        self.shared.run_now(name);
        Ok(())
    }

    /// Registers a callback run after each successful completion of a type.
    pub fn on_task_complete(&self, name: &str, callback: CompleteCallback) -> Result<()> {
        let ty = *self
            .shared
            .registry
            .index
            .get(name)
            .ok_or_else(|| Error::UnknownType(name.to_owned()))?;
        if !self.shared.registry.on_complete(ty, callback) {
            return Err(Error::Stopped);
        }
        Ok(())
    }

    /// A snapshot of what runs and why waiting work does not.
    pub async fn status(&self) -> Result<EngineStatus> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .inbox
            .send_now(Msg::Status(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Polls the database now instead of at the next interval.
    pub fn poll_now(&self) {
        self.shared.request_poll();
    }

    /// Waits until the engine has stopped: `Ok` after a graceful shutdown, an error when it
    /// stopped because it was fenced ([`Error::Fenced`]) or restarted
    /// ([`Error::RestartRequested`]).
    pub async fn wait(&self) -> Result<()> {
        self.shared.done.cancelled().await;
        let cause = self
            .shared
            .cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match cause {
            None | Some(StopCause::Shutdown) => Ok(()),
            Some(StopCause::Fenced(id)) => Err(Error::Fenced(id)),
            Some(StopCause::RestartRequested) => Err(Error::RestartRequested),
        }
    }

    /// Whether the engine has stopped.
    pub fn is_stopped(&self) -> bool {
        self.shared.done.is_cancelled()
    }

    /// Graceful shutdown (DESIGN §9): stop claiming; give ordinary running tasks
    /// `shutdown_grace` to finish; cancel the rest (they are released with retries unchanged
    /// and history `err = "shutdown"`); await time-sensitive and uninterruptible tasks; release
    /// every task still owned; delete the machine row. Idempotent; returns like [`Engine::wait`].
    pub async fn shutdown(&self) -> Result<()> {
        self.shared.stop_with(StopCause::Shutdown).await;
        self.wait().await
    }

    /// The time now on the engine's clock.
    pub fn now(&self) -> Timestamp {
        self.shared.clock.now()
    }
}
