//! The scheduler: one actor per node that owns the view of waiting work and every decision to
//! start a task.
//!
//! The decisions live in [`state::SchedulerState`], which does no I/O: it takes an event and
//! the time and returns actions. This module is its driver, the actor: it receives events on a
//! bounded channel, feeds them to the state, and performs the actions — claim and poll jobs,
//! attempts, IAmBored calls, preemption bids — on the engine's trackers, each reporting its
//! result back as an event.
//!
//! **How it wakes up.** On events from its bounded channel — a local add, a finished attempt
//! (resources freed), a released task, a claim or poll result, a status request, a drain —
//! on a nudge (missed events, flag changes), on the poll timer (the safety net, default 30 s),
//! and on the earliest moment a task leaves its retry wait. Every burst of events that is
//! already queued is handled before one scheduling pass ([`state::Event::Tick`]) runs, so
//! bursts are coalesced without adding delay.
//!
//! **What it never does.** It never awaits the database or task code: every job runs on its
//! own tokio task and reports back.

pub(crate) mod admission;
pub(crate) mod inbox;
pub mod state;
pub(crate) mod view;

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use harmonydb::{Db, ErrorKind, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::inbox::{Inbox, Msg};
use crate::backoff::Backoff;
use crate::client::{Client, TaskAdder};
use crate::clock::Clock;
use crate::error::Error;
use crate::lifecycle::Supervisor;
use crate::metrics::EngineMetrics;
use crate::model::{Candidate, ClaimOutcome, StorageNeed};
use crate::notify::PollPace;
use crate::ownership::NodeFlags;
use crate::registry::Registry;
use crate::resources::Resources;
use crate::runner::{RunEnv, RunHandle, run_one};
use crate::status::EngineStatus;
use crate::store::prelude::*;
use crate::store::{Reserved, Store, TaskClaim};
use crate::task::{EngineView, MachineId, TaskId, TypeDetails};

pub use self::state::{
    Action, ClaimResult, Event, Now, PollResult, PreemptResult, RunningCounts, SchedConfig,
    SchedulerState, StopReason, TypeSpec,
};

impl TypeSpec {
    /// The scheduler's part of a type's declaration. (Built here, in the driver, so that the
    /// sans-IO state depends on value types only, never on the programming model.)
    pub fn from_details(d: &TypeDetails) -> Self {
        TypeSpec {
            name: Arc::from(d.name.as_str()),
            cost: d.cost.amounts(),
            cost_resources: d.cost,
            limiter: d.max.as_ref().map(|l| (l.key(), l.max())),
            max_cluster: d.max_cluster,
            time_sensitive: d.time_sensitive,
            uninterruptible: d.uninterruptible,
            can_yield: d.can_yield,
            scheduling_overrides: d.scheduling_overrides.clone(),
            retry_wait: d.retry_wait.clone(),
            bored: d.iambored.is_some(),
        }
    }
}

/// What the scheduler and its jobs use: nothing else of the engine.
pub(crate) struct SchedulerEnv {
    pub db: Db,
    pub store: Store,
    pub machine: MachineId,
    pub host_and_port: String,
    pub clock: Arc<dyn Clock>,
    pub budget: Resources,
    pub registry: Arc<Registry>,
    pub inbox: Arc<Inbox>,
    pub pace: Arc<PollPace>,
    pub flags: Arc<NodeFlags>,
    pub metrics: EngineMetrics,
    /// The node's client, for the adders handed to IAmBored callbacks.
    pub client: Client,
    pub supervisor: Arc<dyn Supervisor>,
    /// Most waiting tasks a poll reads per type.
    pub view_max_per_type: usize,
    /// How long a preemption bid waits for cheaper bids.
    pub preempt_bid_window: Duration,
    /// Claim, poll, preemption, release and IAmBored jobs.
    pub jobs: TaskTracker,
    /// Task attempts.
    pub runs: TaskTracker,
    /// Fired on a fatal error: running attempts are stopped as fenced.
    pub fatal: CancellationToken,
}

pub(crate) struct Scheduler {
    shared: Arc<SchedulerEnv>,
    run_env: Arc<RunEnv>,
    rx: mpsc::Receiver<Msg>,
    counts: watch::Sender<RunningCounts>,
    state: SchedulerState,
    handles: HashMap<TaskId, RunHandle>,
    /// Arguments a claim returned, until the task starts (or is given back).
    claimed_args: HashMap<TaskId, HashMap<String, String>>,
    actions: Vec<Action>,
}

impl Scheduler {
    pub(crate) fn new(
        shared: Arc<SchedulerEnv>,
        run_env: Arc<RunEnv>,
        rx: mpsc::Receiver<Msg>,
        counts: watch::Sender<RunningCounts>,
        config: SchedConfig,
        downstream: HashMap<String, Vec<String>>,
    ) -> Self {
        let specs = shared
            .registry
            .types
            .iter()
            .map(|t| TypeSpec::from_details(&t.details))
            .collect();
        let state = SchedulerState::new(
            specs,
            shared.budget,
            config,
            downstream,
            fastrand::u64(..),
            now(&shared),
        );
        Scheduler {
            shared,
            run_env,
            rx,
            counts,
            state,
            handles: HashMap::new(),
            claimed_args: HashMap::new(),
            actions: Vec::new(),
        }
    }

    /// Runs until `shutdown` fires (the end of a graceful shutdown, or a fatal error) or every
    /// sender is gone.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let shared = Arc::clone(&self.shared);
        let mut poll_all = false;
        loop {
            self.step(Event::Tick {
                poll_interval: shared.pace.interval(),
                poll_all: std::mem::take(&mut poll_all),
            });
            self.publish_counts();
            let wake = self.state.next_wake(now(&shared));
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.receive(msg);
                    while let Ok(msg) = self.rx.try_recv() {
                        self.receive(msg);
                    }
                }
                requested = shared.inbox.nudged() => poll_all = requested,
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        // Stopped: on a fatal error every attempt must end now, its outcome is discarded.
        if shared.fatal.is_cancelled() {
            for h in self.handles.values() {
                h.stop(StopReason::Fenced);
            }
        }
    }

    fn receive(&mut self, msg: Msg) {
        match msg {
            Msg::Event(ev) => self.step(ev),
            Msg::Status(reply) => {
                let s = &self.shared;
                let (types, running) = self.state.status(now(s));
                let _ = reply.send(EngineStatus {
                    machine_id: s.machine,
                    host_and_port: s.host_and_port.clone(),
                    budget: s.budget,
                    reserved: self.state.reserved().to_resources(),
                    cordoned: s.flags.cordoned(),
                    draining: self.state.draining(),
                    running,
                    types,
                });
            }
            Msg::CordonChanged => self.step(Event::Cordon(self.shared.flags.cordoned())),
        }
    }

    /// Feeds one event to the state and performs what it decided.
    fn step(&mut self, mut ev: Event) {
        if let Event::Finished { ty, id } = &ev
            && self.handles.remove(id).is_some()
        {
            self.shared.registry.types[*ty].metrics.running.dec();
        }
        // The state decides on tasks, not their arguments: keep them for the start.
        if let Event::Claimed(ClaimResult {
            outcome: Ok(outcome),
            ..
        }) = &mut ev
            && let Some(mut args) = outcome.args.take()
        {
            // Only for what the claim kept (a task given back at once, with no storage room,
            // never starts).
            for c in &outcome.claimed {
                if let Some(a) = args.remove(&c.id) {
                    self.claimed_args.insert(c.id, a);
                }
            }
        }
        let mut actions = std::mem::take(&mut self.actions);
        self.state.handle_into(ev, now(&self.shared), &mut actions);
        for a in actions.drain(..) {
            self.perform(a);
        }
        self.actions = actions;
    }

    fn publish_counts(&self) {
        let counts = self.state.counts();
        self.counts.send_if_modified(|c| {
            let changed = *c != counts;
            *c = counts;
            changed
        });
    }

    fn perform(&mut self, action: Action) {
        let shared = &self.shared;
        match action {
            Action::Claim {
                ty,
                offered,
                n,
                free,
            } => {
                let shared = Arc::clone(shared);
                self.shared.jobs.spawn(async move {
                    let result = claim_job(&shared, ty, offered, n, free).await;
                    shared.inbox.send(Event::Claimed(result)).await;
                });
            }
            Action::Poll { epoch, types } => {
                let shared = Arc::clone(shared);
                self.shared.jobs.spawn(poll_job(shared, epoch, types));
            }
            Action::Start { ty, task, stop } => {
                let handle = RunHandle::new(ty);
                self.handles.insert(task.id, handle.clone());
                shared.registry.types[ty].metrics.running.inc();
                let args = self.claimed_args.remove(&task.id);
                shared.runs.spawn(run_one(
                    Arc::clone(&self.run_env),
                    ty,
                    task,
                    args,
                    handle.clone(),
                ));
                if let Some(reason) = stop {
                    handle.stop(reason);
                }
            }
            Action::Stop { id, reason } => {
                if let Some(h) = self.handles.get(&id) {
                    if reason == StopReason::Preempted {
                        shared.registry.types[h.ty].metrics.preempted.inc();
                    }
                    h.stop(reason);
                }
            }
            Action::Bored { ty, run_now } => self.call_bored(ty, run_now),
            Action::Preempt {
                ty,
                task,
                cost_ms,
                free,
            } => {
                let shared = Arc::clone(shared);
                self.shared.jobs.spawn(async move {
                    let outcome = preempt_job(&shared, ty, task, cost_ms, free).await;
                    shared
                        .inbox
                        .send(Event::Preempted(PreemptResult { ty, outcome }))
                        .await;
                });
            }
            Action::Release { task, update_time } => {
                self.claimed_args.remove(&task);
                let shared = Arc::clone(shared);
                self.shared.jobs.spawn(async move {
                    let at = update_time.unwrap_or_else(|| shared.clock.now());
                    if let Err(e) = shared.store.task_release(task, shared.machine, at).await {
                        tracing::warn!(task = %task, error = %e, "could not give back a claimed task; it is released when this node stops");
                    }
                });
            }
            Action::Fenced => shared.supervisor.fail(Error::Fenced(shared.machine.0)),
        }
    }

    fn call_bored(&self, ty: usize, run_now: bool) {
        let Some(bored) = self.shared.registry.types[ty].details.iambored.clone() else {
            return;
        };
        let shared = Arc::clone(&self.shared);
        let adder = TaskAdder::new(
            shared.client.clone(),
            shared.registry.types[ty].name.to_string(),
        );
        self.shared.jobs.spawn(async move {
            let ctx = crate::singleton::BoredContext { adder, run_now };
            let name = Arc::clone(&shared.registry.types[ty].name);
            match AssertUnwindSafe((bored.call)(ctx)).catch_unwind().await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(task_type = %name, error = %e, "IAmBored failed"),
                Err(_) => tracing::warn!(task_type = %name, "IAmBored panicked"),
            }
            shared.inbox.send(Event::BoredDone { ty }).await;
        });
    }
}

