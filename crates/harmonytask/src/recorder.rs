//! Records attempt outcomes, many per transaction, and acts on what the commit decided.
//!
//! Each finished attempt sends its [`Outcome`] here and waits until it is recorded. The
//! recorder takes everything that has queued up (up to `record_batch_max`) and records it in
//! one transaction through [`Store::task_record`], fenced by `owner_id = this machine`:
//! batching comes for free under load (while one transaction commits, the next batch gathers)
//! and costs nothing when idle (a lone outcome is recorded at once).
//!
//! The record path runs one way: runner → recorder → scheduler. Only the commit knows which
//! outcomes applied (the fence held), so the recorder alone tells the scheduler which tasks
//! were released (with the `update_time` the commit wrote), asks for a singleton's run-now
//! when the same transaction found one pending, runs the completion callbacks and wakes the
//! follower loop. An outcome whose fence failed is counted and dropped.
//!
//! Transient database errors are retried with capped backoff until the batch is recorded; the
//! scheduler never waits on this loop, because resources are freed when `run` returns.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use harmonydb::Timestamp;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::follow::FollowWake;
use crate::model::{Candidate, Fate, MachineId, Outcome, TaskId};
use crate::registry::Registry;
use crate::scheduler::inbox::Inbox;
use crate::scheduler::state::Event;
use crate::store::prelude::*;
use crate::store::{RecordBatch, Store};

/// One finished attempt, to record.
pub(crate) struct Request {
    /// The task's type (registry index).
    pub ty: usize,
    /// Failed attempts before this one.
    pub retries: u32,
    pub outcome: Outcome,
    /// What the attempt set with `RunContext::set_meta`, for the completion callbacks.
    pub meta: HashMap<String, String>,
    /// Answered once the outcome is recorded, discarded by its fence, or abandoned because
    /// the engine stopped: the attempt ends then.
    pub reply: oneshot::Sender<()>,
}

/// First wait before retrying a failed batch.
const RECORD_BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// Longest wait between retries of a failed batch.
const RECORD_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Times the recorder yields to the runtime before a transaction, gathering what arrives
/// meanwhile (microseconds, no timer).
const GATHER_YIELDS: usize = 2;

/// The recorder loop, with only what it uses.
pub(crate) struct Recorder {
    pub rx: mpsc::Receiver<Request>,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub machine: MachineId,
    pub host_and_port: String,
    /// Send wake-up hints with each commit.
    pub notify: bool,
    pub batch_max: usize,
    /// Types with a cluster-wide limit (their completions are hinted).
    pub cluster_limited: Vec<String>,
    /// Local singleton types (their run-now requests are read in the record transaction).
    pub singletons: Vec<String>,
    /// Fired on a fatal error: outcomes are abandoned.
    pub fatal: CancellationToken,
    /// Wakes the follower loop after completions that queued follow-ups.
    pub followers: FollowWake,
    pub registry: Arc<Registry>,
    /// Told what was released and which run-now requests are pending.
    pub inbox: Arc<Inbox>,
}

