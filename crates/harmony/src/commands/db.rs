//! `harmony db migrate|status`.

use serde::Serialize;

use crate::cli::DbCommand;
use crate::commands::{EXIT_OK, db_config};
use crate::output;

#[derive(Serialize)]
struct MigrateReport {
    applied: Vec<harmonydb::MigrationInfo>,
    up_to_date: bool,
    schema_version: Option<i64>,
}

pub async fn run(url: &str, json: bool, cmd: DbCommand) -> anyhow::Result<u8> {
    match cmd {
        DbCommand::Migrate => {
            let mut cfg = db_config(url)?;
            cfg.migrate_on_open = false;
            let shown = cfg.to_string();
            let db = harmonydb::Db::open(cfg)
                .await
                .map_err(|e| anyhow::Error::new(e).context(format!("opening database {shown}")))?;
            let applied = db
                .migrate()
                .await
                .map_err(|e| anyhow::Error::new(e).context(format!("migrating {shown}")))?;
            let status = db.migration_status().await?;
            let report = MigrateReport {
                up_to_date: applied.is_empty(),
                applied,
                schema_version: status.current_version,
            };
            if json {
                output::json(&report)?;
            } else if report.up_to_date {
                outln!(
                    "{shown}: schema is up to date (version {}); nothing to do",
                    report.schema_version.unwrap_or(0)
                );
            } else {
                for m in &report.applied {
                    outln!("applied {:04} {}", m.version, m.name);
                }
                outln!(
                    "{shown}: schema now at version {}",
                    report.schema_version.unwrap_or(0)
                );
            }
        }
        DbCommand::Status => {
            let (db, _) = super::open_unmigrated(url).await?;
            let status = db.status().await?;
            if json {
                output::json(&status)?;
            } else {
                outln!("backend:         {}", status.backend);
                outln!("database:        {}", status.url);
                outln!("location:        {}", status.location);
                if let Some(i) = status.host_index {
                    outln!("host index:      {i}");
                }
                if let Some(s) = &status.schema {
                    outln!("schema:          {s}");
                }
                let m = &status.migrations;
                outln!(
                    "schema version:  {} (latest {})",
                    m.current_version
                        .map_or("none".to_owned(), |v| v.to_string()),
                    m.latest_version
                );
                if m.pending.is_empty() {
                    outln!("pending:         none");
                } else {
                    for p in &m.pending {
                        outln!("pending:         {:04} {}", p.version, p.name);
                    }
                }
            }
        }
    }
    Ok(EXIT_OK)
}
