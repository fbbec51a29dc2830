//! `harmony storage attach|list|detach`.

use crate::cli::StorageCommand;
use crate::commands::UsageError;

/// Runs one `storage` subcommand.
pub async fn run(_db_url: &str, _json: bool, _cmd: StorageCommand) -> anyhow::Result<u8> {
    Err(UsageError("storage: not built yet".into()).into())
}
