//! Built-in task types for tests, benchmarks and demos: `bench_noop`, `bench_sleep`
//! (`ms` argument), `bench_fail` (fails `fail_times` attempts, then succeeds) and `bench_read`
//! (reads its arguments, as a user's task reads its input, and logs nothing).
//!
//! Each logs every physical attempt — task, machine, start, end — in `harmony_test_attempt`
//! itself, outside the engine's fencing, so that an outside checker can prove that no task ran
//! twice at once and none was lost, even across crashes. The log is group-committed: an attempt
//! waits for its start row to commit before working and for its end row before returning,
//! but many attempts share a transaction. `bench_noop` does no work between its start and its
//! end, so it writes its attempt as one row (start and end) before returning: an attempt cut
//! off by a crash had no effect and leaves no row.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harmonydb::{Db, Timestamp};
use harmonytask::{
    Done, Resources, RetryWait, RunContext, Task, TaskError, TaskId, TypeDetails, async_trait,
};
use tokio::sync::{mpsc, oneshot};

use crate::store::{AttemptStart, AttemptWhole, BenchStore};

/// Name of the no-op type.
pub const BENCH_NOOP: &str = "bench_noop";
/// Name of the sleeping type.
pub const BENCH_SLEEP: &str = "bench_sleep";
/// Name of the failing type.
pub const BENCH_FAIL: &str = "bench_fail";
/// Name of the input-reading type.
pub const BENCH_READ: &str = "bench_read";
/// All built-in names.
pub const BUILTIN_TYPES: [&str; 4] = [BENCH_NOOP, BENCH_SLEEP, BENCH_FAIL, BENCH_READ];

/// Most attempt log entries written in one transaction.
const ATTEMPT_BATCH_MAX: usize = 1024;

enum LogRequest {
    Start(AttemptStart, oneshot::Sender<Option<i64>>),
    Whole(AttemptWhole, oneshot::Sender<()>),
    End(i64, Timestamp, oneshot::Sender<()>),
}

/// Group-committing writer of `harmony_test_attempt`. Cheap to clone.
#[derive(Clone)]
pub struct AttemptLog {
    tx: mpsc::Sender<LogRequest>,
}

impl AttemptLog {
    /// Starts the writer loop on the current runtime; it ends when the last handle is dropped.
    pub fn new(db: Db) -> Self {
        let (tx, mut rx) = mpsc::channel::<LogRequest>(ATTEMPT_BATCH_MAX * 4);
        let store = BenchStore::new(db);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(ATTEMPT_BATCH_MAX);
            while rx.recv_many(&mut batch, ATTEMPT_BATCH_MAX).await > 0 {
                let mut starts = Vec::new();
                let mut start_replies = Vec::new();
                let mut wholes = Vec::new();
                let mut ends = Vec::new();
                let mut end_replies = Vec::new();
                for r in batch.drain(..) {
                    match r {
                        LogRequest::Start(s, reply) => {
                            starts.push(s);
                            start_replies.push(reply);
                        }
                        LogRequest::Whole(w, reply) => {
                            wholes.push(w);
                            end_replies.push(reply);
                        }
                        LogRequest::End(id, at, reply) => {
                            ends.push((id, at));
                            end_replies.push(reply);
                        }
                    }
                }
                let mut backoff = Duration::from_millis(20);
                let t0 = std::time::Instant::now();
                let ids = loop {
                    match store.attempts_log(&starts, &wholes, &ends).await {
                        Ok(ids) => break ids,
                        Err(e) => {
                            tracing::warn!(error = %e, "attempt log write failed; retrying");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                };
                tracing::debug!(starts = starts.len(), wholes = wholes.len(), ends = ends.len(), took = ?t0.elapsed(), "attempt log batch");
                for (reply, id) in start_replies
                    .into_iter()
                    .zip(ids.into_iter().map(Some).chain(std::iter::repeat(None)))
                {
                    let _ = reply.send(id);
                }
                for reply in end_replies {
                    let _ = reply.send(());
                }
            }
        });
        AttemptLog { tx }
    }