/// The time now, as the state takes it.
fn now(shared: &SchedulerEnv) -> Now {
    Now {
        mono: Instant::now(),
        wall: shared.clock.now(),
    }
}

async fn poll_job(shared: Arc<SchedulerEnv>, epoch: u64, types: Vec<usize>) {
    shared.metrics.poll();
    let limit = shared.view_max_per_type;
    let polls = types.iter().map(|&ty| {
        let shared = &shared;
        async move {
            (
                ty,
                shared
                    .store
                    .task_poll(&shared.registry.types[ty].name, limit)
                    .await,
            )
        }
    });
    let polled = futures_util::future::join_all(polls).await;
    shared
        .inbox
        .send(Event::Polled(PollResult { epoch, polled }))
        .await;
    // Run-now requests are also found by polling (SQLite has no notifications).
    if shared
        .registry
        .types
        .iter()
        .any(|t| t.details.iambored.is_some())
    {
        match shared.store.singleton_requests().await {
            Ok(names) => {
                for name in names {
                    shared.inbox.run_now(&name);
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading run-now requests failed"),
        }
    }
}

async fn claim_job(
    shared: &SchedulerEnv,
    ty: usize,
    offered: Vec<TaskId>,
    n: usize,
    free: Resources,
) -> ClaimResult {
    let entry = &shared.registry.types[ty];
    let view = EngineView {
        machine: shared.machine,
        db: shared.db.clone(),
        free,
    };
    let accepted = match AssertUnwindSafe(entry.task.can_accept(&offered, &view))
        .catch_unwind()
        .await
    {
        Ok(Ok(ids)) => {
            // Only offered ids, each once, in the order given.
            let offered_set: HashSet<TaskId> = offered.iter().copied().collect();
            let mut seen = HashSet::with_capacity(ids.len());
            ids.into_iter()
                .filter(|id| offered_set.contains(id) && seen.insert(*id))
                .collect()
        }
        Ok(Err(e)) => {
            tracing::warn!(task_type = %entry.name, error = %e, "can_accept failed; treating as refusal");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(task_type = %entry.name, "can_accept panicked; treating as refusal");
            Vec::new()
        }
    };
    let need = entry.details.storage;
    let (accepted, no_storage) = match need {
        Some(need) if !accepted.is_empty() => {
            match storage_room(&shared.store, &shared.host_and_port, need, accepted).await {
                Ok(r) => r,
                Err((accepted, e)) => {
                    return ClaimResult {
                        ty,
                        reserved: n,
                        offered,
                        accepted,
                        outcome: Err(e),
                        no_storage: None,
                    };
                }
            }
        }
        _ => (accepted, None),
    };
    let outcome = if accepted.is_empty() {
        Ok(ClaimOutcome::default())
    } else {
        shared.metrics.claim();
        let claimed = shared
            .store
            .task_claim(&TaskClaim {
                name: &entry.name,
                ids: &accepted,
                limit: n,
                owner: shared.machine,
                max_cluster: entry.details.max_cluster,
            })
            .await;
        if let Err(e) = &claimed
            && e.db_kind() != Some(ErrorKind::ForeignKey)
        {
            undo_with_backoff(shared, &entry.name, &accepted).await;
        }
        match (claimed, need) {
            (Ok(o), Some(need)) => Ok(reserve_storage(&storage_env(shared), need, o).await),
            (claimed, _) => claimed,
        }
    };
    ClaimResult {
        ty,
        reserved: n,
        offered,
        accepted,
        outcome,
        no_storage,
    }
}

/// Cuts `accepted` to as many tasks as the storage paths of the node at `host_and_port` have
/// room for; none fit: nothing is accepted, and the reason says what was needed and what the
/// best path has. The simulator calls it as the claim job does.
pub(crate) async fn storage_room(
    store: &Store,
    host_and_port: &str,
    need: StorageNeed,
    mut accepted: Vec<TaskId>,
) -> std::result::Result<(Vec<TaskId>, Option<(u64, u64)>), (Vec<TaskId>, Error)> {
    let free = match store.storage_free(host_and_port, need.kind).await {
        Ok(f) => f,
        Err(e) => return Err((accepted, e)),
    };
    let fit: u64 = free.iter().map(|f| f / need.bytes.max(1)).sum();
    if fit == 0 {
        let best = free.iter().copied().max().unwrap_or(0);
        return Ok((Vec::new(), Some((need.bytes, best))));
    }
    accepted.truncate(usize::try_from(fit).unwrap_or(usize::MAX));
    Ok((accepted, None))
}

/// What reserving storage for claimed tasks needs of the node.
pub(crate) struct StorageEnv<'a> {
    pub store: &'a Store,
    pub host_and_port: &'a str,
    pub machine: MachineId,
    pub now: Timestamp,
}

fn storage_env(shared: &SchedulerEnv) -> StorageEnv<'_> {
    StorageEnv {
        store: &shared.store,
        host_and_port: &shared.host_and_port,
        machine: shared.machine,
        now: shared.clock.now(),
    }
}

