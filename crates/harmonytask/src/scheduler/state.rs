//! The scheduler's decisions, without I/O: [`SchedulerState::handle`] takes one [`Event`] and
//! the time, updates the state and returns the [`Action`]s a driver must perform (claims,
//! polls, attempts to start or stop, IAmBored calls, preemption bids). The driver
//! (`scheduler::Scheduler` in the engine, the simulator in `simulation.rs`) performs
//! them and feeds their results back as events.
//!
//! **What it owns.** Per registered type: a bounded [`TypeView`] of the oldest waiting tasks,
//! the count running here, whether a claim is in flight, and the current blocking reason. For
//! the node: the budget, the reservation ledger (what running tasks and in-flight claims
//! hold), the per-limiter counts, the running attempts, and a seeded random generator for the
//! one random choice it makes (where to start offering a contended view).
//!
//! **What it must not know.** The database, tokio, the wall clock or task code: time comes in
//! with every call ([`Now`]), randomness from the seed given to [`SchedulerState::new`].
//!
//! Invariant: reserved ≤ budget, asserted after every reservation; every reservation is
//! released exactly once (asserted on release, and [`SchedulerState::check`] recomputes the
//! ledger from claims in flight and running attempts).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use harmonydb::{ErrorKind, Timestamp};
use tokio::time::Instant;

use crate::error::Error;
use crate::model::{Candidate, ClaimOutcome};
use crate::model::{RetryWait, TaskId};
use crate::resources::{Amounts, Resource, Resources};
use crate::status::{RunningTask, TypeStatus};

use super::admission::{AdmitInput, Blocked, Victim, admit, pass_order, plan_preemption};
use super::view::{self, TypeView};

/// The time of a call: monotonic for timers, wall-clock for retry waits (which count from the
/// rows' `update_time`).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic time (timers, runtimes, holds).
    pub mono: Instant,
    /// Wall-clock time on the engine's clock.
    pub wall: Timestamp,
}

/// Why an attempt's cancellation token fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Not stopped.
    None = 0,
    /// The node shuts down.
    Shutdown = 1,
    /// A time-sensitive task needed the resources.
    Preempted = 2,
    /// This node lost its machine row: the outcome is discarded.
    Fenced = 3,
    /// The node was cordoned and the type is `can_yield`: it gives way to other nodes.
    Yielded = 4,
    /// The task's row is gone or no longer this node's: an operator cancelled it (or this
    /// node was declared dead). The outcome is discarded by its fence.
    Lost = 5,
}

impl StopReason {
    /// The reason stored as `as u8`.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => StopReason::Shutdown,
            2 => StopReason::Preempted,
            3 => StopReason::Fenced,
            4 => StopReason::Yielded,
            5 => StopReason::Lost,
            _ => StopReason::None,
        }
    }
}

/// What the scheduler needs to know of one registered type.
#[derive(Debug, Clone)]
pub struct TypeSpec {
    /// The type name.
    pub name: Arc<str>,
    /// What one running task takes (scheduler units).
    pub cost: Amounts,
    /// The same, as declared (for status).
    pub cost_resources: Resources,
    /// The per-node limiter: its identity and size.
    pub limiter: Option<(usize, usize)>,
    /// Cluster-wide limit (0 = none).
    pub max_cluster: usize,
    /// Goes first and may preempt.
    pub time_sensitive: bool,
    /// Never preempted.
    pub uninterruptible: bool,
    /// Gives way when the node is cordoned.
    pub can_yield: bool,
    /// Types whose waiting tasks let this one be claimed on a cordoned node.
    pub scheduling_overrides: Vec<String>,
    /// Wait before a retry.
    pub retry_wait: RetryWait,
    /// Has an IAmBored callback.
    pub bored: bool,
}

impl TypeSpec {
    /// Awaited at shutdown and never preempted.
    pub fn protected(&self) -> bool {
        self.time_sensitive || self.uninterruptible
    }
}

/// The settings the scheduler decides with.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    /// Most tasks of one type claimed by one statement.
    pub claim_batch_max: usize,
    /// Most waiting tasks of one type kept in the view (a poll reads this many).
    pub view_max_per_type: usize,
    /// Hold after a refusal or a full cluster.
    pub refused_retry_interval: Duration,
    /// Shortest time between two IAmBored calls of one type.
    pub iambored_interval: Duration,
    /// The safety-net poll interval to start with.
    pub poll_interval: Duration,
}

impl SchedConfig {
    /// The scheduler's part of an engine configuration.
    pub fn from_engine(c: &crate::config::EngineConfig) -> Self {
        SchedConfig {
            claim_batch_max: c.claim_batch_max,
            view_max_per_type: c.view_max_per_type,
            refused_retry_interval: c.refused_retry_interval,
            iambored_interval: c.iambored_interval,
            poll_interval: c.poll_interval,
        }
    }
}

/// Result of a claim job.
#[derive(Debug)]
pub struct ClaimResult {
    /// The type.
    pub ty: usize,
    /// Tasks reserved for the claim (the `n` of [`Action::Claim`]).
    pub reserved: usize,
    /// What was offered to `can_accept`.
    pub offered: Vec<TaskId>,
    /// What `can_accept` accepted (and the claim asked for).
    pub accepted: Vec<TaskId>,
    /// What the claim statement got.
    pub outcome: Result<ClaimOutcome, Error>,
    /// The type needs storage and no path had room for one task: (bytes needed, best free).
    /// Nothing was accepted then.
    pub no_storage: Option<(u64, u64)>,
}

/// Result of a preemption bid: the claimed time-sensitive task when this node won.
#[derive(Debug)]
pub struct PreemptResult {
    /// The time-sensitive type.
    pub ty: usize,
    /// The claimed task, `None` when the bid was lost or refused.
    pub outcome: Result<Option<Candidate>, Error>,
}

/// Result of a poll job.
#[derive(Debug)]
pub struct PollResult {
    /// The epoch of the [`Action::Poll`].
    pub epoch: u64,
    /// Per polled type, the oldest waiting rows.
    pub polled: Vec<(usize, Result<Vec<Candidate>, Error>)>,
}

