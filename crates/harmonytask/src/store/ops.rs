//! Operator steering and the why-is-it-stuck record: cancel, pause and resume, and the blocked
//! reasons nodes write for the types they cannot start. Cancel takes part in fencing only from
//! the outside: it deletes the task's row, so the owner's `still_owned` turns false and its
//! late record finds nothing to update.

use std::time::Duration;

use harmonydb::{Dialect, Executor, Timestamp, TxOptions};

use super::{Store, millis, sqlite_age_modifier};
use crate::error::{Error, Result};
use crate::hint::Hint;
use crate::model::{AttemptResult, BlockedRow, Cancelled, MachineId, PausedRow, TaskId};

/// Most waiting tasks one `task_cancel_waiting` transaction removes.
const CANCEL_BATCH_MAX: usize = 1000;

/// Most waiting tasks a why-count reads per type; beyond it the count says "at least".
pub(crate) const WHY_COUNT_MAX: i64 = 100_000;

/// One change of a node's blocked reasons: `Some((kind, detail))` sets the type's reason,
/// `None` clears it.
pub(crate) type BlockedChange = (String, Option<(String, String)>);

impl Store {
    /// Cancels one task, waiting or running: deletes its row and writes a history row with
    /// `err = "cancelled"` in one transaction, and hints the owner (Postgres) so that it stops
    /// the attempt at once. `by` names who asked (the history row's `completed_by`).
    pub async fn task_cancel(
        &self,
        id: TaskId,
        by: &str,
        now: Timestamp,
        notify: bool,
    ) -> Result<Cancelled> {
        let cancelled = self
            .db
            .transaction_with(TxOptions::retry(), |tx| async move {
                let row: Option<(String, Timestamp, Option<i64>)> = tx
                    .query_opt(
                        "DELETE FROM harmony_task WHERE id = $1 RETURNING name, posted_time, owner_id",
                        &[&id],
                    )
                    .await?;
                let Some((name, posted, owner)) = row else {
                    return Ok(Some(None));
                };
                insert_cancelled(&tx, id, &name, posted, now, by).await?;
                if notify {
                    if owner.is_some() {
                        Store::notify_in(&tx, &Hint::Cancel { task: id }.payload(MachineId(0)))
                            .await?;
                    }
                    // A cluster-limited type has a slot free now.
                    let hint = Hint::Released { name: name.clone() };
                    Store::notify_in(&tx, &hint.payload(MachineId(0))).await?;
                }
                Ok(Some(Some(Cancelled {
                    id,
                    name,
                    owner: owner.map(MachineId),
                })))
            })
            .await?;
        cancelled.flatten().ok_or(Error::TaskNotFound(id))
    }

    /// Cancels every waiting (unowned) task of `name`, in transactions of at most
    /// `CANCEL_BATCH_MAX` tasks, each with its history rows. Returns how many.
    pub async fn task_cancel_waiting(&self, name: &str, by: &str, now: Timestamp) -> Result<u64> {
        let mut total = 0u64;
        loop {
            let n = self
                .db
                .transaction_with(TxOptions::retry(), |tx| async move {
                    let rows: Vec<(TaskId, Timestamp)> = tx
                        .select(
                            "SELECT id, posted_time FROM harmony_task
                             WHERE name = $1 AND owner_id IS NULL ORDER BY posted_time, id LIMIT $2",
                            &[&name, &CANCEL_BATCH_MAX],
                        )
                        .await?;
                    let mut n = 0u64;
                    for (id, posted) in &rows {
                        // The row may have been claimed since the read: only a waiting one goes.
                        let gone = tx
                            .exec(
                                "DELETE FROM harmony_task WHERE id = $1 AND owner_id IS NULL",
                                &[id],
                            )
                            .await?;
                        if gone > 0 {
                            insert_cancelled(&tx, *id, name, *posted, now, by).await?;
                            n += 1;
                        }
                    }
                    Ok(Some((n, rows.len())))
                })
                .await?
                .unwrap_or_default();
            total += n.0;
            if n.1 < CANCEL_BATCH_MAX {
                return Ok(total);
            }
        }
    }

    /// Pauses a type cluster-wide: from the commit on, no node polls or claims its tasks.
    /// Pausing a paused type keeps the first pause.
    pub async fn type_pause(&self, name: &str, by: &str, now: Timestamp) -> Result<bool> {
        let n = self
            .db
            .exec(
                "INSERT INTO harmony_task_pause (task_name, paused_at, paused_by) VALUES ($1, $2, $3)
                 ON CONFLICT (task_name) DO NOTHING",
                &[&name, &now, &by],
            )
            .await?;
        Ok(n > 0)
    }

    /// Resumes a paused type and hints the nodes that run it; `false` when it was not paused.
    pub async fn type_resume(&self, name: &str, notify: bool) -> Result<bool> {
        let resumed = self
            .db
            .transaction(|tx| async move {
                let n = tx
                    .exec(
                        "DELETE FROM harmony_task_pause WHERE task_name = $1",
                        &[&name],
                    )
                    .await?;
                if n > 0 && notify {
                    let hint = Hint::Released {
                        name: name.to_owned(),
                    };
                    Store::notify_in(&tx, &hint.payload(MachineId(0))).await?;
                }
                Ok(Some(n > 0))
            })
            .await?;
        Ok(resumed.unwrap_or(false))
    }

    /// The paused types.
    pub async fn paused(&self) -> Result<Vec<PausedRow>> {
        Ok(self
            .db
            .select(
                "SELECT task_name, paused_at, paused_by FROM harmony_task_pause ORDER BY task_name",
                &[],
            )
            .await?)
    }

