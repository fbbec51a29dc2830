//! The engine: registration, start-up, adding tasks, status, shutdown.
//!
//! [`Engine::builder`] collects task types and settings; [`EngineBuilder::start`] registers the
//! machine and assembles the node: it builds each background loop with only the handles that
//! loop uses — the scheduler actor, the recorder, the heartbeat, the reaper, the listener,
//! the follower loop and the pruner — and spawns them on one `TaskTracker`. Each loop stops
//! on a cancellation token; shutdown is "cancel, then a bounded wait". This is the top of the
//! crate: it imports every layer, and nothing imports it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harmonydb::{Db, Timestamp, Tx};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client::{Client, TaskAdder};
use crate::clock::{Clock, SystemClock};
use crate::config::EngineConfig;
use crate::error::{Error, Result};
use crate::follow::FollowWake;
use crate::follower::Followers;
use crate::lifecycle::Supervisor;
use crate::machine::{Heartbeat, Reaper};
use crate::metrics::EngineMetrics;
use crate::notify::{Listener, PollPace};
use crate::ownership::{NodeFlags, Ownership};
use crate::recorder::Recorder;
use crate::registry::{Registry, TypeEntry};
use crate::reporter::BlockedReporter;
use crate::resources::Resources;
use crate::runner::RunEnv;
use crate::scheduler::admission::downstream_order;
use crate::scheduler::inbox::{Inbox, InboxType, Msg};
use crate::scheduler::{Event, RunningCounts, SchedConfig, Scheduler, SchedulerEnv, StopReason};
use crate::status::EngineStatus;
use crate::store::prelude::*;
use crate::store::{MachineRegister, Store};
use crate::task::{MachineId, Task, TaskId};

/// Scheduler event channel size; adds beyond it fall back to a poll.
const EVENTS_MAX: usize = 8192;
/// Recorder queue size.
const RECORD_QUEUE_MAX: usize = 8192;

pub use crate::registry::CompleteCallback;

/// Why the engine stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StopCause {
    Shutdown,
    Fenced(i64),
    RestartRequested,
}

/// The engine's own state: what its handle and its stop sequence use. The loops never see it;
/// each is built below with only the handles it uses, and reaches the stop controls through
/// [`Supervisor`].
struct Shared {
    db: Db,
    client: Client,
    store: Store,
    machine: MachineId,
    config: EngineConfig,
    clock: Arc<dyn Clock>,
    budget: Resources,
    registry: Arc<Registry>,
    /// The scheduler's inbox.
    inbox: Arc<Inbox>,
    flags: Arc<NodeFlags>,
    metrics: EngineMetrics,
    /// Background loops and the scheduler's jobs (claim, poll, bid, release, IAmBored).
    tracker: TaskTracker,
    /// Task attempts.
    runs: TaskTracker,
    /// Stops the scheduler.
    stop: CancellationToken,
    /// Stops heartbeat and reaper.
    stop_liveness: CancellationToken,
    /// Fired on a fatal error (fenced).
    fatal: CancellationToken,
    /// Fired when the engine has fully stopped.
    done: CancellationToken,
    cause: Mutex<Option<StopCause>>,
    shutting_down: AtomicBool,
    /// Set just before this node deletes its own machine row at shutdown: a claim still in
    /// flight then fails on the owner foreign key, which is not a fence.
    unregistered: AtomicBool,
    counts: watch::Receiver<RunningCounts>,
    /// Whether notifications flow (the listener sets it), for the operator's health view.
    pace: Arc<PollPace>,
}

impl Supervisor for Shared {
    fn fail(&self, err: Error) {
        Shared::fail(self, err);
    }

    fn restart(self: Arc<Self>) {
        // Not on the tracker: the restart sequence closes and awaits the tracker, so a task
        // on it would wait for itself. It ends with the engine (`done`), which `Engine::wait`
        // awaits.
        tokio::spawn(async move { self.stop_with(StopCause::RestartRequested).await });
    }
}

