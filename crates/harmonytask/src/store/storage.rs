//! Storage paths and reservations (`storage_path`, `storage_reservation`).
//!
//! A reservation counts only while its task is owned by the machine registered at the path's
//! `host_and_port`. So a task that completes, fails for good or is cancelled (row deleted:
//! the reservation cascades), and one that is released by a retry, a shutdown or the reaper
//! (owner no longer that machine), gives its space back without the record path touching
//! this table. A stale row of a released task is deleted when the task reserves again, or
//! with the task.
//!
//! Reserving locks the host's path rows (Postgres `FOR UPDATE`; SQLite has one writer), reads
//! what is free and inserts, in one transaction, so reservations on a path never exceed its
//! available bytes however many claims run at once.

use harmonydb::{Dialect, Executor, Row, Timestamp, TxOptions};

use super::Store;
use crate::error::Result;
use crate::model::{StorageKind, StorageNeed, StoragePathRow, TaskId};

/// Most storage paths listed by one call.
pub(crate) const STORAGE_PATHS_MAX: i64 = 10_000;

/// A path to attach (or update) for a machine address.
#[derive(Debug, Clone)]
pub struct StorageAttach<'a> {
    /// The machine address (`--listen`) it belongs to.
    pub host_and_port: &'a str,
    /// The directory.
    pub local_path: &'a str,
    /// Preference among paths with room (higher first).
    pub weight: i64,
    /// Bytes it may hold.
    pub capacity: u64,
    /// Bytes free now (at most `capacity`).
    pub available: u64,
    /// Takes seal reservations.
    pub can_seal: bool,
    /// Takes store reservations.
    pub can_store: bool,
}

/// What a reservation got: the path, or the best free space there was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Space reserved on this path.
    On {
        /// The path's id.
        path_id: i64,
        /// The directory.
        local_path: String,
    },
    /// No path of the kind has room; the most free bytes on one of them (0: no such path).
    NoRoom {
        /// Free bytes on the best path.
        best_free: u64,
    },
}

/// Live reserved bytes of path `p`: reservations of tasks owned by the path's machine.
macro_rules! live_reserved {
    () => {
        "CAST(COALESCE((SELECT SUM(r.bytes) FROM storage_reservation r
            JOIN harmony_task t ON t.id = r.task_id
            JOIN harmony_machines m ON m.id = t.owner_id
            WHERE r.path_id = p.id AND m.host_and_port = p.host_and_port), 0) AS BIGINT)"
    };
}

