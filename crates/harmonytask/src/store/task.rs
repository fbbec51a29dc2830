//! Task rows on the hot path: adding, polling, the claim, recording outcomes (fenced by
//! `owner_id`), releasing. Crate-private: a claim or a record by anything but the engine's
//! own loops would break the one-owner rule.

use std::collections::HashMap;

use harmonydb::{Dialect, Executor, Timestamp, Tx};

use super::{Store, prefer_index_order};
use crate::error::Result;
use crate::hint::{self, Hint};
use crate::model::{Candidate, ClaimOutcome, Claimed, Fate, MachineId, Outcome, TaskId};

/// The Postgres claim statement: `$1` owner, `$2` candidate ids in preference order, `$3`
/// limit. The candidates drive a nested loop over the primary key. The filter is written
/// `coalesce(owner_id, 0) = 0` (machine ids start at 1) so that the planner cannot pick the
/// partial index on unowned tasks, whose scan grows with the backlog.
macro_rules! pg_claim_sql {
    () => {
        "UPDATE harmony_task SET owner_id = $1
         WHERE owner_id IS NULL AND id IN (
             SELECT t.id FROM unnest($2::bigint[]) WITH ORDINALITY AS u(id, ord)
             JOIN harmony_task AS t ON t.id = u.id
             WHERE coalesce(t.owner_id, 0) = 0
               AND NOT EXISTS (SELECT 1 FROM harmony_task_pause AS p WHERE p.task_name = t.name)
             ORDER BY u.ord LIMIT $3 FOR UPDATE OF t SKIP LOCKED)
         RETURNING id, posted_time, update_time, retries"
    };
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
    /// Local singleton types: when one of their tasks ends for good, the same transaction
    /// reads whether a run-now request is pending.
    pub singletons: &'a [String],
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
    /// Singleton types whose task ended for good in this batch and that have a run-now
    /// request pending, as of this transaction.
    pub run_now: Vec<String>,
}

/// Operations on task rows that the engine's loops perform.
pub(crate) trait TaskStore {
    /// Inserts one task row with no rows of the caller's, in one statement (its own
    /// transaction), with the `addt` wake-up hint on Postgres when `notify`; returns its id.
    /// The hint is built in SQL in the format of `notify::Hint::payload`.
    async fn task_insert_alone(
        &self,
        name: &str,
        posted: Timestamp,
        added_by: MachineId,
        notify: bool,
    ) -> Result<TaskId>;

    /// The oldest `limit` unowned tasks of a type, through the partial index: the cost does
    /// not depend on how many tasks wait.
    async fn task_poll(&self, name: &str, limit: usize) -> Result<Vec<Candidate>>;

