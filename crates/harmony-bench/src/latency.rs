//! Add-to-start latency on an idle cluster, measured from just before the add call.
//!
//! Same node: an in-process engine runs a probe type that timestamps its start; tasks are
//! added through that engine. Cross node (`--cross-node`): a `harmony run` child process runs
//! `bench_noop`, which logs its start in microseconds; this process adds through a `Client`
//! (another process, as another node would) and compares clocks of the same machine. With
//! `notify_http` (`harmony --notify http bench latency --cross-node`) the node runs with
//! `--notify http` and this process sends its hints through a `harmony_peer::HttpRelay`, as
//! a node or `harmony task add --notify http` would.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::builtin::BENCH_NOOP;
use crate::store::BenchStore;
use harmonytask::{
    Client, Done, Engine, EngineConfig, Resources, RunContext, Task, TaskError, TaskId,
    TypeDetails, async_trait,
};

use crate::fresh::FreshDb;
use crate::node::NodeProcess;
use crate::reference::reference_commits_per_s;
use crate::{BenchOptions, BenchResult, peak_rss_mb, percentile, reset_peak_rss};

/// Tasks added and run before measuring.
const WARM_UP: usize = 50;

/// Most run-now and follower samples.
const RUN_NOW_SAMPLES: usize = 300;

/// Adds per second: slow enough that the node is idle at every add.
const ADD_RATE_PER_S: u64 = 200;

struct Probe {
    starts: Arc<Mutex<HashMap<TaskId, Instant>>>,
}

#[async_trait]
impl Task for Probe {
    fn type_details(&self) -> TypeDetails {
        TypeDetails::new("latency_probe")
    }

    async fn run(&self, task: TaskId, _ctx: RunContext) -> Result<Done, TaskError> {
        let now = Instant::now();
        if let Ok(mut s) = self.starts.lock() {
            s.insert(task, now);
        }
        Ok(Done(true))
    }
}

/// A task type that does nothing but push the instant each run starts (which is also when it
/// returns) onto a shared list.
struct Stamp {
    details: TypeDetails,
    stamps: Arc<Mutex<Vec<Instant>>>,
}

#[async_trait]
impl Task for Stamp {
    fn type_details(&self) -> TypeDetails {
        self.details.clone()
    }

    async fn run(&self, _task: TaskId, _ctx: RunContext) -> Result<Done, TaskError> {
        if let Ok(mut s) = self.stamps.lock() {
            s.push(Instant::now());
        }
        Ok(Done(true))
    }
}

impl Stamp {
    fn new(details: TypeDetails) -> (Self, Arc<Mutex<Vec<Instant>>>) {
        let stamps = Arc::new(Mutex::new(Vec::new()));
        let s = Stamp {
            details,
            stamps: stamps.clone(),
        };
        (s, stamps)
    }
}