/// Reserves storage for each claimed task; one that gets none (another claim took the room
/// first) is released at once and left out of the outcome, so it never starts.
pub(crate) async fn reserve_storage(
    env: &StorageEnv<'_>,
    need: StorageNeed,
    mut outcome: ClaimOutcome,
) -> ClaimOutcome {
    let mut kept = Vec::with_capacity(outcome.claimed.len());
    for c in outcome.claimed {
        match env
            .store
            .storage_reserve(c.id, env.host_and_port, need)
            .await
        {
            Ok(Reserved::On { local_path, .. }) => {
                tracing::debug!(task = %c.id, path = %local_path, "storage reserved");
                kept.push(c);
            }
            other => {
                if let Err(e) = &other {
                    tracing::warn!(task = %c.id, error = %e, "reserving storage failed; giving the task back");
                }
                if let Err(e) = env.store.task_release(c.id, env.machine, env.now).await {
                    tracing::warn!(task = %c.id, error = %e, "could not give back a task without storage; it is released when this node stops");
                }
            }
        }
    }
    outcome.claimed = kept;
    outcome
}

/// Most tries to give back what a failed claim may have claimed.
const UNDO_TRIES_MAX: usize = 5;
/// First wait between those tries.
const UNDO_BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// Longest wait between those tries.
const UNDO_BACKOFF_MAX: Duration = Duration::from_secs(2);

