//! Records attempt outcomes, many per transaction.
//!
//! Each finished attempt sends its [`Outcome`] here and waits for the verdict. The recorder
//! takes everything that has queued up (up to `record_batch_max`) and records it in one
//! transaction through [`Store::task_record`], fenced by `owner_id = this machine`: batching
//! comes for free under load (while one transaction commits, the next batch gathers) and costs
//! nothing when idle (a lone outcome is recorded at once).
//!
//! Transient database errors are retried with capped backoff until the batch is recorded; the
//! scheduler never waits on this loop, because resources are freed when `run` returns.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::clock::Clock;
use crate::store::prelude::*;
use crate::store::{Outcome, RecordBatch, Store};
use crate::task::MachineId;

/// What happened to one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Recorded; the history row's id.
    Applied(i64),
    /// Discarded: the task was no longer owned by this machine.
    FencedOut,
    /// Not recorded: the engine stopped first (its row is released at shutdown, or belongs to
    /// other nodes after a fence).
    Abandoned,
}

pub(crate) struct Request {
    pub outcome: Outcome,
    pub reply: oneshot::Sender<Verdict>,
}

/// First wait before retrying a failed batch.
const RECORD_BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// Longest wait between retries of a failed batch.
const RECORD_BACKOFF_MAX: Duration = Duration::from_secs(5);

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
    /// Fired on a fatal error: outcomes are abandoned.
    pub fatal: CancellationToken,
    /// Wakes the follower loop after completions that queued follow-ups (`None` when no local
    /// type follows anything).
    pub followers: Option<Arc<Notify>>,
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
        loop {
            if s.fatal.is_cancelled() {
                for r in batch.drain(..) {
                    let _ = r.reply.send(Verdict::Abandoned);
                }
                return;
            }
            if uncertain {
                match s.take_recorded(batch).await {
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
            let b = RecordBatch {
                notify: s.notify,
                cluster_limited: &s.cluster_limited,
                owner: s.machine,
                host_and_port: &s.host_and_port,
                now: s.clock.now(),
                outcomes: &outcomes,
            };
            let t0 = std::time::Instant::now();
            let result = s.store.task_record(&b).await;
            tracing::debug!(outcomes = outcomes.len(), took = ?t0.elapsed(), "record batch");
            match result {
                Ok(recorded) => {
                    if !recorded.followed.is_empty()
                        && let Some(f) = &s.followers
                    {
                        f.notify_one();
                    }
                    // A task appears at most once per batch: it is released only by recording.
                    let applied: std::collections::HashMap<_, _> =
                        recorded.applied.into_iter().collect();
                    for r in batch.drain(..) {
                        let verdict = applied
                            .get(&r.outcome.id)
                            .map_or(Verdict::FencedOut, |h| Verdict::Applied(*h));
                        let _ = r.reply.send(verdict);
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

    /// Answers, and removes from `batch`, the outcomes whose history row exists: an earlier
    /// try committed them. Returns how many.
    async fn take_recorded(&self, batch: &mut Vec<Request>) -> crate::Result<usize> {
        let mut taken = 0;
        let mut i = 0;
        while i < batch.len() {
            let o = &batch[i].outcome;
            let found = self
                .store
                .history_of_attempt(o.id, o.work_start, o.work_end, &self.host_and_port)
                .await?;
            match found {
                Some(history_id) => {
                    let r = batch.swap_remove(i);
                    let _ = r.reply.send(Verdict::Applied(history_id));
                    taken += 1;
                }
                None => i += 1,
            }
        }
        Ok(taken)
    }
}
