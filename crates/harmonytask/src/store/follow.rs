//! The follower tables: registered pairs and the queue of completions to follow (filled by
//! the record transaction in `task`).

use harmonydb::{Executor, Tx};

use super::{Store, prefer_index_order};
use crate::error::Result;

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

/// Operations on follower pairs.
pub(crate) trait FollowStore {
    /// Registers a follower pair; completions of `from` are queued for `to` from now on.
    async fn follow_register(&self, from: &str, to: &str) -> Result<()>;
}

impl FollowStore for Store {
    async fn follow_register(&self, from: &str, to: &str) -> Result<()> {
        self.db
            .exec(
                "INSERT INTO harmony_task_follow (from_type, to_type, last_history_id) VALUES ($1, $2, 0)
                 ON CONFLICT (from_type, to_type) DO NOTHING",
                &[&from, &to],
            )
            .await?;
        Ok(())
    }
}

impl Store {
    /// Takes (locks, on Postgres skipping rows other nodes hold) up to `limit` queued
    /// follow-ups of a pair, oldest first.
    pub(crate) async fn follow_take(
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
        prefer_index_order(tx).await?;
        tx.select(sql, &[&from, &to, &limit]).await
    }

    /// Deletes consumed follow-ups and advances the pair's cursor (the last history id
    /// followed, for operators).
    pub(crate) async fn follow_done(
        tx: &Tx,
        from: &str,
        to: &str,
        ids: &[i64],
        last_history: i64,
    ) -> harmonydb::Result<()> {
        let delete =
            harmonydb::id_list_sql!("DELETE FROM harmony_task_follow_queue WHERE ", "id", 1, "")
                .get(tx.dialect());
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
}
