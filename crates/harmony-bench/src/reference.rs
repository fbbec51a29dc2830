//! The machine's reference rates, with the raw drivers and nothing of Harmony in between.
//!
//! This module (and `db`) holds the only SQL outside `harmonydb` and the engine's store: the
//! benchmark's own statements against the raw drivers, which is the point of comparing them.

use std::time::{Duration, Instant};

use anyhow::Context;
use harmonydb::{BackendConfig, DbConfig, PostgresConfig, SqliteConfig, Synchronous};

/// How long each reference loop runs.
pub(crate) const REFERENCE_TIME: Duration = Duration::from_secs(1);

/// A raw rusqlite connection with the settings harmonydb uses for its writer.
pub(crate) fn raw_sqlite(cfg: &SqliteConfig) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(&cfg.path)?;
    conn.busy_timeout(cfg.busy_timeout)?;
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    let sync = match cfg.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// A raw tokio-postgres client on the first host, with the schema on the search path.
pub(crate) async fn raw_postgres(cfg: &PostgresConfig) -> anyhow::Result<tokio_postgres::Client> {
    let host = cfg.hosts.first().context("no Postgres host")?;
    let mut c = tokio_postgres::Config::new();
    c.host(&host.host)
        .port(host.port)
        .user(&cfg.user)
        .dbname(&cfg.database);
    if let Some(pw) = &cfg.password {
        c.password(pw);
    }
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
        .execute(
            "SELECT set_config('search_path', $1, false)",
            &[&cfg.schema],
        )
        .await?;
    Ok(client)
}

/// SQLite: single-row insert commits per second; Postgres: single-row UPDATE commits per
/// second — each statement its own transaction, one at a time.
pub(crate) async fn reference_commits_per_s(url: &str) -> anyhow::Result<f64> {
    match DbConfig::from_url(url)?.backend {
        BackendConfig::Sqlite(cfg) => tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
            let conn = raw_sqlite(&cfg)?;
            conn.execute_batch("CREATE TABLE IF NOT EXISTS bench_reference (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)")?;
            let mut stmt = conn.prepare("INSERT INTO bench_reference (v) VALUES (?1)")?;
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < REFERENCE_TIME {
                stmt.execute([n as i64])?;
                n += 1;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        })
        .await?,
        BackendConfig::Postgres(cfg) => {
            let client = raw_postgres(&cfg).await?;
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS bench_reference (id BIGINT PRIMARY KEY, v BIGINT NOT NULL);
                     INSERT INTO bench_reference VALUES (1, 0) ON CONFLICT DO NOTHING",
                )
                .await?;
            let stmt = client.prepare("UPDATE bench_reference SET v = v + 1 WHERE id = 1").await?;
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < REFERENCE_TIME {
                client.execute(&stmt, &[]).await?;
                n += 1;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        }
    }
}
