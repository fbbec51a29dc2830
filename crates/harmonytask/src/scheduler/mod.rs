//! The scheduler: one actor per node that owns the view of waiting work and every decision to
//! start a task.
//!
//! **What it owns.** Per registered type: a bounded [`view::TypeView`] of the oldest waiting
//! tasks, the count running here, whether a claim is in flight, and the current blocking
//! reason. For the node: the budget, what running tasks and in-flight claims have reserved,
//! the per-limiter counts, and the handles of running attempts.
//!
//! **How it wakes up.** On events from its bounded channel — a local add, a finished attempt
//! (resources freed), a released task, a claim or poll result, a status request, a drain —
//! on a nudge (missed events, flag changes), on the poll timer (the safety net, default 30 s),
//! and on the earliest moment a task leaves its retry wait. Every burst of events that is
//! already queued is handled before one scheduling pass runs, so bursts are coalesced without
//! adding delay.
//!
//! **What it never does.** It never awaits the database or task code. A decision reserves the
//! resources and limiter slots first, then a claim job runs `can_accept` and the claim
//! statement on its own tokio task and reports back; unclaimed reservations are returned.
//! Invariant: reserved ≤ budget, checked after every change.

pub(crate) mod admission;
pub(crate) mod view;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use harmonydb::{ErrorKind, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::engine::{Event, RunningCounts, Shared};
use crate::error::Error;
use crate::resources::{Amounts, Resources};
use crate::runner::{RunHandle, StopReason, run_one};
use crate::status::{EngineStatus, RunningTask, TypeStatus};
use crate::store::{Candidate, ClaimOutcome, TaskClaim};
use crate::task::{EngineView, TaskId};

use self::admission::{AdmitInput, Blocked, admit, pass_order};
use self::view::TypeView;

/// Result of a claim job.
pub(crate) struct ClaimResult {
    ty: usize,
    reserved: usize,
    offered: Vec<TaskId>,
    accepted: Vec<TaskId>,
    outcome: Result<ClaimOutcome, Error>,
}

/// Result of a poll job.
pub(crate) struct PollResult {
    epoch: u64,
    polled: Vec<(usize, Result<Vec<Candidate>, Error>)>,
}

struct TypeSched {
    view: TypeView,
    running: usize,
    claim_in_flight: bool,
    blocked: Option<Blocked>,
    /// Do not offer again before this (after a refusal or a full cluster), unless new work
    /// arrives.
    hold_until: Option<Instant>,
    next_eligible: Option<Timestamp>,
    never_fits_reported: bool,
}

pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Event>,
    counts: watch::Sender<RunningCounts>,
    types: Vec<TypeSched>,
    budget: Amounts,
    reserved: Amounts,
    limiter_used: HashMap<usize, usize>,
    running: HashMap<TaskId, RunHandle>,
    /// Claimed since the poll in flight started: a poll result may still list them.
    claimed_during_poll: HashSet<TaskId>,
    /// Incremented when a poll starts; view entries remember the epoch they were learned in.
    epoch: u64,
    poll_in_flight: bool,
    poll_wanted: BTreeSet<usize>,
    next_poll_at: Instant,
    draining: bool,
    downstream: HashMap<String, Vec<String>>,
}

impl Scheduler {
    pub(crate) fn new(
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Event>,
        counts: watch::Sender<RunningCounts>,
        downstream: HashMap<String, Vec<String>>,
    ) -> Self {
        let view_max = shared.config.view_max_per_type;
        let types = (0..shared.types.len())
            .map(|_| TypeSched {
                view: TypeView::new(view_max),
                running: 0,
                claim_in_flight: false,
                blocked: None,
                hold_until: None,
                next_eligible: None,
                never_fits_reported: false,
            })
            .collect();
        let budget = shared.budget.amounts();
        Scheduler {
            poll_wanted: (0..shared.types.len()).collect(),
            next_poll_at: Instant::now() + shared.config.poll_interval,
            shared,
            rx,
            counts,
            types,
            budget,
            reserved: Amounts::default(),
            limiter_used: HashMap::new(),
            running: HashMap::new(),
            claimed_during_poll: HashSet::new(),
            epoch: 0,
            poll_in_flight: false,
            draining: false,
            downstream,
        }
    }