impl Recorder {
    /// Runs until every sender is gone (all attempts finished) or the engine fails fatally.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let max = self.batch_max;
        let mut batch: Vec<Request> = Vec::with_capacity(max);
        loop {
            // By the time `shutdown` fires, every attempt has returned and been recorded (or
            // abandoned), so nothing is left behind.
            let n = tokio::select! {
                n = self.rx.recv_many(&mut batch, max) => n,
                () = shutdown.cancelled() => return,
            };
            if n == 0 {
                return;
            }
            // Let the attempts that finished with these run to their hand-off first, so that
            // their outcomes join this transaction instead of waiting for the next one.
            for _ in 0..GATHER_YIELDS {
                tokio::task::yield_now().await;
                while batch.len() < max
                    && let Ok(r) = self.rx.try_recv()
                {
                    batch.push(r);
                }
            }
            self.record(&mut batch).await;
        }
    }

    async fn record(&self, batch: &mut Vec<Request>) {
        let s = self;
        let mut outcomes: Vec<Outcome> = batch.iter().map(|r| r.outcome.clone()).collect();
        let mut backoff = Backoff::new(RECORD_BACKOFF_INITIAL, RECORD_BACKOFF_MAX);
        // A failed try may have committed anyway (its reply lost): before the next one, find
        // the outcomes it recorded, so that no attempt is recorded twice.
        let mut uncertain = false;
        // The `update_time` the last try wrote to released rows.
        let mut last_now = s.clock.now();
        loop {
            if s.fatal.is_cancelled() {
                tracing::debug!(
                    outcomes = batch.len(),
                    "outcomes not recorded: the engine stopped first"
                );
                for r in batch.drain(..) {
                    let _ = r.reply.send(());
                }
                return;
            }
            if uncertain {
                match s.take_recorded(batch, last_now).await {
                    Ok(0) => {}
                    Ok(_) => {
                        outcomes = batch.iter().map(|r| r.outcome.clone()).collect();
                        if batch.is_empty() {
                            return;
                        }
                    }
                    Err(e) => {
                        let wait = backoff.next_wait();
                        tracing::warn!(error = %e, retry_in = ?wait, "checking what a failed recording committed failed; retrying");
                        tokio::select! {
                            () = s.fatal.cancelled() => {}
                            () = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                }
            }
            last_now = s.clock.now();
            let b = RecordBatch {
                notify: s.notify,
                cluster_limited: &s.cluster_limited,
                owner: s.machine,
                host_and_port: &s.host_and_port,
                now: last_now,
                outcomes: &outcomes,
                singletons: &s.singletons,
            };
            let t0 = std::time::Instant::now();
            let result = s.store.task_record(&b).await;
            tracing::debug!(outcomes = outcomes.len(), took = ?t0.elapsed(), "record batch");
            match result {
                Ok(recorded) => {
                    for from in &recorded.followed {
                        s.followers.wake(Some(from));
                    }
                    // A task appears at most once per batch: it is released only by recording.
                    let applied: HashSet<TaskId> =
                        recorded.applied.iter().map(|(id, _)| *id).collect();
                    for r in batch.drain(..) {
                        if applied.contains(&r.outcome.id) {
                            s.applied(&r, b.now).await;
                        } else {
                            s.registry.types[r.ty].metrics.fenced_out.inc();
                            tracing::warn!(task = %r.outcome.id, task_type = %r.outcome.name, "outcome discarded: another node owns this task now");
                        }
                        let _ = r.reply.send(());
                    }
                    for name in &recorded.run_now {
                        s.inbox.run_now(name);
                    }
                    return;
                }
                Err(e) => {
                    uncertain = true;
                    let wait = backoff.next_wait();
                    tracing::warn!(error = %e, outcomes = outcomes.len(), retry_in = ?wait, "recording outcomes failed; retrying");
                    tokio::select! {
                        () = s.fatal.cancelled() => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// What an applied outcome means for this node: a released task is offered to the
    /// scheduler again (with the `update_time` its row got, `now`, from which its retry wait
    /// counts); a completion runs the type's callbacks.
    async fn applied(&self, r: &Request, now: Timestamp) {
        let o = &r.outcome;
        match o.fate {
            Fate::Done => self.registry.task_completed(r.ty, o.id, &r.meta),
            Fate::Retry | Fate::Release => {
                let retries = if o.fate == Fate::Retry {
                    r.retries + 1
                } else {
                    r.retries
                };
                let task = Candidate {
                    id: o.id,
                    posted: o.posted,
                    updated: now,
                    retries,
                };
                self.inbox.send(Event::Released { ty: r.ty, task }).await;
            }
            Fate::Fail => {}
        }
    }

    /// Acts on, answers and removes from `batch` the outcomes whose history row exists: an
    /// earlier try (which wrote `now`) committed them. Returns how many. A run-now request of
    /// a singleton they ended is found by the scheduler's next poll.
    async fn take_recorded(
        &self,
        batch: &mut Vec<Request>,
        now: Timestamp,
    ) -> crate::Result<usize> {
        let mut taken = 0;
        let mut i = 0;
        while i < batch.len() {
            let o = &batch[i].outcome;
            let found = self
                .store
                .history_of_attempt(o.id, o.work_start, o.work_end, &self.host_and_port)
                .await?;
            match found {
                Some(_history_id) => {
                    let r = batch.swap_remove(i);
                    self.applied(&r, now).await;
                    let _ = r.reply.send(());
                    taken += 1;
                }
                None => i += 1,
            }
        }
        Ok(taken)
    }
}
