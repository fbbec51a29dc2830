//! Operator reads and writes (the CLI, the coming web server): lists, details, history,
//! summaries, cordon and restart requests, restarting a failed task. Nothing here claims or
//! records: these statements never take part in fencing.

use std::collections::HashMap;

use harmonydb::{Executor, Row, Timestamp};

use super::Store;
use crate::error::{Error, Result};
use crate::hint::Hint;
use crate::model::{HistoryQuery, HistoryRow, MachineId, MachineRow, TaskId, TaskRow, TypeSummary};

/// The columns of a [`TaskRow`] and the join that gives the owner's address; a statement adds
/// its `WHERE`, order and limit.
macro_rules! task_row_sql {
    () => {
        "SELECT t.id, t.name, t.owner_id, m.host_and_port AS owner_host, t.posted_time, t.update_time,
                t.retries, t.added_by, t.previous_task
         FROM harmony_task t LEFT JOIN harmony_machines m ON m.id = t.owner_id"
    };
}

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

    /// Sets what a machine's details row says about its config layers (`machine ls`).
    pub async fn machine_layers_set(&self, id: MachineId, layers: &str) -> Result<()> {
        self.db
            .exec(
                "UPDATE harmony_machine_details SET layers = $2 WHERE machine_id = $1",
                &[&id, &layers],
            )
            .await?;
        Ok(())
    }

    /// Every registered machine with its details and owned-task count.
    pub async fn machine_list(&self) -> Result<Vec<MachineRow>> {
        let rows: Vec<Row> = self
            .db
            .select(
                "SELECT m.id, m.host_and_port, m.cpu, m.ram, m.gpu, m.last_contact, m.unschedulable, m.restart_request,
                        COALESCE(d.machine_name, '') AS machine_name, COALESCE(d.tasks, '') AS tasks, COALESCE(d.layers, '') AS layers,
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
                    layers: r.get("layers")?,
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
                concat!(
                    task_row_sql!(),
                    " WHERE ($1 = '' OR t.name = $1)
                 ORDER BY t.posted_time, t.id LIMIT $2"
                ),
                &[&name.unwrap_or(""), &limit],
            )
            .await?)
    }

    /// One task row, if it is pending or running.
    pub async fn task_get(&self, id: TaskId) -> Result<Option<TaskRow>> {
        Ok(self
            .db
            .query_opt(concat!(task_row_sql!(), " WHERE t.id = $1"), &[&id])
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

/// A task-page statement: `$1` limit, `$2` offset, `$3` the type (when filtered). Without a
/// type, pages are in id order (the primary key); with one, in posting order (`posted_time`,
/// then id), the order of the waiting index, which a type's waiting page then reads exactly.
macro_rules! task_page_sql {
    (typed $($filter:tt)*) => {
        concat!(
            task_row_sql!(),
            " WHERE t.name = $3",
            $($filter)*,
            " ORDER BY t.posted_time, t.id LIMIT $1 OFFSET $2"
        )
    };
    ($($filter:tt)*) => {
        concat!(
            task_row_sql!(),
            " WHERE 1 = 1",
            $($filter)*,
            " ORDER BY t.id LIMIT $1 OFFSET $2"
        )
    };
}

/// A history-page statement: `$1` limit, then the filter's parameters.
macro_rules! history_page_sql {
    ($($filter:tt)*) => {
        concat!(
            "SELECT h.id, h.task_id, h.name, h.posted, h.work_start, h.work_end, h.result, h.err,
                    h.completed_by_host_and_port
             FROM harmony_task_history h
             WHERE 1 = 1",
            $($filter)*,
            " ORDER BY h.work_end DESC, h.id DESC LIMIT $1"
        )
    };
}

/// Rows older than history row `$n` in (work_end, id) order; the first condition lets the
/// `work_end` index bound the scan.
macro_rules! before_row {
    ($n:literal) => {
        concat!(
            " AND h.work_end <= (SELECT c.work_end FROM harmony_task_history c WHERE c.id = ",
            $n,
            ") AND (h.work_end < (SELECT c.work_end FROM harmony_task_history c WHERE c.id = ",
            $n,
            ") OR h.id < ",
            $n,
            ")"
        )
    };
}

// Operator reads of the web server (pages, bounded counts). Every statement is one of a fixed
// set, chosen by which filters are given, so that each filter can use its index (a
// `$1 = '' OR name = $1` filter cannot) and values are always bound, never formatted in.
impl Store {
    /// A cheap round trip, to tell whether the database answers.
    pub async fn ping(&self) -> Result<()> {
        let _: i64 = self.db.scalar("SELECT 1", &[]).await?;
        Ok(())
    }

    /// Whether the machine row `id` exists (the node is registered and not reaped).
    pub async fn machine_exists(&self, id: MachineId) -> Result<bool> {
        let n: i64 = self
            .db
            .scalar(
                "SELECT count(*) FROM harmony_machines WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(n > 0)
    }

    /// One page of pending and running tasks: in id order, or with a type in posting order.
    pub async fn task_page(&self, q: &crate::model::TaskPageQuery) -> Result<Vec<TaskRow>> {
        use crate::model::QueueState;
        let (limit, offset) = (&q.limit, &q.offset);
        let rows = match (q.name.as_deref(), q.state) {
            (None, None) => self.db.select(task_page_sql!(""), &[limit, offset]).await,
            (None, Some(QueueState::Waiting)) => {
                self.db
                    .select(task_page_sql!(" AND t.owner_id IS NULL"), &[limit, offset])
                    .await
            }
            (None, Some(QueueState::Running)) => {
                // Running tasks are few: read them through the owner index (a range, for
                // SQLite: machine ids start at 1) and sort them, rather than walk the primary
                // key past every waiting task.
                let sql = self.dialect().pick(
                    "SELECT t.id, t.name, t.owner_id, m.host_and_port AS owner_host, t.posted_time, t.update_time,
                            t.retries, t.added_by, t.previous_task
                     FROM harmony_task t INDEXED BY harmony_task_owner LEFT JOIN harmony_machines m ON m.id = t.owner_id
                     WHERE t.owner_id > 0 ORDER BY t.id LIMIT $1 OFFSET $2",
                    task_page_sql!(" AND t.owner_id > 0"),
                );
                self.db.select(sql, &[limit, offset]).await
            }
            (Some(name), None) => {
                self.db
                    .select(task_page_sql!(typed ""), &[limit, offset, &name])
                    .await
            }
            (Some(name), Some(QueueState::Waiting)) => {
                self.db
                    .select(
                        task_page_sql!(typed " AND t.owner_id IS NULL"),
                        &[limit, offset, &name],
                    )
                    .await
            }
            (Some(name), Some(QueueState::Running)) => {
                self.db
                    .select(
                        self.dialect().pick(
                            "SELECT t.id, t.name, t.owner_id, m.host_and_port AS owner_host, t.posted_time, t.update_time,
                                    t.retries, t.added_by, t.previous_task
                             FROM harmony_task t INDEXED BY harmony_task_owner LEFT JOIN harmony_machines m ON m.id = t.owner_id
                             WHERE t.name = $3 AND t.owner_id > 0 ORDER BY t.posted_time, t.id LIMIT $1 OFFSET $2",
                            task_page_sql!(typed " AND t.owner_id > 0"),
                        ),
                        &[limit, offset, &name],
                    )
                    .await
            }
        };
        Ok(rows?)
    }

    /// A task's attempts, oldest first, at most `limit` (through the `task_id` index).
    pub async fn task_attempts(&self, id: TaskId, limit: usize) -> Result<Vec<HistoryRow>> {
        Ok(self
            .db
            .select(
                "SELECT id, task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port
                 FROM harmony_task_history WHERE task_id = $1 ORDER BY id LIMIT $2",
                &[&id, &limit],
            )
            .await?)
    }

    /// One page of history, newest first (by `work_end`, then id).
    pub async fn history_page(
        &self,
        q: &crate::model::HistoryPageQuery,
    ) -> Result<Vec<HistoryRow>> {
        let limit = &q.limit;
        let failed = &false;
        let rows = match (q.name.as_deref(), q.failures_only, q.before.as_ref()) {
            (None, false, None) => self.db.select(history_page_sql!(""), &[limit]).await,
            (None, true, None) => {
                self.db
                    .select(history_page_sql!(" AND h.result = $2"), &[limit, failed])
                    .await
            }
            (Some(name), false, None) => {
                self.db
                    .select(history_page_sql!(" AND h.name = $2"), &[limit, &name])
                    .await
            }
            (Some(name), true, None) => {
                self.db
                    .select(
                        history_page_sql!(" AND h.name = $2 AND h.result = $3"),
                        &[limit, &name, failed],
                    )
                    .await
            }
            (None, false, Some(before)) => {
                self.db
                    .select(history_page_sql!(before_row!("$2")), &[limit, before])
                    .await
            }
            (None, true, Some(before)) => {
                self.db
                    .select(
                        history_page_sql!(concat!(" AND h.result = $3", before_row!("$2"))),
                        &[limit, before, failed],
                    )
                    .await
            }
            (Some(name), false, Some(before)) => {
                self.db
                    .select(
                        history_page_sql!(concat!(" AND h.name = $3", before_row!("$2"))),
                        &[limit, before, &name],
                    )
                    .await
            }
            (Some(name), true, Some(before)) => {
                self.db
                    .select(
                        history_page_sql!(concat!(
                            " AND h.name = $3 AND h.result = $4",
                            before_row!("$2")
                        )),
                        &[limit, before, &name, failed],
                    )
                    .await
            }
        };
        Ok(rows?)
    }

    /// The names of types with waiting tasks, sorted, at most `limit`: one probe of the
    /// waiting index per name (a loose index scan), never a scan of the tasks.
    pub async fn waiting_types(&self, limit: usize) -> Result<Vec<String>> {
        // SQLite, without statistics, would probe the owner index (`owner_id = NULL`) and sort
        // every waiting row for each name; INDEXED BY makes each probe one seek of the waiting
        // index. Postgres picks the partial index itself.
        let sql = self.dialect().pick(
            "WITH RECURSIVE w(name) AS (
                SELECT (SELECT t.name FROM harmony_task t INDEXED BY harmony_task_unowned WHERE t.owner_id IS NULL ORDER BY t.name LIMIT 1)
                UNION ALL
                SELECT (SELECT t.name FROM harmony_task t INDEXED BY harmony_task_unowned WHERE t.owner_id IS NULL AND t.name > w.name ORDER BY t.name LIMIT 1)
                FROM w WHERE w.name IS NOT NULL
             )
             SELECT name FROM w WHERE name IS NOT NULL LIMIT $1",
            "WITH RECURSIVE w(name) AS (
                SELECT (SELECT t.name FROM harmony_task t WHERE t.owner_id IS NULL ORDER BY t.name LIMIT 1)
                UNION ALL
                SELECT (SELECT t.name FROM harmony_task t WHERE t.owner_id IS NULL AND t.name > w.name ORDER BY t.name LIMIT 1)
                FROM w WHERE w.name IS NOT NULL
             )
             SELECT name FROM w WHERE name IS NOT NULL LIMIT $1",
        );
        let rows: Vec<(String,)> = self.db.select(sql, &[&limit]).await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    /// Waiting tasks of `name`, counted up to `cap` (a bounded walk of the waiting index).
    pub async fn waiting_count(&self, name: &str, cap: usize) -> Result<i64> {
        Ok(self
            .db
            .scalar(
                "SELECT count(*) FROM (SELECT 1 FROM harmony_task WHERE owner_id IS NULL AND name = $1 LIMIT $2) AS w",
                &[&name, &cap],
            )
            .await?)
    }

    /// Running (owned) tasks per type, through the owner index.
    pub async fn running_counts(&self) -> Result<Vec<(String, i64)>> {
        Ok(self
            .db
            .select(
                // `owner_id > 0` rather than IS NOT NULL (machine ids start at 1): SQLite reads
                // the owner index only for a range.
                "SELECT name, count(*) FROM harmony_task WHERE owner_id > 0 GROUP BY name ORDER BY name",
                &[],
            )
            .await?)
    }

    /// Attempts per type that ended at or after `since`.
    pub async fn history_counts_since(
        &self,
        since: Timestamp,
    ) -> Result<Vec<crate::model::HistoryCounts>> {
        // SQLite would walk the whole (name, work_end) index to group by name; the range of
        // the work_end index reads only the window.
        let sql = self.dialect().pick(
            "SELECT name,
                    sum(CASE WHEN result THEN 1 ELSE 0 END) AS succeeded,
                    sum(CASE WHEN result THEN 0 ELSE 1 END) AS failed
             FROM harmony_task_history INDEXED BY harmony_task_history_work_end
             WHERE work_end >= $1 GROUP BY name ORDER BY name",
            "SELECT name,
                    sum(CASE WHEN result THEN 1 ELSE 0 END) AS succeeded,
                    sum(CASE WHEN result THEN 0 ELSE 1 END) AS failed
             FROM harmony_task_history WHERE work_end >= $1 GROUP BY name ORDER BY name",
        );
        Ok(self.db.select(sql, &[&since]).await?)
    }

    /// The tasks `owner` runs now, in id order, at most `limit` after skipping `offset`
    /// (through the owner index).
    pub async fn machine_tasks(
        &self,
        owner: MachineId,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<TaskRow>> {
        Ok(self
            .db
            .select(
                concat!(
                    task_row_sql!(),
                    " WHERE t.owner_id = $1 ORDER BY t.id LIMIT $2 OFFSET $3"
                ),
                &[&owner.0, &limit, &offset],
            )
            .await?)
    }

    /// The attempts `host` (a machine's `host_and_port`) ran among the cluster's latest
    /// `scan_max` attempts, newest first, at most `limit`. The history has no index by host:
    /// the inner query bounds the scan to the newest rows of the `work_end` index.
    pub async fn machine_history(
        &self,
        host: &str,
        limit: usize,
        scan_max: usize,
    ) -> Result<Vec<HistoryRow>> {
        Ok(self
            .db
            .select(
                "SELECT h.id, h.task_id, h.name, h.posted, h.work_start, h.work_end, h.result, h.err,
                        h.completed_by_host_and_port
                 FROM (SELECT * FROM harmony_task_history ORDER BY work_end DESC, id DESC LIMIT $3) h
                 WHERE h.completed_by_host_and_port = $1
                 ORDER BY h.work_end DESC, h.id DESC LIMIT $2",
                &[&host, &limit, &scan_max],
            )
            .await?)
    }
}