    /// Claims up to `limit` of the candidate ids that are still unowned, in the given order,
    /// with one statement (plus, for types with a cluster-wide limit, a per-type lock row and
    /// a count in the same transaction). Returns what was actually claimed; a lost race just
    /// claims fewer.
    async fn task_claim(&self, p: &TaskClaim<'_>) -> Result<ClaimOutcome>;

    /// Records a batch of attempt outcomes in one transaction. Every row change is fenced by
    /// `owner_id = owner`: an outcome whose task is no longer owned by this machine (another
    /// node took it over after this one was declared dead) is discarded and reported, and
    /// writes no history.
    async fn task_record(&self, b: &RecordBatch<'_>) -> Result<Recorded>;

    /// The owner of a task: `None` when the row is gone, `Some(None)` when unowned.
    async fn task_owner(&self, id: TaskId) -> Result<Option<Option<MachineId>>>;

    /// Releases every task still owned by `owner` (shutdown), retries unchanged.
    async fn task_release_owned(&self, owner: MachineId, now: Timestamp) -> Result<u64>;

    /// Releases one task this machine owns without recording an attempt (it never started).
    async fn task_release(&self, id: TaskId, owner: MachineId, now: Timestamp) -> Result<bool>;
}

impl TaskStore for Store {
    async fn task_insert_alone(
        &self,
        name: &str,
        posted: Timestamp,
        added_by: MachineId,
        notify: bool,
    ) -> Result<TaskId> {
        // The hint built in SQL saves a round trip on the hot path; a relay must get the hint
        // after the commit instead, so a handle with one inserts, then publishes.
        if notify && self.dialect() == Dialect::Postgres && self.db.relay().is_none() {
            let posted_ms = posted.as_millis();
            return Ok(self
                .db
                .scalar(
                    "WITH ins AS (
                         INSERT INTO harmony_task (name, posted_time, update_time, added_by)
                         VALUES ($1, $2, $2, $3) RETURNING id)
                     SELECT ins.id FROM ins
                     CROSS JOIN LATERAL pg_notify($4, 'addt:' || $1::text || ':' || $3::bigint || ':' || ins.id || ':' || $5::bigint) AS n",
                    &[&name, &posted, &added_by, &hint::CHANNEL, &posted_ms],
                )
                .await?);
        }
        let id: TaskId = self
            .db
            .scalar(
                "INSERT INTO harmony_task (name, posted_time, update_time, added_by) VALUES ($1, $2, $2, $3) RETURNING id",
                &[&name, &posted, &added_by],
            )
            .await?;
        if notify && self.db.relay().is_some() {
            let hint = Hint::Added {
                name: name.to_owned(),
                task: Some((id, posted)),
            };
            self.notify(&hint.payload(added_by)).await?;
        }
        Ok(id)
    }

    async fn task_poll(&self, name: &str, limit: usize) -> Result<Vec<Candidate>> {
        // A paused type offers nothing (one primary-key probe of the pause table).
        const POLL: &str = "SELECT id, posted_time, update_time, retries FROM harmony_task
                 WHERE name = $1 AND owner_id IS NULL
                   AND NOT EXISTS (SELECT 1 FROM harmony_task_pause WHERE task_name = $1)
                 ORDER BY posted_time, id LIMIT $2";
        if self.dialect() == Dialect::Sqlite {
            return Ok(self.db.select(POLL, &[&name, &limit]).await?);
        }
        let polled = self
            .db
            .transaction(|tx| async move {
                prefer_index_order(&tx).await?;
                Ok(Some(tx.select::<Candidate>(POLL, &[&name, &limit]).await?))
            })
            .await?;
        Ok(polled.unwrap_or_default())
    }

    async fn task_claim(&self, p: &TaskClaim<'_>) -> Result<ClaimOutcome> {
        if p.ids.is_empty() || p.limit == 0 {
            return Ok(ClaimOutcome::default());
        }
        let ids: Vec<i64> = p.ids.iter().map(|t| t.0).collect();
        let claim = self.dialect().pick(
            "UPDATE harmony_task SET owner_id = $1
             WHERE id IN (SELECT t.id FROM json_each($2) AS j CROSS JOIN harmony_task AS t ON t.id = j.value
                          WHERE t.owner_id IS NULL
                            AND NOT EXISTS (SELECT 1 FROM harmony_task_pause AS p WHERE p.task_name = t.name)
                          ORDER BY j.key LIMIT $3)
             RETURNING id, posted_time, update_time, retries",
            pg_claim_sql!(),
        );
        if p.max_cluster == 0 {
            if self.dialect() == Dialect::Postgres {
                let rows: Vec<ClaimedWithArg> = self
                    .db
                    .select(CLAIM_WITH_ARGS_PG, &[&p.owner, &ids, &p.limit])
                    .await?;
                return Ok(ClaimOutcome::with_args(rows, false));
            }
            return Ok(ClaimOutcome {
                claimed: self.db.select(claim, &[&p.owner, &ids, &p.limit]).await?,
                cluster_full: false,
                args: None,
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
                        return Ok(Some(ClaimOutcome { claimed: Vec::new(), cluster_full, args: None }));
                    }
                    let claimed: Vec<Claimed> = tx.select(claim, &[&p.owner, &ids, &limit]).await?;
                    Ok(Some(ClaimOutcome { claimed, cluster_full, args: None }))
                }
            })
            .await?;
        Ok(claimed.unwrap_or_default())
    }

