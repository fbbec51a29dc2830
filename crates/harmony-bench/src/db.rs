//! The SQL layer's overhead: single-row insert+commit and point-select rates through `Db`
//! versus the raw driver, one statement at a time (latency-bound) and with 16 in flight
//! (throughput-bound).

use std::sync::Arc;
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

async fn raw_inserts(cfg: &DbConfig, first_id: i64) -> anyhow::Result<f64> {
    match &cfg.backend {
        BackendConfig::Sqlite(s) => {
            let s = s.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
                let conn = raw_sqlite(&s)?;
                let mut stmt = conn.prepare("INSERT INTO bench_rows (id, v) VALUES (?1, ?2)")?;
                let start = Instant::now();
                let mut n = 0i64;
                while start.elapsed() < REFERENCE_TIME {
                    stmt.execute([first_id + n, n])?;
                    n += 1;
                }
                Ok(n as f64 / start.elapsed().as_secs_f64())
            })
            .await?
        }
        BackendConfig::Postgres(p) => {
            let client = raw_postgres(p).await?;
            let stmt = client
                .prepare("INSERT INTO bench_rows (id, v) VALUES ($1, $2)")
                .await?;
            let start = Instant::now();
            let mut n = 0i64;
            while start.elapsed() < REFERENCE_TIME {
                client.execute(&stmt, &[&(first_id + n), &n]).await?;
                n += 1;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        }
    }
}

async fn raw_selects(cfg: &DbConfig) -> anyhow::Result<f64> {
    match &cfg.backend {
        BackendConfig::Sqlite(s) => {
            let s = s.clone();
            tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
                let conn = raw_sqlite(&s)?;
                let mut stmt = conn.prepare("SELECT v FROM bench_rows WHERE id = ?1")?;
                let start = Instant::now();
                let mut n = 0i64;
                while start.elapsed() < REFERENCE_TIME {
                    let _v: Option<i64> =
                        stmt.query_row([1_000_000_000 + n % 100], |r| r.get(0)).ok();
                    n += 1;
                }
                Ok(n as f64 / start.elapsed().as_secs_f64())
            })
            .await?
        }
        BackendConfig::Postgres(p) => {
            let client = raw_postgres(p).await?;
            let stmt = client
                .prepare("SELECT v FROM bench_rows WHERE id = $1")
                .await?;
            let start = Instant::now();
            let mut n = 0i64;
            while start.elapsed() < REFERENCE_TIME {
                let _ = client
                    .query_opt(&stmt, &[&(1_000_000_000 + n % 100)])
                    .await?;
                n += 1;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        }
    }
}

async fn db_inserts(db: &Db, first_id: i64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0i64;
    while start.elapsed() < REFERENCE_TIME {
        db.exec(
            "INSERT INTO bench_rows (id, v) VALUES ($1, $2)",
            &[&(first_id + n), &n],
        )
        .await?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn db_selects(db: &Db) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut n = 0i64;
    while start.elapsed() < REFERENCE_TIME {
        let _: Option<i64> = db
            .scalar_opt(
                "SELECT v FROM bench_rows WHERE id = $1",
                &[&(1_000_000_000 + n % 100)],
            )
            .await?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

async fn db_inserts_concurrent(db: &Db, first_id: i64) -> anyhow::Result<f64> {
    let counter = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (db, counter) = (db.clone(), counter.clone());
        workers.push(tokio::spawn(async move {
            while start.elapsed() < REFERENCE_TIME {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                db.exec(
                    "INSERT INTO bench_rows (id, v) VALUES ($1, $2)",
                    &[&(first_id + n), &n],
                )
                .await?;
            }
            Ok::<_, harmonydb::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(counter.load(std::sync::atomic::Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

async fn db_selects_concurrent(db: &Db) -> anyhow::Result<f64> {
    let counter = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (db, counter) = (db.clone(), counter.clone());
        workers.push(tokio::spawn(async move {
            while start.elapsed() < REFERENCE_TIME {
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _: Option<i64> = db
                    .scalar_opt(
                        "SELECT v FROM bench_rows WHERE id = $1",
                        &[&(1_000_000_000 + n % 100)],
                    )
                    .await?;
            }
            Ok::<_, harmonydb::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(counter.load(std::sync::atomic::Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}