async fn undo_with_backoff(shared: &SchedulerEnv, name: &str, ids: &[TaskId]) {
    let mut backoff = Backoff::new(UNDO_BACKOFF_INITIAL, UNDO_BACKOFF_MAX);
    for _ in 0..UNDO_TRIES_MAX {
        match undo_failed_claim(&shared.store, ids, shared.machine, shared.clock.now()).await {
            Ok(0) => return,
            Ok(n) => {
                tracing::info!(
                    task_type = name,
                    released = n,
                    "gave back tasks a failed claim had claimed"
                );
                return;
            }
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!(task_type = name, error = %e, retry_in = ?wait, "could not give back what a failed claim may have claimed");
                tokio::time::sleep(wait).await;
            }
        }
    }
    // Still owned, maybe: such rows are released when this node shuts down or is reaped.
}

/// Gives back (owner back to NULL, retries unchanged) those of `ids` that `owner` holds after
/// a claim of them failed: the claim may have committed with its reply lost (a connection
/// dropped after the commit), and rows this node owns without knowing would otherwise wait
/// until it shuts down. The scheduler keeps the type's claim in flight until this returns, so
/// no later claim of the same ids can be undone by it. Returns how many were given back.
pub async fn undo_failed_claim(
    store: &Store,
    ids: &[TaskId],
    owner: MachineId,
    now: Timestamp,
) -> Result<u64, Error> {
    let mut released = 0;
    for id in ids {
        if store.task_release(*id, owner, now).await? {
            released += 1;
        }
    }
    Ok(released)
}

