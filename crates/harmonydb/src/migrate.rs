//! Embedded, numbered schema migrations with a checksum ledger.
//!
//! Each migration exists once per dialect (`migrations/sqlite/NNNN_name.sql` and
//! `migrations/postgres/NNNN_name.sql`); the list below names each version once and includes
//! both files, so the two dialects cannot drift apart in version or name.
//!
//! Rules:
//! * each file runs in its own transaction together with its ledger row, so a file is either
//!   applied and recorded or not applied at all;
//! * concurrent starts are safe: on Postgres every migration transaction first takes a
//!   transaction-scoped advisory lock, on SQLite the transaction is `BEGIN IMMEDIATE`; the
//!   ledger is re-read under the lock, so the loser of a race finds the file applied and
//!   skips it;
//! * a ledger row whose checksum differs from the embedded file, a version this binary does not
//!   know (the database is newer), or a gap in the ledger stops the open with a
//!   [`ErrorKind::Migration`] error that says what to do.

use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::value::Timestamp;
use crate::{Db, Dialect, Executor, FromRow, Row};

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

impl Migration {
    fn sql(&self, dialect: Dialect) -> &'static str {
        dialect.pick(self.sqlite, self.postgres)
    }

    fn checksum(&self, dialect: Dialect) -> String {
        let digest = Sha256::digest(self.sql(dialect).as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

macro_rules! migrations {
    ($($version:literal => $file:literal),* $(,)?) => {
        pub(crate) const MIGRATIONS: &[Migration] = &[$(
            Migration {
                version: $version,
                name: $file,
                sqlite: include_str!(concat!("../migrations/sqlite/", $file, ".sql")),
                postgres: include_str!(concat!("../migrations/postgres/", $file, ".sql")),
            },
        )*];
    };
}

migrations! {
    1 => "0001_init",
    2 => "0002_task_args",
    3 => "0003_type_lock",
    4 => "0004_follow_preempt",
    5 => "0005_machine_cpu_fraction",
    6 => "0006_machine_address_unique",
    7 => "0007_lease",
    8 => "0008_why_pause",
}

/// Serialises migrations across processes on Postgres (`pg_advisory_xact_lock` key).
const PG_MIGRATION_LOCK: i64 = 0x4841_524d_4f4e_5901;

const LEDGER_SQLITE: &str = "CREATE TABLE IF NOT EXISTS harmony_schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    checksum    TEXT NOT NULL,
    applied_at  TEXT NOT NULL
)";

const LEDGER_POSTGRES: &str = "CREATE TABLE IF NOT EXISTS harmony_schema_migrations (
    version     BIGINT PRIMARY KEY,
    name        TEXT NOT NULL,
    checksum    TEXT NOT NULL,
    applied_at  TIMESTAMPTZ NOT NULL
)";

/// A migration as recorded or known.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct MigrationInfo {
    /// Version number.
    pub version: i64,
    /// File name without extension.
    pub name: String,
}

/// The schema's migration state.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationStatus {
    /// Highest applied version (`None` for an empty database).
    pub current_version: Option<i64>,
    /// Highest version this binary knows.
    pub latest_version: i64,
    /// Known migrations not yet applied, in order.
    pub pending: Vec<MigrationInfo>,
}

struct LedgerRow {
    version: i64,
    name: String,
    checksum: String,
}

impl FromRow for LedgerRow {
    fn from_row(row: &Row) -> Result<Self> {
        Ok(LedgerRow {
            version: row.get("version")?,
            name: row.get("name")?,
            checksum: row.get("checksum")?,
        })
    }
}

async fn lock<E: Executor>(tx: &E) -> Result<()> {
    if tx.dialect() == Dialect::Postgres {
        tx.exec("SELECT pg_advisory_xact_lock($1)", &[&PG_MIGRATION_LOCK])
            .await?;
    }
    Ok(())
}

async fn ensure_ledger(db: &Db) -> Result<()> {
    let ddl = db.dialect().pick(LEDGER_SQLITE, LEDGER_POSTGRES);
    db.transaction(|tx| async move {
        lock(&tx).await?;
        tx.exec_script(ddl).await?;
        Ok(true)
    })
    .await
    .map(|_| ())
}

async fn ledger<E: Executor>(e: &E) -> Result<Vec<LedgerRow>> {
    e.select(
        "SELECT version, name, checksum FROM harmony_schema_migrations ORDER BY version",
        &[],
    )
    .await
}

