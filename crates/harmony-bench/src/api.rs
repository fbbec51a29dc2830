//! `harmony bench api`: request latency of the web server's main endpoints, and the cost of a
//! `/metrics` scrape, with a large queue and a large history.
//!
//! Fills a fresh database with `--tasks` waiting tasks (default 1,000,000) of a type no node
//! runs, plus 1,000 of a second type, and `--history` synthetic history rows (default
//! 1,000,000) that ended over the last 30 days; starts an in-process node (the built-in types,
//! none of them queued) and the web server on a loopback port, and times sequential HTTP/1.1
//! requests (one connection each, as curl makes them). `/metrics` is timed both uncached (each
//! request more than the 1 s cache lifetime after the last) and cached.
//!
//! The dashboard: its pages are timed the same way (the overview both cold, when its shared
//! snapshot is stale and the load waits for a refresh, and warm), and the database queries per
//! second are counted (`harmonydb`'s query counter) for [`SSE_WINDOW`] with no dashboard
//! open, with 1 and with 20 open event streams (what 1 and 20 browsers on the overview hold).

use std::sync::Arc;
use std::time::{Duration, Instant};

use harmonydb::Timestamp;
use harmonytask::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::fresh::FreshDb;
use crate::store::BenchStore;
use crate::throughput::{Counted, node_budget};
use crate::{BenchOptions, BenchResult, percentile};

/// The type of the big queue (no node runs it).
const WAITING_TYPE: &str = "api_waiting";
/// A second, small queue.
const SMALL_TYPE: &str = "api_small";
const SMALL_COUNT: usize = 1_000;
/// History rows per `INSERT … SELECT`.
const FILL_CHUNK: usize = 1_000_000;
/// Largest insert transaction of tasks.
const INSERT_BATCH: usize = 10_000;
/// Requests timed per endpoint.
const SAMPLES: usize = 30;
/// Uncached `/metrics` scrapes timed (each waits out the cache).
const UNCACHED_SCRAPES: usize = 8;
/// Cold overview loads timed (each waits out the dashboard's refresh interval).
const COLD_PAGES: usize = 5;
/// How long queries are counted for each number of open event streams.
const SSE_WINDOW: Duration = Duration::from_secs(20);

