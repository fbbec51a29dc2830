//! The benchmarks' and built-in types' own SQL: the built-ins' attempt log
//! (`harmony_test_attempt`) and the history spans throughput is measured from. These are not
//! the engine's operations, so they live here and not in `harmonytask`'s store; the table's
//! creation stays in the main migration set (see `ARCHITECTURE.md`).

use harmonydb::{Db, Dialect, Executor, Timestamp};
use harmonytask::{MachineId, TaskId};

/// `Result` of this module: database errors only.
type Result<T> = harmonydb::Result<T>;

/// The benchmarks' and built-ins' statements over one database.
#[derive(Clone, Debug)]
pub struct BenchStore {
    db: Db,
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

impl BenchStore {
    /// Wraps a database handle.
    pub fn new(db: Db) -> Self {
        BenchStore { db }
    }

    /// Whether a machine is registered at `host_and_port` (a node finished starting).
    pub async fn machine_registered(&self, host_and_port: &str) -> Result<bool> {
        Ok(self
            .db
            .query_opt::<(i64,)>(
                "SELECT id FROM harmony_machines WHERE host_and_port = $1",
                &[&host_and_port],
            )
            .await?
            .is_some())
    }

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
        self.db
            .select(
                "SELECT id, task_id, machine_id, started, ended, started_us FROM harmony_test_attempt ORDER BY task_id, started_us, id",
                &[],
            )
            .await
    }
}
