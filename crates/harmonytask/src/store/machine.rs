//! Machine rows: registration, heartbeat, the reaper, graceful exit. The heartbeat and the
//! reaper decide who owns what (a reaped machine's tasks are released by `ON DELETE SET NULL`),
//! so they are crate-private: only the engine's own loops call them.

use std::time::Duration;

use harmonydb::{Dialect, Executor, Timestamp};

use super::{Store, machine_at, millis, sqlite_age_modifier};
use crate::error::{Error, Result};
use crate::model::{MachineFlags, MachineId};

/// Parameters of registering this process as a machine.
#[derive(Debug, Clone)]
pub struct MachineRegister<'a> {
    /// Advertised address, also the node's identity across restarts.
    pub host_and_port: &'a str,
    /// Budget, as given (fractional CPUs are kept, not rounded).
    pub cpu: f64,
    /// Budget, bytes.
    pub ram: i64,
    /// Budget.
    pub gpu: f64,
    /// Comma-joined task types this node runs.
    pub tasks: &'a str,
    /// Comma-joined config layers.
    pub layers: &'a str,
    /// Display name.
    pub name: &'a str,
    /// Build version.
    pub version: &'a str,
    /// Start time.
    pub now: Timestamp,
    /// A machine silent for longer than this is dead; only such a row with the same address
    /// may be replaced.
    pub dead_after: Duration,
}

/// Result of registration.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    /// The new machine id.
    pub id: MachineId,
    /// Tasks that earlier incarnations with the same address still owned, now released.
    pub released_tasks: i64,
}

/// Operations on this node's own machine row and on dead ones.
pub(crate) trait MachineStore {
    /// Registers this process: removes earlier, dead incarnations with the same address
    /// (their tasks are released by `ON DELETE SET NULL`), inserts the machine and its
    /// details. A live machine with the address (heartbeat within `dead_after`) is never
    /// replaced: registration fails with [`Error::AddressInUse`] and writes nothing.
    async fn machine_register(&self, p: &MachineRegister<'_>) -> Result<Registered>;

    /// Bumps `last_contact`; returns the operator flags, or `None` when the row is gone
    /// (this node was declared dead).
    async fn machine_heartbeat(&self, id: MachineId) -> Result<Option<MachineFlags>>;

    /// Deletes machines whose last heartbeat is older than `dead_after` (server clock);
    /// their tasks become unowned. Returns the reaped machines.
    async fn machine_reap(&self, dead_after: Duration) -> Result<Vec<(MachineId, String)>>;

    /// Clears a served restart request (and the cordon that usually precedes it).
    async fn machine_clear_restart(&self, id: MachineId) -> Result<()>;

    /// Deletes this machine's row (graceful exit).
    async fn machine_unregister(&self, id: MachineId) -> Result<()>;
}

impl MachineStore for Store {
    async fn machine_register(&self, p: &MachineRegister<'_>) -> Result<Registered> {
        let dialect = self.dialect();
        let insert = dialect.pick(
            "INSERT INTO harmony_machines (host_and_port, cpu, ram, gpu, last_contact) VALUES ($1, $2, $3, $4, strftime('%Y-%m-%d %H:%M:%f', 'now')) RETURNING id",
            "INSERT INTO harmony_machines (host_and_port, cpu, ram, gpu, last_contact) VALUES ($1, $2, $3, $4, now()) RETURNING id",
        );
        let attempt = self
            .db
            .transaction_with(harmonydb::TxOptions::retry(), |tx| async move {
                let released: i64 = match dialect {
                    Dialect::Sqlite => {
                        let cutoff = sqlite_age_modifier(p.dead_after);
                        let n = tx
                            .scalar(
                            "SELECT count(*) FROM harmony_task t JOIN harmony_machines m ON t.owner_id = m.id WHERE m.host_and_port = $1 AND m.last_contact < strftime('%Y-%m-%d %H:%M:%f', 'now', $2)",
                            &[&p.host_and_port, &cutoff],
                        )
                        .await?;
                        tx.exec(
                            "DELETE FROM harmony_machines WHERE host_and_port = $1 AND last_contact < strftime('%Y-%m-%d %H:%M:%f', 'now', $2)",
                            &[&p.host_and_port, &cutoff],
                        )
                        .await?;
                        n
                    }
                    Dialect::Postgres => {
                        let ms = millis(p.dead_after);
                        let n = tx
                            .scalar(
                                "SELECT count(*) FROM harmony_task t JOIN harmony_machines m ON t.owner_id = m.id WHERE m.host_and_port = $1 AND m.last_contact < now() - ($2::bigint * interval '1 millisecond')",
                                &[&p.host_and_port, &ms],
                            )
                            .await?;
                        tx.exec(
                            "DELETE FROM harmony_machines WHERE host_and_port = $1 AND last_contact < now() - ($2::bigint * interval '1 millisecond')",
                            &[&p.host_and_port, &ms],
                        )
                        .await?;
                        n
                    }
                };
                if let Some(live) = machine_at(&tx, dialect, p.host_and_port).await? {
                    return Ok(Some(Err(live)));
                }
                let id: i64 = tx
                    .scalar(insert, &[&p.host_and_port, &p.cpu, &p.ram, &p.gpu])
                    .await?;
                tx.exec(
                    "INSERT INTO harmony_machine_details (machine_id, tasks, layers, startup_time, machine_name, version) VALUES ($1, $2, $3, $4, $5, $6)",
                    &[&id, &p.tasks, &p.layers, &p.now, &p.name, &p.version],
                )
                .await?;
                Ok(Some(Ok(Registered {
                    id: MachineId(id),
                    released_tasks: released,
                })))
            })
            .await;
        let live = match attempt {
            Ok(Some(Ok(registered))) => return Ok(registered),
            Ok(Some(Err(live))) => Some(live),
            // Another node registered the address between our check and our insert (the
            // unique index on host_and_port refused the second row).
            Err(e) if e.kind() == harmonydb::ErrorKind::UniqueViolation => {
                machine_at(&self.db, dialect, p.host_and_port).await?
            }
            Err(e) => return Err(e.into()),
            Ok(None) => None,
        };
        Err(match live {
            Some((machine, since)) => Error::AddressInUse {
                host_and_port: p.host_and_port.to_owned(),
                machine,
                seconds_since_contact: since,
                dead_after: p.dead_after,
            },
            None => Error::Task("machine registration rolled back".into()),
        })
    }

