//! The engine's one seam to the database: named operations, each taking a params struct.
//!
//! All task SQL of the engine lives here (and nowhere else outside `harmonydb`). Where the two
//! dialects need different SQL the statement is written twice and picked with
//! [`Dialect::pick`]; everything else is shared. Batched statements pass arrays: Postgres
//! binds real arrays (`= ANY($1)`, `unnest`), SQLite binds JSON text read with `json_each`.
//!
//! Timestamps of task rows come from the engine's injected clock (bound parameters); machine
//! liveness (`last_contact`, the reaper's cutoff) uses the database server's clock, so that
//! nodes with skewed clocks cannot declare each other dead.

use std::collections::HashMap;
use std::time::Duration;

use harmonydb::{Db, Dialect, Executor, FromRow, Row, Timestamp, Tx};

use crate::error::{Error, Result};
use crate::task::{MachineId, TaskId};

/// Handle over the database with the engine's operations.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

/// A waiting task as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Task id.
    pub id: TaskId,
    /// Creation time (FIFO order).
    pub posted: Timestamp,
    /// Last release or failure (retry waits count from it).
    pub updated: Timestamp,
    /// Failed attempts so far.
    pub retries: u32,
}

impl FromRow for Candidate {
    fn from_row(row: &Row) -> harmonydb::Result<Self> {
        Ok(Candidate {
            id: row.get("id")?,
            posted: row.get("posted_time")?,
            updated: row.get("update_time")?,
            retries: row.get("retries")?,
        })
    }
}

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

/// Operator flags read with each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineFlags {
    /// Cordoned: claim nothing new.
    pub unschedulable: bool,
    /// Restart requested at this time.
    pub restart_requested: bool,
}

/// One machine row with its details.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineRow {
    /// Id.
    pub id: MachineId,
    /// Address.
    pub host_and_port: String,
    /// Display name.
    pub name: String,
    /// Budget (may be fractional).
    pub cpu: f64,
    /// Budget, bytes.
    pub ram: i64,
    /// Budget.
    pub gpu: f64,
    /// Last heartbeat.
    pub last_contact: Timestamp,
    /// Cordoned.
    pub unschedulable: bool,
    /// Restart requested.
    pub restart_request: Option<Timestamp>,
    /// Task types it runs.
    pub tasks: String,
    /// Tasks it owns now.
    pub running: i64,
    /// Start time.
    pub startup_time: Option<Timestamp>,
    /// Build version.
    pub version: String,
}

/// Parameters of a claim.
#[derive(Debug, Clone)]
pub struct TaskClaim<'a> {
    /// The type.
    pub name: &'a str,
    /// Candidates in preference order.
    pub ids: &'a [TaskId],
    /// Claim at most this many.
    pub limit: usize,
    /// The claiming machine.
    pub owner: MachineId,
    /// Cluster-wide limit on owned tasks of this type (0 = none).
    pub max_cluster: usize,
}

/// A claimed task.
pub type Claimed = Candidate;

/// What a claim got.
#[derive(Debug, Clone, Default)]
pub struct ClaimOutcome {
    /// The tasks now owned by the claimer.
    pub claimed: Vec<Claimed>,
    /// The cluster-wide limit left less room than asked for.
    pub cluster_full: bool,
}

/// How one attempt ended, for the completion batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Done: delete the row; history `result = true`.
    Done,
    /// Failed, will be retried: release with `retries + 1`.
    Retry,
    /// Failed for good: delete the row.
    Fail,
    /// Preempted or shut down: release, retries unchanged.
    Release,
}

/// One attempt's outcome to record.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The task.
    pub id: TaskId,
    /// Its type.
    pub name: String,
    /// Its creation time (history `posted`).
    pub posted: Timestamp,
    /// Attempt start.
    pub work_start: Timestamp,
    /// Attempt end.
    pub work_end: Timestamp,
    /// What to do with the row.
    pub fate: Fate,
    /// History `err` ("" for a clean success).
    pub err: String,
}

/// A batch of outcomes of one machine, recorded in one transaction.
#[derive(Debug, Clone)]
pub struct RecordBatch<'a> {
    /// Send wake-up hints (released work, queued follow-ups) with the commit.
    pub notify: bool,
    /// Types with a cluster-wide limit: a completion of one frees a slot anywhere in the
    /// cluster, so it is hinted like a release.
    pub cluster_limited: &'a [String],
    /// The recording machine: every row change is fenced by `owner_id = owner`.
    pub owner: MachineId,
    /// Its address, for history.
    pub host_and_port: &'a str,
    /// `update_time` for released rows.
    pub now: Timestamp,
    /// The outcomes.
    pub outcomes: &'a [Outcome],
}

/// What recording found.
#[derive(Debug, Clone, Default)]
pub struct Recorded {
    /// Outcomes whose fence held, with their history row ids.
    pub applied: Vec<(TaskId, i64)>,
    /// Outcomes discarded because the row was no longer owned by this machine.
    pub fenced_out: Vec<TaskId>,
    /// Types whose completions in this batch queued follow-ups.
    pub followed: Vec<String>,
}

/// A task row (pending or running).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskRow {
    /// Id.
    pub id: TaskId,
    /// Type.
    pub name: String,
    /// Owner, if running.
    pub owner_id: Option<MachineId>,
    /// Owner's address.
    pub owner_host: Option<String>,
    /// Created.
    pub posted_time: Timestamp,
    /// Last release/failure.
    pub update_time: Timestamp,
    /// Failed attempts so far.
    pub retries: i64,
    /// Added by machine.
    pub added_by: i64,
    /// Predecessor (followers).
    pub previous_task: Option<i64>,
}

impl FromRow for TaskRow {
    fn from_row(row: &Row) -> harmonydb::Result<Self> {
        Ok(TaskRow {
            id: row.get("id")?,
            name: row.get("name")?,
            owner_id: row.get::<Option<i64>>("owner_id")?.map(MachineId),
            owner_host: row.get("owner_host")?,
            posted_time: row.get("posted_time")?,
            update_time: row.get("update_time")?,
            retries: row.get("retries")?,
            added_by: row.get("added_by")?,
            previous_task: row.get("previous_task")?,
        })
    }
}

/// One history row (one attempt).
#[derive(Debug, Clone, serde::Serialize, harmonydb::FromRow)]
pub struct HistoryRow {
    /// History id.
    pub id: i64,
    /// Task id.
    pub task_id: i64,
    /// Type.
    pub name: String,
    /// Task creation.
    pub posted: Timestamp,
    /// Attempt start.
    pub work_start: Timestamp,
    /// Attempt end.
    pub work_end: Timestamp,
    /// Success.
    pub result: bool,
    /// Error text.
    pub err: String,
    /// Who ran it.
    pub completed_by_host_and_port: String,
}

/// How an attempt ended, as its history row records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptResult {
    /// The task succeeded.
    Ok,
    /// A failed attempt: it counts against `max_failures`.
    Failed,
    /// Released because its node shut down; retries unchanged.
    Shutdown,
    /// Released for a time-sensitive task; retries unchanged.
    Preempted,
    /// Released because its node was cordoned (`can_yield`); retries unchanged.
    Yielded,
    /// Released because the database failed under it (connection, timeout, serialization);
    /// retries unchanged.
    DatabaseUnavailable,
}

