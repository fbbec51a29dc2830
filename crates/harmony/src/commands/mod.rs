//! Command implementations. Each returns the process exit code or an error that `main`
//! prints as one line.

mod bench;
pub mod config;
mod db;
mod machine;
mod operate;
mod peering;
pub(crate) mod run;
pub mod storage;
mod task;
pub(crate) mod web;

use harmonydb::{BackendConfig, Db, DbConfig, ErrorKind};
use tokio_util::sync::CancellationToken;

use crate::cli::{Cli, Command};
use crate::taskfile::TaskFileError;

/// Success.
pub const EXIT_OK: u8 = 0;
/// A failure not covered below.
pub const EXIT_ERROR: u8 = 1;
/// Bad input: flags, configuration, names, files.
pub const EXIT_USAGE: u8 = 2;
/// The database could not be reached or refused us.
pub const EXIT_DATABASE: u8 = 3;
/// This node was declared dead by the cluster (its machine row was deleted) and stopped.
pub const EXIT_FENCED: u8 = 4;
/// An operator asked this node to restart; it drained and stopped (a supervisor restarts it).
pub const EXIT_RESTART: u8 = 100;

/// Runs the parsed command. `shutdown` fires on SIGINT/SIGTERM for long-running commands.
pub async fn dispatch(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<u8> {
    let notify = cli.notify.enabled();
    let peering = || {
        peering::Peering::new(
            cli.notify,
            cli.cluster_secret.as_ref().map(|s| s.0.as_str()),
        )
    };
    match cli.command {
        Command::Db(cmd) => db::run(&cli.db, cli.json, cmd).await,
        Command::Run(args) => {
            let p = peering()?;
            run::run(&cli.db, *args, &p, shutdown).await
        }
        Command::Task(cmd) => {
            let p = peering()?;
            let out = task::run(&cli.db, cli.json, &p, cmd).await;
            p.finish().await;
            out
        }
        Command::Machine(cmd) => {
            let p = peering()?;
            let out = machine::run(&cli.db, cli.json, &p, cmd).await;
            p.finish().await;
            out
        }
        Command::Demo(args) => crate::demo::run(args, cli.json, notify, shutdown).await,
        Command::Bench(args) => {
            let http = cli.notify == crate::cli::NotifyMode::Http;
            bench::run(&cli.db, cli.json, http, args).await
        }
        Command::Web(args) => web::run(&cli.db, args, notify, shutdown).await,
        Command::Config(cmd) => config::run(&cli.db, cli.json, cmd).await,
        Command::Storage(cmd) => storage::run(&cli.db, cli.json, cmd).await,
    }
}

/// The word for an exit code in `--json` errors: `usage`, `database`, `fenced`, `restart`,
/// or `error`.
pub fn exit_kind(code: u8) -> &'static str {
    match code {
        EXIT_USAGE => "usage",
        EXIT_DATABASE => "database",
        EXIT_FENCED => "fenced",
        EXIT_RESTART => "restart",
        _ => "error",
    }
}

/// Maps an error to an exit code by what went wrong.
pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    if let Some(db) = e.chain().find_map(|c| c.downcast_ref::<harmonydb::Error>()) {
        return db_exit_code(db.kind());
    }
    if let Some(t) = e
        .chain()
        .find_map(|c| c.downcast_ref::<harmonytask::Error>())
    {
        return match t {
            harmonytask::Error::Db(db) => db_exit_code(db.kind()),
            harmonytask::Error::Fenced(_) => EXIT_FENCED,
            harmonytask::Error::RestartRequested => EXIT_RESTART,
            harmonytask::Error::InvalidName(_)
            | harmonytask::Error::InvalidType(_)
            | harmonytask::Error::DuplicateType(_)
            | harmonytask::Error::UnknownType(_)
            | harmonytask::Error::Task(_)
            | harmonytask::Error::TaskNotFound(_)
            | harmonytask::Error::TaskActive { .. }
            | harmonytask::Error::TaskSucceeded { .. }
            | harmonytask::Error::Config(_)
            | harmonytask::Error::AddressInUse { .. }
            | harmonytask::Error::MachineNotFound(_)
            | harmonytask::Error::NotSingleton(_) => EXIT_USAGE,
            _ => EXIT_ERROR,
        };
    }
    if e.chain().any(|c| {
        c.downcast_ref::<UsageError>().is_some() || c.downcast_ref::<TaskFileError>().is_some()
    }) {
        return EXIT_USAGE;
    }
    EXIT_ERROR
}

fn db_exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Config | ErrorKind::Misuse => EXIT_USAGE,
        ErrorKind::Connection
        | ErrorKind::Authentication
        | ErrorKind::Refused
        | ErrorKind::Timeout => EXIT_DATABASE,
        _ => EXIT_ERROR,
    }
}

/// Checks a task type name given on the command line (`what` names the flag or argument).
pub fn check_type_name(what: &str, name: &str) -> anyhow::Result<()> {
    harmonytask::validate_name(name).map_err(|e| UsageError(format!("{what}: {e}")).into())
}

/// An error in what the user asked for (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Parses the `--db` URL.
pub fn db_config(url: &str) -> anyhow::Result<DbConfig> {
    Ok(DbConfig::from_url(url)?)
}

/// Opens the database for a command that works on what nodes wrote (`task ls`, `machine
/// cordon`, …): no migrations, a missing SQLite file is an error rather than a new empty
/// database, and the schema must be one this binary understands. A database without a
/// Harmony schema is refused with exit code 2 (the remedy is `harmony db migrate` or another
/// `--db`); one migrated by a newer binary, or with a tampered ledger, is refused exactly as
/// `harmony run` refuses it.
pub async fn open_existing(url: &str) -> anyhow::Result<Db> {
    let (db, shown) = open_unmigrated(url).await?;
    let status = db
        .migration_status()
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("opening database {shown}")))?;
    if status.current_version.is_none() {
        return Err(UsageError(format!(
            "database {shown} has no Harmony schema (no migration recorded in harmony_schema_migrations); run `harmony db migrate` to create it, or check --db"
        ))
        .into());
    }
    Ok(db)
}

/// Opens the database without migrating it or checking its schema (for `db status`, which
/// reports the schema's state, whatever it is). A missing SQLite file is an error.
pub async fn open_unmigrated(url: &str) -> anyhow::Result<(Db, String)> {
    let mut cfg = db_config(url)?;
    cfg.migrate_on_open = false;
    if let BackendConfig::Sqlite(s) = &mut cfg.backend {
        s.create_if_missing = false;
    }
    let shown = cfg.to_string();
    let db = Db::open(cfg)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("opening database {shown}")))?;
    Ok((db, shown))
}

/// Opens the database, creating and migrating it as needed.
pub async fn open_migrated(url: &str) -> anyhow::Result<Db> {
    let cfg = db_config(url)?;
    let shown = cfg.to_string();
    Db::open(cfg)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("opening database {shown}")))
}
