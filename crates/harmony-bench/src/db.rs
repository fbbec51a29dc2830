//! The SQL layer's overhead: single-row insert+commit and point-select rates through `Db`
//! versus the raw driver, one statement at a time (latency-bound) and with 16 in flight
//! (throughput-bound).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use harmonydb::{BackendConfig, Db, DbConfig, Executor};

use crate::fresh::FreshDb;
use crate::reference::{REFERENCE_TIME, raw_postgres, raw_sqlite, reference_commits_per_s};
use crate::{BenchOptions, BenchResult};

/// Statements in flight in the concurrent runs.
const IN_FLIGHT: usize = 16;

fn result(
    backend: &str,
    name: &str,
    via: &str,
    rate: f64,
    reference: f64,
    detail: String,
) -> BenchResult {
    let mut r = BenchResult::new("db", backend);
    r.tasks = 0;
    r.seconds = REFERENCE_TIME.as_secs_f64();
    r.tasks_per_s = Some(rate);
    r.reference_commits_per_s = Some(reference);
    r.detail = format!("{name} via {via}: {rate:.0}/s{detail}");
    r
}

pub(crate) async fn db_overhead(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let fresh = FreshDb::create(&opts.db_url).await?;
    let reference = reference_commits_per_s(&fresh.url).await?;
    let db = fresh.open().await?;
    db.exec_script("CREATE TABLE bench_rows (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")
        .await?;
    let cfg = DbConfig::from_url(&fresh.url)?;
    let mut out = Vec::new();
    let b = fresh.backend;

    // Inserts, one at a time.
    let raw_insert = raw_inserts(&cfg, 1_000_000_000).await?;
    let db_insert = db_inserts(&db, 2_000_000_000).await?;
    out.push(result(
        b,
        "insert+commit",
        "raw driver",
        raw_insert,
        reference,
        String::new(),
    ));
    out.push(result(
        b,
        "insert+commit",
        "Db",
        db_insert,
        reference,
        overhead(raw_insert, db_insert),
    ));
    // Point selects, one at a time (the rows inserted above).
    let raw_select = raw_selects(&cfg).await?;
    let db_select = db_selects(&db).await?;
    out.push(result(
        b,
        "point select",
        "raw driver",
        raw_select,
        reference,
        String::new(),
    ));
    out.push(result(
        b,
        "point select",
        "Db",
        db_select,
        reference,
        overhead(raw_select, db_select),
    ));
    // Through Db with many in flight: what the engine's concurrent callers see.
    let conc_insert = db_inserts_concurrent(&db, 3_000_000_000).await?;
    let conc_select = db_selects_concurrent(&db).await?;
    out.push(result(
        b,
        "insert+commit",
        &format!("Db, {IN_FLIGHT} in flight"),
        conc_insert,
        reference,
        String::new(),
    ));
    out.push(result(
        b,
        "point select",
        &format!("Db, {IN_FLIGHT} in flight"),
        conc_select,
        reference,
        String::new(),
    ));
    drop(db);
    fresh.cleanup().await?;
    Ok(out)
}

fn overhead(raw: f64, via_db: f64) -> String {
    format!("; overhead {:+.1}% vs raw", 100.0 * (raw / via_db - 1.0))
}

/// Runs `op(n)` for n = 0, 1, … for `REFERENCE_TIME`; returns calls per second.
fn rate_of(mut op: impl FnMut(i64) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0i64;
    while start.elapsed() < REFERENCE_TIME {
        op(n)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// [`rate_of`] for an async operation, one call at a time.
async fn rate_of_async(mut op: impl AsyncFnMut(i64) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0i64;
    while start.elapsed() < REFERENCE_TIME {
        op(n).await?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Calls `op(db, n)` from `IN_FLIGHT` tasks at once, each n used once, for `REFERENCE_TIME`;
/// returns calls per second.
async fn rate_in_flight<F, Fut>(db: &Db, op: F) -> anyhow::Result<f64>
where
    F: Fn(Db, i64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = harmonydb::Result<()>> + Send,
{
    let counter = Arc::new(AtomicI64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (db, counter, op) = (db.clone(), counter.clone(), op.clone());
        workers.push(tokio::spawn(async move {
            while start.elapsed() < REFERENCE_TIME {
                op(db.clone(), counter.fetch_add(1, Ordering::Relaxed)).await?;
            }
            Ok::<_, harmonydb::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(counter.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

const INSERT: &str = "INSERT INTO bench_rows (id, v) VALUES ($1, $2)";
const SELECT: &str = "SELECT v FROM bench_rows WHERE id = $1";

/// The id a point select reads: one of the first 100 rows of the raw insert run.
fn select_id(n: i64) -> i64 {
    1_000_000_000 + n % 100
}

async fn raw_inserts(cfg: &DbConfig, first_id: i64) -> anyhow::Result<f64> {
    match &cfg.backend {
        BackendConfig::Sqlite(s) => {
            let s = s.clone();
            tokio::task::spawn_blocking(move || {
                let conn = raw_sqlite(&s)?;
                let mut stmt = conn.prepare(INSERT)?;
                rate_of(|n| {
                    stmt.execute([first_id + n, n])?;
                    Ok(())
                })
            })
            .await?
        }
        BackendConfig::Postgres(p) => {
            let client = raw_postgres(p).await?;
            let stmt = client.prepare(INSERT).await?;
            rate_of_async(async |n| {
                client.execute(&stmt, &[&(first_id + n), &n]).await?;
                Ok(())
            })
            .await
        }
    }
}

async fn raw_selects(cfg: &DbConfig) -> anyhow::Result<f64> {
    match &cfg.backend {
        BackendConfig::Sqlite(s) => {
            let s = s.clone();
            tokio::task::spawn_blocking(move || {
                let conn = raw_sqlite(&s)?;
                let mut stmt = conn.prepare(SELECT)?;
                rate_of(|n| {
                    let _v: Option<i64> = stmt.query_row([select_id(n)], |r| r.get(0)).ok();
                    Ok(())
                })
            })
            .await?
        }
        BackendConfig::Postgres(p) => {
            let client = raw_postgres(p).await?;
            let stmt = client.prepare(SELECT).await?;
            rate_of_async(async |n| {
                client.query_opt(&stmt, &[&select_id(n)]).await?;
                Ok(())
            })
            .await
        }
    }
}

async fn db_inserts(db: &Db, first_id: i64) -> anyhow::Result<f64> {
    rate_of_async(async |n| {
        db.exec(INSERT, &[&(first_id + n), &n]).await?;
        Ok(())
    })
    .await
}

async fn db_selects(db: &Db) -> anyhow::Result<f64> {
    rate_of_async(async |n| {
        let _: Option<i64> = db.scalar_opt(SELECT, &[&select_id(n)]).await?;
        Ok(())
    })
    .await
}

async fn db_inserts_concurrent(db: &Db, first_id: i64) -> anyhow::Result<f64> {
    rate_in_flight(db, move |db, n| async move {
        db.exec(INSERT, &[&(first_id + n), &n]).await.map(|_| ())
    })
    .await
}

async fn db_selects_concurrent(db: &Db) -> anyhow::Result<f64> {
    rate_in_flight(db, |db, n| async move {
        db.scalar_opt::<i64>(SELECT, &[&select_id(n)])
            .await
            .map(|_| ())
    })
    .await
}
