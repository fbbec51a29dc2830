//! Command-line definitions (clap derive). Only this module and `main` know about flags.

use clap::{Args, Parser, Subcommand};

/// Harmony: a distributed, resource-aware task engine on SQL.
#[derive(Debug, Parser)]
#[command(name = "harmony", version, about, long_about = None)]
pub struct Cli {
    /// Database URL: sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT][,HOST2…]/DB[?schema=…]
    #[arg(long, global = true, env = "HARMONY_DB", default_value = harmonydb::DEFAULT_URL)]
    pub db: String,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// Log filter (also HARMONY_LOG), e.g. `info` or `harmonytask=debug`.
    #[arg(long = "log", global = true, default_value = "warn")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Database schema: apply migrations, show status.
    #[command(subcommand)]
    Db(DbCommand),
}

/// `harmony db …`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Apply pending migrations (a second run reports the schema is up to date).
    Migrate,
    /// Show backend, host in use, schema version and pending migrations.
    Status,
}

/// Shared flags for commands that only read.
#[derive(Debug, Args)]
pub struct ReadOnly {}