pub(crate) async fn api(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let waiting = opts.tasks.unwrap_or(1_000_000);
    let history = opts.history.unwrap_or(1_000_000);
    let fresh = FreshDb::create(&opts.db_url).await?;
    let db = fresh.open().await?;

    let client = Client::new(db.clone());
    let fill = Instant::now();
    for (name, n) in [(WAITING_TYPE, waiting), (SMALL_TYPE, SMALL_COUNT)] {
        let mut left = n;
        while left > 0 {
            let k = left.min(INSERT_BATCH);
            client.add_tasks_with_args(name, k, &[]).await?;
            left -= k;
        }
    }
    let tasks_secs = fill.elapsed().as_secs_f64();
    let fill = Instant::now();
    let store = BenchStore::new(db.clone());
    let now_ms = Timestamp::from_system(std::time::SystemTime::now()).as_millis();
    let span_ms: i64 = 30 * 24 * 3600 * 1000;
    let step = (span_ms / i64::try_from(history.max(1))?).max(1);
    let first_end = now_ms - step * i64::try_from(history)?;
    let mut filled = 0usize;
    while filled < history {
        let n = FILL_CHUNK.min(history - filled);
        let f = i64::try_from(filled)?;
        store
            .history_fill_synthetic(
                "api_done",
                i64::try_from(n)?,
                f + 1,
                first_end + f * step,
                step,
            )
            .await?;
        filled += n;
    }
    let history_secs = fill.elapsed().as_secs_f64();
    if fresh.backend == "postgres" {
        // What autovacuum would soon do after a bulk insert; SQLite nodes never run ANALYZE.
        store.analyze().await?;
    }

    let node = Arc::new(Counted::start(&db, node_budget()).await?);
    let server = harmony_web::WebServer::builder(db.clone())
        .engine(node.engine.clone())
        .bind("127.0.0.1:0")
        .await?;
    let addr = server.local_addr().to_string();
    let live = server.live();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.run(stop.clone()));

    // A page's last history id, for the second page.
    let first_page = get(&addr, "/api/v1/history?limit=50").await?;
    let before = serde_json::from_str::<serde_json::Value>(&first_page.1)?["next_before"]
        .as_i64()
        .unwrap_or(0);
    let some_task = serde_json::from_str::<serde_json::Value>(
        &get(&addr, "/api/v1/tasks?state=waiting&limit=1").await?.1,
    )?["tasks"][0]["id"]
        .as_i64()
        .unwrap_or(1);

    let mut results = Vec::new();
    let backend = fresh.backend;
    let mut push = |label: String, samples: Vec<f64>, bytes: usize| {
        let mut s = samples;
        s.sort_by(f64::total_cmp);
        let mut r = BenchResult::new("api", backend);
        r.tasks = waiting;
        r.seconds = s.iter().sum::<f64>() / 1000.0;
        r.p50_ms = Some(percentile(&s, 50.0));
        r.p95_ms = Some(percentile(&s, 95.0));
        r.p99_ms = Some(percentile(&s, 99.0));
        r.max_ms = s.last().copied();
        r.detail = format!(
            "{label} ({} requests, {bytes} B); {waiting} waiting, {history} history rows",
            s.len()
        );
        results.push(r);
    };

    // Uncached scrapes: each after the 1 s cache has expired.
    let mut samples = Vec::new();
    let mut bytes = 0;
    for _ in 0..UNCACHED_SCRAPES {
        tokio::time::sleep(harmony_web::cluster::COUNTS_TTL + Duration::from_millis(50)).await;
        let (ms, body) = timed(&addr, "/metrics").await?;
        bytes = body.len();
        samples.push(ms);
    }
    push("GET /metrics uncached".into(), samples, bytes);

    let before_path = format!("/api/v1/history?limit=50&before={before}");
    let task_path = format!("/api/v1/tasks/{some_task}");
    let deep = format!(
        "/api/v1/tasks?state=waiting&limit=50&offset={}",
        waiting / 2
    );
    let endpoints: Vec<(&str, usize)> = vec![
        ("/metrics", SAMPLES),
        ("/healthz", SAMPLES),
        ("/api/v1/machines", SAMPLES),
        ("/api/v1/tasks?limit=50", SAMPLES),
        ("/api/v1/tasks?state=waiting&limit=50", SAMPLES),
        (
            "/api/v1/tasks?type=api_small&state=waiting&limit=50",
            SAMPLES,
        ),
        ("/api/v1/tasks?state=running&limit=50", SAMPLES),
        (deep.as_str(), 5),
        (task_path.as_str(), SAMPLES),
        ("/api/v1/history?limit=50", SAMPLES),
        (before_path.as_str(), SAMPLES),
        ("/api/v1/history?type=api_done&limit=50", SAMPLES),
        ("/api/v1/history?failures=true&limit=50", 3),
        ("/api/v1/types", SAMPLES),
    ];
    for (path, n) in endpoints {
        let mut samples = Vec::with_capacity(n);
        let mut bytes = 0;
        for _ in 0..n {
            let (ms, body) = timed(&addr, path).await?;
            bytes = body.len();
            samples.push(ms);
        }
        let label = if path == "/metrics" {
            "GET /metrics cached".to_owned()
        } else {
            format!("GET {path}")
        };
        push(label, samples, bytes);
    }
    // The dashboard's pages.
    let machine = node.engine.machine_id().0;
    let mut samples = Vec::new();
    let mut bytes = 0;
    for _ in 0..COLD_PAGES {
        tokio::time::sleep(
            harmony_web::dashboard::live::LIVE_INTERVAL + Duration::from_millis(100),
        )
        .await;
        let (ms, body) = timed(&addr, "/").await?;
        bytes = body.len();
        samples.push(ms);
    }
    push(
        "GET / (dashboard overview) cold: waits for a refresh".into(),
        samples,
        bytes,
    );
    let machine_page = format!("/machines/{machine}");
    let task_page = format!("/tasks/{some_task}");
    let pages: Vec<(&str, usize)> = vec![
        ("/", SAMPLES),
        ("/tasks", SAMPLES),
        ("/tasks?type=api_small&state=waiting", SAMPLES),
        ("/history", SAMPLES),
        ("/types/api_waiting", 5),
        (machine_page.as_str(), SAMPLES),
        (task_page.as_str(), SAMPLES),
    ];
    for (path, n) in pages {
        let mut samples = Vec::with_capacity(n);
        let mut bytes = 0;
        for _ in 0..n {
            let (ms, body) = timed(&addr, path).await?;
            bytes = body.len();
            samples.push(ms);
        }
        push(format!("GET {path} (dashboard)"), samples, bytes);
    }

    // Database queries per second with 0, 1 and 20 open event streams on the overview. The
    // node's own engine queries too: the 0-stream rate is its share plus the idle refresh.
    let mut streams: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    for want in [0usize, 1, 20] {
        while streams.len() < want {
            streams.push(tokio::spawn(hold_events(addr.clone())));
        }
        let live = Arc::clone(&live);
        let deadline = Instant::now() + Duration::from_secs(30);
        while live.subscribers() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::ensure!(
            live.subscribers() == want,
            "{want} event streams wanted, {} open",
            live.subscribers()
        );
        // One interval to settle into the watched pace.
        tokio::time::sleep(harmony_web::dashboard::live::LIVE_INTERVAL).await;
        let (q0, r0, t0) = (db.metrics().queries(), live.refreshes(), Instant::now());
        tokio::time::sleep(SSE_WINDOW).await;
        let secs = t0.elapsed().as_secs_f64();
        let queries = db.metrics().queries() - q0;
        let refreshes = live.refreshes() - r0;
        let mut r = BenchResult::new("api", backend);
        r.tasks = waiting;
        r.seconds = secs;
        r.detail = format!(
            "dashboard with {want} open event streams: {:.2} database queries/s ({queries} in {secs:.1} s, node included), {refreshes} shared refreshes",
            queries as f64 / secs
        );
        results.push(r);
    }
    for s in streams {
        s.abort();
    }

    if let Some(r) = results.first_mut() {
        r.detail = format!(
            "{}; fill: tasks {tasks_secs:.1} s, history {history_secs:.1} s",
            r.detail
        );
    }

    stop.cancel();
    let _ = serving.await;
    node.engine.shutdown().await?;
    drop(node);
    fresh.cleanup().await?;
    Ok(results)
}

/// Holds one dashboard event stream of the overview open (as a browser does), reading and
/// dropping what it sends, until aborted.
async fn hold_events(addr: String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
        return;
    };
    let req = format!(
        "GET /events?view=%2F HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// One timed GET: milliseconds and the body. A non-200 answer is an error.
async fn timed(addr: &str, path: &str) -> anyhow::Result<(f64, String)> {
    let start = Instant::now();
    let (status, body) = get(addr, path).await?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(status == 200, "GET {path}: {status} {body}");
    Ok((ms, body))
}

/// A plain HTTP/1.1 GET with `Connection: close`.
async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
