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
use std::time::Duration;

use futures_util::FutureExt;
use harmonydb::{ErrorKind, Timestamp};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::engine::{Event, RunningCounts, Shared};
use crate::error::Error;
use crate::resources::{Amounts, Resources};
use crate::runner::{RunHandle, StopReason, run_one};
use crate::status::{EngineStatus, RunningTask, TypeStatus};
use crate::store::prelude::*;
use crate::store::{Candidate, ClaimOutcome, TaskClaim};
use crate::task::{EngineView, TaskId, TypeDetails};

use self::admission::{AdmitInput, Blocked, Victim, admit, pass_order, plan_preemption};
use self::view::TypeView;

/// Result of a claim job.
pub(crate) struct ClaimResult {
    ty: usize,
    reserved: usize,
    offered: Vec<TaskId>,
    accepted: Vec<TaskId>,
    outcome: Result<ClaimOutcome, Error>,
}

/// Result of a preemption bid: the claimed time-sensitive task when this node won.
pub(crate) struct PreemptResult {
    ty: usize,
    outcome: Result<Option<Candidate>, Error>,
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
    /// Last IAmBored call, and whether one is running.
    bored_at: Option<Instant>,
    bored_in_flight: bool,
    /// A preemption bid for this (time-sensitive) type is in flight.
    preempt_in_flight: bool,
    /// Until then, other nodes are claiming the same oldest tasks (a claim lost races): offer
    /// the view from a random point instead of its head, so that nodes with the same view
    /// mostly claim different tasks instead of all but one getting nothing.
    contended_until: Option<Instant>,
}

/// How long a lost claim race keeps a type's offers spread out.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