/// Bids to preempt for `task`, waits the bid window, and claims the task if this node's bid
/// is the cheapest. `Ok(None)`: refused by `can_accept`, lost the bid, or the task is gone.
async fn preempt_job(
    shared: &SchedulerEnv,
    ty: usize,
    task: Candidate,
    cost_ms: u64,
    free: Resources,
) -> Result<Option<Candidate>, Error> {
    let entry = &shared.registry.types[ty];
    let view = EngineView {
        machine: shared.machine,
        db: shared.db.clone(),
        free,
    };
    let accepted = AssertUnwindSafe(entry.task.can_accept(&[task.id], &view))
        .catch_unwind()
        .await
        .ok()
        .and_then(Result::ok)
        .is_some_and(|ids| ids.contains(&task.id));
    if !accepted {
        return Ok(None);
    }
    let cost = i64::try_from(cost_ms).unwrap_or(i64::MAX);
    shared
        .store
        .preempt_bid(task.id, shared.machine, cost)
        .await?;
    tokio::time::sleep(shared.preempt_bid_window).await;
    if shared.store.preempt_winner(task.id).await? != Some(shared.machine) {
        return Ok(None);
    }
    let claimed = shared
        .store
        .task_claim(&TaskClaim {
            name: &entry.name,
            ids: &[task.id],
            limit: 1,
            owner: shared.machine,
            max_cluster: entry.details.max_cluster,
        })
        .await?;
    if let Err(e) = shared.store.preempt_clear(task.id).await {
        tracing::debug!(error = %e, "could not clear preemption bids");
    }
    let claimed = match entry.details.storage {
        Some(need) => reserve_storage(&storage_env(shared), need, claimed).await,
        None => claimed,
    };
    Ok(claimed.claimed.into_iter().next())
}