/// Checks the recorded ledger against the embedded list.
fn verify(dialect: Dialect, applied: &[LedgerRow]) -> Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    // A newer database is reported first: it explains every other mismatch.
    if let Some(newest) = applied.iter().find(|r| r.version > latest) {
        return Err(Error::new(
            ErrorKind::Migration,
            format!(
                "the database schema is at version {} ({}) but this binary knows only up to {latest}; upgrade harmony",
                newest.version, newest.name
            ),
        ));
    }
    for (i, row) in applied.iter().enumerate() {
        let Some(known) = MIGRATIONS.iter().find(|m| m.version == row.version) else {
            return Err(Error::new(
                ErrorKind::Migration,
                format!(
                    "the migration ledger records unknown version {} ({})",
                    row.version, row.name
                ),
            ));
        };
        if known.checksum(dialect) != row.checksum {
            return Err(Error::new(
                ErrorKind::Migration,
                format!(
                    "migration {} ({}) was changed after it was applied (checksum {} in the database, {} in this binary); shipped migrations must never change: restore the file and add a new migration",
                    row.version,
                    row.name,
                    short(&row.checksum),
                    short(&known.checksum(dialect))
                ),
            ));
        }
        let expected = MIGRATIONS[i].version;
        if row.version != expected {
            return Err(Error::new(
                ErrorKind::Migration,
                format!(
                    "migration ledger has a gap: version {} is recorded but {expected} is not; the schema was changed outside harmony",
                    row.version
                ),
            ));
        }
    }
    Ok(())
}

fn short(checksum: &str) -> &str {
    &checksum[..checksum.len().min(12)]
}

/// Applies every pending migration; returns those this call applied.
pub(crate) async fn apply(db: &Db) -> Result<Vec<MigrationInfo>> {
    apply_through(db, i64::MAX).await
}

/// Applies the pending migrations up to and including version `last`. Only tests stop short
/// of the newest version: they build a database as an older binary left it, then upgrade it.
async fn apply_through(db: &Db, last: i64) -> Result<Vec<MigrationInfo>> {
    let dialect = db.dialect();
    ensure_ledger(db).await.map_err(as_migration)?;
    let applied = ledger(db).await.map_err(as_migration)?;
    verify(dialect, &applied)?;
    let mut done = Vec::new();
    for m in MIGRATIONS
        .iter()
        .filter(|m| m.version <= last && !applied.iter().any(|a| a.version == m.version))
    {
        let m = *m;
        let ran = db
            .transaction(|tx| async move {
                lock(&tx).await?;
                // Re-read under the lock: another process may have applied it meanwhile.
                let now = ledger(&tx).await?;
                if now.iter().any(|a| a.version == m.version) {
                    verify(dialect, &now)?;
                    return Ok(false);
                }
                tx.exec_script(m.sql(dialect)).await.map_err(|e| {
                    Error::new(
                        ErrorKind::Migration,
                        format!("migration {} ({}) failed: {}", m.version, m.name, e.message()),
                    )
                })?;
                let applied_at = Timestamp::from_system(SystemTime::now());
                tx.exec(
                    "INSERT INTO harmony_schema_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)",
                    &[&m.version, &m.name, &m.checksum(dialect), &applied_at],
                )
                .await?;
                Ok(true)
            })
            .await
            .map_err(as_migration)?;
        if ran {
            tracing::info!(version = m.version, name = m.name, "applied migration");
            done.push(MigrationInfo {
                version: m.version,
                name: m.name.to_owned(),
            });
        }
    }
    Ok(done)
}

fn as_migration(e: Error) -> Error {
    match e.kind() {
        ErrorKind::Migration
        | ErrorKind::Connection
        | ErrorKind::Authentication
        | ErrorKind::Refused
        | ErrorKind::Timeout => e,
        _ => Error::new(
            ErrorKind::Migration,
            format!("applying migrations: {}", e.message()),
        ),
    }
}

