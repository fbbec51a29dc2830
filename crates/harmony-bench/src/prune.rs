//! Prune workload: history retention over a large history while a node drains no-op tasks.
//!
//! Fills `harmony_task_history` with N finished attempts that ended 60 to 31 days ago (all
//! older than the 30-day default), then keeps an in-process node busy with `bench_noop` tasks
//! (a feeder tops the queue up) and measures its drain rate for a while without pruning, then
//! while one prune round deletes every old row in batches of 10,000. Reports the prune rate,
//! the longest batch (the longest a claim or a record can wait for it) and the drain rate
//! during the prune against the one before.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harmonydb::Timestamp;
use harmonytask::Admin;
use harmonytask::retention::{PruneOutcome, PruneRule};
use tokio_util::sync::CancellationToken;

use crate::builtin::BENCH_NOOP;
use crate::fresh::FreshDb;
use crate::reference::reference_commits_per_s;
use crate::store::BenchStore;
use crate::throughput::{Counted, insert_noops, node_budget};
use crate::{BenchOptions, BenchResult};

/// Rows per fill statement (one transaction each, so the WAL stays bounded).
const FILL_CHUNK: i64 = 1_000_000;
/// Rows per prune transaction (the engine's default `prune_batch_max`).
const BATCH: usize = 10_000;
/// How long the drain rate is measured without a prune (a second for small runs, which are
/// smoke tests rather than measurements).
fn baseline(rows: i64) -> Duration {
    if rows < 100_000 {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    }
}
/// The feeder keeps at most this many tasks queued ahead of the node.
const QUEUE_AHEAD: usize = 20_000;

const DAY_MS: i64 = 86_400_000;

pub(crate) async fn prune(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let rows = opts.tasks.unwrap_or(1_000_000) as i64;
    let fresh = FreshDb::create(&opts.db_url).await?;
    let backend = fresh.backend;
    let reference = reference_commits_per_s(&fresh.url).await?;
    let db = fresh.open().await?;
    let store = BenchStore::new(db.clone());

    // Old rows, evenly spread over 60..31 days ago.
    let now_ms = Timestamp::from_system(std::time::SystemTime::now()).as_millis();
    let first_end = now_ms - 60 * DAY_MS;
    let step = ((29 * DAY_MS) / rows.max(1)).max(1);
    let fill_start = Instant::now();
    let mut filled = 0;
    while filled < rows {
        let n = FILL_CHUNK.min(rows - filled);
        store
            .history_fill_synthetic("bench_old", n, filled + 1, first_end + filled * step, step)
            .await?;
        filled += n;
    }
    let fill_secs = fill_start.elapsed().as_secs_f64();

    let node = Arc::new(Counted::start(&db, node_budget()).await?);
    let stop_feeding = Arc::new(AtomicBool::new(false));
    let feeder = {
        let db = db.clone();
        let node = Arc::clone(&node);
        let stop = Arc::clone(&stop_feeding);
        tokio::spawn(async move {
            let mut added = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if added < node.done.load(Ordering::Relaxed) + QUEUE_AHEAD {
                    insert_noops(&db, 10_000).await?;
                    added += 10_000;
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            anyhow::Ok(added)
        })
    };

    // Drain rate without a prune.
    let before_id = store.history_max_id().await?;
    let started = Instant::now();
    tokio::time::sleep(baseline(rows)).await;
    let baseline_secs = started.elapsed().as_secs_f64();
    let baseline_id = store.history_max_id().await?;
    let baseline_done = store.history_span(BENCH_NOOP, before_id).await?.attempts
        - store.history_span(BENCH_NOOP, baseline_id).await?.attempts;
    let baseline_rate = baseline_done as f64 / baseline_secs;

    // One prune round while the node keeps draining.
    let rule = PruneRule {
        older_than: Some(Duration::from_secs(30 * 24 * 3600)),
        ..PruneRule::default()
    };
    let now = Timestamp::from_system(std::time::SystemTime::now());
    let started = Instant::now();
    let outcome = Admin::new(db.clone())
        .prune_history(
            "harmony bench prune",
            &rule,
            now,
            BATCH,
            &CancellationToken::new(),
        )
        .await?;
    let prune_secs = started.elapsed().as_secs_f64();
    let during_id = store.history_max_id().await?;
    let report = match outcome {
        PruneOutcome::Ran(r) => r,
        PruneOutcome::Busy { holder } => anyhow::bail!("the prune lease is held by {holder}"),
    };
    let during_done = store.history_span(BENCH_NOOP, baseline_id).await?.attempts
        - store.history_span(BENCH_NOOP, during_id).await?.attempts;
    let during_rate = during_done as f64 / prune_secs;

    stop_feeding.store(true, Ordering::Relaxed);
    feeder.await??;
    node.engine.shutdown().await?;
    // The same cut-off as the round's: 30 days before `now`.
    let left_old = Admin::new(db.clone())
        .prune_count(Duration::from_secs(30 * 24 * 3600), Some("bench_old"), now)
        .await?;
    drop(store);
    drop(db);
    fresh.cleanup().await?;

    let mut r = BenchResult::new("prune", backend);
    r.tasks = report.deleted.history as usize;
    r.seconds = prune_secs;
    r.tasks_per_s = Some(report.deleted.history as f64 / prune_secs);
    r.max_ms = Some(report.longest_batch_ms);
    r.reference_commits_per_s = Some(reference);
    r.detail = format!(
        "{rows} old rows filled in {fill_secs:.1} s; pruned {} in {} batches of ≤{BATCH} (longest {:.1} ms), {} old rows left; bench_noop drain {baseline_rate:.0}/s before, {during_rate:.0}/s during the prune ({:.2}x)",
        report.deleted.history,
        report.batches,
        report.longest_batch_ms,
        left_old.history,
        during_rate / baseline_rate.max(1e-9),
    );
    Ok(vec![r])
}