/// Something that happened, for the scheduler to decide on.
#[derive(Debug)]
pub enum Event {
    /// Tasks added by this process (or announced with their ids by a hint).
    Added {
        /// The type.
        ty: usize,
        /// The tasks.
        tasks: Vec<Candidate>,
    },
    /// A task released by this node (retry or release), recorded.
    Released {
        /// The type.
        ty: usize,
        /// The task as it now is in the database.
        task: Candidate,
    },
    /// An attempt returned; its resources are free.
    Finished {
        /// The type.
        ty: usize,
        /// The task.
        id: TaskId,
    },
    /// A claim job ended.
    Claimed(ClaimResult),
    /// A poll job ended.
    Polled(PollResult),
    /// A preemption bid ended.
    Preempted(PreemptResult),
    /// Another node hinted at new or released work of a type: poll it.
    Wake {
        /// The type.
        ty: usize,
    },
    /// Call the type's IAmBored now (run-now request).
    RunNow {
        /// The type.
        ty: usize,
    },
    /// An IAmBored call returned.
    BoredDone {
        /// The type.
        ty: usize,
    },
    /// Stop claiming (shutdown or restart).
    Drain,
    /// Cancel running attempts.
    StopRunning {
        /// Why.
        reason: StopReason,
        /// Time-sensitive and uninterruptible attempts too.
        include_protected: bool,
    },
    /// The node's cordon flag, as now read: on a cordon, running `can_yield` attempts give way.
    Cordon(bool),
    /// These tasks are no longer this node's (an operator cancelled them): stop their
    /// attempts.
    Lost {
        /// The tasks.
        ids: Vec<TaskId>,
    },
    /// The tasks this node owned, read from the database after `asked`: a running attempt
    /// that started before `asked` and is not among them lost its row (cancelled, or taken
    /// over after this node was declared dead) and is stopped.
    Owned {
        /// The owned tasks.
        owned: HashSet<TaskId>,
        /// When the read was issued.
        asked: Instant,
    },
    /// The driver woke (a timer, a nudge, a burst of events handled): check the poll timer and
    /// run one scheduling pass.
    Tick {
        /// The safety-net poll interval in force now (shorter while notifications are down).
        poll_interval: Duration,
        /// Poll every type now.
        poll_all: bool,
    },
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run `can_accept` on `offered` and claim up to `n` of what it accepts; report
    /// [`Event::Claimed`].
    Claim {
        /// The type.
        ty: usize,
        /// Candidates, in preference order.
        offered: Vec<TaskId>,
        /// Reserved: claim at most this many.
        n: usize,
        /// Free budget before the reservation (for `can_accept`).
        free: Resources,
    },
    /// Read the oldest waiting rows of `types`; report [`Event::Polled`] with `epoch`.
    Poll {
        /// The epoch to report back.
        epoch: u64,
        /// The types to poll.
        types: Vec<usize>,
    },
    /// Run a claimed task; report [`Event::Finished`] when `run` returns.
    Start {
        /// The type.
        ty: usize,
        /// The claimed task.
        task: Candidate,
        /// Stop it at once (claimed just before a cordon was seen).
        stop: Option<StopReason>,
    },
    /// Fire a running attempt's cancellation token.
    Stop {
        /// The task.
        id: TaskId,
        /// Why.
        reason: StopReason,
    },
    /// Call the type's IAmBored; report [`Event::BoredDone`].
    Bored {
        /// The type.
        ty: usize,
        /// Because of a run-now request.
        run_now: bool,
    },
    /// Bid to preempt for `task`; report [`Event::Preempted`].
    Preempt {
        /// The time-sensitive type.
        ty: usize,
        /// Its oldest eligible task.
        task: Candidate,
        /// The bid: total runtime of the victims, milliseconds.
        cost_ms: u64,
        /// Free budget now (for `can_accept`).
        free: Resources,
    },
    /// Give back a claimed task that is not going to run here (owner back to NULL).
    Release {
        /// The task.
        task: TaskId,
        /// The update time to leave on the row (a task given back during its retry wait keeps
        /// the time its wait counts from); `None`: now.
        update_time: Option<Timestamp>,
    },
    /// The claim found this machine's row gone: this node was declared dead and must stop.
    Fenced,
}

/// Running attempts, as published to shutdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunningCounts {
    /// All running attempts.
    pub total: usize,
    /// Time-sensitive or uninterruptible: awaited at shutdown, never cancelled.
    pub protected: usize,
}

struct TypeSched {
    view: TypeView,
    running: usize,
    claim_in_flight: bool,
    /// Reserved by the claim in flight.
    claim_reserved: usize,
    /// Units of the ledger this type holds (claims in flight plus running, not preempted).
    held: usize,
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

struct Running {
    ty: usize,
    started: Instant,
    /// Cancelled for time-sensitive work: its reservation already moved to that task.
    preempted: bool,
}

/// How long a lost claim race keeps a type's offers spread out.
const CONTENDED_FOR: Duration = Duration::from_secs(1);

/// How many of a type's eligible candidates a claim of `n` offers: the oldest `2n`, and at
/// least 32 more than `n` so that a few lost races still leave enough. The claim statement
/// reads every offered id, so offering the whole view (hundreds) to fill one or two freed
/// slots cost more than the claim itself.
fn claim_window(n: usize) -> usize {
    n.saturating_mul(2).max(n.saturating_add(32))
}

/// The scheduler of one node, without I/O. See the module documentation.
pub struct SchedulerState {
    specs: Vec<TypeSpec>,
    config: SchedConfig,
    /// For each type, the indices of the types whose waiting work lets it run while cordoned.
    overrides: Vec<Vec<usize>>,
    /// For each type, its `may_follow` descendants, deepest first (by name).
    downstream: HashMap<String, Vec<String>>,
    types: Vec<TypeSched>,
    budget: Amounts,
    reserved: Amounts,
    limiter_used: HashMap<usize, usize>,
    running: HashMap<TaskId, Running>,
    protected_running: usize,
    /// Claimed since the poll in flight started: a poll result may still list them.
    claimed_during_poll: HashSet<TaskId>,
    /// Incremented when a poll starts; view entries remember the epoch they were learned in.
    epoch: u64,
    poll_in_flight: bool,
    poll_wanted: BTreeSet<usize>,
    next_poll_at: Instant,
    draining: bool,
    cordoned: bool,
    rng: fastrand::Rng,
}

impl SchedulerState {
    /// A scheduler for `specs` (indexed as the engine indexes its types) with `budget`, whose
    /// random choices follow `seed`. It polls every type on its first tick.
    pub fn new(
        specs: Vec<TypeSpec>,
        budget: Resources,
        config: SchedConfig,
        downstream: HashMap<String, Vec<String>>,
        seed: u64,
        now: Now,
    ) -> Self {
        let index: HashMap<&str, usize> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| (&*s.name, i))
            .collect();
        let overrides = specs
            .iter()
            .map(|s| {
                s.scheduling_overrides
                    .iter()
                    .filter_map(|o| index.get(o.as_str()).copied())
                    .collect()
            })
            .collect();
        let types = (0..specs.len())
            .map(|_| TypeSched {
                view: TypeView::new(config.view_max_per_type),
                running: 0,
                claim_in_flight: false,
                claim_reserved: 0,
                held: 0,
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
        SchedulerState {
            poll_wanted: (0..specs.len()).collect(),
            next_poll_at: now.mono + config.poll_interval,
            overrides,
            downstream,
            types,
            budget: budget.amounts(),
            reserved: Amounts::default(),
            limiter_used: HashMap::new(),
            running: HashMap::new(),
            protected_running: 0,
            claimed_during_poll: HashSet::new(),
            epoch: 0,
            poll_in_flight: false,
            draining: false,
            cordoned: false,
            rng: fastrand::Rng::with_seed(seed),
            specs,
            config,
        }
    }

    /// Handles one event and returns what to do about it.
    pub fn handle(&mut self, ev: Event, now: Now) -> Vec<Action> {
        let mut out = Vec::new();
        self.handle_into(ev, now, &mut out);
        out
    }

    /// Like [`SchedulerState::handle`], appending to `out` (the driver reuses one buffer).
    pub fn handle_into(&mut self, ev: Event, now: Now, out: &mut Vec<Action>) {
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
                // A release learned late (its recording was retried) may find the task
                // claimed again and running here.
                if !self.running.contains_key(&task.id) {
                    t.view.insert(task, self.epoch);
                }
            }
            Event::Wake { ty } => {
                self.types[ty].hold_until = None;
                self.poll_wanted.insert(ty);
            }
            Event::RunNow { ty } => self.call_bored(ty, true, now, out),
            Event::BoredDone { ty } => self.types[ty].bored_in_flight = false,
            Event::Preempted(r) => self.preempt_result(r, now, out),
            Event::Finished { ty, id } => self.finished(ty, id),
            Event::Claimed(r) => self.claimed(r, now, out),
            Event::Polled(p) => self.polled(p),
            Event::Drain => self.draining = true,
            Event::StopRunning {
                reason,
                include_protected,
            } => {
                for (id, r) in &self.running {
                    if include_protected || !self.specs[r.ty].protected() {
                        out.push(Action::Stop { id: *id, reason });
                    }
                }
            }
            Event::Cordon(cordoned) => {
                self.cordoned = cordoned;
                if cordoned {
                    self.yield_running(out);
                }
            }
            Event::Lost { ids } => self.stop_lost(ids, out),
            Event::Owned { owned, asked } => {
                let lost = self
                    .running
                    .iter()
                    .filter(|(id, r)| r.started < asked && !owned.contains(id))
                    .map(|(id, _)| *id)
                    .collect();
                self.stop_lost(lost, out);
            }
            Event::Tick {
                poll_interval,
                poll_all,
            } => {
                if poll_all || now.mono >= self.next_poll_at {
                    self.poll_wanted.extend(0..self.types.len());
                }
                if now.mono >= self.next_poll_at {
                    self.next_poll_at = now.mono + poll_interval;
                } else {
                    // Notifications may have gone down since the timer was set.
                    self.next_poll_at = self.next_poll_at.min(now.mono + poll_interval);
                }
                self.pass(now, out);
                self.bored(now, out);
                self.start_poll(out);
            }
        }
    }

