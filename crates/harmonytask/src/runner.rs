//! One attempt of one task, on its own tokio task: run it (catching panics, enforcing the
//! per-attempt timeout, honouring cancellation), give its resources back to the scheduler the
//! moment it returns, then hand the outcome to the recorder and wait until it is recorded.
//! What the record means for the scheduler (released, run-now) the recorder says: the path
//! runs one way.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use futures_util::FutureExt;
use harmonydb::Db;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::model::{AttemptResult, Candidate, Fate, MachineId, Outcome};
use crate::recorder::Request;
use crate::registry::Registry;
use crate::scheduler::inbox::Inbox;
use crate::scheduler::state::{Event, StopReason};
use crate::task::{Done, RunContext, TaskError};

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

/// What an attempt needs: the registered types, the scheduler's inbox (resources freed), the
/// recorder, the database and the clock. Nothing else of the engine.
pub(crate) struct RunEnv {
    pub registry: Arc<Registry>,
    pub inbox: Arc<Inbox>,
    pub recorder: mpsc::Sender<Request>,
    pub db: Db,
    pub clock: Arc<dyn Clock>,
    pub machine: MachineId,
}

/// Runs one claimed task to its recorded end.
/// `args`: the task's arguments where the claim returned them.
pub(crate) async fn run_one(
    shared: Arc<RunEnv>,
    ty: usize,
    cand: Candidate,
    args: Option<std::collections::HashMap<String, String>>,
    handle: RunHandle,
) {
    let entry = &shared.registry.types[ty];
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
    let db_trouble = Arc::new(std::sync::Mutex::new(None));
    let ctx = RunContext {
        task: cand.id,
        name: Arc::clone(&entry.name),
        retries: cand.retries,
        db: shared.db.clone(),
        cancel: handle.token.clone(),
        ownership: Arc::clone(&entry.ownership),
        meta: Arc::clone(&meta),
        machine: shared.machine,
        db_trouble: Arc::clone(&db_trouble),
        claimed_args: args.map(Arc::new),
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
    shared.inbox.send(Event::Finished { ty, id: cand.id }).await;

    let reason = StopReason::from_u8(handle.reason.load(Ordering::Acquire));
    if reason == StopReason::Lost {
        entry.metrics.cancelled.inc();
    }
    let db_trouble = db_trouble.lock().ok().and_then(|mut t| t.take());
    let (fate, err) = classify(
        attempt,
        reason,
        db_trouble,
        cand.retries,
        entry.details.max_failures,
    );
    let counter = match fate {
        Fate::Done => &entry.metrics.completed,
        Fate::Retry | Fate::Fail => &entry.metrics.failed,
        Fate::Release => &entry.metrics.released,
    };
    counter.inc();
    if let Fate::Retry | Fate::Fail = fate {
        tracing::info!(task = %cand.id, task_type = %entry.name, retries = cand.retries, final_failure = fate == Fate::Fail, error = %err, "attempt failed");
    } else if fate == Fate::Release && err.starts_with(DB_UNAVAILABLE) {
        tracing::warn!(task = %cand.id, task_type = %entry.name, retries = cand.retries, error = %err, "attempt spoiled by the database; released with retries unchanged, it runs again once the database is back");
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
    let meta = meta.lock().map(|m| m.clone()).unwrap_or_default();
    let (reply, recorded) = oneshot::channel();
    let request = Request {
        ty,
        retries: cand.retries,
        outcome,
        meta,
        reply,
    };
    if shared.recorder.send(request).await.is_ok() {
        // Recorded, discarded by its fence or abandoned: the recorder has acted on it.
        let _ = recorded.await;
    }
}

/// How the history `err` of an attempt spoiled by the database starts.
const DB_UNAVAILABLE: &str = AttemptResult::DatabaseUnavailable.release_text();

/// Decides what an attempt's end does to its task. `db_trouble` is a transient database error
/// that one of the engine's own reads for the attempt (`args`, `still_owned`) met.
fn classify(
    attempt: Attempt,
    reason: StopReason,
    db_trouble: Option<String>,
    retries: u32,
    max_failures: u32,
) -> (Fate, String) {
    let failure = match attempt {
        Attempt::Returned(Ok(Done(true))) => return (Fate::Done, String::new()),
        _ if reason == StopReason::Shutdown => return release(AttemptResult::Shutdown),
        _ if reason == StopReason::Preempted => return release(AttemptResult::Preempted),
        _ if reason == StopReason::Yielded => return release(AttemptResult::Yielded),
        // Cancelled by an operator: the row is gone and the record discards this outcome.
        _ if reason == StopReason::Lost => return release(AttemptResult::Cancelled),
        // The database blinked: the task did nothing wrong, so the attempt is not counted.
        // Recording the release waits (with retries) until the database is back, and the task
        // runs again from there. Panics and timeouts stay failures: they are the task's own.
        Attempt::Returned(Err(e)) if e.is_database_unavailable() => {
            return (Fate::Release, db_unavailable(e.message()));
        }
        Attempt::Returned(Ok(Done(false)) | Err(_)) if db_trouble.is_some() => {
            return (
                Fate::Release,
                db_unavailable(db_trouble.as_deref().unwrap_or_default()),
            );
        }
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

fn db_unavailable(message: &str) -> String {
    bounded(format!("{DB_UNAVAILABLE}{}", harmonydb::redact(message)))
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
        assert_eq!(
            classify(done, StopReason::Shutdown, None, 0, 1).0,
            Fate::Done
        );
        let err = || Attempt::Returned(Err(TaskError::new("boom")));
        assert_eq!(
            classify(err(), StopReason::None, None, 0, 0),
            (Fate::Retry, "boom".into())
        );
        assert_eq!(classify(err(), StopReason::None, None, 1, 3).0, Fate::Retry);
        assert_eq!(classify(err(), StopReason::None, None, 2, 3).0, Fate::Fail);
        assert_eq!(classify(err(), StopReason::None, None, 0, 1).0, Fate::Fail);
        assert_eq!(
            classify(err(), StopReason::Preempted, None, 2, 3),
            (Fate::Release, "preempted".into())
        );
        assert_eq!(
            classify(err(), StopReason::Shutdown, None, 0, 1),
            (Fate::Release, "shutdown".into())
        );
        // A yield is not a failure, however the attempt ended, even on its last attempt.
        assert_eq!(
            classify(err(), StopReason::Yielded, None, 2, 3),
            (Fate::Release, "yielded".into())
        );
        assert_eq!(
            classify(
                Attempt::Returned(Ok(Done(false))),
                StopReason::Yielded,
                None,
                0,
                1
            ),
            (Fate::Release, "yielded".into())
        );
        let (f, e) = classify(
            Attempt::Panicked("oops".into()),
            StopReason::None,
            None,
            0,
            0,
        );
        assert_eq!((f, e.as_str()), (Fate::Retry, "panic: oops"));
        assert!(
            classify(
                Attempt::TimedOut(std::time::Duration::from_secs(1)),
                StopReason::None,
                None,
                0,
                0
            )
            .1
            .starts_with("timeout")
        );
    }

    #[test]
    fn a_transient_database_error_releases_the_task_with_retries_unchanged() {
        use harmonydb::{Error as DbError, ErrorKind};
        let db_err = |kind| {
            let e: TaskError =
                DbError::new(kind, "connection closed to postgres://bob:pw@db1/x").into();
            Attempt::Returned(Err(e))
        };
        // Even on the last allowed attempt of a max_failures = 1 type.
        for kind in [
            ErrorKind::Connection,
            ErrorKind::Timeout,
            ErrorKind::Serialization,
        ] {
            let (fate, err) = classify(db_err(kind), StopReason::None, None, 0, 1);
            assert_eq!(fate, Fate::Release, "{kind}");
            assert!(
                err.starts_with("database unavailable: connection closed"),
                "{err}"
            );
            assert!(!err.contains(":pw@"), "credentials leaked: {err}");
        }
        // Through the engine's error type too (what `ctx.args()` returns).
        let e: TaskError =
            crate::Error::Db(DbError::new(ErrorKind::Connection, "connection closed")).into();
        assert_eq!(
            classify(Attempt::Returned(Err(e)), StopReason::None, None, 0, 1).0,
            Fate::Release
        );
        // With context added through TaskError::database.
        let e = TaskError::database(
            "writing the result",
            &DbError::new(ErrorKind::Timeout, "statement timed out"),
        );
        assert_eq!(
            classify(Attempt::Returned(Err(e)), StopReason::None, None, 0, 1),
            (
                Fate::Release,
                "database unavailable: writing the result: statement timed out".into()
            )
        );
        // A database error that is about the work itself still counts.
        let (fate, err) = classify(
            db_err(ErrorKind::UniqueViolation),
            StopReason::None,
            None,
            0,
            1,
        );
        assert_eq!(fate, Fate::Fail);
        assert!(!err.starts_with("database unavailable"), "{err}");
        // A task that wraps the error in its own text has decided what it means.
        let wrapped = Attempt::Returned(Err(TaskError::new("connection closed")));
        assert_eq!(
            classify(wrapped, StopReason::None, None, 0, 1).0,
            Fate::Fail
        );
        // Shutdown and preemption keep their own reasons.
        assert_eq!(
            classify(
                db_err(ErrorKind::Connection),
                StopReason::Shutdown,
                None,
                0,
                1
            ),
            (Fate::Release, "shutdown".into())
        );
    }

    #[test]
    fn an_engine_read_spoiled_by_the_database_releases_the_task() {
        let trouble = || Some("connection closed".to_owned());
        // Whatever the task made of the failed read: its own error text, or Done(false) after
        // still_owned() said false.
        let own_text = Attempt::Returned(Err(TaskError::new("reading the arguments: oops")));
        assert_eq!(
            classify(own_text, StopReason::None, trouble(), 0, 1),
            (
                Fate::Release,
                "database unavailable: connection closed".into()
            )
        );
        let gave_up = Attempt::Returned(Ok(Done(false)));
        assert_eq!(
            classify(gave_up, StopReason::None, trouble(), 0, 1).0,
            Fate::Release
        );
        // A success is a success; a panic or a timeout is the task's own.
        let done = Attempt::Returned(Ok(Done(true)));
        assert_eq!(
            classify(done, StopReason::None, trouble(), 0, 1).0,
            Fate::Done
        );
        let panicked = Attempt::Panicked("oops".into());
        assert_eq!(
            classify(panicked, StopReason::None, trouble(), 0, 1).0,
            Fate::Fail
        );
    }

    #[test]
    fn history_reads_back_how_an_attempt_ended() {
        let row = |result: bool, err: String| crate::model::HistoryRow {
            id: 1,
            task_id: 1,
            name: "t".into(),
            posted: harmonydb::Timestamp::from_millis(0),
            work_start: harmonydb::Timestamp::from_millis(0),
            work_end: harmonydb::Timestamp::from_millis(0),
            result,
            err,
            completed_by_host_and_port: "h:1".into(),
        };
        for kind in [
            AttemptResult::Shutdown,
            AttemptResult::Preempted,
            AttemptResult::Yielded,
        ] {
            assert_eq!(row(false, release(kind).1).attempt_result(), kind);
        }
        assert_eq!(
            row(false, db_unavailable("connection closed")).attempt_result(),
            AttemptResult::DatabaseUnavailable
        );
        assert_eq!(row(true, String::new()).attempt_result(), AttemptResult::Ok);
        // A task's own error that merely mentions a release word is a failure.
        assert_eq!(
            row(false, "shutdown of the pump failed".into()).attempt_result(),
            AttemptResult::Failed
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