pub(crate) struct Scheduler {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Event>,
    counts: watch::Sender<RunningCounts>,
    types: Vec<TypeSched>,
    budget: Amounts,
    reserved: Amounts,
    limiter_used: HashMap<usize, usize>,
    running: HashMap<TaskId, RunHandle>,
    /// Victims cancelled for time-sensitive work: their reservation already moved to it.
    preempted: HashSet<TaskId>,
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
                bored_at: None,
                bored_in_flight: false,
                preempt_in_flight: false,
                contended_until: None,
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
            preempted: HashSet::new(),
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
            self.bored();
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
            let now = Instant::now();
            if now >= self.next_poll_at {
                self.poll_wanted.extend(0..self.types.len());
                self.next_poll_at = now + shared.poll_interval();
            } else {
                // Notifications may have gone down since the timer was set.
                self.next_poll_at = self.next_poll_at.min(now + shared.poll_interval());
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
        // The idle tick: IAmBored of types with spare capacity.
        let tick = self.shared.config.iambored_interval;
        for (e, t) in self.shared.types.iter().zip(&self.types) {
            if e.details.iambored.is_some() && !t.bored_in_flight {
                wake = wake.min(t.bored_at.map_or(now, |at| at + tick));
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
            Event::Wake { ty } => {
                self.types[ty].hold_until = None;
                self.poll_wanted.insert(ty);
            }
            Event::RunNow { ty } => self.call_bored(ty, true),
            Event::BoredDone { ty } => self.types[ty].bored_in_flight = false,
            Event::Preempted(r) => self.preempt_result(r),
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
            Event::Cordoned => self.yield_running(),
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
        // A limit or budget this type was held by may have room now.
        self.types[ty].hold_until = None;
        self.shared.types[ty].metrics.running.dec();
        if !self.preempted.remove(&id) {
            self.unreserve(ty, 1);
        }
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
                // Only a claim that got nothing waits; one that got some may get more at once
                // (a running task of the type finishing anywhere also wakes it).
                if claimed_n == 0 {
                    t.hold_until = Some(hold);
                }
            } else if claimed_n < r.reserved.min(r.accepted.len()) {
                // Lost races: what we accepted but did not get is owned by others (or locked
                // by their claim). Drop it from the view and look again.
                let got: HashSet<TaskId> = outcome.claimed.iter().map(|c| c.id).collect();
                for id in r.accepted.iter().filter(|id| !got.contains(id)) {
                    t.view.remove(*id);
                }
                self.poll_wanted.insert(ty);
                t.blocked = None;
                t.contended_until = Some(Instant::now() + CONTENDED_FOR);
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
        self.shared
            .runs
            .spawn(run_one(shared, ty, c, handle.clone()));
        // Claimed just before the cordon was seen: give way at once, like the attempts that
        // were already running when it came.
        if self.shared.types[ty].details.can_yield && self.shared.flags.cordoned() {
            handle.stop(StopReason::Yielded);
        }
    }

    /// The node is cordoned: every running attempt of a `can_yield` type stops and is
    /// released with its retries unchanged (history `err = "yielded"`). The engine does this
    /// itself, so that task code that never calls `still_owned` gives way too.
    fn yield_running(&self) {
        if !self.shared.flags.cordoned() {
            // Uncordoned again before this event was handled.
            return;
        }
        for (id, h) in &self.running {
            let entry = &self.shared.types[h.ty];
            if entry.details.can_yield {
                tracing::info!(task = %id, task_type = %entry.name, "node cordoned: the task yields");
                h.stop(StopReason::Yielded);
            }
        }
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
            // Run-now requests are also found by polling (SQLite has no notifications).
            if shared.types.iter().any(|t| t.details.iambored.is_some()) {
                match shared.store.singleton_requests().await {
                    Ok(names) => {
                        for name in names {
                            shared.run_now(&name);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "reading run-now requests failed"),
                }
            }
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
            let (mut eligible, next) =
                t.view
                    .eligible(now_ts, &entry.details.retry_wait, usize::MAX);
            if t.contended_until.is_some_and(|u| u > now) && eligible.len() > 1 {
                let from = fastrand::usize(..eligible.len());
                eligible.rotate_left(from);
            }
            t.next_eligible = next;
            if eligible.is_empty() {
                t.blocked = next.map(|until| Blocked::RetryWait { until });
                continue;
            }
            let (limiter_max, limiter_used) = limiter_use(&entry.details, &self.limiter_used);
            let input = AdmitInput {
                cordoned,
                // A `can_yield` type would give way as soon as it started: never claim it on a
                // cordoned node, overrides or not.
                override_applies: !entry.details.can_yield
                    && entry
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
                Err(b @ Blocked::Resources { .. }) if entry.details.time_sensitive => {
                    t.blocked = Some(b);
                    if !t.preempt_in_flight
                        && let Some(first) =
                            eligible.first().and_then(|id| t.view.get(*id)).cloned()
                    {
                        self.try_preempt(ty, first);
                    }
                }
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

    /// Calls IAmBored of every type that has spare capacity here and was not called within
    /// `iambored_interval`.
    fn bored(&mut self) {
        if self.draining {
            return;
        }
        let now = Instant::now();
        let tick = self.shared.config.iambored_interval;
        let cordoned = self.shared.flags.cordoned();
        for ty in 0..self.types.len() {
            let entry = &self.shared.types[ty];
            let t = &self.types[ty];
            if entry.details.iambored.is_none()
                || t.bored_in_flight
                || t.bored_at.is_some_and(|at| now < at + tick)
            {
                continue;
            }
            let (limiter_max, limiter_used) = limiter_use(&entry.details, &self.limiter_used);
            let spare = admit(&AdmitInput {
                cordoned,
                override_applies: false,
                limiter_max,
                limiter_used,
                cost: entry.cost,
                free: self.budget.minus(&self.reserved),
                budget: self.budget,
                eligible: 1,
                claim_batch_max: 1,
            })
            .is_ok_and(|n| n > 0);
            if spare {
                self.call_bored(ty, false);
            }
        }
    }

    fn call_bored(&mut self, ty: usize, run_now: bool) {
        let Some(bored) = self.shared.types[ty].details.iambored.clone() else {
            return;
        };
        if self.draining || (self.types[ty].bored_in_flight && !run_now) {
            return;
        }
        let t = &mut self.types[ty];
        t.bored_in_flight = true;
        t.bored_at = Some(Instant::now());
        let shared = Arc::clone(&self.shared);
        let adder = shared.adder(ty);
        self.shared.tracker.spawn(async move {
            let ctx = crate::singleton::BoredContext { adder, run_now };
            let name = Arc::clone(&shared.types[ty].name);
            match AssertUnwindSafe((bored.call)(ctx)).catch_unwind().await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(task_type = %name, error = %e, "IAmBored failed"),
                Err(_) => tracing::warn!(task_type = %name, "IAmBored panicked"),
            }
            shared.send(Event::BoredDone { ty }).await;
        });
    }

    /// The running attempts that may be preempted (neither time-sensitive nor uninterruptible,
    /// not already preempted), with their costs and runtimes.
    fn victims(&self) -> Vec<Victim> {
        self.running
            .iter()
            .filter(|(id, h)| !self.shared.types[h.ty].protected() && !self.preempted.contains(id))
            .map(|(id, h)| Victim {
                id: *id,
                cost: self.shared.types[h.ty].cost,
                runtime: h.started.elapsed(),
            })
            .collect()
    }

    /// A time-sensitive task does not fit: if cancelling the cheapest running work would make
    /// room, bid for the right to do so (DESIGN §8). The claim decides: only the node that wins
    /// the bid and then claims the task preempts anything.
    fn try_preempt(&mut self, ty: usize, task: Candidate) {
        let need = self.shared.types[ty].cost;
        let free = self.budget.minus(&self.reserved);
        let Some(plan) = plan_preemption(&need, &free, &self.victims()) else {
            return;
        };
        let cost_ms: u64 = plan.iter().map(|v| v.runtime.as_millis() as u64).sum();
        self.types[ty].preempt_in_flight = true;
        let shared = Arc::clone(&self.shared);
        let view_free = free.to_resources();
        self.shared.tracker.spawn(async move {
            let outcome = preempt_job(&shared, ty, task, cost_ms, view_free).await;
            shared
                .send(Event::Preempted(PreemptResult { ty, outcome }))
                .await;
        });
    }

    fn preempt_result(&mut self, r: PreemptResult) {
        let ty = r.ty;
        self.types[ty].preempt_in_flight = false;
        let task = match r.outcome {
            Ok(Some(task)) => task,
            Ok(None) => {
                // Lost the bid, refused, or another node took the task: nothing to do here.
                self.types[ty].hold_until =
                    Some(Instant::now() + self.shared.config.refused_retry_interval);
                return;
            }
            Err(e) => {
                tracing::warn!(task_type = %self.shared.types[ty].name, error = %e, "preemption bid failed");
                self.types[ty].hold_until =
                    Some(Instant::now() + self.shared.config.refused_retry_interval);
                return;
            }
        };
        self.types[ty].view.remove(task.id);
        let need = self.shared.types[ty].cost;
        let free = self.budget.minus(&self.reserved);
        // Recompute: work may have finished while the bid ran.
        let plan = plan_preemption(&need, &free, &self.victims()).unwrap_or_default();
        let fits_after =
            need.fits_in(&free.plus(&plan.iter().fold(Amounts::default(), |a, v| a.plus(&v.cost))));
        if self.draining || !fits_after {
            let shared = Arc::clone(&self.shared);
            self.shared.tracker.spawn(async move {
                let now = shared.clock.now();
                if let Err(e) = shared.store.task_release(task.id, shared.machine, now).await {
                    tracing::warn!(task = %task.id, error = %e, "could not release a claimed time-sensitive task");
                }
            });
            return;
        }
        for v in &plan {
            if let Some(h) = self.running.get(&v.id) {
                let vty = h.ty;
                tracing::info!(
                    victim = %v.id,
                    victim_type = %self.shared.types[vty].name,
                    for_task = %task.id,
                    for_type = %self.shared.types[ty].name,
                    "preempting for time-sensitive work"
                );
                h.stop(StopReason::Preempted);
                self.shared.types[vty].metrics.preempted.inc();
                self.preempted.insert(v.id);
                self.unreserve(vty, 1);
            }
        }
        self.reserve(ty, 1);
        self.start(ty, task);
        self.publish_counts();
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

/// A type's `max` limiter: its size and the slots in use here (0, 0 without one).
fn limiter_use(details: &TypeDetails, used: &HashMap<usize, usize>) -> (usize, usize) {
    match &details.max {
        Some(l) => (l.max(), used.get(&l.key()).copied().unwrap_or(0)),
        None => (0, 0),
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

/// Bids to preempt for `task`, waits the bid window, and claims the task if this node's bid
/// is the cheapest. `Ok(None)`: refused by `can_accept`, lost the bid, or the task is gone.
async fn preempt_job(
    shared: &Shared,
    ty: usize,
    task: Candidate,
    cost_ms: u64,
    free: Resources,
) -> Result<Option<Candidate>, Error> {
    let entry = &shared.types[ty];
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
    tokio::time::sleep(shared.config.preempt_bid_window).await;
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
    Ok(claimed.claimed.into_iter().next())
}