/// Reads the ledger without changing anything.
pub(crate) async fn status(db: &Db) -> Result<MigrationStatus> {
    let table_exists: bool = match db.dialect() {
        Dialect::Sqlite => db
            .scalar::<i64>(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'harmony_schema_migrations'",
                &[],
            )
            .await?
            > 0,
        Dialect::Postgres => db
            .scalar::<bool>("SELECT to_regclass('harmony_schema_migrations') IS NOT NULL", &[])
            .await?,
    };
    let applied = if table_exists {
        ledger(db).await?
    } else {
        Vec::new()
    };
    verify(db.dialect(), &applied)?;
    Ok(MigrationStatus {
        current_version: applied.last().map(|r| r.version),
        latest_version: MIGRATIONS.last().map_or(0, |m| m.version),
        pending: MIGRATIONS
            .iter()
            .filter(|m| !applied.iter().any(|a| a.version == m.version))
            .map(|m| MigrationInfo {
                version: m.version,
                name: m.name.to_owned(),
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_dense_and_named_by_number() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "{}", m.name);
            let prefix: i64 = m.name[..4].parse().expect("name starts with NNNN");
            assert_eq!(prefix, m.version, "{}", m.name);
        }
    }

    #[test]
    fn both_dialect_directories_hold_exactly_the_listed_files() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{}.sql", m.name))
            .collect();
        for dialect in ["sqlite", "postgres"] {
            let mut files: Vec<String> = std::fs::read_dir(root.join(dialect))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            assert_eq!(
                files, listed,
                "{dialect} migrations differ from the embedded list"
            );
        }
    }

    /// A database left at version 4 by an older binary, whose machine rows have whole-number
    /// CPU budgets, is upgraded: the values survive, and fractional ones are stored exactly
    /// from then on.
    async fn cpu_budgets_survive_the_fractional_upgrade(url: &str) {
        let mut cfg = crate::DbConfig::from_url(url).unwrap();
        cfg.migrate_on_open = false;
        let old = Db::open(cfg).await.unwrap();
        apply_through(&old, 4).await.unwrap();
        old.exec(
            "INSERT INTO harmony_machines (host_and_port, cpu, ram, gpu) VALUES ($1, $2, $3, $4)",
            &[&"old:1", &4i64, &(1i64 << 30), &0.5f64],
        )
        .await
        .unwrap();
        drop(old);
        // A newer binary opens it (its own connections: the old ones cached statements typed
        // for the integer column) and migrates on open.
        let db = Db::open(crate::DbConfig::from_url(url).unwrap())
            .await
            .unwrap();
        let status = db.migration_status().await.unwrap();
        assert!(status.latest_version >= 5);
        assert_eq!(status.current_version, Some(status.latest_version));
        db.exec(
            "INSERT INTO harmony_machines (host_and_port, cpu, ram, gpu) VALUES ($1, $2, $3, $4)",
            &[&"new:1", &1.5f64, &(1i64 << 30), &0.0f64],
        )
        .await
        .unwrap();
        let rows: Vec<(String, f64)> = db
            .select(
                "SELECT host_and_port, cpu FROM harmony_machines ORDER BY id",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows, [("old:1".to_owned(), 4.0), ("new:1".to_owned(), 1.5)]);
    }

    #[tokio::test]
    async fn sqlite_cpu_budgets_survive_the_fractional_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("old.db").display());
        cpu_budgets_survive_the_fractional_upgrade(&url).await;
    }

    #[tokio::test]
    async fn postgres_cpu_budgets_survive_the_fractional_upgrade() {
        let test = "postgres_cpu_budgets_survive_the_fractional_upgrade";
        if !harmony_testkit::postgres_or_skip(test).await {
            return;
        }
        let base = harmony_testkit::pg_base_url();
        let schema = format!("t_{}", harmony_testkit::unique_suffix());
        let url = harmony_testkit::with_option(&base, "schema", &schema);
        // Run on its own task so that the schema is dropped even when an assertion fails.
        let outcome = tokio::spawn(async move {
            cpu_budgets_survive_the_fractional_upgrade(&url).await;
        })
        .await;
        std::thread::spawn(move || harmony_testkit::drop_schema(&base, &schema))
            .join()
            .unwrap();
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    #[test]
    fn checksums_differ_by_dialect_and_are_stable() {
        let m = MIGRATIONS[0];
        assert_eq!(m.checksum(Dialect::Sqlite), m.checksum(Dialect::Sqlite));
        assert_ne!(m.checksum(Dialect::Sqlite), m.checksum(Dialect::Postgres));
        assert_eq!(m.checksum(Dialect::Sqlite).len(), 64);
    }
}