impl AttemptResult {
    /// The word shown in tables and JSON: `ok`, `failed`, `shutdown`, `preempted`, `yielded`,
    /// `db_unavailable`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::Failed => "failed",
            AttemptResult::Shutdown => "shutdown",
            AttemptResult::Preempted => "preempted",
            AttemptResult::Yielded => "yielded",
            AttemptResult::DatabaseUnavailable => "db_unavailable",
        }
    }

    /// Whether the attempt counted as a failure (a retry used up).
    pub fn is_failure(self) -> bool {
        self == AttemptResult::Failed
    }

    /// The history `err` text the engine writes for a release of this kind (for
    /// `DatabaseUnavailable`, the start of it; the database's message follows).
    pub(crate) const fn release_text(self) -> &'static str {
        match self {
            AttemptResult::DatabaseUnavailable => "database unavailable: ",
            other => other.as_str(),
        }
    }
}

impl HistoryRow {
    /// How this attempt ended. A release writes `result = false` with one of the release
    /// texts as its error (the schema has no other column for it, as upstream).
    pub fn attempt_result(&self) -> AttemptResult {
        if self.result {
            return AttemptResult::Ok;
        }
        let db = AttemptResult::DatabaseUnavailable;
        if self.err.starts_with(db.release_text()) {
            return db;
        }
        [
            AttemptResult::Shutdown,
            AttemptResult::Preempted,
            AttemptResult::Yielded,
        ]
        .into_iter()
        .find(|r| r.release_text() == self.err)
        .unwrap_or(AttemptResult::Failed)
    }
}

/// Filter of [`Store::history`].
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Only this type.
    pub name: Option<String>,
    /// Only this task.
    pub task: Option<TaskId>,
    /// Only failed attempts.
    pub failed_only: bool,
    /// At most this many rows, newest first.
    pub limit: usize,
}

/// Per-type counts of history and queue (for summaries).
#[derive(Debug, Clone, serde::Serialize, harmonydb::FromRow)]
pub struct TypeSummary {
    /// Type.
    pub name: String,
    /// Attempts recorded.
    pub attempts: i64,
    /// Successful attempts.
    pub succeeded: i64,
    /// Failed attempts.
    pub failed: i64,
    /// Mean milliseconds from post to start of the successful attempt.
    pub mean_wait_ms: f64,
    /// Mean milliseconds of attempts.
    pub mean_run_ms: f64,
}

