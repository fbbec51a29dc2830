//! One attempt of one task, on its own tokio task: run it (catching panics, enforcing the
//! per-attempt timeout, honouring cancellation), give its resources back to the scheduler the
//! moment it returns, then have the outcome recorded and act on the verdict.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::engine::{Event, Shared};
use crate::recorder::{Request, Verdict};
use crate::store::{AttemptResult, Candidate, Fate, Outcome};
use crate::task::{Done, RunContext, TaskError};

/// Why an attempt's cancellation token fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum StopReason {
    None = 0,
    Shutdown = 1,
    Preempted = 2,
    Fenced = 3,
    /// The node was cordoned and the type is `can_yield`: it gives way to other nodes.
    Yielded = 4,
}

impl StopReason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => StopReason::Shutdown,
            2 => StopReason::Preempted,
            3 => StopReason::Fenced,
            4 => StopReason::Yielded,
            _ => StopReason::None,
        }
    }
}

/// The scheduler's handle on a running attempt.
#[derive(Clone)]
pub(crate) struct RunHandle {
    pub token: CancellationToken,
    pub reason: Arc<AtomicU8>,
    pub ty: usize,
    pub started: std::time::Instant,
}

impl RunHandle {
    pub(crate) fn new(ty: usize) -> Self {
        RunHandle {
            token: CancellationToken::new(),
            reason: Arc::new(AtomicU8::new(StopReason::None as u8)),
            ty,
            started: std::time::Instant::now(),
        }
    }

    /// Fires the token, remembering the first reason given.
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.compare_exchange(
            StopReason::None as u8,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.token.cancel();
    }
}

/// Longest error text stored in history.
pub(crate) const ERR_TEXT_MAX: usize = 4096;

enum Attempt {
    Returned(Result<Done, TaskError>),
    Panicked(String),
    TimedOut(std::time::Duration),
}

/// Runs one claimed task to its recorded end.
pub(crate) async fn run_one(shared: Arc<Shared>, ty: usize, cand: Candidate, handle: RunHandle) {
    let entry = &shared.types[ty];
    let work_start = shared.clock.now();
    let queued_since = if cand.retries == 0 {
        cand.posted
    } else {
        cand.updated
    };
    entry.metrics.started.inc();
    entry
        .metrics
        .wait
        .observe(work_start.since(queued_since).as_secs_f64());
    let meta = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let ctx = RunContext {
        task: cand.id,
        name: Arc::clone(&entry.name),
        retries: cand.retries,
        db: shared.db.clone(),
        cancel: handle.token.clone(),
        ownership: Arc::clone(&entry.ownership),
        meta: Arc::clone(&meta),
        machine: shared.machine,
    };
    let span = tracing::debug_span!("task", id = %cand.id, task_type = %entry.name, machine = %shared.machine);
    let guarded = AssertUnwindSafe(tracing::Instrument::instrument(
        entry.task.run(cand.id, ctx),
        span,
    ))
    .catch_unwind();
    let attempt = match entry.details.timeout {
        Some(limit) => match tokio::time::timeout(limit, guarded).await {
            Ok(r) => r.map_or_else(|p| Attempt::Panicked(panic_text(&*p)), Attempt::Returned),
            Err(_) => {
                handle.token.cancel();
                Attempt::TimedOut(limit)
            }
        },
        None => guarded
            .await
            .map_or_else(|p| Attempt::Panicked(panic_text(&*p)), Attempt::Returned),
    };
    let work_end = shared.clock.now();
    entry
        .metrics
        .duration
        .observe(handle.started.elapsed().as_secs_f64());
    // Resources come back now, not after recording: the scheduler can start the next task
    // while this outcome is written.
    shared.send(Event::Finished { ty, id: cand.id }).await;

    let reason = StopReason::from_u8(handle.reason.load(Ordering::Acquire));
    let (fate, err) = classify(attempt, reason, cand.retries, entry.details.max_failures);
    let counter = match fate {
        Fate::Done => &entry.metrics.completed,
        Fate::Retry | Fate::Fail => &entry.metrics.failed,
        Fate::Release => &entry.metrics.released,
    };
    counter.inc();
    if let Fate::Retry | Fate::Fail = fate {
        tracing::info!(task = %cand.id, task_type = %entry.name, retries = cand.retries, final_failure = fate == Fate::Fail, error = %err, "attempt failed");
    }
    let outcome = Outcome {
        id: cand.id,
        name: entry.name.to_string(),
        posted: cand.posted,
        work_start,
        work_end,
        fate,
        err,
    };
    let (reply, verdict) = oneshot::channel();
    if shared
        .recorder
        .send(Request { outcome, reply })
        .await
        .is_err()
    {
        return;
    }
    match verdict.await.unwrap_or(Verdict::Abandoned) {
        Verdict::Applied(_history_id) => match fate {
            Fate::Done | Fate::Fail if entry.is_singleton() => {
                // A run-now request that arrived while this one ran or waited is served now.
                if fate == Fate::Done {
                    let meta = meta.lock().map(|m| m.clone()).unwrap_or_default();
                    shared.task_completed(ty, cand.id, &meta);
                }
                match shared.store.singleton_get(&entry.name).await {
                    Ok(Some((_, _, true))) => shared.run_now(&entry.name),
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "reading the run-now flag failed"),
                }
            }
            Fate::Done => {
                let meta = meta.lock().map(|m| m.clone()).unwrap_or_default();
                shared.task_completed(ty, cand.id, &meta);
            }
            Fate::Retry | Fate::Release => {
                let retries = if fate == Fate::Retry {
                    cand.retries + 1
                } else {
                    cand.retries
                };
                shared
                    .send(Event::Released {
                        ty,
                        task: Candidate {
                            id: cand.id,
                            posted: cand.posted,
                            updated: work_end,
                            retries,
                        },
                    })
                    .await;
            }
            Fate::Fail => {}
        },
        Verdict::FencedOut => {
            entry.metrics.fenced_out.inc();
            tracing::warn!(task = %cand.id, task_type = %entry.name, "outcome discarded: another node owns this task now");
        }
        Verdict::Abandoned => {
            tracing::debug!(task = %cand.id, "outcome not recorded: the engine stopped first");
        }
    }
}

