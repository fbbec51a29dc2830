//! History retention: the lease that lets one node at a time prune, and the bounded,
//! primary-key-range batches that delete old history and the arguments of finished tasks.

use std::time::Duration;

use harmonydb::{Dialect, Executor, Timestamp};

use super::{Store, millis};
use crate::error::Result;
use crate::model::PruneCounts;

impl Store {
    /// Takes the lease `name` for `holder` for `ttl` (database clock), or renews it when
    /// `holder` already has it. Returns false, changing nothing, while another holder's lease
    /// has not expired.
    pub async fn lease_acquire(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool> {
        // One upsert: it takes a free or expired row and renews our own, and touches (and
        // returns) nothing when someone else's lease is still running, so two holders racing
        // for it cannot both win.
        let got: Option<(String,)> = match self.dialect() {
            Dialect::Sqlite => {
                let modifier = format!("+{:.3} seconds", ttl.as_secs_f64());
                self.db
                    .query_opt(
                        "INSERT INTO harmony_lease (name, holder, expires) VALUES ($1, $2, strftime('%Y-%m-%d %H:%M:%f', 'now', $3))
                         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires
                         WHERE harmony_lease.holder = excluded.holder OR harmony_lease.expires < strftime('%Y-%m-%d %H:%M:%f', 'now')
                         RETURNING holder",
                        &[&name, &holder, &modifier],
                    )
                    .await?
            }
            Dialect::Postgres => {
                self.db
                    .query_opt(
                        "INSERT INTO harmony_lease (name, holder, expires) VALUES ($1, $2, now() + ($3::bigint * interval '1 millisecond'))
                         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires
                         WHERE harmony_lease.holder = excluded.holder OR harmony_lease.expires < now()
                         RETURNING holder",
                        &[&name, &holder, &millis(ttl)],
                    )
                    .await?
            }
        };
        Ok(got.is_some())
    }

    /// Gives up the lease `name` if `holder` has it.
    pub async fn lease_release(&self, name: &str, holder: &str) -> Result<()> {
        self.db
            .exec(
                "DELETE FROM harmony_lease WHERE name = $1 AND holder = $2",
                &[&name, &holder],
            )
            .await?;
        Ok(())
    }

    /// Who holds the lease `name` now (an expired lease is nobody's).
    pub async fn lease_holder(&self, name: &str) -> Result<Option<String>> {
        let sql = self.dialect().pick(
            "SELECT holder FROM harmony_lease WHERE name = $1 AND expires >= strftime('%Y-%m-%d %H:%M:%f', 'now')",
            "SELECT holder FROM harmony_lease WHERE name = $1 AND expires >= now()",
        );
        let row: Option<(String,)> = self.db.query_opt(sql, &[&name]).await?;
        Ok(row.map(|(h,)| h))
    }

    /// The id of the newest history row (by `work_end`) that ended before `cutoff`, of `name`
    /// or of any type: the upper end of the id range a prune round walks. One read of the head
    /// of the (name,) work_end index.
    pub async fn history_prune_bound(
        &self,
        cutoff: Timestamp,
        name: Option<&str>,
    ) -> Result<Option<i64>> {
        let row: Option<(i64,)> = match name {
            None => {
                self.db
                    .query_opt(
                        "SELECT id FROM harmony_task_history WHERE work_end < $1 ORDER BY work_end DESC LIMIT 1",
                        &[&cutoff],
                    )
                    .await?
            }
            Some(name) => {
                self.db
                    .query_opt(
                        "SELECT id FROM harmony_task_history WHERE name = $2 AND work_end < $1 ORDER BY work_end DESC LIMIT 1",
                        &[&cutoff, &name],
                    )
                    .await?
            }
        };
        Ok(row.map(|(id,)| id))
    }

    /// Where a prune round of `name` (or of every type) starts: just below the lowest history
    /// id (every type: the primary key's head), or below the oldest row of the type (its
    /// (name, work_end) index's tail).
    pub async fn history_prune_start(&self, name: Option<&str>) -> Result<Option<i64>> {
        let row: Option<(Option<i64>,)> = match name {
            None => {
                self.db
                    .query_opt("SELECT min(id) FROM harmony_task_history", &[])
                    .await?
            }
            Some(name) => self
                .db
                .query_opt(
                    "SELECT id FROM harmony_task_history WHERE name = $1 ORDER BY work_end LIMIT 1",
                    &[&name],
                )
                .await?,
        };
        Ok(row.and_then(|(id,)| id).map(|id| id - 1))
    }

    /// Deletes the history rows with ids in `(after, upto]` that ended before `cutoff` (of type
    /// `name`, or of every type), never one of a task that is still pending or running; then
    /// the arguments of the tasks among them that are finished and have no history left. The
    /// caller keeps `upto - after` to its batch size, so one batch deletes at most that many
    /// rows, in one short transaction: claims and records wait for it at most one batch.
    ///
    /// Ranges of the primary key, rather than "any old rows, LIMIT n": on Postgres deleted
    /// rows stay in the table and its indexes as dead entries until a vacuum, and a planner
    /// with statistics older than a bulk insert reads the whole candidate set and sorts it
    /// for the LIMIT; a range reads exactly its own rows, so the last batch costs what the
    /// first did.
    pub async fn history_prune_batch(
        &self,
        cutoff: Timestamp,
        name: Option<&str>,
        after: i64,
        upto: i64,
    ) -> Result<PruneCounts> {
        let dialect = self.dialect();
        // SQLite: the unary `+` keeps the planner on the rowid range instead of the work_end
        // (or name) index, which would read every old row.
        let delete_history = match name {
            None => dialect.pick(
                "DELETE FROM harmony_task_history WHERE id IN (
                     SELECT h.id FROM harmony_task_history h
                     WHERE h.id > $2 AND h.id <= $3 AND +h.work_end < $1
                       AND NOT EXISTS (SELECT 1 FROM harmony_task t WHERE t.id = h.task_id))
                 RETURNING task_id",
                "DELETE FROM harmony_task_history WHERE id IN (
                     SELECT h.id FROM harmony_task_history h
                     WHERE h.id > $2 AND h.id <= $3 AND h.work_end < $1
                       AND NOT EXISTS (SELECT 1 FROM harmony_task t WHERE t.id = h.task_id))
                 RETURNING task_id",
            ),
            Some(_) => dialect.pick(
                "DELETE FROM harmony_task_history WHERE id IN (
                     SELECT h.id FROM harmony_task_history h
                     WHERE h.id > $2 AND h.id <= $3 AND +h.name = $4 AND +h.work_end < $1
                       AND NOT EXISTS (SELECT 1 FROM harmony_task t WHERE t.id = h.task_id))
                 RETURNING task_id",
                "DELETE FROM harmony_task_history WHERE id IN (
                     SELECT h.id FROM harmony_task_history h
                     WHERE h.id > $2 AND h.id <= $3 AND h.name = $4 AND h.work_end < $1
                       AND NOT EXISTS (SELECT 1 FROM harmony_task t WHERE t.id = h.task_id))
                 RETURNING task_id",
            ),
        };
        let delete_args = harmonydb::id_list_sql!(
            "DELETE FROM harmony_task_args
             WHERE ",
            "task_id",
            1,
            "
               AND NOT EXISTS (SELECT 1 FROM harmony_task t WHERE t.id = harmony_task_args.task_id)
               AND NOT EXISTS (SELECT 1 FROM harmony_task_history h WHERE h.task_id = harmony_task_args.task_id)"
        )
        .get(dialect);
        let name = name.unwrap_or("");
        let done = self
            .db
            .transaction_with(harmonydb::TxOptions::retry(), |tx| async move {
                let rows: Vec<(i64,)> = if name.is_empty() {
                    tx.select(delete_history, &[&cutoff, &after, &upto]).await?
                } else {
                    tx.select(delete_history, &[&cutoff, &after, &upto, &name])
                        .await?
                };
                let history = rows.len() as u64;
                let mut tasks: Vec<i64> = rows.into_iter().map(|(t,)| t).collect();
                tasks.sort_unstable();
                tasks.dedup();
                let args = if tasks.is_empty() {
                    0
                } else {
                    tx.exec(delete_args, &[&tasks]).await?
                };
                Ok(Some(PruneCounts { history, args }))
            })
            .await?;
        Ok(done.unwrap_or_default())
    }

    /// What [`Store::history_prune_batch`] would delete with no limit: the history rows that
    /// ended before `cutoff` (of `name`, or all) of tasks no longer pending or running, and
    /// the arguments of the tasks all of whose history is among them.
    pub async fn history_prune_count(
        &self,
        cutoff: Timestamp,
        name: Option<&str>,
    ) -> Result<PruneCounts> {
        let name = name.unwrap_or("");
        let history: i64 = self
            .db
            .scalar(
                "SELECT count(*) FROM harmony_task_history h
                 WHERE h.work_end < $1 AND ($2 = '' OR h.name = $2)
                   AND NOT EXISTS (SELECT 1 FROM harmony_task t WHERE t.id = h.task_id)",
                &[&cutoff, &name],
            )
            .await?;
        let args: i64 = self
            .db
            .scalar(
                "SELECT count(*) FROM harmony_task_args a
                 WHERE NOT EXISTS (SELECT 1 FROM harmony_task t WHERE t.id = a.task_id)
                   AND EXISTS (SELECT 1 FROM harmony_task_history h WHERE h.task_id = a.task_id)
                   AND NOT EXISTS (SELECT 1 FROM harmony_task_history h
                                   WHERE h.task_id = a.task_id
                                     AND NOT (h.work_end < $1 AND ($2 = '' OR h.name = $2)))",
                &[&cutoff, &name],
            )
            .await?;
        Ok(PruneCounts {
            history: u64::try_from(history).unwrap_or(0),
            args: u64::try_from(args).unwrap_or(0),
        })
    }

    /// The type names that have history, read by skipping through the (name, work_end)
    /// index one name at a time rather than scanning every row.
    pub async fn history_type_names(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self
            .db
            .select(
                "WITH RECURSIVE names (name) AS (
                     SELECT min(name) FROM harmony_task_history
                     UNION ALL
                     SELECT (SELECT min(h.name) FROM harmony_task_history h WHERE h.name > names.name)
                     FROM names WHERE names.name IS NOT NULL
                 )
                 SELECT name FROM names WHERE name IS NOT NULL",
                &[],
            )
            .await?;
        Ok(rows.into_iter().map(|(n,)| n).collect())
    }

    /// The `work_end` of the `n`-th newest history row of `name` (n ≥ 1), if it has that
    /// many: keeping `n` rows of the type means deleting those that ended before it.
    pub async fn history_nth_newest_end(&self, name: &str, n: u64) -> Result<Option<Timestamp>> {
        let offset = i64::try_from(n.saturating_sub(1)).unwrap_or(i64::MAX);
        let row: Option<(Timestamp,)> = self
            .db
            .query_opt(
                "SELECT work_end FROM harmony_task_history WHERE name = $1
                 ORDER BY work_end DESC LIMIT 1 OFFSET $2",
                &[&name, &offset],
            )
            .await?;
        Ok(row.map(|(t,)| t))
    }
}
