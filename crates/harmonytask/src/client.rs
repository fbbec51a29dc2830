//! Posting work: [`Client`] adds, restarts and run-now requests without running a node, and
//! [`TaskAdder`] adds tasks of one type from inside a node (handed to `Task::adder` and to
//! IAmBored callbacks). An engine's own client also offers what it adds to the local
//! scheduler at once.

use std::future::Future;
use std::sync::Arc;

use harmonydb::{Db, ErrorKind, Timestamp, Tx, TxOptions};

use crate::clock::{Clock, SystemClock};
use crate::error::Result;
use crate::hint::Hint;
use crate::model::{Candidate, MachineId, TaskId};
use crate::name::validate_name;
use crate::scheduler::inbox::Inbox;
use crate::store::prelude::*;
use crate::store::{NewTask, Store};

/// Adds and restarts tasks without running a node: for CLIs, web handlers and other programs
/// that post work. Rows it adds have `added_by = 0` unless it belongs to an engine.
#[derive(Clone)]
pub struct Client {
    db: Db,
    clock: Arc<dyn Clock>,
    added_by: MachineId,
    notify: bool,
    /// The engine's scheduler, when this client belongs to a node: what it adds is offered
    /// to it at once, without a poll or a notification round trip.
    local: Option<Arc<Inbox>>,
}

impl Client {
    /// A client on `db` using the system clock.
    pub fn new(db: Db) -> Self {
        Client {
            db,
            clock: Arc::new(SystemClock),
            added_by: MachineId(0),
            notify: true,
            local: None,
        }
    }

    /// The client of an engine: rows it adds name `machine` as `added_by`, and the local
    /// scheduler hears of them at once.
    pub(crate) fn of_node(
        db: Db,
        clock: Arc<dyn Clock>,
        machine: MachineId,
        notify: bool,
        local: Arc<Inbox>,
    ) -> Self {
        Client {
            db,
            clock,
            added_by: machine,
            notify,
            local: Some(local),
        }
    }

    /// Tells the local scheduler (if any) about tasks just added.
    pub(crate) fn tell_local(&self, name: &str, tasks: Vec<Candidate>) {
        if let Some(inbox) = &self.local
            && !tasks.is_empty()
        {
            inbox.added(name, tasks);
        }
    }