fn classify(
    attempt: Attempt,
    reason: StopReason,
    retries: u32,
    max_failures: u32,
) -> (Fate, String) {
    let failure = match attempt {
        Attempt::Returned(Ok(Done(true))) => return (Fate::Done, String::new()),
        _ if reason == StopReason::Shutdown => return release(AttemptResult::Shutdown),
        _ if reason == StopReason::Preempted => return release(AttemptResult::Preempted),
        _ if reason == StopReason::Yielded => return release(AttemptResult::Yielded),
        Attempt::Returned(Ok(Done(false))) => "not done (the task returned Done(false))".to_owned(),
        Attempt::Returned(Err(e)) => e.message().to_owned(),
        Attempt::Panicked(msg) => format!("panic: {msg}"),
        Attempt::TimedOut(limit) => format!("timeout: the attempt ran longer than {limit:?}"),
    };
    let attempts = retries.saturating_add(1);
    let fate = if max_failures > 0 && attempts >= max_failures {
        Fate::Fail
    } else {
        Fate::Retry
    };
    (fate, bounded(failure))
}

/// A release with retries unchanged; `task history` reads the kind back from the text.
fn release(kind: AttemptResult) -> (Fate, String) {
    (Fate::Release, kind.release_text().to_owned())
}

fn bounded(mut s: String) -> String {
    if s.len() > ERR_TEXT_MAX {
        let mut cut = ERR_TEXT_MAX - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let done = Attempt::Returned(Ok(Done(true)));
        assert_eq!(classify(done, StopReason::Shutdown, 0, 1).0, Fate::Done);
        let err = || Attempt::Returned(Err(TaskError::new("boom")));
        assert_eq!(
            classify(err(), StopReason::None, 0, 0),
            (Fate::Retry, "boom".into())
        );
        assert_eq!(classify(err(), StopReason::None, 1, 3).0, Fate::Retry);
        assert_eq!(classify(err(), StopReason::None, 2, 3).0, Fate::Fail);
        assert_eq!(classify(err(), StopReason::None, 0, 1).0, Fate::Fail);
        assert_eq!(
            classify(err(), StopReason::Preempted, 2, 3),
            (Fate::Release, "preempted".into())
        );
        assert_eq!(
            classify(err(), StopReason::Shutdown, 0, 1),
            (Fate::Release, "shutdown".into())
        );
        // A yield is not a failure, however the attempt ended, even on its last attempt.
        assert_eq!(
            classify(err(), StopReason::Yielded, 2, 3),
            (Fate::Release, "yielded".into())
        );
        assert_eq!(
            classify(
                Attempt::Returned(Ok(Done(false))),
                StopReason::Yielded,
                0,
                1
            ),
            (Fate::Release, "yielded".into())
        );
        let (f, e) = classify(Attempt::Panicked("oops".into()), StopReason::None, 0, 0);
        assert_eq!((f, e.as_str()), (Fate::Retry, "panic: oops"));
        assert!(
            classify(
                Attempt::TimedOut(std::time::Duration::from_secs(1)),
                StopReason::None,
                0,
                0
            )
            .1
            .starts_with("timeout")
        );
    }

    #[test]
    fn error_text_is_bounded() {
        let long = "é".repeat(5000);
        let b = bounded(long);
        assert!(b.len() <= ERR_TEXT_MAX);
        assert!(b.ends_with("..."));
    }
}
