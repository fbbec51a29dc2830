//! `harmony storage attach|list|detach`, and the measurement a node makes of its paths. The
//! binary reads the file systems (statvfs); the library keeps the rows and the reservations.

use std::path::Path;
use std::time::Duration;

use harmonytask::resources::format_bytes;
use harmonytask::{Admin, StorageAttach, StoragePathRow};

use crate::cli::StorageCommand;
use crate::commands::run::check_listen;
use crate::commands::{EXIT_OK, UsageError, open_existing};
use crate::output::{self, Table};

/// How often a node measures its storage paths.
pub const STORAGE_REFRESH: Duration = Duration::from_secs(10);

/// A path not measured for this long is shown as stale.
const STALE_AFTER_SECS: f64 = 60.0;

/// Runs one `storage` subcommand.
pub async fn run(db_url: &str, json: bool, cmd: StorageCommand) -> anyhow::Result<u8> {
    match cmd {
        StorageCommand::Attach {
            path,
            weight,
            can_seal,
            can_store,
            capacity,
            listen,
        } => {
            check_listen(&listen)?;
            if !can_seal && !can_store {
                return Err(UsageError(
                    "storage attach: give --can-seal, --can-store or both (what tasks may reserve space here)".into(),
                )
                .into());
            }
            if weight < 0 {
                return Err(
                    UsageError(format!("--weight: must be 0 or more, got {weight}")).into(),
                );
            }
            if capacity.is_some_and(|c| c.0 == 0) {
                return Err(UsageError("--capacity: must be more than 0 bytes".into()).into());
            }
            let dir = std::fs::canonicalize(&path)
                .map_err(|e| UsageError(format!("storage attach: {}: {e}", path.display())))?;
            if !dir.is_dir() {
                return Err(UsageError(format!(
                    "storage attach: {} is not a directory",
                    dir.display()
                ))
                .into());
            }
            let (total, free) = measure(&dir).map_err(|e| {
                UsageError(format!("storage attach: measuring {}: {e}", dir.display()))
            })?;
            let cap = capacity.map_or(total, |c| c.0.min(total));
            let shown = dir.to_string_lossy().into_owned();
            let admin = Admin::new(open_existing(db_url).await?);
            let id = admin
                .storage_attach(&StorageAttach {
                    host_and_port: &listen,
                    local_path: &shown,
                    weight,
                    capacity: cap,
                    available: free.min(cap),
                    can_seal,
                    can_store,
                })
                .await?;
            if json {
                output::json(&serde_json::json!({
                    "id": id, "host_and_port": listen, "local_path": shown,
                    "capacity": cap, "available": free.min(cap),
                }))?;
            } else {
                outln!(
                    "storage path {id} attached: {shown} on {listen}, capacity {}, available {}",
                    format_bytes(cap),
                    format_bytes(free.min(cap))
                );
            }
        }
        StorageCommand::List => {
            let admin = Admin::new(open_existing(db_url).await?);
            let rows = admin.storage_list(None).await?;
            if json {
                let out: Vec<_> = rows
                    .iter()
                    .map(|r| {
                        let mut v = serde_json::to_value(r).unwrap_or_default();
                        v["health"] = health(r).into();
                        v
                    })
                    .collect();
                output::json(&out)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&[
                "ID",
                "MACHINE",
                "PATH",
                "WEIGHT",
                "KINDS",
                "CAPACITY",
                "AVAILABLE",
                "RESERVED",
                "HEALTH",
            ]);
            for r in &rows {
                let kinds: Vec<&str> = [(r.can_seal, "seal"), (r.can_store, "store")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, k)| *k)
                    .collect();
                let b = |v: i64| format_bytes(u64::try_from(v).unwrap_or(0));
                t.row(vec![
                    r.id.to_string(),
                    r.host_and_port.clone(),
                    r.local_path.clone(),
                    r.weight.to_string(),
                    kinds.join(","),
                    b(r.capacity),
                    b(r.available),
                    b(r.reserved),
                    health(r).to_owned(),
                ]);
            }
            if t.is_empty() {
                outln!(
                    "no storage paths (attach one with `harmony storage attach PATH --can-store`)"
                );
            } else {
                t.print();
            }
        }
        StorageCommand::Detach { path, listen } => {
            check_listen(&listen)?;
            // A path that is gone from the disk can still be detached by the name it had.
            let shown = std::fs::canonicalize(&path)
                .unwrap_or_else(|_| path.clone())
                .to_string_lossy()
                .into_owned();
            let admin = Admin::new(open_existing(db_url).await?);
            if !admin.storage_detach(&listen, &shown).await? {
                return Err(UsageError(format!(
                    "storage detach: {shown} is not attached on {listen} (see `harmony storage list`)"
                ))
                .into());
            }
            if json {
                output::json(&serde_json::json!({ "detached": shown }))?;
            } else {
                outln!("storage path {shown} detached from {listen}");
            }
        }
    }
    Ok(EXIT_OK)
}

/// `ok`, `stale` (not measured lately), `no node` (no live machine at its address) or `full`.
fn health(r: &StoragePathRow) -> &'static str {
    if !r.machine_alive {
        "no node"
    } else if r.seconds_since_heartbeat > STALE_AFTER_SECS {
        "stale"
    } else if r.available <= r.reserved {
        "full"
    } else {
        "ok"
    }
}

/// The size and free space (for unprivileged users) of the file system holding `dir`.
pub fn measure(dir: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let frag = s.fragment_size() as u64;
    Ok((
        (s.blocks() as u64).saturating_mul(frag),
        (s.blocks_available() as u64).saturating_mul(frag),
    ))
}

/// Measures this node's paths (those attached at `host_and_port`) every [`STORAGE_REFRESH`]
/// until `stop`: available is what the file system has free, at most the path's capacity; a
/// path that cannot be measured has nothing available.
pub async fn refresh_loop(
    admin: Admin,
    host_and_port: String,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        match admin.storage_list(Some(&host_and_port)).await {
            Ok(paths) => {
                for p in paths {
                    let dir = std::path::PathBuf::from(&p.local_path);
                    let measured = tokio::task::spawn_blocking(move || measure(&dir)).await;
                    let cap = u64::try_from(p.capacity).unwrap_or(0);
                    let (cap, free) = match measured {
                        Ok(Ok((total, free))) => (cap.min(total), free),
                        Ok(Err(e)) => {
                            tracing::warn!(path = %p.local_path, error = %e, "cannot measure a storage path; nothing is reserved on it until it can be");
                            (cap, 0)
                        }
                        Err(_) => (cap, 0),
                    };
                    if let Err(e) = admin.storage_refresh(p.id, cap, free).await {
                        tracing::debug!(error = %e, "could not record a storage measurement");
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "could not read this node's storage paths"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(STORAGE_REFRESH) => {}
        }
    }
}
