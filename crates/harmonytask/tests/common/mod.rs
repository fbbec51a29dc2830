//! Helpers for engine tests: a programmable task type and engine settings for fast tests.

#![allow(dead_code, missing_docs, unused_macros)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use harmony_testkit::{TestDb, eventually};
use harmonydb::Executor;
use harmonytask::{
    Done, Engine, EngineConfig, EngineView, Resources, RunContext, Task, TaskError, TaskId,
    TypeDetails, async_trait,
};

pub type RunFn = Arc<
    dyn Fn(TaskId, RunContext) -> Pin<Box<dyn Future<Output = Result<Done, TaskError>> + Send>>
        + Send
        + Sync,
>;
pub type AcceptFn = Arc<dyn Fn(&[TaskId]) -> Vec<TaskId> + Send + Sync>;

/// A task type whose behaviour is a closure.
pub struct Probe {
    pub details: TypeDetails,
    pub run: RunFn,
    pub accept: Option<AcceptFn>,
}

impl Probe {
    pub fn new<F, Fut>(details: TypeDetails, f: F) -> Self
    where
        F: Fn(TaskId, RunContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Done, TaskError>> + Send + 'static,
    {
        Probe {
            details,
            run: Arc::new(move |id, ctx| Box::pin(f(id, ctx))),
            accept: None,
        }
    }

    pub fn accepting(
        mut self,
        f: impl Fn(&[TaskId]) -> Vec<TaskId> + Send + Sync + 'static,
    ) -> Self {
        self.accept = Some(Arc::new(f));
        self
    }
}

#[async_trait]
impl Task for Probe {
    fn type_details(&self) -> TypeDetails {
        self.details.clone()
    }

    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        (self.run)(task, ctx).await
    }

    async fn can_accept(
        &self,
        candidates: &[TaskId],
        _engine: &EngineView,
    ) -> Result<Vec<TaskId>, TaskError> {
        Ok(match &self.accept {
            Some(f) => f(candidates),
            None => candidates.to_vec(),
        })
    }
}

/// The suite on SQLite and Postgres, and again on Postgres with notifications off
/// (YugabyteDB, CockroachDB, PgBouncer): correct on polling alone.
macro_rules! engine_suite {
    ($($case:ident),* $(,)?) => {
        harmony_testkit::both_backends!($($case),*);
        mod postgres_notify_off {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(t) = harmony_testkit::TestDb::postgres(stringify!($case)).await else { return };
                    super::common::NOTIFY_OFF.with(|n| n.set(true));
                    super::$case(&t).await;
                }
            )*
        }
    };
}

thread_local! {
    /// Set by a test module to run its engines with notifications off (polling only).
    pub static NOTIFY_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Settings for tests: short intervals, an explicit budget, a unique address. Also installs
/// a log subscriber (`RUST_LOG=harmonytask=debug` to see the engine's logs in a failing test).
pub fn config(budget: Resources) -> EngineConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    EngineConfig {
        host_and_port: format!("127.0.0.1:{}", harmony_testkit::free_port()),
        budget: Some(budget),
        poll_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(200),
        dead_after: Duration::from_secs(10),
        reaper_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(5),
        cancel_wait: Duration::from_secs(2),
        refused_retry_interval: Duration::from_millis(100),
        poll_interval_unhealthy: Duration::from_millis(200),
        notify: !NOTIFY_OFF.with(std::cell::Cell::get),
        ..EngineConfig::default()
    }
}

pub fn big_budget() -> Resources {
    Resources::new(64.0, 256 << 30, 8.0)
}

/// Waits until `harmony_task` is empty (every task done or failed for good).
pub async fn drained(t: &TestDb, deadline: Duration) {
    drained_db(&t.db, deadline).await;
}

/// [`drained`] for any handle (a test on its own server has no `TestDb`).
pub async fn drained_db(db: &harmonydb::Db, deadline: Duration) {
    let db = db.clone();
    eventually("every task to finish", deadline, || {
        let db = db.clone();
        async move {
            let n: i64 = db
                .scalar("SELECT count(*) FROM harmony_task", &[])
                .await
                .ok()?;
            (n == 0).then_some(())
        }
    })
    .await;
}

/// Adds one task of `name` through `engine` and waits until it is the one task running there.
pub async fn add_and_wait_running(engine: &Engine, name: &str) {
    engine
        .add_task(name, |_, _| async { Ok(true) })
        .await
        .unwrap();
    eventually("the task to run", Duration::from_secs(10), || {
        let e = engine.clone();
        async move { (e.status().await.ok()?.running.len() == 1).then_some(()) }
    })
    .await;
}

pub async fn count(t: &TestDb, sql: &'static str) -> i64 {
    t.db.scalar(sql, &[]).await.unwrap()
}

/// Tracks how many run at once and the peak.
#[derive(Default, Clone)]
pub struct Gauge {
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Gauge {
    pub fn enter(&self) -> GaugeGuard {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        GaugeGuard(self.now.clone())
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

pub struct GaugeGuard(Arc<AtomicUsize>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn shutdown(e: &Engine) {
    e.shutdown().await.expect("clean shutdown");
}