    /// When the driver should send the next [`Event::Tick`] at the latest.
    pub fn next_wake(&self, now: Now) -> Instant {
        let mut wake = self.next_poll_at;
        for t in &self.types {
            if let Some(h) = t.hold_until {
                wake = wake.min(h);
            }
            if let Some(at) = t.next_eligible {
                wake = wake.min(now.mono + view::until(now.wall, at));
            }
        }
        // The idle tick: IAmBored of types with spare capacity.
        let tick = self.config.iambored_interval;
        for (s, t) in self.specs.iter().zip(&self.types) {
            if s.bored && !t.bored_in_flight {
                wake = wake.min(t.bored_at.map_or(now.mono, |at| at + tick));
            }
        }
        wake.max(now.mono)
    }

    /// Running attempts (for shutdown).
    pub fn counts(&self) -> RunningCounts {
        RunningCounts {
            total: self.running.len(),
            protected: self.protected_running,
        }
    }

    /// What running attempts and in-flight claims hold.
    pub fn reserved(&self) -> Amounts {
        self.reserved
    }

    /// The node's budget.
    pub fn budget(&self) -> Amounts {
        self.budget
    }

    /// Whether the node stopped claiming.
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// The running attempts' ids (any order).
    pub fn running_ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.running.keys().copied()
    }

    /// The type of a running attempt.
    pub fn running_type(&self, id: TaskId) -> Option<usize> {
        self.running.get(&id).map(|r| r.ty)
    }

    /// Why a type's waiting tasks are not starting here.
    pub fn blocked(&self, ty: usize) -> Option<&Blocked> {
        self.types[ty].blocked.as_ref()
    }

    /// A type with waiting tasks that is neither being claimed nor blocked for a named reason
    /// (checked after a tick: "nothing sits silent").
    pub fn unexplained_waiting(&self) -> Option<usize> {
        self.types.iter().position(|t| {
            !t.view.is_empty() && !t.claim_in_flight && !t.preempt_in_flight && t.blocked.is_none()
        })
    }

    /// A type's scheduling state in words, for a simulator's violation reports.
    pub fn describe(&self, ty: usize, now: Now) -> String {
        let t = &self.types[ty];
        format!(
            "view {} (more {}), running {}, held {}, claim in flight {} ({}), preempt in flight {}, blocked {:?}, hold {:?}, next eligible {:?}, contended {:?}, cordoned {}",
            t.view.len(),
            t.view.maybe_more,
            t.running,
            t.held,
            t.claim_in_flight,
            t.claim_reserved,
            t.preempt_in_flight,
            t.blocked,
            t.hold_until.map(|h| h.saturating_duration_since(now.mono)),
            t.next_eligible,
            t.contended_until
                .map(|h| h.saturating_duration_since(now.mono)),
            self.cordoned,
        )
    }

    /// Whether a type's view holds `id`.
    pub fn knows(&self, ty: usize, id: TaskId) -> bool {
        self.types[ty].view.get(id).is_some()
    }

    /// Per-type status and the running attempts, sorted by id.
    pub fn status(&self, now: Now) -> (Vec<TypeStatus>, Vec<RunningTask>) {
        let types = self
            .specs
            .iter()
            .zip(&self.types)
            .map(|(s, t)| TypeStatus {
                name: s.name.to_string(),
                waiting_known: t.view.len(),
                more_waiting: t.view.maybe_more,
                running: t.running,
                blocked: t.blocked.clone(),
                blocked_text: t.blocked.as_ref().map(ToString::to_string),
                cost: s.cost_resources,
            })
            .collect();
        let mut running: Vec<RunningTask> = self
            .running
            .iter()
            .map(|(id, r)| RunningTask {
                id: *id,
                name: self.specs[r.ty].name.to_string(),
                running_for_ms: now.mono.saturating_duration_since(r.started).as_millis() as u64,
            })
            .collect();
        running.sort_by_key(|r| r.id);
        (types, running)
    }

    /// Recomputes the reservation ledger from the claims in flight and the running attempts
    /// and compares it with the running totals: every reservation has exactly one release.
    pub fn check(&self) -> Result<(), String> {
        if !self.reserved.fits_in(&self.budget) {
            return Err(format!(
                "reserved {:?} exceeds budget {:?}",
                self.reserved, self.budget
            ));
        }
        let mut want = Amounts::default();
        let mut limiters: HashMap<usize, usize> = HashMap::new();
        let mut holding = vec![0usize; self.types.len()];
        for r in self.running.values().filter(|r| !r.preempted) {
            holding[r.ty] += 1;
        }
        for (ty, t) in self.types.iter().enumerate() {
            let held = holding[ty] + t.claim_reserved;
            if held != t.held {
                return Err(format!(
                    "type {} holds {} reservations, but {} are running or claiming",
                    self.specs[ty].name, t.held, held
                ));
            }
            if let Some((key, max)) = self.specs[ty].limiter {
                let used = limiters.entry(key).or_default();
                *used += held;
                if max > 0 && *used > max {
                    return Err(format!(
                        "limiter of {} holds {} > max {max}",
                        self.specs[ty].name, *used
                    ));
                }
            }
            want = want.plus(&self.specs[ty].cost.times(held as u64));
        }
        if want != self.reserved {
            return Err(format!(
                "reserved {:?}, but running and claiming hold {want:?}",
                self.reserved
            ));
        }
        for (key, used) in limiters {
            let have = self.limiter_used.get(&key).copied().unwrap_or(0);
            if have != used {
                return Err(format!("limiter {key} counts {have}, holders {used}"));
            }
        }
        let running: usize = self.types.iter().map(|t| t.running).sum();
        if running != self.running.len() {
            return Err(format!(
                "types count {running} running, {} attempts run",
                self.running.len()
            ));
        }
        Ok(())
    }

    fn reserve(&mut self, ty: usize, n: usize) {
        let cost = self.specs[ty].cost;
        self.reserved = self.reserved.plus(&cost.times(n as u64));
        assert!(
            self.reserved.fits_in(&self.budget),
            "reserved {:?} exceeds budget {:?}",
            self.reserved,
            self.budget
        );
        self.types[ty].held += n;
        if let Some((key, max)) = self.specs[ty].limiter {
            let used = self.limiter_used.entry(key).or_default();
            *used += n;
            debug_assert!(
                max == 0 || *used <= max,
                "limiter of {} at {used} > max {max}",
                self.specs[ty].name
            );
        }
    }

    fn release(&mut self, ty: usize, n: usize) {
        if n == 0 {
            return;
        }
        let t = &mut self.types[ty];
        assert!(
            t.held >= n,
            "type {} releases {n} reservations but holds {}",
            self.specs[ty].name,
            t.held
        );
        t.held -= n;
        let cost = self.specs[ty].cost;
        self.reserved = self.reserved.minus(&cost.times(n as u64));
        if let Some((key, _)) = self.specs[ty].limiter {
            let used = self.limiter_used.entry(key).or_default();
            *used = used.saturating_sub(n);
        }
    }

    fn finished(&mut self, ty: usize, id: TaskId) {
        let Some(r) = self.running.remove(&id) else {
            return;
        };
        debug_assert_eq!(r.ty, ty);
        if self.specs[ty].protected() {
            self.protected_running -= 1;
        }
        self.types[ty].running -= 1;
        // A limit or budget this type was held by may have room now.
        self.types[ty].hold_until = None;
        if !r.preempted {
            self.release(ty, 1);
        }
    }

    fn claimed(&mut self, r: ClaimResult, now: Now, out: &mut Vec<Action>) {
        let ty = r.ty;
        self.types[ty].claim_in_flight = false;
        self.types[ty].claim_reserved = 0;
        let outcome = match r.outcome {
            Ok(o) => o,
            Err(e) => {
                self.release(ty, r.reserved);
                if e.db_kind() == Some(ErrorKind::ForeignKey) {
                    // Our machine row is gone: this node was declared dead.
                    out.push(Action::Fenced);
                    return;
                }
                tracing::warn!(task_type = %self.specs[ty].name, error = %e, "claim failed; will retry");
                let t = &mut self.types[ty];
                t.hold_until = Some(now.mono + self.config.refused_retry_interval);
                // Nothing sits silent: the wait has a reason (the simulator found it missing).
                t.blocked = Some(Blocked::ClaimFailed {
                    error: e.to_string(),
                });
                self.poll_wanted.insert(ty);
                return;
            }
        };
        let claimed_n = outcome.claimed.len();
        assert!(
            claimed_n <= r.reserved,
            "claimed {claimed_n} tasks with {} reserved",
            r.reserved
        );
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
        self.release(ty, r.reserved - claimed_n);
        let hold = now.mono + self.config.refused_retry_interval;
        {
            let t = &mut self.types[ty];
            for c in &outcome.claimed {
                t.view.remove(c.id);
            }
            if r.accepted.is_empty() {
                t.blocked = Some(match r.no_storage {
                    Some((needed, best_free)) => Blocked::NoStorage { needed, best_free },
                    None => Blocked::Refused,
                });
                t.hold_until = Some(hold);
            } else if outcome.cluster_full && claimed_n < r.reserved {
                t.blocked = Some(Blocked::ClusterLimit {
                    max: self.specs[ty].max_cluster,
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
                t.contended_until = Some(now.mono + CONTENDED_FOR);
            } else {
                t.blocked = None;
            }
        }
        if self.draining {
            // Claimed just as the node started draining: do not start them; shutdown releases
            // every row this machine still owns.
            self.release(ty, claimed_n);
            return;
        }
        for c in outcome.claimed {
            // The claimed row is the database's truth. What the view offered can be older than
            // the task's last failure (a late or repeated add hint, a poll's snapshot), so a
            // task still in its retry wait goes back at once, its update time unchanged, and
            // waits in the view, instead of starting early.
            if TypeView::eligible_at(&c, &self.specs[ty].retry_wait) > now.wall {
                self.release(ty, 1);
                out.push(Action::Release {
                    task: c.id,
                    update_time: Some(c.updated),
                });
                self.types[ty].view.insert(c, self.epoch);
                continue;
            }
            self.start(ty, c, now, out);
        }
    }

    /// Records a claimed task as running (its reservation is already held) and asks the driver
    /// to run it.
    fn start(&mut self, ty: usize, c: Candidate, now: Now, out: &mut Vec<Action>) {
        let prev = self.running.insert(
            c.id,
            Running {
                ty,
                started: now.mono,
                preempted: false,
            },
        );
        assert!(prev.is_none(), "task {} started twice", c.id);
        self.types[ty].running += 1;
        if self.specs[ty].protected() {
            self.protected_running += 1;
        }
        // Claimed just before the cordon was seen: give way at once, like the attempts that
        // were already running when it came.
        let stop = (self.specs[ty].can_yield && self.cordoned).then_some(StopReason::Yielded);
        out.push(Action::Start { ty, task: c, stop });
    }

    /// The node is cordoned: every running attempt of a `can_yield` type stops and is
    /// released with its retries unchanged (history `err = "yielded"`). The engine does this
    /// itself, so that task code that never calls `still_owned` gives way too.
    /// Stops the running attempts of `ids` whose rows are no longer this node's (in id order,
    /// so that a replay is exact).
    fn stop_lost(&self, mut ids: Vec<TaskId>, out: &mut Vec<Action>) {
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Some(r) = self.running.get(&id) {
                tracing::info!(task = %id, task_type = %self.specs[r.ty].name, "the task was cancelled or is owned elsewhere now: stopping its attempt");
                out.push(Action::Stop {
                    id,
                    reason: StopReason::Lost,
                });
            }
        }
    }

    fn yield_running(&self, out: &mut Vec<Action>) {
        for (id, r) in &self.running {
            let spec = &self.specs[r.ty];
            if spec.can_yield {
                tracing::info!(task = %id, task_type = %spec.name, "node cordoned: the task yields");
                out.push(Action::Stop {
                    id: *id,
                    reason: StopReason::Yielded,
                });
            }
        }
    }

    fn polled(&mut self, p: PollResult) {
        tracing::debug!(types = p.polled.len(), "poll result");
        self.poll_in_flight = false;
        let limit = self.config.view_max_per_type;
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
                    tracing::warn!(task_type = %self.specs[ty].name, error = %e, "poll failed");
                }
            }
        }
    }

    fn start_poll(&mut self, out: &mut Vec<Action>) {
        if self.poll_in_flight || self.poll_wanted.is_empty() || self.draining {
            return;
        }
        self.poll_in_flight = true;
        self.epoch += 1;
        self.claimed_during_poll.clear();
        let types: Vec<usize> = std::mem::take(&mut self.poll_wanted).into_iter().collect();
        out.push(Action::Poll {
            epoch: self.epoch,
            types,
        });
    }

    /// One scheduling pass over every type, in DESIGN §6.3 order.
    fn pass(&mut self, now: Now, out: &mut Vec<Action>) {
        let names: Vec<&str> = self.specs.iter().map(|t| &*t.name).collect();
        let time_sensitive: Vec<bool> = self.specs.iter().map(|t| t.time_sensitive).collect();
        let oldest: Vec<Option<Timestamp>> = self.types.iter().map(|t| t.view.oldest()).collect();
        let order = pass_order(&names, &time_sensitive, &oldest, &self.downstream);
        let batch_max = self.config.claim_batch_max;
        for ty in order {
            let t = &mut self.types[ty];
            if t.view.len() < batch_max && t.view.maybe_more && !t.claim_in_flight {
                self.poll_wanted.insert(ty);
            }
            if t.view.is_empty() {
                if !t.claim_in_flight {
                    t.blocked = None;
                }
                // A hold (after a refusal or a full cluster) is about tasks that are gone now:
                // whatever a poll finds next is offered at once. Kept, it held the next tasks
                // back with no blocked reason (simulation seed 406).
                t.hold_until = None;
                t.next_eligible = None;
                continue;
            }
            if self.draining {
                t.blocked = Some(Blocked::Draining);
                continue;
            }
            // One claim at a time per type, and none while a preemption bid may be claiming
            // one of its tasks: a failed claim gives back rows it may have claimed without
            // knowing, which must never include the bid's.
            if t.claim_in_flight || t.preempt_in_flight {
                continue;
            }
            if t.hold_until.is_some_and(|h| h > now.mono) {
                continue;
            }
            t.hold_until = None;
            let spec = &self.specs[ty];
            let (mut eligible, next) = t.view.eligible(now.wall, &spec.retry_wait, usize::MAX);
            if t.contended_until.is_some_and(|u| u > now.mono) && eligible.len() > 1 {
                let from = self.rng.usize(..eligible.len());
                eligible.rotate_left(from);
            }
            t.next_eligible = next;
            if eligible.is_empty() {
                t.blocked = next.map(|until| Blocked::RetryWait { until });
                continue;
            }
            let (limiter_max, limiter_used) = self.limiter_use(ty);
            let types = &self.types;
            let input = AdmitInput {
                cordoned: self.cordoned,
                // A `can_yield` type would give way as soon as it started: never claim it on a
                // cordoned node, overrides or not.
                override_applies: !spec.can_yield
                    && self.overrides[ty]
                        .iter()
                        .any(|&o| !types[o].view.is_empty()),
                limiter_max,
                limiter_used,
                cost: spec.cost,
                free: self.budget.minus(&self.reserved),
                budget: self.budget,
                eligible: eligible.len(),
                claim_batch_max: batch_max,
            };
            let t = &mut self.types[ty];
            match admit(&input) {
                Err(b @ Blocked::Resources { .. }) if spec.time_sensitive => {
                    t.blocked = Some(b);
                    if !t.preempt_in_flight
                        && let Some(first) =
                            eligible.first().and_then(|id| t.view.get(*id)).cloned()
                    {
                        self.try_preempt(ty, first, now, out);
                    }
                }
                Err(b) => {
                    if let Blocked::NeverFits { .. } = &b
                        && !t.never_fits_reported
                    {
                        t.never_fits_reported = true;
                        tracing::warn!(task_type = %spec.name, reason = %b, "task type can never run on this node");
                    }
                    t.blocked = Some(b);
                }
                Ok(0) => {}
                Ok(n) => {
                    t.blocked = None;
                    t.claim_in_flight = true;
                    t.claim_reserved = n;
                    let free = self.budget.minus(&self.reserved).to_resources();
                    self.reserve(ty, n);
                    let mut eligible = eligible;
                    eligible.truncate(claim_window(n));
                    tracing::debug!(ty, n, offered = eligible.len(), "claiming");
                    out.push(Action::Claim {
                        ty,
                        offered: eligible,
                        n,
                        free,
                    });
                }
            }
        }
    }

    /// A type's `max` limiter: its size and the slots in use here (0, 0 without one).
    fn limiter_use(&self, ty: usize) -> (usize, usize) {
        match self.specs[ty].limiter {
            Some((key, max)) => (max, self.limiter_used.get(&key).copied().unwrap_or(0)),
            None => (0, 0),
        }
    }

    /// Calls IAmBored of every type that has spare capacity here and was not called within
    /// `iambored_interval`.
    fn bored(&mut self, now: Now, out: &mut Vec<Action>) {
        if self.draining {
            return;
        }
        let tick = self.config.iambored_interval;
        for ty in 0..self.types.len() {
            let spec = &self.specs[ty];
            let t = &self.types[ty];
            if !spec.bored || t.bored_in_flight || t.bored_at.is_some_and(|at| now.mono < at + tick)
            {
                continue;
            }
            let (limiter_max, limiter_used) = self.limiter_use(ty);
            let spare = admit(&AdmitInput {
                cordoned: self.cordoned,
                override_applies: false,
                limiter_max,
                limiter_used,
                cost: spec.cost,
                free: self.budget.minus(&self.reserved),
                budget: self.budget,
                eligible: 1,
                claim_batch_max: 1,
            })
            .is_ok_and(|n| n > 0);
            if spare {
                self.call_bored(ty, false, now, out);
            }
        }
    }

    fn call_bored(&mut self, ty: usize, run_now: bool, now: Now, out: &mut Vec<Action>) {
        if !self.specs[ty].bored || self.draining || (self.types[ty].bored_in_flight && !run_now) {
            return;
        }
        let t = &mut self.types[ty];
        t.bored_in_flight = true;
        t.bored_at = Some(now.mono);
        out.push(Action::Bored { ty, run_now });
    }

    /// The running attempts that may be preempted (neither time-sensitive nor uninterruptible,
    /// not already preempted), with their costs and runtimes.
    fn victims(&self, now: Now) -> Vec<Victim> {
        self.running
            .iter()
            .filter(|(_, r)| !self.specs[r.ty].protected() && !r.preempted)
            .map(|(id, r)| Victim {
                id: *id,
                cost: self.specs[r.ty].cost,
                runtime: now.mono.saturating_duration_since(r.started),
            })
            .collect()
    }

    /// A time-sensitive task does not fit: if cancelling the cheapest running work would make
    /// room, bid for the right to do so (DESIGN §8). The claim decides: only the node that wins
    /// the bid and then claims the task preempts anything.
    fn try_preempt(&mut self, ty: usize, task: Candidate, now: Now, out: &mut Vec<Action>) {
        let need = self.specs[ty].cost;
        let free = self.budget.minus(&self.reserved);
        let Some(plan) = plan_preemption(&need, &free, &self.victims(now)) else {
            return;
        };
        let cost_ms: u64 = plan.iter().map(|v| v.runtime.as_millis() as u64).sum();
        self.types[ty].preempt_in_flight = true;
        out.push(Action::Preempt {
            ty,
            task,
            cost_ms,
            free: free.to_resources(),
        });
    }

    fn preempt_result(&mut self, r: PreemptResult, now: Now, out: &mut Vec<Action>) {
        let ty = r.ty;
        self.types[ty].preempt_in_flight = false;
        let task = match r.outcome {
            Ok(Some(task)) => task,
            other => {
                // Lost the bid, refused, or another node took the task: nothing to do here
                // but wait before bidding again. Only while the type is still short of room:
                // if work ended meanwhile, holding it back would delay time-sensitive work
                // for nothing (the simulator found such a hold, with no blocked reason).
                if let Err(e) = other {
                    tracing::warn!(task_type = %self.specs[ty].name, error = %e, "preemption bid failed");
                }
                let free = self.budget.minus(&self.reserved);
                let need = self.specs[ty].cost;
                if !need.fits_in(&free) {
                    // The hold names its reason, even when the view emptied (and its reason was
                    // cleared) and refilled while the bid ran.
                    let resource = need.how_many_fit(&free).1.unwrap_or(Resource::Cpu);
                    let t = &mut self.types[ty];
                    t.blocked = Some(Blocked::Resources {
                        resource,
                        needed: need.get(resource),
                        free: free.get(resource),
                    });
                    t.hold_until = Some(now.mono + self.config.refused_retry_interval);
                }
                return;
            }
        };
        self.types[ty].view.remove(task.id);
        // As for a claim: the claimed row is the truth, and a task still in its retry wait
        // goes back with its update time unchanged (simulation seed 486).
        if TypeView::eligible_at(&task, &self.specs[ty].retry_wait) > now.wall {
            out.push(Action::Release {
                task: task.id,
                update_time: Some(task.updated),
            });
            self.types[ty].view.insert(task, self.epoch);
            return;
        }
        let need = self.specs[ty].cost;
        let free = self.budget.minus(&self.reserved);
        // Recompute: work may have finished while the bid ran.
        let plan = plan_preemption(&need, &free, &self.victims(now)).unwrap_or_default();
        let fits_after =
            need.fits_in(&free.plus(&plan.iter().fold(Amounts::default(), |a, v| a.plus(&v.cost))));
        // The per-node limit too: other types sharing the limiter may have claimed its last
        // slot while the bid ran (simulation seed 1674 found a limiter over its max). Victims
        // of the same limiter give their slots back.
        let limit_ok = match self.specs[ty].limiter {
            Some((key, max)) if max > 0 => {
                let freed = plan
                    .iter()
                    .filter(|v| {
                        self.running
                            .get(&v.id)
                            .is_some_and(|r| self.specs[r.ty].limiter.is_some_and(|l| l.0 == key))
                    })
                    .count();
                let used = self.limiter_used.get(&key).copied().unwrap_or(0);
                used.saturating_sub(freed) < max
            }
            _ => true,
        };
        if self.draining || !fits_after || !limit_ok {
            out.push(Action::Release {
                task: task.id,
                update_time: None,
            });
            return;
        }
        for v in &plan {
            if let Some(run) = self.running.get_mut(&v.id) {
                let vty = run.ty;
                run.preempted = true;
                tracing::info!(
                    victim = %v.id,
                    victim_type = %self.specs[vty].name,
                    for_task = %task.id,
                    for_type = %self.specs[ty].name,
                    "preempting for time-sensitive work"
                );
                out.push(Action::Stop {
                    id: v.id,
                    reason: StopReason::Preempted,
                });
                self.release(vty, 1);
            }
        }
        self.reserve(ty, 1);
        self.start(ty, task, now, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{Limiter, TypeDetails};

    const POLL: Duration = Duration::from_secs(30);

    struct Sim {
        state: SchedulerState,
        now: Now,
    }

    fn spec(name: &str, cpu: f64) -> TypeSpec {
        let mut d = TypeDetails::new(name);
        d.cost = Resources::new(cpu, 0, 0.0);
        TypeSpec::from_details(&d)
    }

    fn config() -> SchedConfig {
        SchedConfig {
            claim_batch_max: 100,
            view_max_per_type: 400,
            refused_retry_interval: Duration::from_secs(1),
            iambored_interval: Duration::from_secs(1),
            poll_interval: POLL,
        }
    }

    fn cand(id: i64, posted_ms: i64) -> Candidate {
        Candidate {
            id: TaskId(id),
            posted: Timestamp::from_millis(posted_ms),
            updated: Timestamp::from_millis(posted_ms),
            retries: 0,
        }
    }

    impl Sim {
        fn new(specs: Vec<TypeSpec>, cpu: f64, seed: u64) -> Self {
            let now = Now {
                mono: Instant::now(),
                wall: Timestamp::from_millis(1_000_000),
            };
            let state = SchedulerState::new(
                specs,
                Resources::new(cpu, 0, 0.0),
                config(),
                HashMap::new(),
                seed,
                now,
            );
            let mut sim = Sim { state, now };
            // The first tick asks for a poll of everything; answer it with nothing.
            let a = sim.tick();
            let Some(Action::Poll { epoch, types }) = a.into_iter().next() else {
                panic!("first tick polls")
            };
            sim.ev(Event::Polled(PollResult {
                epoch,
                polled: types.into_iter().map(|t| (t, Ok(Vec::new()))).collect(),
            }));
            sim
        }

        fn ev(&mut self, ev: Event) -> Vec<Action> {
            let a = self.state.handle(ev, self.now);
            self.state.check().expect("ledger");
            a
        }

        fn tick(&mut self) -> Vec<Action> {
            self.ev(Event::Tick {
                poll_interval: POLL,
                poll_all: false,
            })
        }

        fn advance(&mut self, d: Duration) {
            self.now.mono += d;
            self.now.wall = self.now.wall + d;
        }

        fn add(&mut self, ty: usize, ids: impl IntoIterator<Item = i64>) {
            let tasks = ids.into_iter().map(|i| cand(i, i)).collect();
            self.ev(Event::Added { ty, tasks });
        }

        /// Answers a claim action with the first `got` of what it offered.
        fn claim_reply(&mut self, claim: &Action, got: usize) -> Vec<Action> {
            let Action::Claim { ty, offered, n, .. } = claim else {
                panic!("not a claim: {claim:?}")
            };
            let claimed = offered
                .iter()
                .take(got.min(*n))
                .map(|id| cand(id.0, id.0))
                .collect();
            self.ev(Event::Claimed(ClaimResult {
                ty: *ty,
                reserved: *n,
                offered: offered.clone(),
                accepted: offered.clone(),
                outcome: Ok(ClaimOutcome {
                    claimed,
                    cluster_full: false,
                    args: None,
                }),
                no_storage: None,
            }))
        }
    }

    fn claims(actions: &[Action]) -> Vec<&Action> {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Claim { .. }))
            .collect()
    }

    fn started(actions: &[Action]) -> Vec<i64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { task, .. } => Some(task.id.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn admission_claims_what_the_budget_and_max_allow() {
        let mut limited = spec("lim", 1.0);
        limited.limiter = Some((Limiter::new(3).key(), 3));
        let mut sim = Sim::new(vec![limited, spec("big", 2.0)], 5.0, 1);
        sim.add(0, 1..=10);
        let a = sim.tick();
        let c = claims(&a);
        assert_eq!(c.len(), 1);
        assert!(matches!(c[0], Action::Claim { ty: 0, n: 3, .. }), "{c:?}");
        assert_eq!(sim.state.reserved().cpu, 3000);
        // The rest of the budget (2 CPUs) fits one task of the other type.
        sim.add(1, 100..=105);
        let a = sim.tick();
        let c = claims(&a);
        assert!(
            matches!(c[..], [Action::Claim { ty: 1, n: 1, .. }]),
            "{c:?}"
        );
        assert_eq!(sim.state.reserved(), sim.state.budget());
        // Nothing more fits: the limited type waits for its claim, the other one is blocked.
        assert!(claims(&sim.tick()).is_empty());
        assert!(matches!(
            sim.state.blocked(1),
            None | Some(Blocked::Resources { .. })
        ));
    }

    #[test]
    fn a_small_claim_offers_the_oldest_few_not_the_whole_view() {
        let mut sim = Sim::new(vec![spec("a", 1.0)], 2.0, 1);
        sim.add(0, 1..=300);
        let a = sim.tick();
        let Action::Claim { n, offered, .. } = claims(&a)[0].clone() else {
            unreachable!()
        };
        assert_eq!(n, 2);
        assert_eq!(offered.len(), claim_window(2));
        assert_eq!(offered.first(), Some(&TaskId(1)), "the oldest first");
        // A large claim offers twice what it asks for.
        assert_eq!(claim_window(100), 200);
        assert_eq!(claim_window(1), 33);
    }

    #[test]
    fn a_claim_result_gives_back_what_it_did_not_get() {
        let mut sim = Sim::new(vec![spec("a", 1.0)], 4.0, 1);
        sim.add(0, 1..=10);
        let a = sim.tick();
        let claim = claims(&a)[0].clone();
        assert!(matches!(claim, Action::Claim { n: 4, .. }));
        assert_eq!(sim.state.reserved().cpu, 4000);
        let a = sim.claim_reply(&claim, 1);
        assert_eq!(started(&a), vec![1]);
        assert_eq!(sim.state.reserved().cpu, 1000);
        assert_eq!(sim.state.counts().total, 1);
        // A finished attempt gives its reservation back exactly once.
        sim.ev(Event::Finished {
            ty: 0,
            id: TaskId(1),
        });
        sim.ev(Event::Finished {
            ty: 0,
            id: TaskId(1),
        });
        assert_eq!(sim.state.reserved().cpu, 0);
    }

    #[test]
    fn a_failed_claim_releases_everything_and_a_foreign_key_error_fences() {
        let mut sim = Sim::new(vec![spec("a", 1.0)], 4.0, 1);
        sim.add(0, 1..=2);
        let a = sim.tick();
        let Action::Claim { n, offered, .. } = claims(&a)[0].clone() else {
            unreachable!()
        };
        let err = |kind| Err(Error::Db(harmonydb::Error::new(kind, "claim failed")));
        let a = sim.ev(Event::Claimed(ClaimResult {
            ty: 0,
            reserved: n,
            offered: offered.clone(),
            accepted: offered.clone(),
            outcome: err(ErrorKind::Connection),
            no_storage: None,
        }));
        assert!(a.is_empty());
        assert_eq!(sim.state.reserved().cpu, 0);
        assert!(matches!(
            sim.state.blocked(0),
            Some(Blocked::ClaimFailed { .. })
        ));
        // Held for the retry interval, then offered again.
        assert!(claims(&sim.tick()).is_empty());
        sim.advance(Duration::from_secs(1));
        let a = sim.tick();
        let Action::Claim { n, offered, .. } = claims(&a)[0].clone() else {
            panic!("claims again after the hold: {a:?}")
        };
        let a = sim.ev(Event::Claimed(ClaimResult {
            ty: 0,
            reserved: n,
            offered: offered.clone(),
            accepted: offered,
            outcome: err(ErrorKind::ForeignKey),
            no_storage: None,
        }));
        assert_eq!(a, vec![Action::Fenced]);
        assert_eq!(sim.state.reserved().cpu, 0);
    }

    #[test]
    fn lost_races_spread_offers_reproducibly() {
        let offers_after_lost_race = |seed| {
            let mut sim = Sim::new(vec![spec("a", 1.0)], 1.0, seed);
            sim.add(0, 1..=20);
            let a = sim.tick();
            let claim = claims(&a)[0].clone();
            let Action::Claim { offered, .. } = &claim else {
                unreachable!()
            };
            assert_eq!(offered[0], TaskId(1), "a quiet node offers oldest first");
            // Other nodes got all of them first: our claim got nothing, so every task it
            // asked for is owned by others.
            sim.claim_reply(&claim, 0);
            assert!(
                !sim.state.knows(0, TaskId(1)),
                "the lost tasks leave the view"
            );
            let a = sim.tick();
            let Some(Action::Poll { epoch, .. }) = a.first().cloned() else {
                panic!("looks again at once: {a:?}")
            };
            let rows = (21..=40).map(|i| cand(i, i)).collect();
            sim.ev(Event::Polled(PollResult {
                epoch,
                polled: vec![(0, Ok(rows))],
            }));
            let a = sim.tick();
            let Some(Action::Claim { offered, .. }) = claims(&a).first().copied().cloned() else {
                panic!("claims again at once: {a:?}")
            };
            offered
        };
        let first = offers_after_lost_race(7);
        assert_eq!(first, offers_after_lost_race(7), "same seed, same offers");
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, (21..=40).map(TaskId).collect::<Vec<_>>());
        let heads: HashSet<TaskId> = (0..20).map(|s| offers_after_lost_race(s)[0]).collect();
        assert!(heads.len() > 1, "offers start at random points: {heads:?}");
    }

    #[test]
    fn a_poll_merge_keeps_what_was_added_during_the_poll() {
        let mut sim = Sim::new(vec![spec("a", 1.0)], 0.5, 1);
        sim.add(0, [1, 2]);
        let a = sim.ev(Event::Tick {
            poll_interval: POLL,
            poll_all: true,
        });
        let Some(Action::Poll { epoch, .. }) = a.iter().find(|a| matches!(a, Action::Poll { .. }))
        else {
            panic!("polls: {a:?}")
        };
        // While the poll runs, task 3 is added here; the poll saw 2 but not 1 (claimed
        // elsewhere) and not 3 (too late).
        sim.add(0, [3]);
        sim.ev(Event::Polled(PollResult {
            epoch: *epoch,
            polled: vec![(0, Ok(vec![cand(2, 2)]))],
        }));
        assert!(!sim.state.knows(0, TaskId(1)), "gone from the database");
        assert!(sim.state.knows(0, TaskId(2)));
        assert!(sim.state.knows(0, TaskId(3)), "added during the poll, kept");
    }

    #[test]
    fn a_task_in_its_retry_wait_is_claimed_when_the_wait_ends() {
        let mut s = spec("a", 1.0);
        s.retry_wait = RetryWait::constant(Duration::from_secs(10));
        let mut sim = Sim::new(vec![s], 1.0, 1);
        let mut c = cand(1, 1);
        c.retries = 1;
        c.updated = sim.now.wall;
        sim.ev(Event::Released { ty: 0, task: c });
        assert!(claims(&sim.tick()).is_empty());
        assert!(matches!(
            sim.state.blocked(0),
            Some(Blocked::RetryWait { .. })
        ));
        assert_eq!(
            sim.state.next_wake(sim.now),
            sim.now.mono + Duration::from_secs(10)
        );
        sim.advance(Duration::from_secs(10));
        assert_eq!(claims(&sim.tick()).len(), 1);
    }

    #[test]
    fn drain_stops_claims_and_drops_what_a_late_claim_got() {
        let mut sim = Sim::new(vec![spec("a", 1.0)], 2.0, 1);
        sim.add(0, 1..=4);
        let a = sim.tick();
        let claim = claims(&a)[0].clone();
        sim.ev(Event::Drain);
        let a = sim.claim_reply(&claim, 2);
        assert!(started(&a).is_empty(), "nothing starts while draining");
        assert_eq!(sim.state.reserved().cpu, 0);
        let a = sim.tick();
        assert!(claims(&a).is_empty());
        assert!(!a.iter().any(|a| matches!(a, Action::Poll { .. })));
        assert_eq!(sim.state.blocked(0), Some(&Blocked::Draining));
    }

    #[test]
    fn preemption_plans_the_cheapest_victims() {
        let mut urgent = spec("urgent", 1.0);
        urgent.time_sensitive = true;
        let mut sim = Sim::new(vec![spec("a", 1.0), urgent], 2.0, 1);
        // Task 1 starts first, task 2 five seconds later.
        for id in [1, 2] {
            sim.add(0, [id]);
            let a = sim.tick();
            let claim = claims(&a)[0].clone();
            assert_eq!(started(&sim.claim_reply(&claim, 1)), vec![id]);
            sim.advance(Duration::from_secs(5));
        }
        sim.add(1, [50]);
        let a = sim.tick();
        let bid = a
            .iter()
            .find(|a| matches!(a, Action::Preempt { .. }))
            .cloned()
            .expect("bids to preempt");
        let Action::Preempt { task, cost_ms, .. } = bid else {
            unreachable!()
        };
        assert_eq!(cost_ms, 5_000, "the bid is the youngest victim's runtime");
        let a = sim.ev(Event::Preempted(PreemptResult {
            ty: 1,
            outcome: Ok(Some(task)),
        }));
        assert!(
            a.contains(&Action::Stop {
                id: TaskId(2),
                reason: StopReason::Preempted
            }),
            "{a:?}"
        );
        assert_eq!(started(&a), vec![50]);
        assert_eq!(sim.state.reserved().cpu, 2000);
        // The victim's end releases nothing more: its reservation moved to task 50.
        sim.ev(Event::Finished {
            ty: 0,
            id: TaskId(2),
        });
        assert_eq!(sim.state.reserved().cpu, 2000);
        assert_eq!(sim.state.counts().protected, 1);
    }

    #[test]
    fn a_lost_preemption_bid_does_not_hold_back_a_type_that_found_room() {
        // Simulation seed 158: the bid came back empty after room had appeared; the type was
        // then held for a second with no blocked reason.
        let mut urgent = spec("urgent", 1.0);
        urgent.time_sensitive = true;
        let mut sim = Sim::new(vec![spec("a", 1.0), urgent], 1.0, 1);
        sim.add(0, [1]);
        let a = sim.tick();
        let claim = claims(&a)[0].clone();
        sim.claim_reply(&claim, 1);
        sim.add(1, [50, 51]);
        let a = sim.tick();
        assert!(a.iter().any(|a| matches!(a, Action::Preempt { .. })));
        // The ordinary task ends by itself while the bid runs: no claim until the bid is back.
        sim.ev(Event::Finished {
            ty: 0,
            id: TaskId(1),
        });
        assert!(claims(&sim.tick()).is_empty());
        sim.ev(Event::Preempted(PreemptResult {
            ty: 1,
            outcome: Ok(None),
        }));
        let a = sim.tick();
        assert!(
            matches!(claims(&a)[..], [Action::Claim { ty: 1, .. }]),
            "claims at once, not held: {a:?}"
        );
    }

    #[test]
    fn no_storage_names_its_reason_and_gives_back_the_reservation() {
        let mut sim = Sim::new(vec![spec("a", 1.0)], 1.0, 1);
        sim.add(0, [1]);
        let a = sim.tick();
        let Action::Claim { n, offered, .. } = claims(&a)[0].clone() else {
            unreachable!()
        };
        sim.ev(Event::Claimed(ClaimResult {
            ty: 0,
            reserved: n,
            offered,
            accepted: Vec::new(),
            outcome: Ok(ClaimOutcome::default()),
            no_storage: Some((64 << 30, 12 << 30)),
        }));
        let b = sim.state.blocked(0).cloned().expect("a reason");
        assert_eq!(b.kind(), "no_storage");
        assert_eq!(
            b.to_string(),
            "no storage: needs 64 GiB, best path has 12 GiB free"
        );
        // Held, like a refusal: no claim until the hold ends or new work arrives.
        assert!(claims(&sim.tick()).is_empty());
    }

    #[test]
    fn a_hold_after_a_refusal_ends_when_its_tasks_are_gone() {
        // Simulation seed 406: refused, the view emptied, a poll refilled it, and the new
        // tasks waited out the old hold with no blocked reason.
        let mut sim = Sim::new(vec![spec("a", 1.0)], 1.0, 1);
        sim.add(0, [1]);
        let a = sim.tick();
        let Action::Claim { n, offered, .. } = claims(&a)[0].clone() else {
            unreachable!()
        };
        sim.ev(Event::Claimed(ClaimResult {
            ty: 0,
            reserved: n,
            offered,
            accepted: Vec::new(),
            outcome: Ok(ClaimOutcome::default()),
            no_storage: None,
        }));
        assert_eq!(sim.state.blocked(0), Some(&Blocked::Refused));
        let poll = |sim: &mut Sim, rows: Vec<Candidate>| {
            let a = sim.ev(Event::Tick {
                poll_interval: POLL,
                poll_all: true,
            });
            let Some(Action::Poll { epoch, .. }) =
                a.iter().find(|a| matches!(a, Action::Poll { .. })).cloned()
            else {
                panic!("polls: {a:?}")
            };
            sim.ev(Event::Polled(PollResult {
                epoch,
                polled: vec![(0, Ok(rows))],
            }));
        };
        poll(&mut sim, Vec::new());
        sim.tick();
        poll(&mut sim, vec![cand(2, 2)]);
        let a = sim.tick();
        assert_eq!(
            claims(&a).len(),
            1,
            "the new task is offered at once: {a:?}"
        );
    }

    #[test]
    fn a_won_bid_respects_the_limiter_filled_while_it_ran() {
        // Simulation seed 1674: another type sharing the limiter took its last slot while the
        // bid ran; starting the time-sensitive task anyway put the limiter over its max.
        let mut urgent = spec("urgent", 1.0);
        urgent.time_sensitive = true;
        urgent.limiter = Some((7, 1));
        let mut other = spec("other", 0.0);
        other.limiter = Some((7, 1));
        let mut sim = Sim::new(vec![spec("a", 1.0), urgent, other], 1.0, 1);
        sim.add(0, [1]);
        let a = sim.tick();
        let claim = claims(&a)[0].clone();
        sim.claim_reply(&claim, 1);
        sim.add(1, [50]);
        let a = sim.tick();
        let Some(Action::Preempt { task, .. }) = a
            .iter()
            .find(|a| matches!(a, Action::Preempt { .. }))
            .cloned()
        else {
            panic!("bids: {a:?}")
        };
        // While the bid runs, a task of the other type takes the limiter's only slot.
        sim.add(2, [60]);
        let a = sim.tick();
        let claim = claims(&a)[0].clone();
        assert!(matches!(claim, Action::Claim { ty: 2, .. }));
        assert_eq!(started(&sim.claim_reply(&claim, 1)), vec![60]);
        // The bid is won, but the task must not start: it is given back, nothing preempted.
        let a = sim.ev(Event::Preempted(PreemptResult {
            ty: 1,
            outcome: Ok(Some(task)),
        }));
        assert_eq!(
            a,
            vec![Action::Release {
                task: TaskId(50),
                update_time: None
            }]
        );
    }

    #[test]
    fn a_cordon_yields_running_can_yield_attempts() {
        let mut s = spec("y", 1.0);
        s.can_yield = true;
        let mut sim = Sim::new(vec![s], 2.0, 1);
        sim.add(0, [1]);
        let a = sim.tick();
        let claim = claims(&a)[0].clone();
        sim.claim_reply(&claim, 1);
        let a = sim.ev(Event::Cordon(true));
        assert_eq!(
            a,
            vec![Action::Stop {
                id: TaskId(1),
                reason: StopReason::Yielded
            }]
        );
        sim.add(0, [2]);
        assert!(claims(&sim.tick()).is_empty());
        assert_eq!(sim.state.blocked(0), Some(&Blocked::Cordoned));
    }
}
