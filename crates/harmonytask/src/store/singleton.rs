//! Singleton rows: which types are singletons, their current task, run-now requests.

use std::time::Duration;

use harmonydb::{Executor, Timestamp, Tx};

use super::Store;
use crate::error::{Error, Result};
use crate::hint::Hint;
use crate::model::{MachineId, TaskId};

/// Operations on singleton rows.
pub(crate) trait SingletonStore {
    /// Records that `name` is a singleton type (at registration of a node that runs it), so
    /// that run-now requests for it are accepted before its first run.
    async fn singleton_register(&self, name: &str) -> Result<()>;

    /// Asks for a singleton to run now (and wakes the nodes on Postgres). A type that no node
    /// ever registered as a singleton is refused with [`Error::NotSingleton`], writing nothing.
    async fn singleton_run_now(&self, name: &str, notify: bool) -> Result<()>;

    /// Which of `names` have a pending run-now request.
    async fn singleton_requests(&self) -> Result<Vec<String>>;
}

impl SingletonStore for Store {
    async fn singleton_register(&self, name: &str) -> Result<()> {
        self.db
            .exec(
                "INSERT INTO harmony_task_singletons (task_name, run_now_request) VALUES ($1, $2)
                 ON CONFLICT (task_name) DO NOTHING",
                &[&name, &false],
            )
            .await?;
        Ok(())
    }

    async fn singleton_run_now(&self, name: &str, notify: bool) -> Result<()> {
        let hint = Hint::RunNow {
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

    async fn singleton_requests(&self) -> Result<Vec<String>> {
        let rows: Vec<(String,)> = self
            .db
            .select(
                "SELECT task_name FROM harmony_task_singletons WHERE run_now_request = $1",
                &[&true],
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}

impl Store {
    /// Inside the insert transaction of singleton task `id`: whether it may run now. It may
    /// when no live task of the type exists and the interval has passed or a run-now request is
    /// pending; then the singleton row points at it, `last_run_time` is now, and the request is
    /// cleared. Returns false (roll back) otherwise.
    pub(crate) async fn singleton_take(
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
}