    /// Writes a node's changed blocked reasons in one transaction.
    pub(crate) async fn blocked_write(
        &self,
        machine: MachineId,
        changes: &[BlockedChange],
        now: Timestamp,
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.db
            .transaction(|tx| async move {
                for (name, reason) in changes {
                    match reason {
                        Some((kind, detail)) => {
                            tx.exec(
                                "INSERT INTO harmony_task_blocked (machine_id, task_name, reason, detail, since)
                                 VALUES ($1, $2, $3, $4, $5)
                                 ON CONFLICT (machine_id, task_name) DO UPDATE SET
                                     detail = excluded.detail,
                                     since = CASE WHEN harmony_task_blocked.reason = excluded.reason
                                                  THEN harmony_task_blocked.since ELSE excluded.since END,
                                     reason = excluded.reason",
                                &[&machine, name, kind, detail, &now],
                            )
                            .await?;
                        }
                        None => {
                            tx.exec(
                                "DELETE FROM harmony_task_blocked WHERE machine_id = $1 AND task_name = $2",
                                &[&machine, name],
                            )
                            .await?;
                        }
                    }
                }
                Ok(Some(()))
            })
            .await?;
        Ok(())
    }

    /// The blocked reasons of live machines (heartbeat within `dead_after`, on the database
    /// clock), of one type or all.
    pub async fn blocked_list(
        &self,
        name: Option<&str>,
        dead_after: Duration,
    ) -> Result<Vec<BlockedRow>> {
        Ok(match self.dialect() {
            Dialect::Sqlite => self
                .db
                .select(
                    "SELECT b.machine_id, m.host_and_port, b.task_name, b.reason, b.detail, b.since
                         FROM harmony_task_blocked b JOIN harmony_machines m ON m.id = b.machine_id
                         WHERE ($1 IS NULL OR b.task_name = $1)
                           AND m.last_contact >= strftime('%Y-%m-%d %H:%M:%f', 'now', $2)
                         ORDER BY b.task_name, b.machine_id",
                    &[&name, &sqlite_age_modifier(dead_after)],
                )
                .await?,
            Dialect::Postgres => self
                .db
                .select(
                    "SELECT b.machine_id, m.host_and_port, b.task_name, b.reason, b.detail, b.since
                         FROM harmony_task_blocked b JOIN harmony_machines m ON m.id = b.machine_id
                         WHERE ($1::text IS NULL OR b.task_name = $1)
                           AND m.last_contact >= now() - ($2::bigint * interval '1 millisecond')
                         ORDER BY b.task_name, b.machine_id",
                    &[&name, &millis(dead_after)],
                )
                .await?,
        })
    }

    /// Live machines (heartbeat within `dead_after`, on the database clock) with the types
    /// they registered.
    pub(crate) async fn machines_live(
        &self,
        dead_after: Duration,
    ) -> Result<Vec<(MachineId, String, String)>> {
        Ok(match self.dialect() {
            Dialect::Sqlite => {
                self.db
                    .select(
                        "SELECT m.id, m.host_and_port, COALESCE(d.tasks, '') FROM harmony_machines m
                         LEFT JOIN harmony_machine_details d ON d.machine_id = m.id
                         WHERE m.last_contact >= strftime('%Y-%m-%d %H:%M:%f', 'now', $1) ORDER BY m.id",
                        &[&sqlite_age_modifier(dead_after)],
                    )
                    .await?
            }
            Dialect::Postgres => {
                self.db
                    .select(
                        "SELECT m.id, m.host_and_port, COALESCE(d.tasks, '') FROM harmony_machines m
                         LEFT JOIN harmony_machine_details d ON d.machine_id = m.id
                         WHERE m.last_contact >= now() - ($1::bigint * interval '1 millisecond') ORDER BY m.id",
                        &[&millis(dead_after)],
                    )
                    .await?
            }
        })
    }

    /// The tasks `owner` owns now.
    pub(crate) async fn task_owned(&self, owner: MachineId) -> Result<Vec<TaskId>> {
        let rows: Vec<(TaskId,)> = self
            .db
            .select("SELECT id FROM harmony_task WHERE owner_id = $1", &[&owner])
            .await?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The pause of one type, if paused.
    pub(crate) async fn pause_of(&self, name: &str) -> Result<Option<PausedRow>> {
        Ok(self
            .db
            .query_opt(
                "SELECT task_name, paused_at, paused_by FROM harmony_task_pause WHERE task_name = $1",
                &[&name],
            )
            .await?)
    }

    /// Waiting and running tasks of a type; the waiting count stops at `WHY_COUNT_MAX`.
    pub(crate) async fn type_counts(&self, name: &str) -> Result<(i64, i64)> {
        let waiting: i64 = self
            .db
            .scalar(
                "SELECT count(*) FROM (SELECT 1 FROM harmony_task WHERE name = $1 AND owner_id IS NULL LIMIT $2) AS w",
                &[&name, &WHY_COUNT_MAX],
            )
            .await?;
        let running: i64 = self
            .db
            .scalar(
                "SELECT count(*) FROM harmony_task WHERE name = $1 AND owner_id IS NOT NULL",
                &[&name],
            )
            .await?;
        Ok((waiting, running))
    }
}

/// The history row of a cancelled task.
async fn insert_cancelled(
    tx: &harmonydb::Tx,
    id: TaskId,
    name: &str,
    posted: Timestamp,
    now: Timestamp,
    by: &str,
) -> harmonydb::Result<()> {
    tx.exec(
        "INSERT INTO harmony_task_history (task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port)
         VALUES ($1, $2, $3, $4, $4, $5, $6, $7)",
        &[&id, &name, &posted, &now, &false, &AttemptResult::Cancelled.as_str(), &by],
    )
    .await?;
    Ok(())
}