    pub(crate) async fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        loop {
            self.pass();
            self.start_poll();
            let wake = self.next_wake();
            tokio::select! {
                biased;
                () = shared.stop.cancelled() => break,
                ev = self.rx.recv() => {
                    let Some(ev) = ev else { break };
                    self.handle(ev);
                    while let Ok(ev) = self.rx.try_recv() {
                        self.handle(ev);
                    }
                }
                () = shared.nudged.notified() => {
                    if shared.take_poll_request() {
                        self.poll_wanted.extend(0..self.types.len());
                    }
                }
                () = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= self.next_poll_at {
                self.poll_wanted.extend(0..self.types.len());
                self.next_poll_at = Instant::now() + shared.config.poll_interval;
            }
        }
        // Stopped: on a fatal error every attempt must end now, its outcome is discarded.
        if shared.fatal.is_cancelled() {
            for h in self.running.values() {
                h.stop(StopReason::Fenced);
            }
        }
    }

    fn next_wake(&self) -> Instant {
        let now_ts = self.shared.clock.now();
        let now = Instant::now();
        let mut wake = self.next_poll_at;
        for t in &self.types {
            if let Some(h) = t.hold_until {
                wake = wake.min(h);
            }
            if let Some(at) = t.next_eligible {
                wake = wake.min(now + view::until(now_ts, at));
            }
        }
        wake.max(now)
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Added { ty, tasks } => {
                let t = &mut self.types[ty];
                t.hold_until = None;
                for c in tasks {
                    if !self.running.contains_key(&c.id) {
                        t.view.insert(c, self.epoch);
                    }
                }
            }
            Event::Released { ty, task } => {
                let t = &mut self.types[ty];
                t.hold_until = None;
                self.claimed_during_poll.remove(&task.id);
                t.view.insert(task, self.epoch);
            }
            Event::Finished { ty, id } => self.finished(ty, id),
            Event::Claimed(r) => self.claimed(r),
            Event::Polled(p) => self.polled(p),
            Event::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Event::Drain => self.draining = true,
            Event::StopRunning {
                reason,
                include_protected,
            } => {
                for h in self.running.values() {
                    let protected = self.shared.types[h.ty].protected();
                    if include_protected || !protected {
                        h.stop(reason);
                    }
                }
            }
        }
    }

    fn limiter_key(&self, ty: usize) -> Option<(usize, usize)> {
        self.shared.types[ty]
            .details
            .max
            .as_ref()
            .map(|l| (l.key(), l.max()))
    }

    fn reserve(&mut self, ty: usize, n: usize) {
        let cost = self.shared.types[ty].cost;
        self.reserved = self.reserved.plus(&cost.times(n as u64));
        assert!(
            self.reserved.fits_in(&self.budget),
            "reserved {:?} exceeds budget {:?}",
            self.reserved,
            self.budget
        );
        if let Some((key, _)) = self.limiter_key(ty) {
            *self.limiter_used.entry(key).or_default() += n;
        }
    }

    fn unreserve(&mut self, ty: usize, n: usize) {
        if n == 0 {
            return;
        }
        let cost = self.shared.types[ty].cost;
        self.reserved = self.reserved.minus(&cost.times(n as u64));
        if let Some((key, _)) = self.limiter_key(ty) {
            let used = self.limiter_used.entry(key).or_default();
            *used = used.saturating_sub(n);
        }
    }

    fn finished(&mut self, ty: usize, id: TaskId) {
        if self.running.remove(&id).is_none() {
            return;
        }
        self.types[ty].running -= 1;
        self.shared.types[ty].metrics.running.dec();
        self.unreserve(ty, 1);
        self.publish_counts();
    }

    fn publish_counts(&self) {
        let protected = self
            .running
            .values()
            .filter(|h| self.shared.types[h.ty].protected())
            .count();
        self.counts.send_replace(RunningCounts {
            total: self.running.len(),
            protected,
        });
    }

    fn claimed(&mut self, r: ClaimResult) {
        let ty = r.ty;
        self.types[ty].claim_in_flight = false;
        let outcome = match r.outcome {
            Ok(o) => o,
            Err(e) => {
                self.unreserve(ty, r.reserved);
                if e.db_kind() == Some(ErrorKind::ForeignKey) {
                    // Our machine row is gone: this node was declared dead.
                    self.shared.fail(Error::Fenced(self.shared.machine.0));
                    return;
                }
                tracing::warn!(task_type = %self.shared.types[ty].name, error = %e, "claim failed; will retry");
                self.types[ty].hold_until =
                    Some(Instant::now() + self.shared.config.refused_retry_interval);
                self.poll_wanted.insert(ty);
                return;
            }
        };
        let claimed_n = outcome.claimed.len();
        if self.poll_in_flight {
            self.claimed_during_poll
                .extend(outcome.claimed.iter().map(|c| c.id));
        }
        tracing::debug!(
            ty,
            reserved = r.reserved,
            offered = r.offered.len(),
            accepted = r.accepted.len(),
            claimed = claimed_n,
            "claim result"
        );
        self.unreserve(ty, r.reserved.saturating_sub(claimed_n));
        let hold = Instant::now() + self.shared.config.refused_retry_interval;
        {
            let t = &mut self.types[ty];
            for c in &outcome.claimed {
                t.view.remove(c.id);
            }
            if r.accepted.is_empty() {
                t.blocked = Some(Blocked::Refused);
                t.hold_until = Some(hold);
            } else if outcome.cluster_full && claimed_n < r.reserved {
                t.blocked = Some(Blocked::ClusterLimit {
                    max: self.shared.types[ty].details.max_cluster,
                });
                t.hold_until = Some(hold);
            } else if claimed_n < r.reserved.min(r.accepted.len()) {
                // Lost races: what we accepted but did not get is owned by others (or locked
                // by their claim). Drop it from the view and look again.
                let got: HashSet<TaskId> = outcome.claimed.iter().map(|c| c.id).collect();
                for id in r.accepted.iter().filter(|id| !got.contains(id)) {
                    t.view.remove(*id);
                }
                self.poll_wanted.insert(ty);
                t.blocked = None;
            } else {
                t.blocked = None;
            }
        }
        if self.draining {
            // Claimed just as the node started draining: do not start them; shutdown releases
            // every row this machine still owns.
            self.unreserve(ty, claimed_n);
            return;
        }
        for c in outcome.claimed {
            self.start(ty, c);
        }
        self.publish_counts();
    }

    fn start(&mut self, ty: usize, c: Candidate) {
        let handle = RunHandle::new(ty);
        self.running.insert(c.id, handle.clone());
        self.types[ty].running += 1;
        self.shared.types[ty].metrics.running.inc();
        let shared = Arc::clone(&self.shared);
        self.shared.runs.spawn(run_one(shared, ty, c, handle));
    }

    fn polled(&mut self, p: PollResult) {
        tracing::debug!(types = p.polled.len(), "poll result");
        self.poll_in_flight = false;
        let limit = self.shared.config.view_max_per_type;
        let claimed = std::mem::take(&mut self.claimed_during_poll);
        for (ty, result) in p.polled {
            match result {
                Ok(rows) => {
                    let complete = rows.len() < limit;
                    let running = &self.running;
                    self.types[ty]
                        .view
                        .merge_poll(p.epoch, rows, complete, |id| {
                            running.contains_key(&id) || claimed.contains(&id)
                        });
                }
                Err(e) => {
                    tracing::warn!(task_type = %self.shared.types[ty].name, error = %e, "poll failed");
                }
            }
        }
    }

    fn start_poll(&mut self) {
        if self.poll_in_flight || self.poll_wanted.is_empty() || self.draining {
            return;
        }
        self.poll_in_flight = true;
        self.epoch += 1;
        self.claimed_during_poll.clear();
        let epoch = self.epoch;
        let types: Vec<usize> = std::mem::take(&mut self.poll_wanted).into_iter().collect();
        let shared = Arc::clone(&self.shared);
        self.shared.tracker.spawn(async move {
            shared.metrics.poll();
            let limit = shared.config.view_max_per_type;
            let polls = types.iter().map(|&ty| {
                let shared = &shared;
                async move {
                    (
                        ty,
                        shared.store.task_poll(&shared.types[ty].name, limit).await,
                    )
                }
            });
            let polled = futures_util::future::join_all(polls).await;
            shared
                .send(Event::Polled(PollResult { epoch, polled }))
                .await;
        });
    }

    /// One scheduling pass over every type, in DESIGN §6.3 order.
    fn pass(&mut self) {
        let shared = Arc::clone(&self.shared);
        let now_ts = shared.clock.now();
        let now = Instant::now();
        let cordoned = shared.flags.cordoned();
        let names: Vec<&str> = shared.types.iter().map(|t| &*t.name).collect();
        let time_sensitive: Vec<bool> = shared
            .types
            .iter()
            .map(|t| t.details.time_sensitive)
            .collect();
        let oldest: Vec<Option<Timestamp>> = self.types.iter().map(|t| t.view.oldest()).collect();
        let order = pass_order(&names, &time_sensitive, &oldest, &self.downstream);
        let waiting: HashSet<&str> = names
            .iter()
            .zip(&self.types)
            .filter(|(_, t)| !t.view.is_empty())
            .map(|(n, _)| *n)
            .collect();
        let batch_max = shared.config.claim_batch_max;
        for ty in order {
            let entry = &shared.types[ty];
            let t = &mut self.types[ty];
            if t.view.len() < batch_max && t.view.maybe_more && !t.claim_in_flight {
                self.poll_wanted.insert(ty);
            }
            if t.view.is_empty() {
                if !t.claim_in_flight {
                    t.blocked = None;
                }
                t.next_eligible = None;
                continue;
            }
            if self.draining {
                t.blocked = Some(Blocked::Draining);
                continue;
            }
            if t.claim_in_flight {
                continue;
            }
            if t.hold_until.is_some_and(|h| h > now) {
                continue;
            }
            t.hold_until = None;
            let (eligible, next) = t
                .view
                .eligible(now_ts, &entry.details.retry_wait, usize::MAX);
            t.next_eligible = next;
            if eligible.is_empty() {
                t.blocked = next.map(|until| Blocked::RetryWait { until });
                continue;
            }
            let (limiter_max, limiter_used) = match &entry.details.max {
                Some(l) => (
                    l.max(),
                    self.limiter_used.get(&l.key()).copied().unwrap_or(0),
                ),
                None => (0, 0),
            };
            let input = AdmitInput {
                cordoned,
                override_applies: entry
                    .details
                    .scheduling_overrides
                    .iter()
                    .any(|o| waiting.contains(o.as_str())),
                limiter_max,
                limiter_used,
                cost: entry.cost,
                free: self.budget.minus(&self.reserved),
                budget: self.budget,
                eligible: eligible.len(),
                claim_batch_max: batch_max,
            };
            match admit(&input) {
                Err(b) => {
                    if let Blocked::NeverFits { .. } = &b
                        && !t.never_fits_reported
                    {
                        t.never_fits_reported = true;
                        tracing::warn!(task_type = %entry.name, reason = %b, "task type can never run on this node");
                    }
                    t.blocked = Some(b);
                }
                Ok(0) => {}
                Ok(n) => {
                    t.blocked = None;
                    t.claim_in_flight = true;
                    let free = self.budget.minus(&self.reserved).to_resources();
                    self.reserve(ty, n);
                    tracing::debug!(ty, n, offered = eligible.len(), "claiming");
                    self.spawn_claim(ty, eligible, n, free);
                }
            }
        }
    }

    fn spawn_claim(&self, ty: usize, offered: Vec<TaskId>, n: usize, free: Resources) {
        let shared = Arc::clone(&self.shared);
        self.shared.tracker.spawn(async move {
            let result = claim_job(&shared, ty, offered, n, free).await;
            shared.send(Event::Claimed(result)).await;
        });
    }

    fn status(&self) -> EngineStatus {
        let s = &self.shared;
        let types = s
            .types
            .iter()
            .zip(&self.types)
            .map(|(e, t)| TypeStatus {
                name: e.name.to_string(),
                waiting_known: t.view.len(),
                more_waiting: t.view.maybe_more,
                running: t.running,
                blocked: t.blocked.clone(),
                blocked_text: t.blocked.as_ref().map(ToString::to_string),
                cost: e.details.cost,
            })
            .collect();
        let mut running: Vec<RunningTask> = self
            .running
            .iter()
            .map(|(id, h)| RunningTask {
                id: *id,
                name: s.types[h.ty].name.to_string(),
                running_for_ms: h.started.elapsed().as_millis() as u64,
            })
            .collect();
        running.sort_by_key(|r| r.id);
        EngineStatus {
            machine_id: s.machine,
            host_and_port: s.config.host_and_port.clone(),
            budget: s.budget,
            reserved: self.reserved.to_resources(),
            cordoned: s.flags.cordoned(),
            draining: self.draining,
            running,
            types,
        }
    }
}

async fn claim_job(
    shared: &Shared,
    ty: usize,
    offered: Vec<TaskId>,
    n: usize,
    free: Resources,
) -> ClaimResult {
    let entry = &shared.types[ty];
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
    let outcome = if accepted.is_empty() {
        Ok(ClaimOutcome::default())
    } else {
        shared.metrics.claim();
        shared
            .store
            .task_claim(&TaskClaim {
                name: &entry.name,
                ids: &accepted,
                limit: n,
                owner: shared.machine,
                max_cluster: entry.details.max_cluster,
            })
            .await
    };
    ClaimResult {
        ty,
        reserved: n,
        offered,
        accepted,
        outcome,
    }
}