impl Shared {
    /// Drains and stops. `Shutdown` gives ordinary tasks the grace period, then cancels them;
    /// `RestartRequested` waits for every task to finish (an operator asked for a drain).
    async fn stop_with(&self, cause: StopCause) {
        let s = self;
        if s.shutting_down.swap(true, Ordering::AcqRel) || s.fatal.is_cancelled() {
            s.done.cancelled().await;
            return;
        }
        s.flags.draining.store(true, Ordering::Release);
        s.inbox.send(Event::Drain).await;
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
            s.inbox
                .send(Event::StopRunning {
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
    fn fail(&self, err: Error) {
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
        let singletons: Vec<String> = types
            .iter()
            .filter(|t| t.is_singleton())
            .map(|t| t.name.to_string())
            .collect();
        let follows_from: Vec<String> = types
            .iter()
            .flat_map(|t| t.details.follows.iter().map(|f| f.from.clone()))
            .collect();
        let inbox_types = types
            .iter()
            .map(|t| InboxType {
                bored: t.details.iambored.is_some(),
                added: t.metrics.added.clone(),
            })
            .collect();
        let registry = Arc::new(Registry::new(types));
        let (events_tx, events_rx) = mpsc::channel(EVENTS_MAX);
        let inbox = Arc::new(Inbox::new(
            events_tx,
            registry.index.clone(),
            inbox_types,
            metrics.clone(),
        ));
        let (record_tx, record_rx) = mpsc::channel(RECORD_QUEUE_MAX);
        let (counts_tx, counts_rx) = watch::channel(RunningCounts::default());
        let client = Client::of_node(
            self.db.clone(),
            Arc::clone(&self.clock),
            machine,
            self.config.notify,
            Arc::clone(&inbox),
        );
        let follow_wake = FollowWake::new(follows_from);
        let pace = Arc::new(PollPace::new(
            self.config.poll_interval,
            self.config.poll_interval_unhealthy,
        ));
        let wake_heartbeat = Arc::new(Notify::new());
        let config = self.config;
        let shared = Arc::new(Shared {
            client: client.clone(),
            db: self.db.clone(),
            store: store.clone(),
            machine,
            config: config.clone(),
            clock: Arc::clone(&self.clock),
            budget,
            registry: Arc::clone(&registry),
            inbox: Arc::clone(&inbox),
            flags: Arc::clone(&flags),
            metrics: metrics.clone(),
            pace: Arc::clone(&pace),
            tracker: TaskTracker::new(),
            runs: TaskTracker::new(),
            stop: CancellationToken::new(),
            stop_liveness: CancellationToken::new(),
            fatal: CancellationToken::new(),
            done: CancellationToken::new(),
            cause: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
            counts: counts_rx,
        });
        let supervisor: Arc<dyn Supervisor> = Arc::clone(&shared) as Arc<dyn Supervisor>;
        let tracker = &shared.tracker;
        let run_env = Arc::new(RunEnv {
            registry: Arc::clone(&registry),
            inbox: Arc::clone(&inbox),
            recorder: record_tx,
            db: self.db.clone(),
            clock: Arc::clone(&self.clock),
            machine,
        });
        let scheduler = Scheduler::new(
            Arc::new(SchedulerEnv {
                db: self.db.clone(),
                store: store.clone(),
                machine,
                host_and_port: config.host_and_port.clone(),
                clock: Arc::clone(&self.clock),
                budget,
                registry: Arc::clone(&registry),
                inbox: Arc::clone(&inbox),
                pace: Arc::clone(&pace),
                flags: Arc::clone(&flags),
                metrics: metrics.clone(),
                client: client.clone(),
                supervisor: Arc::clone(&supervisor),
                view_max_per_type: config.view_max_per_type,
                preempt_bid_window: config.preempt_bid_window,
                jobs: shared.tracker.clone(),
                runs: shared.runs.clone(),
                fatal: shared.fatal.clone(),
            }),
            run_env,
            events_rx,
            counts_tx,
            SchedConfig::from_engine(&config),
            downstream,
        );
        tracker.spawn(scheduler.run(shared.stop.clone()));
        tracker.spawn(
            Recorder {
                rx: record_rx,
                store: store.clone(),
                clock: Arc::clone(&self.clock),
                machine,
                host_and_port: config.host_and_port.clone(),
                notify: config.notify,
                batch_max: config.record_batch_max,
                cluster_limited,
                singletons,
                fatal: shared.fatal.clone(),
                followers: follow_wake.clone(),
                registry: Arc::clone(&registry),
                inbox: Arc::clone(&inbox),
            }
            .run(shared.stop.clone()),
        );
        tracker.spawn(
            Heartbeat {
                store: store.clone(),
                machine,
                interval: config.heartbeat_interval,
                wake: Arc::clone(&wake_heartbeat),
                flags: Arc::clone(&flags),
                inbox: Arc::clone(&inbox),
                supervisor: Arc::clone(&supervisor),
                counts: shared.counts.clone(),
            }
            .run(shared.stop_liveness.clone()),
        );
        tracker.spawn(
            Reaper {
                store: store.clone(),
                machine,
                interval: config.reaper_interval,
                dead_after: config.dead_after,
                notify: config.notify,
                metrics: metrics.clone(),
                inbox: Arc::clone(&inbox),
            }
            .run(shared.stop_liveness.clone()),
        );
        if config.notify {
            tracker.spawn(
                Listener {
                    db: self.db.clone(),
                    machine,
                    inbox: Arc::clone(&inbox),
                    pace: Arc::clone(&pace),
                    change_check_interval: config.change_check_interval,
                    wake_heartbeat,
                    followers: follow_wake.clone(),
                }
                .run(shared.stop_liveness.clone()),
            );
        }
        tracker.spawn(
            BlockedReporter {
                store: store.clone(),
                machine,
                inbox: Arc::clone(&inbox),
                clock: Arc::clone(&self.clock),
                metrics: metrics.clone(),
            }
            .run(shared.stop_liveness.clone()),
        );
        tracker.spawn(
            crate::retention::Pruner {
                store: store.clone(),
                clock: Arc::clone(&self.clock),
                rule: crate::retention::PruneRule {
                    older_than: config.history_keep,
                    keep_per_type: config.history_keep_per_type,
                    name: None,
                },
                holder: format!("machine {} ({})", machine, config.host_and_port),
                interval: config.prune_interval,
                batch_max: config.prune_batch_max,
            }
            .run(shared.stop_liveness.clone()),
        );
        tracker.spawn(
            Followers {
                db: self.db,
                registry: Arc::clone(&registry),
                clock: self.clock,
                machine,
                notify: config.notify,
                pace,
                wake: follow_wake,
                client: client.clone(),
            }
            .run(shared.stop_liveness.clone()),
        );
        for entry in &registry.types {
            entry
                .task
                .adder(TaskAdder::new(client.clone(), entry.name.to_string()));
        }
        Ok(Engine { shared })
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

    /// The settings of every type this node registers, in registration order.
    pub fn type_settings(&self) -> Vec<crate::status::TypeSettings> {
        self.shared
            .registry
            .types
            .iter()
            .map(|t| {
                let d = &t.details;
                crate::status::TypeSettings {
                    name: t.name.to_string(),
                    cost: d.cost,
                    max: d.max.as_ref().map(|l| l.max()).filter(|&m| m > 0),
                    max_cluster: d.max_cluster,
                    max_failures: d.max_failures,
                    retry_wait: format!("{:?}", d.retry_wait),
                    timeout_ms: d
                        .timeout
                        .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                    singleton: t.is_singleton(),
                    time_sensitive: d.time_sensitive,
                }
            })
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
        Ok(added.map(|c| c.id))
    }

    /// Adds a task with arguments (stored in `harmony_task_args`).
    pub async fn add_task_with_args(
        &self,
        name: &str,
        args: &[(String, String)],
    ) -> Result<Option<TaskId>> {
        self.shared.client.add_task_with_args(name, args).await
    }

    /// Adds `count` tasks of one type in one transaction (one insert statement); `extra` gets
    /// all new ids. Returns them (empty when `extra` rolled back).
    pub async fn add_tasks<F, Fut>(&self, name: &str, count: usize, extra: F) -> Result<Vec<TaskId>>
    where
        F: Fn(Vec<TaskId>, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        let added = self.shared.client.add_many(name, count, extra).await?;
        Ok(added.iter().map(|c| c.id).collect())
    }

    /// Re-queues a permanently failed task with its original id and posted time.
    pub async fn restart_task(&self, id: TaskId) -> Result<()> {
        self.shared.client.restart_task(id).await
    }

    /// Asks a singleton type to run now (see [`Client::run_now`]); this node acts on it at
    /// once when it runs the type, whatever the backend.
    pub async fn run_now(&self, name: &str) -> Result<()> {
        self.shared.client.run_now(name).await
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
        self.shared.inbox.request_poll();
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

    /// Whether wake-up notifications flow now (the listener is connected, or the SQLite change
    /// check runs); false while the node falls back to its fast safety-net poll, and always
    /// false with notifications turned off.
    pub fn notifications_healthy(&self) -> bool {
        self.shared.pace.is_healthy()
    }
}
