//! Command implementations. Each returns the process exit code or an error that `main`
//! prints as one line.

mod db;

use harmonydb::{BackendConfig, Db, DbConfig, ErrorKind};

use crate::cli::{Cli, Command};

/// Success.
pub const EXIT_OK: u8 = 0;
/// A failure not covered below.
pub const EXIT_ERROR: u8 = 1;
/// Bad input: flags, configuration, names, files.
pub const EXIT_USAGE: u8 = 2;
/// The database could not be reached or refused us.
pub const EXIT_DATABASE: u8 = 3;

/// Runs the parsed command.
pub async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Db(cmd) => db::run(&cli.db, cli.json, cmd).await,
    }
}

/// Maps an error to an exit code by what went wrong.
pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    if let Some(db) = e.chain().find_map(|c| c.downcast_ref::<harmonydb::Error>()) {
        return match db.kind() {
            ErrorKind::Config | ErrorKind::Misuse => EXIT_USAGE,
            ErrorKind::Connection | ErrorKind::Authentication | ErrorKind::Timeout => EXIT_DATABASE,
            _ => EXIT_ERROR,
        };
    }
    if e.chain().any(|c| c.downcast_ref::<UsageError>().is_some()) {
        return EXIT_USAGE;
    }
    EXIT_ERROR
}

/// An error in what the user asked for (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses the `--db` URL.
pub fn db_config(url: &str) -> anyhow::Result<DbConfig> {
    Ok(DbConfig::from_url(url)?)
}

/// Opens the database for a command that only reads: no migrations, and a missing SQLite file
/// is an error rather than a new empty database.
pub async fn open_existing(url: &str) -> anyhow::Result<Db> {
    let mut cfg = db_config(url)?;
    cfg.migrate_on_open = false;
    if let BackendConfig::Sqlite(s) = &mut cfg.backend {
        s.create_if_missing = false;
    }
    let shown = cfg.to_string();
    Db::open(cfg)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("opening database {shown}")))
}

/// Opens the database, creating and migrating it as needed.
pub async fn open_migrated(url: &str) -> anyhow::Result<Db> {
    let cfg = db_config(url)?;
    let shown = cfg.to_string();
    Db::open(cfg)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("opening database {shown}")))
}