fn bytes(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Attaches a path (or updates the one at the same host and directory); returns its id.
    pub async fn storage_attach(&self, p: &StorageAttach<'_>) -> Result<i64> {
        let sql = self.dialect().pick(
            "INSERT INTO storage_path (host_and_port, local_path, weight, capacity, available, can_seal, can_store, last_heartbeat)
             VALUES ($1, $2, $3, $4, $5, $6, $7, strftime('%Y-%m-%d %H:%M:%f', 'now'))
             ON CONFLICT (host_and_port, local_path) DO UPDATE SET weight = excluded.weight,
                capacity = excluded.capacity, available = excluded.available, can_seal = excluded.can_seal,
                can_store = excluded.can_store, last_heartbeat = excluded.last_heartbeat
             RETURNING id",
            "INSERT INTO storage_path (host_and_port, local_path, weight, capacity, available, can_seal, can_store, last_heartbeat)
             VALUES ($1, $2, $3, $4, $5, $6, $7, now())
             ON CONFLICT (host_and_port, local_path) DO UPDATE SET weight = excluded.weight,
                capacity = excluded.capacity, available = excluded.available, can_seal = excluded.can_seal,
                can_store = excluded.can_store, last_heartbeat = excluded.last_heartbeat
             RETURNING id",
        );
        let (cap, avail) = (bytes(p.capacity), bytes(p.available.min(p.capacity)));
        Ok(self
            .db
            .scalar(
                sql,
                &[
                    &p.host_and_port,
                    &p.local_path,
                    &p.weight,
                    &cap,
                    &avail,
                    &p.can_seal,
                    &p.can_store,
                ],
            )
            .await?)
    }

    /// Detaches a path; its reservations go with it. `false` when there was none.
    pub async fn storage_detach(&self, host_and_port: &str, local_path: &str) -> Result<bool> {
        let n = self
            .db
            .exec(
                "DELETE FROM storage_path WHERE host_and_port = $1 AND local_path = $2",
                &[&host_and_port, &local_path],
            )
            .await?;
        Ok(n > 0)
    }

    /// Every path (of one machine address, if given), by address and directory.
    pub async fn storage_list(&self, host_and_port: Option<&str>) -> Result<Vec<StoragePathRow>> {
        let sql = self.dialect().pick(
            concat!(
                "SELECT p.id, p.host_and_port, p.local_path, p.weight, p.capacity, p.available, ",
                live_reserved!(),
                " AS reserved, p.can_seal, p.can_store, p.last_heartbeat,
                 (julianday('now') - julianday(p.last_heartbeat)) * 86400.0 AS age,
                 EXISTS (SELECT 1 FROM harmony_machines m WHERE m.host_and_port = p.host_and_port) AS alive
                 FROM storage_path p WHERE ($1 IS NULL OR p.host_and_port = $1)
                 ORDER BY p.host_and_port, p.local_path LIMIT $2"
            ),
            concat!(
                "SELECT p.id, p.host_and_port, p.local_path, p.weight, p.capacity, p.available, ",
                live_reserved!(),
                " AS reserved, p.can_seal, p.can_store, p.last_heartbeat,
                 EXTRACT(EPOCH FROM now() - p.last_heartbeat)::float8 AS age,
                 EXISTS (SELECT 1 FROM harmony_machines m WHERE m.host_and_port = p.host_and_port) AS alive
                 FROM storage_path p WHERE ($1::text IS NULL OR p.host_and_port = $1)
                 ORDER BY p.host_and_port, p.local_path LIMIT $2"
            ),
        );
        let rows: Vec<Row> = self
            .db
            .select(sql, &[&host_and_port, &STORAGE_PATHS_MAX])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(StoragePathRow {
                    id: r.get("id")?,
                    host_and_port: r.get("host_and_port")?,
                    local_path: r.get("local_path")?,
                    weight: r.get("weight")?,
                    capacity: r.get("capacity")?,
                    available: r.get("available")?,
                    reserved: r.get("reserved")?,
                    can_seal: r.get("can_seal")?,
                    can_store: r.get("can_store")?,
                    last_heartbeat: r.get::<Timestamp>("last_heartbeat")?,
                    seconds_since_heartbeat: r.get("age")?,
                    machine_alive: r.get("alive")?,
                })
            })
            .collect::<harmonydb::Result<Vec<_>>>()
            .map_err(Into::into)
    }

    /// Records a new measurement of a path.
    pub async fn storage_refresh(&self, id: i64, capacity: u64, available: u64) -> Result<()> {
        let sql = self.dialect().pick(
            "UPDATE storage_path SET capacity = $2, available = $3, last_heartbeat = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id = $1",
            "UPDATE storage_path SET capacity = $2, available = $3, last_heartbeat = now() WHERE id = $1",
        );
        let (cap, avail) = (bytes(capacity), bytes(available.min(capacity)));
        self.db.exec(sql, &[&id, &cap, &avail]).await?;
        Ok(())
    }

    /// Free bytes (available less live reservations) of each path of `host_and_port` that
    /// takes `kind`.
    pub(crate) async fn storage_free(
        &self,
        host_and_port: &str,
        kind: StorageKind,
    ) -> Result<Vec<u64>> {
        let rows: Vec<(i64, String, i64)> =
            self.db.select(paths_sql(kind), &[&host_and_port]).await?;
        Ok(rows
            .into_iter()
            .map(|(_, _, free)| u64::try_from(free).unwrap_or(0))
            .collect())
    }

    /// Reserves `need` for `task` (owned by the machine at `host_and_port`) on the path of
    /// that machine with the highest weight, then the most free bytes, that has room.
    pub(crate) async fn storage_reserve(
        &self,
        task: TaskId,
        host_and_port: &str,
        need: StorageNeed,
    ) -> Result<Reserved> {
        let dialect = self.dialect();
        let want = bytes(need.bytes);
        let out = self
            .db
            .transaction_with(TxOptions::retry(), |tx| async move {
                tx.exec(
                    "DELETE FROM storage_reservation WHERE task_id = $1",
                    &[&task],
                )
                .await?;
                if dialect == Dialect::Postgres {
                    // Serialises reservations on this machine's paths.
                    tx.exec(
                        "SELECT id FROM storage_path WHERE host_and_port = $1 ORDER BY id FOR UPDATE",
                        &[&host_and_port],
                    )
                    .await?;
                }
                let paths: Vec<(i64, String, i64)> =
                    tx.select(paths_sql(need.kind), &[&host_and_port]).await?;
                let Some((path_id, local_path, _)) =
                    paths.iter().find(|(_, _, free)| *free >= want).cloned()
                else {
                    let best_free = paths.iter().map(|p| p.2).max().unwrap_or(0).max(0);
                    return Ok(Some(Reserved::NoRoom {
                        best_free: best_free as u64,
                    }));
                };
                tx.exec(
                    "INSERT INTO storage_reservation (task_id, path_id, bytes) VALUES ($1, $2, $3)",
                    &[&task, &path_id, &want],
                )
                .await?;
                Ok(Some(Reserved::On {
                    path_id,
                    local_path,
                }))
            })
            .await?;
        Ok(out.unwrap_or(Reserved::NoRoom { best_free: 0 }))
    }

    /// The directory reserved for `task` on the machine `machine`, if any.
    pub(crate) async fn storage_of_task(
        &self,
        task: TaskId,
        machine: crate::model::MachineId,
    ) -> Result<Option<String>> {
        let row: Option<(String,)> = self
            .db
            .query_opt(
                "SELECT p.local_path FROM storage_reservation r
                 JOIN storage_path p ON p.id = r.path_id
                 JOIN harmony_machines m ON m.host_and_port = p.host_and_port
                 WHERE r.task_id = $1 AND m.id = $2",
                &[&task, &machine],
            )
            .await?;
        Ok(row.map(|r| r.0))
    }
}

/// The paths of a machine address that take `kind`: id, directory, free bytes; best first.
fn paths_sql(kind: StorageKind) -> &'static str {
    match kind {
        StorageKind::Seal => concat!(
            "SELECT p.id, p.local_path, p.available - ",
            live_reserved!(),
            " AS free FROM storage_path p WHERE p.host_and_port = $1 AND p.can_seal
             ORDER BY p.weight DESC, free DESC, p.id"
        ),
        StorageKind::Store => concat!(
            "SELECT p.id, p.local_path, p.available - ",
            live_reserved!(),
            " AS free FROM storage_path p WHERE p.host_and_port = $1 AND p.can_store
             ORDER BY p.weight DESC, free DESC, p.id"
        ),
    }
}