    /// Logs a start; returns the attempt id once committed.
    pub async fn start(&self, task: TaskId, ctx: &RunContext) -> Option<i64> {
        let (reply, rx) = oneshot::channel();
        let req = attempt_start(task, ctx);
        self.tx.send(LogRequest::Start(req, reply)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Logs an attempt that started at `start` and ends now, as one row; returns once
    /// committed.
    pub async fn whole(&self, start: AttemptStart) {
        let (reply, rx) = oneshot::channel();
        let w = AttemptWhole {
            start,
            ended: Timestamp::from_system(SystemTime::now()),
        };
        if self.tx.send(LogRequest::Whole(w, reply)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Logs an end; returns once committed.
    pub async fn end(&self, attempt: Option<i64>) {
        let Some(id) = attempt else { return };
        let (reply, rx) = oneshot::channel();
        if self
            .tx
            .send(LogRequest::End(
                id,
                Timestamp::from_system(SystemTime::now()),
                reply,
            ))
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

/// The start of an attempt of `task`, now.
fn attempt_start(task: TaskId, ctx: &RunContext) -> AttemptStart {
    let now = SystemTime::now();
    AttemptStart {
        task,
        machine: ctx.machine_id(),
        started: Timestamp::from_system(now),
        started_us: now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64),
    }
}

/// `bench_noop`: logs the attempt and succeeds.
pub struct BenchNoop {
    log: AttemptLog,
    cost: Resources,
}

#[async_trait]
impl Task for BenchNoop {
    fn type_details(&self) -> TypeDetails {
        let mut d = TypeDetails::new(BENCH_NOOP);
        d.cost = self.cost;
        d
    }

    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        let start = attempt_start(task, &ctx);
        self.log.whole(start).await;
        Ok(Done(true))
    }
}

/// `bench_sleep`: sleeps `ms` milliseconds (argument, default 100), stopping early when
/// cancelled.
pub struct BenchSleep {
    log: AttemptLog,
    cost: Resources,
}

#[async_trait]
impl Task for BenchSleep {
    fn type_details(&self) -> TypeDetails {
        let mut d = TypeDetails::new(BENCH_SLEEP);
        d.cost = self.cost;
        d
    }

    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        let args = ctx
            .args()
            .await
            .map_err(|e| TaskError::new(e.to_string()))?;
        let ms: u64 = match args.get("ms") {
            Some(v) => v.parse().map_err(|_| {
                TaskError::new(format!("argument ms={v:?} is not a number of milliseconds"))
            })?,
            None => 100,
        };
        let attempt = self.log.start(task, &ctx).await;
        let finished = tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => true,
            () = ctx.cancelled().cancelled() => false,
        };
        self.log.end(attempt).await;
        if finished {
            Ok(Done(true))
        } else {
            Err(TaskError::new("cancelled"))
        }
    }
}

/// `bench_fail`: fails while fewer than `fail_times` (argument, default 1) attempts failed
/// before, then succeeds. Five attempts in all, then the task fails for good.
pub struct BenchFail {
    log: AttemptLog,
    cost: Resources,
}

/// `bench_fail`'s attempt limit.
pub const BENCH_FAIL_MAX_FAILURES: u32 = 5;

#[async_trait]
impl Task for BenchFail {
    fn type_details(&self) -> TypeDetails {
        let mut d = TypeDetails::new(BENCH_FAIL);
        d.cost = self.cost;
        d.max_failures = BENCH_FAIL_MAX_FAILURES;
        d.retry_wait = RetryWait::constant(Duration::from_millis(50));
        d
    }

    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        let args = ctx
            .args()
            .await
            .map_err(|e| TaskError::new(e.to_string()))?;
        let fail_times: u32 = match args.get("fail_times") {
            Some(v) => v
                .parse()
                .map_err(|_| TaskError::new(format!("argument fail_times={v:?} is not a count")))?,
            None => 1,
        };
        let attempt = self.log.start(task, &ctx).await;
        self.log.end(attempt).await;
        if ctx.retries() < fail_times {
            Err(TaskError::new(format!(
                "deliberate failure {} of {fail_times}",
                ctx.retries() + 1
            )))
        } else {
            Ok(Done(true))
        }
    }
}

/// `bench_read`: reads its arguments (one primary-key read of its own input, the work a
/// user's task does first) and succeeds when `input` is there or no input was given, with
/// `max` attempts at most at once on a node. Unlike the other built-ins it writes no attempt
/// log: it costs what a user's task costs, so the bounded benchmarks measure the engine.
pub struct BenchRead {
    /// Read the arguments (`false`: do nothing, a no-op with no log).
    pub read: bool,
    /// Most attempts at once on a node.
    pub max: Option<usize>,
    /// Cost of an attempt.
    pub cost: Resources,
}

/// The argument `bench_read` looks for.
pub const BENCH_READ_INPUT: &str = "input";

#[async_trait]
impl Task for BenchRead {
    fn type_details(&self) -> TypeDetails {
        let mut d = TypeDetails::new(BENCH_READ);
        d.cost = self.cost;
        d.max = self.max.map(harmonytask::Limiter::new);
        d
    }

    async fn run(&self, _task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        if self.read {
            let args = ctx
                .args()
                .await
                .map_err(|e| TaskError::new(e.to_string()))?;
            if args.get(BENCH_READ_INPUT).is_some_and(String::is_empty) {
                return Err(TaskError::new("argument input is empty"));
            }
        }
        Ok(Done(true))
    }
}

/// The built-in types (in the order of [`BUILTIN_TYPES`]), sharing one attempt log, each with
/// cost `cost`.
pub fn builtins(db: &Db, cost: Resources) -> Vec<Arc<dyn Task>> {
    let log = AttemptLog::new(db.clone());
    vec![
        Arc::new(BenchNoop {
            log: log.clone(),
            cost,
        }),
        Arc::new(BenchSleep {
            log: log.clone(),
            cost,
        }),
        Arc::new(BenchFail { log, cost }),
        Arc::new(BenchRead {
            read: true,
            max: None,
            cost,
        }),
    ]
}