    async fn task_record(&self, b: &RecordBatch<'_>) -> Result<Recorded> {
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
        let delete = harmonydb::id_list_sql!(
            "DELETE FROM harmony_task WHERE owner_id = $1 AND ",
            "id",
            2,
            " RETURNING id"
        )
        .get(dialect);
        let retry = harmonydb::id_list_sql!(
            "UPDATE harmony_task SET owner_id = NULL, retries = retries + 1, update_time = $3
             WHERE owner_id = $1 AND ",
            "id",
            2,
            " RETURNING id"
        )
        .get(dialect);
        let release = harmonydb::id_list_sql!(
            "UPDATE harmony_task SET owner_id = NULL, update_time = $3 WHERE owner_id = $1 AND ",
            "id",
            2,
            " RETURNING id"
        )
        .get(dialect);
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
                    let mut ended: Vec<&str> = applied
                        .iter()
                        .filter(|o| matches!(o.fate, Fate::Done | Fate::Fail))
                        .map(|o| o.name.as_str())
                        .filter(|n| b.singletons.iter().any(|s| s == n))
                        .collect();
                    ended.sort_unstable();
                    ended.dedup();
                    for name in ended {
                        let pending: Option<(bool,)> = tx
                            .query_opt(
                                "SELECT run_now_request FROM harmony_task_singletons WHERE task_name = $1",
                                &[&name],
                            )
                            .await?;
                        if pending.is_some_and(|(p,)| p) {
                            out.run_now.push(name.to_owned());
                        }
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
                                    Hint::Released {
                                        name: o.name.clone(),
                                    }
                                    .payload(b.owner),
                                );
                            }
                        }
                        for from in &out.followed {
                            hints.push(Hint::Follow { from: from.clone() }.payload(b.owner));
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

    async fn task_owner(&self, id: TaskId) -> Result<Option<Option<MachineId>>> {
        let row: Option<(Option<i64>,)> = self
            .db
            .query_opt("SELECT owner_id FROM harmony_task WHERE id = $1", &[&id])
            .await?;
        Ok(row.map(|(o,)| o.map(MachineId)))
    }

    async fn task_release_owned(&self, owner: MachineId, now: Timestamp) -> Result<u64> {
        Ok(self
            .db
            .exec(
                "UPDATE harmony_task SET owner_id = NULL, update_time = $2 WHERE owner_id = $1",
                &[&owner, &now],
            )
            .await?)
    }

    async fn task_release(&self, id: TaskId, owner: MachineId, now: Timestamp) -> Result<bool> {
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

/// The Postgres claim (the statement of `task_claim`) that also returns the claimed tasks'
/// arguments, one row per argument (one with NULLs for a task without any), so that the
/// attempt needs no read of its own.
const CLAIM_WITH_ARGS_PG: &str = concat!(
    "WITH c AS (",
    pg_claim_sql!(),
    ")
     SELECT c.id, c.posted_time, c.update_time, c.retries, a.key AS arg_key, a.value AS arg_value
     FROM c LEFT JOIN harmony_task_args AS a ON a.task_id = c.id"
);

/// A row of [`CLAIM_WITH_ARGS_PG`].
struct ClaimedWithArg {
    task: Claimed,
    arg: Option<(String, String)>,
}

impl harmonydb::FromRow for ClaimedWithArg {
    fn from_row(row: &harmonydb::Row) -> harmonydb::Result<Self> {
        let key: Option<String> = row.get("arg_key")?;
        let value: Option<String> = row.get("arg_value")?;
        Ok(ClaimedWithArg {
            task: Claimed::from_row(row)?,
            arg: key.zip(value),
        })
    }
}

impl ClaimOutcome {
    /// Groups a claim's rows (one per argument) into tasks and their arguments.
    fn with_args(rows: Vec<ClaimedWithArg>, cluster_full: bool) -> Self {
        let mut claimed: Vec<Claimed> = Vec::new();
        let mut args: HashMap<TaskId, HashMap<String, String>> = HashMap::new();
        for r in rows {
            let entry = args.entry(r.task.id).or_insert_with(|| {
                claimed.push(r.task.clone());
                HashMap::new()
            });
            if let Some((k, v)) = r.arg {
                entry.insert(k, v);
            }
        }
        // Oldest first, as the scheduler starts them (the join may reorder rows).
        claimed.sort_by_key(|c| (c.posted, c.id));
        ClaimOutcome {
            claimed,
            cluster_full,
            args: Some(args),
        }
    }
}

/// A new task row, written inside the caller's transaction by [`Store::task_add`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewTask<'a> {
    /// Its type.
    pub name: &'a str,
    /// Its creation time (also its first `update_time`).
    pub posted: Timestamp,
    /// The adding machine (0 for a client).
    pub added_by: MachineId,
    /// The task whose completion created it (followers).
    pub previous: Option<TaskId>,
    /// Send the wake-up hint with the commit (Postgres).
    pub notify: bool,
}

impl Store {
    /// Adds one task inside `tx`: the row, and with `notify` its `addt` hint (delivered on
    /// commit). Returns it as the scheduler's candidate, so that the adding node can offer it
    /// to its own scheduler without a poll.
    pub(crate) async fn task_add(tx: &Tx, t: &NewTask<'_>) -> harmonydb::Result<Candidate> {
        let id = Store::task_insert(tx, t.name, t.posted, t.added_by, t.previous).await?;
        if t.notify {
            let hint = Hint::Added {
                name: t.name.to_owned(),
                task: Some((id, t.posted)),
            };
            Store::notify_in(tx, &hint.payload(t.added_by)).await?;
        }
        Ok(Candidate::added(id, t.posted))
    }

    /// Adds `count` tasks of one type inside `tx` with one statement and one `add` hint (with
    /// `notify`); `t.previous` is not written. Returns the candidates in id order.
    pub(crate) async fn task_add_many(
        tx: &Tx,
        t: &NewTask<'_>,
        count: usize,
    ) -> harmonydb::Result<Vec<Candidate>> {
        let ids = Store::task_insert_many(tx, t.name, count, t.posted, t.added_by).await?;
        if t.notify {
            let hint = Hint::Added {
                name: t.name.to_owned(),
                task: None,
            };
            Store::notify_in(tx, &hint.payload(t.added_by)).await?;
        }
        Ok(ids
            .into_iter()
            .map(|id| Candidate::added(id, t.posted))
            .collect())
    }

    /// Inserts one task row inside `tx`; returns its id.
    pub(crate) async fn task_insert(
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

    /// Inserts `count` task rows of one type inside `tx` with one statement; returns their ids
    /// in ascending order.
    pub(crate) async fn task_insert_many(
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
    pub(crate) async fn task_args_insert(
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
}

harmonydb::batch_sql! {
    /// The history rows of one recording batch, one per outcome, in outcome order.
    struct HistoryRows;
    "INSERT INTO harmony_task_history (task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port)
     SELECT h.task_id, h.name, h.posted, h.work_start, h.work_end, h.result, h.err, $1
     FROM "
    rows($2) as h {
        task_id: bigint,
        name: text,
        posted: timestamptz,
        work_start: timestamptz,
        work_end: timestamptz,
        result: boolean,
        err: text,
    }
    " ORDER BY h.ord RETURNING id"
}

/// Inserts history rows for `outcomes` (one statement); returns their ids in the same order.
async fn insert_history(tx: &Tx, host: &str, outcomes: &[&Outcome]) -> harmonydb::Result<Vec<i64>> {
    if outcomes.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows = HistoryRows::new(tx.dialect(), outcomes.len());
    for o in outcomes {
        rows.push(
            o.id.0,
            &o.name,
            o.posted,
            o.work_start,
            o.work_end,
            o.fate == Fate::Done,
            &o.err,
        );
    }
    // The rows are inserted in batch order, so ascending ids are in outcome order.
    let ids: Vec<(i64,)> = tx.select(rows.sql(), &rows.params(&[&host])).await?;
    let mut ids: Vec<i64> = ids.into_iter().map(|r| r.0).collect();
    ids.sort_unstable();
    Ok(ids)
}

harmonydb::batch_sql! {
    /// Completed tasks whose followers get a follow-up: the type, the task and its history row.
    struct Completions;
    // On SQLite the CROSS JOIN keeps the follower table, which is tiny, as the outer loop.
    "INSERT INTO harmony_task_follow_queue (from_type, to_type, task_id, history_id)
     SELECT f.from_type, f.to_type, d.task_id, d.history_id
     FROM harmony_task_follow AS f CROSS JOIN "
    rows($1) as d {
        name: text,
        task_id: bigint,
        history_id: bigint,
    }
    " WHERE f.from_type = d.name RETURNING from_type"
}

/// Queues one follow-up per registered follower of each completed task's type; returns the
/// types that had followers.
async fn enqueue_follow_ups(tx: &Tx, done: &[(&Outcome, i64)]) -> harmonydb::Result<Vec<String>> {
    let mut completions = Completions::new(tx.dialect(), done.len());
    for (o, history) in done {
        completions.push(&o.name, o.id.0, *history);
    }
    let rows: Vec<(String,)> = tx
        .select(completions.sql(), &completions.params(&[]))
        .await?;
    let mut types: Vec<String> = rows.into_iter().map(|r| r.0).collect();
    types.sort();
    types.dedup();
    Ok(types)
}

impl Store {
    /// The history row of one attempt, if it was recorded. After a recording transaction
    /// failed, it may still have committed (a connection lost after the commit): the recorder
    /// asks before it records again, so that one attempt is never recorded twice — a second
    /// recording would otherwise apply to a later attempt of the same task on this node.
    pub(crate) async fn history_of_attempt(
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
