//! Memory of a node process: idle, and draining a 1,000,000-task backlog.

use std::time::Duration;

use crate::builtin::BENCH_NOOP;
use crate::store::BenchStore;

use crate::fresh::FreshDb;
use crate::node::NodeProcess;
use crate::throughput::insert_noops;
use crate::{BenchOptions, BenchResult, peak_rss_mb, rss_mb};

/// How long an idle node settles before its RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

pub(crate) async fn memory(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let backlog = opts.tasks.unwrap_or(1_000_000);
    let mut results = Vec::new();

    // Idle: registered, polling, heartbeating, nothing to do.
    let fresh = FreshDb::create(&opts.db_url).await?;
    let db = fresh.open().await?;
    let store = BenchStore::new(db.clone());
    let mut node = NodeProcess::spawn(&opts.harmony_exe, &fresh.url, &[])?;
    node.wait_registered(&store).await?;
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle = rss_mb(node.pid());
    let idle_peak = peak_rss_mb(node.pid());
    node.stop().await?;
    let mut r = BenchResult::new("memory", fresh.backend);
    r.tasks = 0;
    r.seconds = IDLE_SETTLE.as_secs_f64();
    r.peak_rss_mb = idle_peak;
    r.detail = format!(
        "idle node: rss {:.1} MB after {IDLE_SETTLE:?}",
        idle.unwrap_or(0.0)
    );
    results.push(r);

    // A node draining a large backlog: peak RSS after the first 20,000 completions.
    insert_noops(&db, backlog).await?;
    let mut node = NodeProcess::spawn(&opts.harmony_exe, &fresh.url, &["--types", BENCH_NOOP])?;
    node.wait_registered(&store).await?;
    let start = std::time::Instant::now();
    while store.history_span(BENCH_NOOP, 0).await?.attempts < 20_000 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let peak = peak_rss_mb(node.pid());
    node.stop().await?;
    let mut r = BenchResult::new("memory", fresh.backend);
    r.tasks = backlog;
    r.seconds = start.elapsed().as_secs_f64();
    r.peak_rss_mb = peak;
    r.detail = format!("node with {backlog} queued: peak rss after 20000 completions");
    results.push(r);
    drop(store);
    drop(db);
    fresh.cleanup().await?;
    Ok(results)
}