impl Store {
    /// Wraps a database handle.
    pub fn new(db: Db) -> Self {
        Store { db }
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    // ---- machines -------------------------------------------------------------------------

    /// Registers this process: removes earlier, dead incarnations with the same address
    /// (their tasks are released by `ON DELETE SET NULL`), inserts the machine and its
    /// details. A live machine with the address (heartbeat within `dead_after`) is never
    /// replaced: registration fails with [`Error::AddressInUse`] and writes nothing.
    pub async fn machine_register(&self, p: &MachineRegister<'_>) -> Result<Registered> {
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

    /// Bumps `last_contact`; returns the operator flags, or `None` when the row is gone
    /// (this node was declared dead).
    pub async fn machine_heartbeat(&self, id: MachineId) -> Result<Option<MachineFlags>> {
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

    /// Deletes machines whose last heartbeat is older than `dead_after` (server clock);
    /// their tasks become unowned. Returns the reaped machines.
    pub async fn machine_reap(&self, dead_after: Duration) -> Result<Vec<(MachineId, String)>> {
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

    /// Clears a served restart request (and the cordon that usually precedes it).
    pub async fn machine_clear_restart(&self, id: MachineId) -> Result<()> {
        self.db
            .exec(
                "UPDATE harmony_machines SET restart_request = NULL, unschedulable = $2 WHERE id = $1",
                &[&id, &false],
            )
            .await?;
        Ok(())
    }

    /// Deletes this machine's row (graceful exit).
    pub async fn machine_unregister(&self, id: MachineId) -> Result<()> {
        self.db
            .exec("DELETE FROM harmony_machines WHERE id = $1", &[&id])
            .await?;
        Ok(())
    }

    /// Every registered machine with its details and owned-task count.
    pub async fn machine_list(&self) -> Result<Vec<MachineRow>> {
        let rows: Vec<Row> = self
            .db
            .select(
                "SELECT m.id, m.host_and_port, m.cpu, m.ram, m.gpu, m.last_contact, m.unschedulable, m.restart_request,
                        COALESCE(d.machine_name, '') AS machine_name, COALESCE(d.tasks, '') AS tasks,
                        d.startup_time, COALESCE(d.version, '') AS version,
                        (SELECT count(*) FROM harmony_task t WHERE t.owner_id = m.id) AS running
                 FROM harmony_machines m LEFT JOIN harmony_machine_details d ON d.machine_id = m.id
                 ORDER BY m.id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(MachineRow {
                    id: MachineId(r.get("id")?),
                    host_and_port: r.get("host_and_port")?,
                    name: r.get("machine_name")?,
                    cpu: r.get("cpu")?,
                    ram: r.get("ram")?,
                    gpu: r.get("gpu")?,
                    last_contact: r.get("last_contact")?,
                    unschedulable: r.get("unschedulable")?,
                    restart_request: r.get("restart_request")?,
                    tasks: r.get("tasks")?,
                    running: r.get("running")?,
                    startup_time: r.get("startup_time")?,
                    version: r.get("version")?,
                })
            })
            .collect::<harmonydb::Result<Vec<_>>>()
            .map_err(Error::from)
    }

    /// Task type names that registered machines run (from their details rows).
    pub async fn types_in_cluster(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self
            .db
            .select("SELECT tasks FROM harmony_machine_details", &[])
            .await?;
        let mut names: Vec<String> = rows
            .iter()
            .flat_map(|(t,)| t.split(',').filter(|s| !s.is_empty()).map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    // ---- adding ---------------------------------------------------------------------------

    /// Inserts one task row inside `tx`; returns its id.
    pub async fn task_insert(
        tx: &Tx,
        name: &str,
        posted: Timestamp,
        added_by: MachineId,
        previous: Option<TaskId>,
    ) -> harmonydb::Result<TaskId> {
        tx.scalar(
            "INSERT INTO harmony_task (name, posted_time, update_time, added_by, previous_task) VALUES ($1, $2, $2, $3, $4) RETURNING id",
            &[&name, &posted, &added_by, &previous],
        )
        .await
    }

    /// Inserts one task row with no rows of the caller's, in one statement (its own
    /// transaction), with the `addt` wake-up hint on Postgres when `notify`; returns its id.
    /// The hint is built in SQL in the format of `notify::Hint::payload`.
    pub async fn task_insert_alone(
        &self,
        name: &str,
        posted: Timestamp,
        added_by: MachineId,
        notify: bool,
    ) -> Result<TaskId> {
        if notify && self.dialect() == Dialect::Postgres {
            let posted_ms = posted.as_millis();
            return Ok(self
                .db
                .scalar(
                    "WITH ins AS (
                         INSERT INTO harmony_task (name, posted_time, update_time, added_by)
                         VALUES ($1, $2, $2, $3) RETURNING id)
                     SELECT ins.id FROM ins
                     CROSS JOIN LATERAL pg_notify($4, 'addt:' || $1::text || ':' || $3::bigint || ':' || ins.id || ':' || $5::bigint) AS n",
                    &[&name, &posted, &added_by, &crate::notify::CHANNEL, &posted_ms],
                )
                .await?);
        }
        Ok(self
            .db
            .scalar(
                "INSERT INTO harmony_task (name, posted_time, update_time, added_by) VALUES ($1, $2, $2, $3) RETURNING id",
                &[&name, &posted, &added_by],
            )
            .await?)
    }

    /// Inserts `count` task rows of one type inside `tx` with one statement; returns their ids
    /// in ascending order.
    pub async fn task_insert_many(
        tx: &Tx,
        name: &str,
        count: usize,
        posted: Timestamp,
        added_by: MachineId,
    ) -> harmonydb::Result<Vec<TaskId>> {
        let sql = tx.dialect().pick(
            "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < $4)
             INSERT INTO harmony_task (name, posted_time, update_time, added_by) SELECT $1, $2, $2, $3 FROM s RETURNING id",
            "INSERT INTO harmony_task (name, posted_time, update_time, added_by)
             SELECT $1, $2, $2, $3 FROM generate_series(1, $4::bigint) RETURNING id",
        );
        let rows: Vec<(TaskId,)> = tx.select(sql, &[&name, &posted, &added_by, &count]).await?;
        let mut ids: Vec<TaskId> = rows.into_iter().map(|r| r.0).collect();
        ids.sort();
        Ok(ids)
    }

    /// Writes task arguments inside `tx`.
    pub async fn task_args_insert(
        tx: &Tx,
        id: TaskId,
        args: &[(String, String)],
    ) -> harmonydb::Result<()> {
        for (k, v) in args {
            tx.exec(
                "INSERT INTO harmony_task_args (task_id, key, value) VALUES ($1, $2, $3)",
                &[&id, k, v],
            )
            .await?;
        }
        Ok(())
    }

    /// A task's arguments.
    pub async fn task_args(&self, id: TaskId) -> Result<HashMap<String, String>> {
        let rows: Vec<(String, String)> = self
            .db
            .select(
                "SELECT key, value FROM harmony_task_args WHERE task_id = $1",
                &[&id],
            )
            .await?;
        Ok(rows.into_iter().collect())
    }

    // ---- scheduling -----------------------------------------------------------------------

    /// The oldest `limit` unowned tasks of a type, through the partial index: the cost does
    /// not depend on how many tasks wait.
    pub async fn task_poll(&self, name: &str, limit: usize) -> Result<Vec<Candidate>> {
        const POLL: &str = "SELECT id, posted_time, update_time, retries FROM harmony_task
                 WHERE name = $1 AND owner_id IS NULL ORDER BY posted_time, id LIMIT $2";
        if self.dialect() == Dialect::Sqlite {
            return Ok(self.db.select(POLL, &[&name, &limit]).await?);
        }
        let polled = self
            .db
            .transaction(|tx| async move {
                Self::prefer_index_order(&tx).await?;
                Ok(Some(tx.select::<Candidate>(POLL, &[&name, &limit]).await?))
            })
            .await?;
        Ok(polled.unwrap_or_default())
    }

    /// On Postgres, makes the rest of `tx` read "the oldest N" through the ordered index, never
    /// as a bitmap scan of every matching row followed by a sort. Postgres picks the bitmap
    /// plan when its statistics predate a bulk insert (until autovacuum analyzes the table):
    /// a poll of 1,000,000 fresh rows then took 500 ms instead of 0.5 ms.
    async fn prefer_index_order(tx: &Tx) -> harmonydb::Result<()> {
        if tx.dialect() == Dialect::Postgres {
            tx.exec("SET LOCAL enable_bitmapscan = off", &[]).await?;
        }
        Ok(())
    }

    /// Claims up to `limit` of the candidate ids that are still unowned, in the given order,
    /// with one statement (plus, for types with a cluster-wide limit, a per-type lock row and
    /// a count in the same transaction). Returns what was actually claimed; a lost race just
    /// claims fewer.
    pub async fn task_claim(&self, p: &TaskClaim<'_>) -> Result<ClaimOutcome> {
        if p.ids.is_empty() || p.limit == 0 {
            return Ok(ClaimOutcome::default());
        }
        let ids: Vec<i64> = p.ids.iter().map(|t| t.0).collect();
        let claim = self.dialect().pick(
            "UPDATE harmony_task SET owner_id = $1
             WHERE id IN (SELECT t.id FROM json_each($2) AS j CROSS JOIN harmony_task AS t ON t.id = j.value
                          WHERE t.owner_id IS NULL ORDER BY j.key LIMIT $3)
             RETURNING id, posted_time, update_time, retries",
            // The candidates drive a nested loop over the primary key. The filter is written
            // `coalesce(owner_id, 0) = 0` (machine ids start at 1) so that the planner cannot
            // pick the partial index on unowned tasks, whose scan grows with the backlog.
            "UPDATE harmony_task SET owner_id = $1
             WHERE owner_id IS NULL AND id IN (
                 SELECT t.id FROM unnest($2::bigint[]) WITH ORDINALITY AS u(id, ord)
                 JOIN harmony_task AS t ON t.id = u.id
                 WHERE coalesce(t.owner_id, 0) = 0
                 ORDER BY u.ord LIMIT $3 FOR UPDATE OF t SKIP LOCKED)
             RETURNING id, posted_time, update_time, retries",
        );
        if p.max_cluster == 0 {
            return Ok(ClaimOutcome {
                claimed: self.db.select(claim, &[&p.owner, &ids, &p.limit]).await?,
                cluster_full: false,
            });
        }
        let lock = self.dialect().pick(
            "INSERT INTO harmony_task_type_lock (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = excluded.name",
            "INSERT INTO harmony_task_type_lock (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = excluded.name",
        );
        let claimed = self
            .db
            .transaction_with(harmonydb::TxOptions::retry(), |tx| {
                let ids = ids.clone();
                async move {
                    // Touching the lock row serialises claims of this type cluster-wide (the
                    // row lock is held until commit), so the count below cannot be raced.
                    tx.exec(lock, &[&p.name]).await?;
                    let owned: i64 = tx
                        .scalar(
                            "SELECT count(*) FROM harmony_task WHERE name = $1 AND owner_id IS NOT NULL",
                            &[&p.name],
                        )
                        .await?;
                    let room = (p.max_cluster as i64 - owned).max(0) as usize;
                    let limit = room.min(p.limit);
                    let cluster_full = room < p.limit;
                    if limit == 0 {
                        return Ok(Some(ClaimOutcome { claimed: Vec::new(), cluster_full }));
                    }
                    let claimed: Vec<Claimed> = tx.select(claim, &[&p.owner, &ids, &limit]).await?;
                    Ok(Some(ClaimOutcome { claimed, cluster_full }))
                }
            })
            .await?;
        Ok(claimed.unwrap_or_default())
    }

    /// Records a batch of attempt outcomes in one transaction. Every row change is fenced by
    /// `owner_id = owner`: an outcome whose task is no longer owned by this machine (another
    /// node took it over after this one was declared dead) is discarded and reported, and
    /// writes no history.
    pub async fn task_record(&self, b: &RecordBatch<'_>) -> Result<Recorded> {
        let dialect = self.dialect();
        let ids_of = |fates: &[Fate]| -> Vec<i64> {
            b.outcomes
                .iter()
                .filter(|o| fates.contains(&o.fate))
                .map(|o| o.id.0)
                .collect()
        };
        let delete_ids = ids_of(&[Fate::Done, Fate::Fail]);
        let retry_ids = ids_of(&[Fate::Retry]);
        let release_ids = ids_of(&[Fate::Release]);
        let delete = dialect.pick(
            "DELETE FROM harmony_task WHERE owner_id = $1 AND id IN (SELECT value FROM json_each($2)) RETURNING id",
            "DELETE FROM harmony_task WHERE owner_id = $1 AND id = ANY($2::bigint[]) RETURNING id",
        );
        let retry = dialect.pick(
            "UPDATE harmony_task SET owner_id = NULL, retries = retries + 1, update_time = $3
             WHERE owner_id = $1 AND id IN (SELECT value FROM json_each($2)) RETURNING id",
            "UPDATE harmony_task SET owner_id = NULL, retries = retries + 1, update_time = $3
             WHERE owner_id = $1 AND id = ANY($2::bigint[]) RETURNING id",
        );
        let release = dialect.pick(
            "UPDATE harmony_task SET owner_id = NULL, update_time = $3
             WHERE owner_id = $1 AND id IN (SELECT value FROM json_each($2)) RETURNING id",
            "UPDATE harmony_task SET owner_id = NULL, update_time = $3
             WHERE owner_id = $1 AND id = ANY($2::bigint[]) RETURNING id",
        );
        let recorded = self
            .db
            .transaction_with(harmonydb::TxOptions::retry(), |tx| {
                let (delete_ids, retry_ids, release_ids) =
                    (delete_ids.clone(), retry_ids.clone(), release_ids.clone());
                async move {
                    let mut kept: Vec<i64> = Vec::with_capacity(b.outcomes.len());
                    if !delete_ids.is_empty() {
                        let rows: Vec<(i64,)> = tx.select(delete, &[&b.owner, &delete_ids]).await?;
                        kept.extend(rows.into_iter().map(|r| r.0));
                    }
                    if !retry_ids.is_empty() {
                        let rows: Vec<(i64,)> =
                            tx.select(retry, &[&b.owner, &retry_ids, &b.now]).await?;
                        kept.extend(rows.into_iter().map(|r| r.0));
                    }
                    if !release_ids.is_empty() {
                        let rows: Vec<(i64,)> = tx
                            .select(release, &[&b.owner, &release_ids, &b.now])
                            .await?;
                        kept.extend(rows.into_iter().map(|r| r.0));
                    }
                    kept.sort_unstable();
                    let applied: Vec<&Outcome> = b
                        .outcomes
                        .iter()
                        .filter(|o| kept.binary_search(&o.id.0).is_ok())
                        .collect();
                    let history_ids = insert_history(&tx, b.host_and_port, &applied).await?;
                    let mut out = Recorded::default();
                    for (o, h) in applied.iter().zip(history_ids) {
                        out.applied.push((o.id, h));
                    }
                    let done: Vec<(&Outcome, i64)> = applied
                        .iter()
                        .zip(&out.applied)
                        .filter(|(o, _)| o.fate == Fate::Done)
                        .map(|(o, (_, h))| (*o, *h))
                        .collect();
                    if !done.is_empty() {
                        out.followed = enqueue_follow_ups(&tx, &done).await?;
                    }
                    if b.notify {
                        let mut hints: Vec<String> = Vec::new();
                        for o in &applied {
                            // Released work can run elsewhere; any end of a cluster-limited
                            // task frees a slot anywhere in the cluster.
                            if matches!(o.fate, Fate::Retry | Fate::Release)
                                || b.cluster_limited.contains(&o.name)
                            {
                                hints.push(
                                    crate::notify::Hint::Released {
                                        name: o.name.clone(),
                                    }
                                    .payload(b.owner),
                                );
                            }
                        }
                        for from in &out.followed {
                            hints.push(
                                crate::notify::Hint::Follow { from: from.clone() }.payload(b.owner),
                            );
                        }
                        hints.sort();
                        hints.dedup();
                        for h in hints {
                            Store::notify_in(&tx, &h).await?;
                        }
                    }
                    out.fenced_out = b
                        .outcomes
                        .iter()
                        .filter(|o| kept.binary_search(&o.id.0).is_err())
                        .map(|o| o.id)
                        .collect();
                    Ok(Some(out))
                }
            })
            .await?;
        Ok(recorded.unwrap_or_default())
    }

    /// The owner of a task: `None` when the row is gone, `Some(None)` when unowned.
    pub async fn task_owner(&self, id: TaskId) -> Result<Option<Option<MachineId>>> {
        let row: Option<(Option<i64>,)> = self
            .db
            .query_opt("SELECT owner_id FROM harmony_task WHERE id = $1", &[&id])
            .await?;
        Ok(row.map(|(o,)| o.map(MachineId)))
    }

    /// Releases every task still owned by `owner` (shutdown), retries unchanged.
    pub async fn task_release_owned(&self, owner: MachineId, now: Timestamp) -> Result<u64> {
        Ok(self
            .db
            .exec(
                "UPDATE harmony_task SET owner_id = NULL, update_time = $2 WHERE owner_id = $1",
                &[&owner, &now],
            )
            .await?)
    }

    /// Re-queues a permanently failed task with its original id and posted time. Fails when the
    /// task is still pending or running, or when its last attempt succeeded.
    pub async fn task_restart(
        &self,
        id: TaskId,
        added_by: MachineId,
        now: Timestamp,
    ) -> Result<String> {
        let restarted = self
            .db
            .transaction_with(harmonydb::TxOptions::retry(), |tx| async move {
                let pending: Option<(String,)> = tx
                    .query_opt("SELECT name FROM harmony_task WHERE id = $1", &[&id])
                    .await?;
                if let Some((name,)) = pending {
                    return Ok(Some(Err(format!("task {id} ({name}) is still queued or running; only failed tasks can be restarted"))));
                }
                let last: Option<(String, Timestamp, bool)> = tx
                    .query_opt(
                        "SELECT name, posted, result FROM harmony_task_history WHERE task_id = $1 ORDER BY id DESC LIMIT 1",
                        &[&id],
                    )
                    .await?;
                let Some((name, posted, result)) = last else {
                    return Ok(Some(Err(format!("task {id} does not exist"))));
                };
                if result {
                    return Ok(Some(Err(format!("task {id} ({name}) completed successfully; there is nothing to restart"))));
                }
                tx.exec(
                    "INSERT INTO harmony_task (id, name, posted_time, update_time, added_by, retries) VALUES ($1, $2, $3, $4, $5, 0)",
                    &[&id, &name, &posted, &now, &added_by],
                )
                .await?;
                Ok(Some(Ok(name)))
            })
            .await?;
        restarted
            .unwrap_or_else(|| Err("restart rolled back".into()))
            .map_err(Error::Task)
    }

    // ---- reading (CLI, status) ------------------------------------------------------------

    /// Pending and running tasks, oldest first, at most `limit`.
    pub async fn task_list(&self, name: Option<&str>, limit: usize) -> Result<Vec<TaskRow>> {
        Ok(self
            .db
            .select(
                "SELECT t.id, t.name, t.owner_id, m.host_and_port AS owner_host, t.posted_time, t.update_time,
                        t.retries, t.added_by, t.previous_task
                 FROM harmony_task t LEFT JOIN harmony_machines m ON m.id = t.owner_id
                 WHERE ($1 = '' OR t.name = $1)
                 ORDER BY t.posted_time, t.id LIMIT $2",
                &[&name.unwrap_or(""), &limit],
            )
            .await?)
    }

    /// One task row, if it is pending or running.
    pub async fn task_get(&self, id: TaskId) -> Result<Option<TaskRow>> {
        Ok(self
            .db
            .query_opt(
                "SELECT t.id, t.name, t.owner_id, m.host_and_port AS owner_host, t.posted_time, t.update_time,
                        t.retries, t.added_by, t.previous_task
                 FROM harmony_task t LEFT JOIN harmony_machines m ON m.id = t.owner_id
                 WHERE t.id = $1",
                &[&id],
            )
            .await?)
    }

    /// Counts of pending (unowned) and running (owned) tasks per type.
    pub async fn task_counts(&self) -> Result<Vec<(String, i64, i64)>> {
        Ok(self
            .db
            .select(
                "SELECT name,
                        sum(CASE WHEN owner_id IS NULL THEN 1 ELSE 0 END) AS pending,
                        sum(CASE WHEN owner_id IS NULL THEN 0 ELSE 1 END) AS running
                 FROM harmony_task GROUP BY name ORDER BY name",
                &[],
            )
            .await?)
    }

    /// History rows, newest first.
    pub async fn history(&self, q: &HistoryQuery) -> Result<Vec<HistoryRow>> {
        let limit = if q.limit == 0 { 100 } else { q.limit };
        let task = q.task.map_or(-1, |t| t.0);
        Ok(self
            .db
            .select(
                "SELECT id, task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port
                 FROM harmony_task_history
                 WHERE ($1 = '' OR name = $1) AND ($2 < 0 OR task_id = $2) AND ($3 = 0 OR result = $4)
                 ORDER BY work_end DESC, id DESC LIMIT $5",
                &[
                    &q.name.as_deref().unwrap_or(""),
                    &task,
                    &i64::from(q.failed_only),
                    &false,
                    &limit,
                ],
            )
            .await?)
    }

    /// Per-type attempt statistics over all history.
    pub async fn type_summaries(&self) -> Result<Vec<TypeSummary>> {
        let sql = self.dialect().pick(
            "SELECT name, count(*) AS attempts,
                    sum(result) AS succeeded,
                    sum(1 - result) AS failed,
                    COALESCE(avg(CASE WHEN result THEN (julianday(work_start) - julianday(posted)) * 86400000.0 END), 0.0) AS mean_wait_ms,
                    COALESCE(avg((julianday(work_end) - julianday(work_start)) * 86400000.0), 0.0) AS mean_run_ms
             FROM harmony_task_history GROUP BY name ORDER BY name",
            "SELECT name, count(*) AS attempts,
                    count(*) FILTER (WHERE result) AS succeeded,
                    count(*) FILTER (WHERE NOT result) AS failed,
                    COALESCE(avg(EXTRACT(EPOCH FROM (work_start - posted)) * 1000.0) FILTER (WHERE result), 0)::float8 AS mean_wait_ms,
                    COALESCE(avg(EXTRACT(EPOCH FROM (work_end - work_start)) * 1000.0), 0)::float8 AS mean_run_ms
             FROM harmony_task_history GROUP BY name ORDER BY name",
        );
        Ok(self.db.select(sql, &[]).await?)
    }
}

/// One queued follow-up.
#[derive(Debug, Clone, harmonydb::FromRow)]
pub struct QueuedFollow {
    /// Queue row id.
    pub id: i64,
    /// The completed task.
    pub task_id: i64,
    /// Its history row.
    pub history_id: i64,
}

impl Store {
    /// Sends a wake-up hint inside `tx` (delivered on commit). Postgres only; a no-op on
    /// SQLite, where other processes see the commit through `PRAGMA data_version`.
    pub async fn notify_in(tx: &Tx, payload: &str) -> harmonydb::Result<()> {
        if tx.dialect() == Dialect::Postgres {
            tx.exec(
                "SELECT pg_notify($1, $2)",
                &[&crate::notify::CHANNEL, &payload],
            )
            .await?;
        }
        Ok(())
    }

    /// Sends a wake-up hint on its own (Postgres only).
    pub async fn notify(&self, payload: &str) -> Result<()> {
        if self.dialect() == Dialect::Postgres {
            self.db
                .exec(
                    "SELECT pg_notify($1, $2)",
                    &[&crate::notify::CHANNEL, &payload],
                )
                .await?;
        }
        Ok(())
    }

    /// Registers a follower pair; completions of `from` are queued for `to` from now on.
    pub async fn follow_register(&self, from: &str, to: &str) -> Result<()> {
        self.db
            .exec(
                "INSERT INTO harmony_task_follow (from_type, to_type, last_history_id) VALUES ($1, $2, 0)
                 ON CONFLICT (from_type, to_type) DO NOTHING",
                &[&from, &to],
            )
            .await?;
        Ok(())
    }

    /// Takes (locks, on Postgres skipping rows other nodes hold) up to `limit` queued
    /// follow-ups of a pair, oldest first.
    pub async fn follow_take(
        tx: &Tx,
        from: &str,
        to: &str,
        limit: usize,
    ) -> harmonydb::Result<Vec<QueuedFollow>> {
        let sql = tx.dialect().pick(
            "SELECT id, task_id, history_id FROM harmony_task_follow_queue
             WHERE from_type = $1 AND to_type = $2 ORDER BY id LIMIT $3",
            "SELECT id, task_id, history_id FROM harmony_task_follow_queue
             WHERE from_type = $1 AND to_type = $2 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED",
        );
        Self::prefer_index_order(tx).await?;
        tx.select(sql, &[&from, &to, &limit]).await
    }

    /// Deletes consumed follow-ups and advances the pair's cursor (the last history id
    /// followed, for operators).
    pub async fn follow_done(
        tx: &Tx,
        from: &str,
        to: &str,
        ids: &[i64],
        last_history: i64,
    ) -> harmonydb::Result<()> {
        let delete = tx.dialect().pick(
            "DELETE FROM harmony_task_follow_queue WHERE id IN (SELECT value FROM json_each($1))",
            "DELETE FROM harmony_task_follow_queue WHERE id = ANY($1::bigint[])",
        );
        let ids = ids.to_vec();
        tx.exec(delete, &[&ids]).await?;
        tx.exec(
            "UPDATE harmony_task_follow SET last_history_id = $3
             WHERE from_type = $1 AND to_type = $2 AND last_history_id < $3",
            &[&from, &to, &last_history],
        )
        .await?;
        Ok(())
    }

    /// Follow-ups waiting, per pair (status and tests).
    pub async fn follow_pending(&self) -> Result<Vec<(String, String, i64)>> {
        Ok(self
            .db
            .select(
                "SELECT from_type, to_type, count(*) FROM harmony_task_follow_queue GROUP BY from_type, to_type ORDER BY from_type, to_type",
                &[],
            )
            .await?)
    }

    /// Inside the insert transaction of singleton task `id`: whether it may run now. It may
    /// when no live task of the type exists and the interval has passed or a run-now request is
    /// pending; then the singleton row points at it, `last_run_time` is now, and the request is
    /// cleared. Returns false (roll back) otherwise.
    pub async fn singleton_take(
        tx: &Tx,
        name: &str,
        id: TaskId,
        min_interval: Duration,
        now: Timestamp,
    ) -> harmonydb::Result<bool> {
        tx.exec(
            "INSERT INTO harmony_task_singletons (task_name, run_now_request) VALUES ($1, $2)
             ON CONFLICT (task_name) DO NOTHING",
            &[&name, &false],
        )
        .await?;
        let select = tx.dialect().pick(
            "SELECT task_id, last_run_time, run_now_request FROM harmony_task_singletons WHERE task_name = $1",
            "SELECT task_id, last_run_time, run_now_request FROM harmony_task_singletons WHERE task_name = $1 FOR UPDATE",
        );
        let (task_id, last_run, run_now): (Option<i64>, Option<Timestamp>, bool) =
            tx.query_row(select, &[&name]).await?;
        if task_id.is_some() {
            // The previous one is still pending or running (the FK clears it when its row goes).
            return Ok(false);
        }
        let due = run_now || last_run.is_none_or(|t| t + min_interval <= now);
        if !due {
            return Ok(false);
        }
        tx.exec(
            "UPDATE harmony_task_singletons SET task_id = $2, last_run_time = $3, run_now_request = $4 WHERE task_name = $1",
            &[&name, &id, &now, &false],
        )
        .await?;
        Ok(true)
    }

    /// Records that `name` is a singleton type (at registration of a node that runs it), so
    /// that run-now requests for it are accepted before its first run.
    pub async fn singleton_register(&self, name: &str) -> Result<()> {
        self.db
            .exec(
                "INSERT INTO harmony_task_singletons (task_name, run_now_request) VALUES ($1, $2)
                 ON CONFLICT (task_name) DO NOTHING",
                &[&name, &false],
            )
            .await?;
        Ok(())
    }

    /// The names of every type registered as a singleton, sorted.
    pub async fn singleton_names(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self
            .db
            .select(
                "SELECT task_name FROM harmony_task_singletons ORDER BY task_name",
                &[],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Asks for a singleton to run now (and wakes the nodes on Postgres). A type that no node
    /// ever registered as a singleton is refused with [`Error::NotSingleton`], writing nothing.
    pub async fn singleton_run_now(&self, name: &str, notify: bool) -> Result<()> {
        let hint = crate::notify::Hint::RunNow {
            name: name.to_owned(),
        }
        .payload(MachineId(0));
        let requested = self
            .db
            .transaction_with(harmonydb::TxOptions::retry(), |tx| {
                let hint = &hint;
                async move {
                    let n = tx
                        .exec(
                            "UPDATE harmony_task_singletons SET run_now_request = $2 WHERE task_name = $1",
                            &[&name, &true],
                        )
                        .await?;
                    if n == 0 {
                        return Ok(false);
                    }
                    if notify {
                        Store::notify_in(&tx, hint).await?;
                    }
                    Ok(true)
                }
            })
            .await?;
        if requested {
            Ok(())
        } else {
            Err(Error::NotSingleton(name.to_owned()))
        }
    }

    /// Which of `names` have a pending run-now request.
    pub async fn singleton_requests(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self
            .db
            .select(
                "SELECT task_name FROM harmony_task_singletons WHERE run_now_request = $1",
                &[&true],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// A singleton's row: current task, last run, pending request.
    pub async fn singleton_get(
        &self,
        name: &str,
    ) -> Result<Option<(Option<i64>, Option<Timestamp>, bool)>> {
        Ok(self
            .db
            .query_opt(
                "SELECT task_id, last_run_time, run_now_request FROM harmony_task_singletons WHERE task_name = $1",
                &[&name],
            )
            .await?)
    }

    /// Cordons (`true`) or uncordons a machine; false when it does not exist.
    pub async fn machine_set_unschedulable(
        &self,
        id: MachineId,
        cordoned: bool,
        notify: bool,
    ) -> Result<bool> {
        let n = self
            .db
            .exec(
                "UPDATE harmony_machines SET unschedulable = $2 WHERE id = $1",
                &[&id, &cordoned],
            )
            .await?;
        if n > 0 && notify {
            self.notify(&crate::notify::Hint::Machines.payload(MachineId(0)))
                .await?;
        }
        Ok(n > 0)
    }

    /// Asks a machine to drain and restart; false when it does not exist.
    pub async fn machine_request_restart(
        &self,
        id: MachineId,
        now: Timestamp,
        notify: bool,
    ) -> Result<bool> {
        let n = self
            .db
            .exec(
                "UPDATE harmony_machines SET restart_request = $2 WHERE id = $1",
                &[&id, &now],
            )
            .await?;
        if n > 0 && notify {
            self.notify(&crate::notify::Hint::Machines.payload(MachineId(0)))
                .await?;
        }
        Ok(n > 0)
    }
}

impl Store {
    /// Records (or updates) this machine's bid to preempt work for time-sensitive task `task`:
    /// `cost_ms` is the total runtime of the victims it would cancel.
    pub async fn preempt_bid(&self, task: TaskId, machine: MachineId, cost_ms: i64) -> Result<()> {
        self.db
            .exec(
                "INSERT INTO harmony_task_preempt_bid (task_id, machine_id, cost_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (task_id, machine_id) DO UPDATE SET cost_ms = excluded.cost_ms",
                &[&task, &machine, &cost_ms],
            )
            .await?;
        Ok(())
    }

    /// The winning bid for `task`: the lowest cost, ties to the lower machine id.
    pub async fn preempt_winner(&self, task: TaskId) -> Result<Option<MachineId>> {
        let row: Option<(i64,)> = self
            .db
            .query_opt(
                "SELECT machine_id FROM harmony_task_preempt_bid WHERE task_id = $1 ORDER BY cost_ms, machine_id LIMIT 1",
                &[&task],
            )
            .await?;
        Ok(row.map(|r| MachineId(r.0)))
    }

    /// Forgets the bids for `task`.
    pub async fn preempt_clear(&self, task: TaskId) -> Result<()> {
        self.db
            .exec(
                "DELETE FROM harmony_task_preempt_bid WHERE task_id = $1",
                &[&task],
            )
            .await?;
        Ok(())
    }

    /// Releases one task this machine owns without recording an attempt (it never started).
    pub async fn task_release(&self, id: TaskId, owner: MachineId, now: Timestamp) -> Result<bool> {
        Ok(self
            .db
            .exec(
                "UPDATE harmony_task SET owner_id = NULL, update_time = $3 WHERE id = $1 AND owner_id = $2",
                &[&id, &owner, &now],
            )
            .await?
            > 0)
    }
}

/// The time span of recorded attempts, for throughput measurements.
#[derive(Debug, Clone, Copy)]
pub struct HistorySpan {
    /// Attempts recorded.
    pub attempts: i64,
    /// Earliest attempt start.
    pub first_start: Option<Timestamp>,
    /// Latest attempt end.
    pub last_end: Option<Timestamp>,
}

impl Store {
    /// Count and span of the attempts of `name` recorded after history id `after`.
    pub async fn history_span(&self, name: &str, after: i64) -> Result<HistorySpan> {
        let (attempts, first_start, last_end): (i64, Option<Timestamp>, Option<Timestamp>) = self
            .db
            .query_row(
                "SELECT count(*), min(work_start), max(work_end) FROM harmony_task_history WHERE name = $1 AND id > $2",
                &[&name, &after],
            )
            .await?;
        Ok(HistorySpan {
            attempts,
            first_start,
            last_end,
        })
    }

    /// The highest history id so far (0 when empty).
    pub async fn history_max_id(&self) -> Result<i64> {
        Ok(self
            .db
            .scalar::<Option<i64>>("SELECT max(id) FROM harmony_task_history", &[])
            .await?
            .unwrap_or(0))
    }

    /// Whether any task of `name` is still pending or running.
    pub async fn any_task(&self, name: &str) -> Result<bool> {
        Ok(self
            .db
            .query_opt::<(i64,)>(
                "SELECT id FROM harmony_task WHERE name = $1 LIMIT 1",
                &[&name],
            )
            .await?
            .is_some())
    }
}

/// One physical attempt of a built-in task, as written by the task itself.
#[derive(Debug, Clone, serde::Serialize, harmonydb::FromRow)]
pub struct AttemptRow {
    /// Attempt id.
    pub id: i64,
    /// Task.
    pub task_id: i64,
    /// Machine that ran it.
    pub machine_id: i64,
    /// Start.
    pub started: Timestamp,
    /// End (NULL if the process died or was stopped mid-attempt).
    pub ended: Option<Timestamp>,
    /// Start, microseconds since the epoch.
    pub started_us: i64,
}

/// A whole attempt of a built-in task, logged once it ended.
#[derive(Debug, Clone)]
pub struct AttemptWhole {
    /// Its start.
    pub start: AttemptStart,
    /// Its end.
    pub ended: Timestamp,
}

/// A start of a built-in attempt to log.
#[derive(Debug, Clone, Copy)]
pub struct AttemptStart {
    /// Task.
    pub task: TaskId,
    /// Machine.
    pub machine: MachineId,
    /// Start.
    pub started: Timestamp,
    /// Start, microseconds since the epoch.
    pub started_us: i64,
}

impl Store {
    /// Logs attempt starts, whole attempts and ends of built-in tasks in one transaction;
    /// returns the new attempt ids in the order of `starts`.
    pub async fn attempts_log(
        &self,
        starts: &[AttemptStart],
        wholes: &[AttemptWhole],
        ends: &[(i64, Timestamp)],
    ) -> Result<Vec<i64>> {
        let ids = self
            .db
            .transaction_with(harmonydb::TxOptions::retry(), |tx| async move {
                let mut ids = Vec::new();
                match tx.dialect() {
                    Dialect::Sqlite => {
                        if !starts.is_empty() {
                            let json = serde_json::Value::Array(
                                starts
                                    .iter()
                                    .map(|a| serde_json::json!([a.task.0, a.machine.0, a.started.to_sqlite_text(), a.started_us]))
                                    .collect(),
                            )
                            .to_string();
                            let rows: Vec<(i64,)> = tx
                                .select(
                                    "INSERT INTO harmony_test_attempt (task_id, machine_id, started, started_us)
                                     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each($1) ORDER BY key
                                     RETURNING id",
                                    &[&json],
                                )
                                .await?;
                            ids = rows.into_iter().map(|r| r.0).collect();
                        }
                        if !wholes.is_empty() {
                            let json = serde_json::Value::Array(
                                wholes
                                    .iter()
                                    .map(|w| {
                                        let a = &w.start;
                                        serde_json::json!([a.task.0, a.machine.0, a.started.to_sqlite_text(), a.started_us, w.ended.to_sqlite_text()])
                                    })
                                    .collect(),
                            )
                            .to_string();
                            tx.exec(
                                "INSERT INTO harmony_test_attempt (task_id, machine_id, started, started_us, ended)
                                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4 FROM json_each($1)",
                                &[&json],
                            )
                            .await?;
                        }
                        if !ends.is_empty() {
                            let json = serde_json::Value::Array(
                                ends.iter().map(|(id, t)| serde_json::json!([id, t.to_sqlite_text()])).collect(),
                            )
                            .to_string();
                            tx.exec(
                                "UPDATE harmony_test_attempt SET ended = j.value ->> 1
                                 FROM json_each($1) AS j WHERE harmony_test_attempt.id = j.value ->> 0",
                                &[&json],
                            )
                            .await?;
                        }
                    }
                    Dialect::Postgres => {
                        // Test and benchmark bookkeeping: it need not wait for fsync, and the
                        // tasks it measures should not queue behind its commits. (A database
                        // crash could lose the last few rows; no test crashes the database.)
                        tx.exec("SET LOCAL synchronous_commit = off", &[]).await?;
                        if !starts.is_empty() {
                            let tasks: Vec<i64> = starts.iter().map(|a| a.task.0).collect();
                            let machines: Vec<i64> = starts.iter().map(|a| a.machine.0).collect();
                            let started: Vec<Timestamp> = starts.iter().map(|a| a.started).collect();
                            let us: Vec<i64> = starts.iter().map(|a| a.started_us).collect();
                            let rows: Vec<(i64,)> = tx
                                .select(
                                    "INSERT INTO harmony_test_attempt (task_id, machine_id, started, started_us)
                                     SELECT u.t, u.m, u.s, u.us
                                     FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::bigint[]) WITH ORDINALITY AS u(t, m, s, us, ord)
                                     ORDER BY u.ord RETURNING id",
                                    &[&tasks, &machines, &started, &us],
                                )
                                .await?;
                            ids = rows.into_iter().map(|r| r.0).collect();
                        }
                        if !wholes.is_empty() {
                            let tasks: Vec<i64> = wholes.iter().map(|w| w.start.task.0).collect();
                            let machines: Vec<i64> = wholes.iter().map(|w| w.start.machine.0).collect();
                            let started: Vec<Timestamp> = wholes.iter().map(|w| w.start.started).collect();
                            let us: Vec<i64> = wholes.iter().map(|w| w.start.started_us).collect();
                            let ended: Vec<Timestamp> = wholes.iter().map(|w| w.ended).collect();
                            tx.exec(
                                "INSERT INTO harmony_test_attempt (task_id, machine_id, started, started_us, ended)
                                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::bigint[], $5::timestamptz[])",
                                &[&tasks, &machines, &started, &us, &ended],
                            )
                            .await?;
                        }
                        if !ends.is_empty() {
                            let attempt: Vec<i64> = ends.iter().map(|e| e.0).collect();
                            let ended: Vec<Timestamp> = ends.iter().map(|e| e.1).collect();
                            tx.exec(
                                "UPDATE harmony_test_attempt a SET ended = u.e
                                 FROM unnest($1::bigint[], $2::timestamptz[]) AS u(id, e) WHERE a.id = u.id",
                                &[&attempt, &ended],
                            )
                            .await?;
                        }
                    }
                }
                ids.sort_unstable();
                Ok(Some(ids))
            })
            .await?;
        Ok(ids.unwrap_or_default())
    }

    /// Every logged attempt, by task then start.
    pub async fn attempts(&self) -> Result<Vec<AttemptRow>> {
        Ok(self
            .db
            .select(
                "SELECT id, task_id, machine_id, started, ended, started_us FROM harmony_test_attempt ORDER BY task_id, started_us, id",
                &[],
            )
            .await?)
    }
}

/// Inserts history rows for `outcomes` (one statement); returns their ids in the same order.
async fn insert_history(tx: &Tx, host: &str, outcomes: &[&Outcome]) -> harmonydb::Result<Vec<i64>> {
    if outcomes.is_empty() {
        return Ok(Vec::new());
    }
    match tx.dialect() {
        Dialect::Sqlite => {
            let rows: Vec<serde_json::Value> = outcomes
                .iter()
                .map(|o| {
                    serde_json::json!([
                        o.id.0,
                        o.name,
                        o.posted.to_sqlite_text(),
                        o.work_start.to_sqlite_text(),
                        o.work_end.to_sqlite_text(),
                        i64::from(o.fate == Fate::Done),
                        o.err,
                    ])
                })
                .collect();
            let json = serde_json::Value::Array(rows).to_string();
            let ids: Vec<(i64,)> = tx
                .select(
                    "INSERT INTO harmony_task_history (task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port)
                     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, $2
                     FROM json_each($1) ORDER BY key RETURNING id",
                    &[&json, &host],
                )
                .await?;
            let mut ids: Vec<i64> = ids.into_iter().map(|r| r.0).collect();
            ids.sort_unstable();
            Ok(ids)
        }
        Dialect::Postgres => {
            let task_ids: Vec<i64> = outcomes.iter().map(|o| o.id.0).collect();
            let names: Vec<String> = outcomes.iter().map(|o| o.name.clone()).collect();
            let posted: Vec<Timestamp> = outcomes.iter().map(|o| o.posted).collect();
            let starts: Vec<Timestamp> = outcomes.iter().map(|o| o.work_start).collect();
            let ends: Vec<Timestamp> = outcomes.iter().map(|o| o.work_end).collect();
            let results: Vec<bool> = outcomes.iter().map(|o| o.fate == Fate::Done).collect();
            let errs: Vec<String> = outcomes.iter().map(|o| o.err.clone()).collect();
            let ids: Vec<(i64,)> = tx
                .select(
                    "INSERT INTO harmony_task_history (task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port)
                     SELECT u.task_id, u.name, u.posted, u.work_start, u.work_end, u.result, u.err, $8
                     FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[], $5::timestamptz[], $6::boolean[], $7::text[])
                          WITH ORDINALITY AS u(task_id, name, posted, work_start, work_end, result, err, ord)
                     ORDER BY u.ord RETURNING id",
                    &[&task_ids, &names, &posted, &starts, &ends, &results, &errs, &host],
                )
                .await?;
            let mut ids: Vec<i64> = ids.into_iter().map(|r| r.0).collect();
            ids.sort_unstable();
            Ok(ids)
        }
    }
}

/// Queues one follow-up per registered follower of each completed task's type; returns the
/// types that had followers.
async fn enqueue_follow_ups(tx: &Tx, done: &[(&Outcome, i64)]) -> harmonydb::Result<Vec<String>> {
    let rows: Vec<(String,)> = match tx.dialect() {
        Dialect::Sqlite => {
            let json = serde_json::Value::Array(
                done.iter()
                    .map(|(o, h)| serde_json::json!([o.name, o.id.0, h]))
                    .collect(),
            )
            .to_string();
            // The follower table is tiny: scan it first, then the batch.
            tx.select(
                "INSERT INTO harmony_task_follow_queue (from_type, to_type, task_id, history_id)
                 SELECT f.from_type, f.to_type, j.value ->> 1, j.value ->> 2
                 FROM harmony_task_follow AS f CROSS JOIN json_each($1) AS j
                 WHERE f.from_type = j.value ->> 0
                 RETURNING from_type",
                &[&json],
            )
            .await?
        }
        Dialect::Postgres => {
            let names: Vec<String> = done.iter().map(|(o, _)| o.name.clone()).collect();
            let tasks: Vec<i64> = done.iter().map(|(o, _)| o.id.0).collect();
            let hist: Vec<i64> = done.iter().map(|(_, h)| *h).collect();
            tx.select(
                "INSERT INTO harmony_task_follow_queue (from_type, to_type, task_id, history_id)
                 SELECT f.from_type, f.to_type, u.task_id, u.history_id
                 FROM harmony_task_follow AS f
                 JOIN unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(name, task_id, history_id) ON f.from_type = u.name
                 RETURNING from_type",
                &[&names, &tasks, &hist],
            )
            .await?
        }
    };
    let mut types: Vec<String> = rows.into_iter().map(|r| r.0).collect();
    types.sort();
    types.dedup();
    Ok(types)
}

/// The machine registered at `host_and_port` and the seconds since its last heartbeat
/// (server clock), if there is one.
async fn machine_at<E: Executor>(
    ex: &E,
    dialect: Dialect,
    host_and_port: &str,
) -> harmonydb::Result<Option<(i64, f64)>> {
    let sql = dialect.pick(
        "SELECT id, (julianday('now') - julianday(last_contact)) * 86400.0 FROM harmony_machines WHERE host_and_port = $1",
        "SELECT id, EXTRACT(EPOCH FROM now() - last_contact)::float8 FROM harmony_machines WHERE host_and_port = $1",
    );
    ex.query_opt(sql, &[&host_and_port]).await
}

/// A SQLite `strftime` modifier for `age` ago: `-30.000 seconds`.
fn sqlite_age_modifier(age: Duration) -> String {
    format!("-{:.3} seconds", age.as_secs_f64())
}

/// Whole milliseconds of `d`, saturating, for Postgres interval arithmetic.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// The history row of one attempt, if it was recorded. After a recording transaction
    /// failed, it may still have committed (a connection lost after the commit): the recorder
    /// asks before it records again, so that one attempt is never recorded twice — a second
    /// recording would otherwise apply to a later attempt of the same task on this node.
    pub async fn history_of_attempt(
        &self,
        task: TaskId,
        work_start: Timestamp,
        work_end: Timestamp,
        host_and_port: &str,
    ) -> Result<Option<i64>> {
        let row: Option<(i64,)> = self
            .db
            .query_opt(
                "SELECT id FROM harmony_task_history
                 WHERE task_id = $1 AND work_start = $2 AND work_end = $3
                   AND completed_by_host_and_port = $4",
                &[&task, &work_start, &work_end, &host_and_port],
            )
            .await?;
        Ok(row.map(|(id,)| id))
    }
}