    /// The time now on the client's clock.
    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Whether adds send wake-up notifications (Postgres); on by default. Turn off for
    /// backends without `NOTIFY`.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Asks a singleton type to run now. A type that no node registered as a singleton is
    /// refused with [`Error::NotSingleton`] and nothing is written.
    pub async fn run_now(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        Store::new(self.db.clone())
            .singleton_run_now(name, self.notify)
            .await?;
        if let Some(inbox) = &self.local {
            inbox.run_now(name);
        }
        Ok(())
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Adds one task; see [`crate::Engine::add_task`]. Returns the new task as a scheduler candidate.
    pub(crate) async fn add<F, Fut>(
        &self,
        name: &str,
        previous: Option<TaskId>,
        extra: F,
    ) -> Result<Option<Candidate>>
    where
        F: Fn(TaskId, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        validate_name(name)?;
        let posted = self.clock.now();
        let added_by = self.added_by;
        let notify = self.notify;
        let extra = &extra;
        let result = self
            .db
            .transaction_with(TxOptions::retry(), |tx| async move {
                let new = NewTask {
                    name,
                    posted,
                    added_by,
                    previous,
                    notify,
                };
                let c = Store::task_add(&tx, &new).await?;
                Ok(extra(c.id, tx).await?.then_some(c))
            })
            .await;
        match result {
            Ok(Some(c)) => {
                self.tell_local(name, vec![c.clone()]);
                Ok(Some(c))
            }
            Ok(None) => Ok(None),
            Err(e) if e.kind() == ErrorKind::UniqueViolation => {
                tracing::debug!(task_type = name, "task already queued");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn add_many<F, Fut>(
        &self,
        name: &str,
        count: usize,
        extra: F,
    ) -> Result<Vec<Candidate>>
    where
        F: Fn(Vec<TaskId>, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        validate_name(name)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let posted = self.clock.now();
        let added_by = self.added_by;
        let notify = self.notify;
        let extra = &extra;
        let new = NewTask {
            name,
            posted,
            added_by,
            previous: None,
            notify,
        };
        let added = self
            .db
            .transaction_with(TxOptions::retry(), |tx| async move {
                let added = Store::task_add_many(&tx, &new, count).await?;
                let ids = added.iter().map(|c| c.id).collect();
                Ok(extra(ids, tx).await?.then_some(added))
            })
            .await?
            .unwrap_or_default();
        self.tell_local(name, added.clone());
        Ok(added)
    }

    pub(crate) async fn restart(&self, id: TaskId) -> Result<(String, Candidate)> {
        let store = Store::new(self.db.clone());
        let now = self.clock.now();
        let name = store.task_restart(id, self.added_by, now).await?;
        let posted = store.task_get(id).await?.map_or(now, |t| t.posted_time);
        if self.notify {
            let hint = Hint::Added {
                name: name.clone(),
                task: Some((id, posted)),
            };
            store.notify(&hint.payload(self.added_by)).await?;
        }
        let c = Candidate {
            id,
            posted,
            updated: now,
            retries: 0,
        };
        self.tell_local(&name, vec![c.clone()]);
        Ok((name, c))
    }

    /// Adds one task with arguments; returns its id (`None` if it was already queued).
    pub async fn add_task_with_args(
        &self,
        name: &str,
        args: &[(String, String)],
    ) -> Result<Option<TaskId>> {
        let c = self.add_with_args(name, args).await?;
        Ok(c.map(|c| c.id))
    }

    /// Adds one task with arguments. Without arguments there are no rows of the caller's to
    /// write, so the row (and its wake-up notification) goes in with one statement.
    pub(crate) async fn add_with_args(
        &self,
        name: &str,
        args: &[(String, String)],
    ) -> Result<Option<Candidate>> {
        if !args.is_empty() {
            return self
                .add(name, None, |id, tx| async move {
                    Store::task_args_insert(&tx, id, args).await?;
                    Ok(true)
                })
                .await;
        }
        validate_name(name)?;
        let posted = self.clock.now();
        let id = Store::new(self.db.clone())
            .task_insert_alone(name, posted, self.added_by, self.notify)
            .await?;
        let c = Candidate::added(id, posted);
        self.tell_local(name, vec![c.clone()]);
        Ok(Some(c))
    }

    /// Adds `count` tasks of one type, each with the same arguments, in one transaction.
    pub async fn add_tasks_with_args(
        &self,
        name: &str,
        count: usize,
        args: &[(String, String)],
    ) -> Result<Vec<TaskId>> {
        let added = self
            .add_many(name, count, |ids, tx| async move {
                for id in ids {
                    Store::task_args_insert(&tx, id, args).await?;
                }
                Ok(true)
            })
            .await?;
        Ok(added.into_iter().map(|c| c.id).collect())
    }

    /// Re-queues a permanently failed task with its original id and posted time.
    pub async fn restart_task(&self, id: TaskId) -> Result<()> {
        self.restart(id).await.map(|_| ())
    }
}

/// Adds tasks of one type; handed to [`crate::Task::adder`].
#[derive(Clone)]
pub struct TaskAdder {
    client: Client,
    name: String,
}

impl TaskAdder {
    /// The type this adder adds.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The engine's clock reading.
    pub fn now(&self) -> Timestamp {
        self.client.now()
    }

    /// Adds one task of this type; see [`crate::Engine::add_task`].
    pub async fn add<F, Fut>(&self, extra: F) -> Result<Option<TaskId>>
    where
        F: Fn(TaskId, Tx) -> Fut + Send + Sync,
        Fut: Future<Output = harmonydb::Result<bool>> + Send,
    {
        let added = self.client.add(&self.name, None, extra).await?;
        Ok(added.map(|c| c.id))
    }
}

impl TaskAdder {
    /// An adder of `name` through `client`.
    pub(crate) fn new(client: Client, name: impl Into<String>) -> Self {
        TaskAdder {
            client,
            name: name.into(),
        }
    }
}