    async fn machine_heartbeat(&self, id: MachineId) -> Result<Option<MachineFlags>> {
        let sql = self.dialect().pick(
            "UPDATE harmony_machines SET last_contact = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id = $1 RETURNING unschedulable, restart_request",
            "UPDATE harmony_machines SET last_contact = now() WHERE id = $1 RETURNING unschedulable, restart_request",
        );
        let row: Option<(bool, Option<Timestamp>)> = self.db.query_opt(sql, &[&id]).await?;
        Ok(row.map(|(unschedulable, restart)| MachineFlags {
            unschedulable,
            restart_requested: restart.is_some(),
        }))
    }

    async fn machine_reap(&self, dead_after: Duration) -> Result<Vec<(MachineId, String)>> {
        let rows: Vec<(i64, String)> = match self.dialect() {
            Dialect::Sqlite => {
                let modifier = sqlite_age_modifier(dead_after);
                self.db
                    .select(
                        "DELETE FROM harmony_machines WHERE last_contact < strftime('%Y-%m-%d %H:%M:%f', 'now', $1) RETURNING id, host_and_port",
                        &[&modifier],
                    )
                    .await?
            }
            Dialect::Postgres => {
                let ms = millis(dead_after);
                self.db
                    .select(
                        "DELETE FROM harmony_machines WHERE last_contact < now() - ($1::bigint * interval '1 millisecond') RETURNING id, host_and_port",
                        &[&ms],
                    )
                    .await?
            }
        };
        Ok(rows.into_iter().map(|(id, h)| (MachineId(id), h)).collect())
    }

    async fn machine_clear_restart(&self, id: MachineId) -> Result<()> {
        self.db
            .exec(
                "UPDATE harmony_machines SET restart_request = NULL, unschedulable = $2 WHERE id = $1",
                &[&id, &false],
            )
            .await?;
        Ok(())
    }

    async fn machine_unregister(&self, id: MachineId) -> Result<()> {
        self.db
            .exec("DELETE FROM harmony_machines WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }
}
