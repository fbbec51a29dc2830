//! Operator reads and writes (the CLI, the coming web server): lists, details, history,
//! summaries, cordon and restart requests, restarting a failed task. Nothing here claims or
//! records: these statements never take part in fencing.

use std::collections::HashMap;

use harmonydb::{Executor, Row, Timestamp};

use super::Store;
use crate::error::{Error, Result};
use crate::hint::Hint;
use crate::model::{HistoryQuery, HistoryRow, MachineId, MachineRow, TaskId, TaskRow, TypeSummary};

impl Store {
    /// The addresses of the registered machines heard from within `alive_within` (server
    /// clock), at most `limit`, oldest machine first. One bounded read of the machine table
    /// only, for the peers that send each other hints over HTTP.
    pub async fn machine_addresses(
        &self,
        alive_within: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<(MachineId, String)>> {
        let sql = self.db.dialect().pick(
            "SELECT id, host_and_port FROM harmony_machines
             WHERE last_contact >= strftime('%Y-%m-%d %H:%M:%f', 'now', $1) ORDER BY id LIMIT $2",
            "SELECT id, host_and_port FROM harmony_machines
             WHERE last_contact >= now() - ($1::bigint * interval '1 millisecond') ORDER BY id LIMIT $2",
        );
        let rows: Vec<(i64, String)> = match self.db.dialect() {
            harmonydb::Dialect::Sqlite => {
                let age = super::sqlite_age_modifier(alive_within);
                self.db.select(sql, &[&age, &limit]).await?
            }
            harmonydb::Dialect::Postgres => {
                let ms = super::millis(alive_within);
                self.db.select(sql, &[&ms, &limit]).await?
            }
        };
        Ok(rows
            .into_iter()
            .map(|(id, host)| (MachineId(id), host))
            .collect())
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
                    return Ok(Some(Err(Error::TaskActive { id, name })));
                }
                let last: Option<(String, Timestamp, bool)> = tx
                    .query_opt(
                        "SELECT name, posted, result FROM harmony_task_history WHERE task_id = $1 ORDER BY id DESC LIMIT 1",
                        &[&id],
                    )
                    .await?;
                let Some((name, posted, result)) = last else {
                    return Ok(Some(Err(Error::TaskNotFound(id))));
                };
                if result {
                    return Ok(Some(Err(Error::TaskSucceeded { id, name })));
                }
                tx.exec(
                    "INSERT INTO harmony_task (id, name, posted_time, update_time, added_by, retries) VALUES ($1, $2, $3, $4, $5, 0)",
                    &[&id, &name, &posted, &now, &added_by],
                )
                .await?;
                Ok(Some(Ok(name)))
            })
            .await?;
        restarted.unwrap_or_else(|| Err(Error::Task("restart rolled back".into())))
    }

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
            self.notify(&Hint::Machines.payload(MachineId(0))).await?;
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
            self.notify(&Hint::Machines.payload(MachineId(0))).await?;
        }
        Ok(n > 0)
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
}