/// Waits (bounded) until `stamps` holds `n` entries; returns the last.
async fn stamped(stamps: &Mutex<Vec<Instant>>, n: usize) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(t) = stamps.lock().ok().and_then(|s| s.get(n - 1).copied()) {
            return Ok(t);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "run {n} did not start within 30 s"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Run-now to start of a singleton, and a predecessor's end to its follower's start, on one
/// idle in-process node, one at a time.
async fn run_now_and_follow(fresh: &FreshDb, n: usize) -> anyhow::Result<Vec<BenchResult>> {
    let db = fresh.open().await?;
    let (single, single_starts) =
        Stamp::new(TypeDetails::new("probe_single").singleton(Duration::from_secs(3600)));
    let (pred, pred_ends) = Stamp::new(TypeDetails::new("probe_pred"));
    let (follow, follow_starts) =
        Stamp::new(TypeDetails::new("probe_follow").follows("probe_pred"));
    let engine = Engine::builder(db.clone())
        .register(single)
        .register(pred)
        .register(follow)
        .config(node_config())
        .start()
        .await?;
    let store = BenchStore::new(db.clone());
    // The singleton's first run comes by itself (its interval has never passed).
    stamped(&single_starts, 1).await?;
    let begin = Instant::now();
    let mut run_now = Vec::with_capacity(n);
    for i in 0..n {
        // The previous run is recorded: no row of the type left.
        while store.any_task("probe_single").await? {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        let t0 = Instant::now();
        engine.run_now("probe_single").await?;
        let t1 = stamped(&single_starts, i + 2).await?;
        run_now.push(t1.duration_since(t0).as_secs_f64() * 1000.0);
    }
    let run_now_secs = begin.elapsed().as_secs_f64();
    let begin = Instant::now();
    let mut follow_ms = Vec::with_capacity(n);
    for i in 0..n {
        engine.add_task_with_args("probe_pred", &[]).await?;
        let t1 = stamped(&follow_starts, i + 1).await?;
        let t0 = stamped(&pred_ends, i + 1).await?;
        follow_ms.push(t1.duration_since(t0).as_secs_f64() * 1000.0);
    }
    let follow_secs = begin.elapsed().as_secs_f64();
    engine.shutdown().await?;
    let mut a = BenchResult::new("latency", fresh.backend);
    a.seconds = run_now_secs;
    a.detail = "run-now to start: singleton, same node, one request at a time".into();
    summarize(run_now, &mut a);
    let mut b = BenchResult::new("latency", fresh.backend);
    b.seconds = follow_secs;
    b.detail = "follower: predecessor's run returned to follower's start, same node".into();
    summarize(follow_ms, &mut b);
    Ok(vec![a, b])
}

/// The in-process node of the same-node measurements: default intervals, a small budget.
fn node_config() -> EngineConfig {
    EngineConfig {
        host_and_port: format!("bench-latency-{}", std::process::id()),
        budget: Some(Resources::new(2.0, 1 << 30, 0.0)),
        ..EngineConfig::default()
    }
}

fn micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn summarize(mut samples_ms: Vec<f64>, r: &mut BenchResult) {
    samples_ms.sort_by(f64::total_cmp);
    r.tasks = samples_ms.len();
    r.p50_ms = Some(percentile(&samples_ms, 50.0));
    r.p95_ms = Some(percentile(&samples_ms, 95.0));
    r.p99_ms = Some(percentile(&samples_ms, 99.0));
    r.max_ms = samples_ms.last().copied();
}

pub(crate) async fn latency(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let n = opts.tasks.unwrap_or(2_000);
    let fresh = FreshDb::create(&opts.db_url).await?;
    let reference = reference_commits_per_s(&fresh.url).await?;
    let mut results = if opts.cross_node {
        vec![cross_node(opts, &fresh, n).await?]
    } else {
        let mut r = vec![same_node(&fresh, n).await?];
        r.extend(run_now_and_follow(&fresh, n.min(RUN_NOW_SAMPLES)).await?);
        r
    };
    for r in &mut results {
        r.reference_commits_per_s = Some(reference);
    }
    fresh.cleanup().await?;
    Ok(results)
}

async fn same_node(fresh: &FreshDb, n: usize) -> anyhow::Result<BenchResult> {
    let db = fresh.open().await?;
    let starts = Arc::new(Mutex::new(HashMap::new()));
    reset_peak_rss();
    let engine = Engine::builder(db.clone())
        .register(Probe {
            starts: starts.clone(),
        })
        .config(node_config())
        .start()
        .await?;
    // Warm-up, not measured: connections opened, statements prepared.
    for _ in 0..WARM_UP {
        engine.add_task_with_args("latency_probe", &[]).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while starts.lock().map(|s| s.len()).unwrap_or(0) < WARM_UP {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    starts.lock().map(|mut s| s.clear()).ok();
    let mut added: Vec<(TaskId, Instant)> = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / ADD_RATE_PER_S));
    let begin = Instant::now();
    for _ in 0..n {
        tick.tick().await;
        let t0 = Instant::now();
        if let Some(id) = engine.add_task_with_args("latency_probe", &[]).await? {
            added.push((id, t0));
        }
    }
    // Wait for the last starts to be seen.
    let deadline = Instant::now() + Duration::from_secs(30);
    while starts.lock().map(|s| s.len()).unwrap_or(0) < added.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = begin.elapsed().as_secs_f64();
    engine.shutdown().await?;
    let starts = starts.lock().map(|s| s.clone()).unwrap_or_default();
    let samples: Vec<f64> = added
        .iter()
        .filter_map(|(id, t0)| {
            starts
                .get(id)
                .map(|t1| t1.duration_since(*t0).as_secs_f64() * 1000.0)
        })
        .collect();
    let mut r = BenchResult::new("latency", fresh.backend);
    r.seconds = seconds;
    r.peak_rss_mb = peak_rss_mb(std::process::id());
    r.detail = format!(
        "same node, in-process; {ADD_RATE_PER_S} adds/s; {} of {} started",
        samples.len(),
        added.len()
    );
    summarize(samples, &mut r);
    Ok(r)
}

async fn cross_node(opts: &BenchOptions, fresh: &FreshDb, n: usize) -> anyhow::Result<BenchResult> {
    let db = fresh.open().await?;
    let store = BenchStore::new(db.clone());
    // A throw-away secret for this run's node (on its command line: the database is fresh and
    // dropped afterwards, so the secret guards nothing else).
    let secret = format!("bench-{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    let mut extra = vec!["--types", BENCH_NOOP];
    if opts.notify_http {
        extra.extend_from_slice(&["--notify", "http", "--cluster-secret", &secret]);
    }
    let mut node = NodeProcess::spawn(&opts.harmony_exe, &fresh.url, &extra)?;
    node.wait_registered(&store).await?;
    // Let the node finish its start-up poll so every task below is found by a wake-up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // With HTTP peering, this process's hints go through a relay whose sender reads the peer
    // list now that the node is registered.
    let peers = if opts.notify_http {
        let config = harmony_peer::PeerConfig::new(harmony_peer::ClusterSecret::new(secret)?, "");
        let (relay, sender) =
            harmony_peer::HttpRelay::new(config, harmonytask::Admin::new(db.clone()));
        let stop = tokio_util::sync::CancellationToken::new();
        let sending = tokio::spawn(sender.run(stop.clone()));
        Some((relay, stop, sending))
    } else {
        None
    };
    let client = match &peers {
        Some((relay, _, _)) => {
            Client::new(db.with_relay(Arc::clone(relay) as Arc<dyn harmonydb::Relay>))
        }
        None => Client::new(db.clone()),
    };
    // Warm-up, not measured: connections opened, statements prepared on both sides.
    for _ in 0..WARM_UP {
        client.add_task_with_args(BENCH_NOOP, &[]).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while store.any_task(BENCH_NOOP).await? {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut added: Vec<(i64, i64)> = Vec::with_capacity(n);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / ADD_RATE_PER_S));
    let begin = Instant::now();
    for _ in 0..n {
        tick.tick().await;
        let t0 = micros_now();
        if let Some(id) = client.add_task_with_args(BENCH_NOOP, &[]).await? {
            added.push((id.0, t0));
        }
    }
    while store.any_task(BENCH_NOOP).await? {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = begin.elapsed().as_secs_f64();
    let rss = peak_rss_mb(node.pid());
    let mut via = "NOTIFY".to_owned();
    if let Some((relay, stop, sending)) = peers {
        stop.cancel();
        let _ = sending.await;
        let m = relay.metrics();
        via = format!(
            "HTTP peering ({} requests sent, {} failed)",
            m.sent_count(),
            m.send_failed_count()
        );
    }
    node.stop().await?;
    let attempts = store.attempts().await?;
    let started: HashMap<i64, i64> = attempts.iter().map(|a| (a.task_id, a.started_us)).collect();
    let samples: Vec<f64> = added
        .iter()
        .filter_map(|(id, t0)| started.get(id).map(|t1| (t1 - t0) as f64 / 1000.0))
        .collect();
    let mut r = BenchResult::new("latency", fresh.backend);
    r.nodes = 2;
    r.seconds = seconds;
    r.peak_rss_mb = rss;
    r.detail = format!(
        "cross node: added by this process, run by a harmony run process, hints by {via}; {ADD_RATE_PER_S} adds/s; {} of {} started",
        samples.len(),
        added.len()
    );
    summarize(samples, &mut r);
    Ok(r)
}
