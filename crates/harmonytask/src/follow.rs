//! Followers: task types whose tasks are created from the completion of another type's tasks.
//!
//! A type declares `follows: [Follow::new(from_type, make)]`. The node registers each
//! `(from_type, to_type)` pair in `harmony_task_follow`. From then on, the transaction that
//! records a successful completion of `from_type` (anywhere in the cluster) also inserts one
//! row per registered follower into `harmony_task_follow_queue`. A follower loop on every
//! node that runs `to_type` takes queued rows (`FOR UPDATE SKIP LOCKED` on Postgres) and, in
//! the same transaction, calls `make(completed_task, add)` — whose adds write into that
//! transaction — and deletes the rows. So every completion leads to exactly one `make` call
//! cluster-wide, even across crashes: a crash before commit rolls back both the adds and the
//! dequeue. Completions that happened before a pair was first registered are not followed.
//!
//! Wake-ups: at once in-process (the recorder wakes the loop), by notification across nodes,
//! and by the poll interval as the safety net.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use harmonydb::{Timestamp, Tx};
use tokio::sync::Notify;

use crate::model::{Candidate, MachineId, TaskId};
use crate::name::validate_name;
use crate::store::{NewTask, Store};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a follower does with one completed task: add zero or more tasks through `FollowAdd`.
pub type FollowMake =
    Arc<dyn Fn(TaskId, FollowAdd) -> BoxFuture<harmonydb::Result<()>> + Send + Sync>;

/// One follow declaration of a type.
#[derive(Clone)]
pub struct Follow {
    /// The type whose successful completions are followed.
    pub from: String,
    /// Called once per completion, cluster-wide.
    pub make: FollowMake,
}

impl fmt::Debug for Follow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Follow({})", self.from)
    }
}

impl Follow {
    /// Follows `from` with a custom `make`.
    pub fn new<F, Fut>(from: impl Into<String>, make: F) -> Self
    where
        F: Fn(TaskId, FollowAdd) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = harmonydb::Result<()>> + Send + 'static,
    {
        Follow {
            from: from.into(),
            make: Arc::new(move |id, add| Box::pin(make(id, add))),
        }
    }

    /// Follows `from` with one task of the follower's own type per completion.
    pub fn chain(from: impl Into<String>) -> Self {
        Follow::new(from, |_, add: FollowAdd| async move {
            add.add().await.map(|_| ())
        })
    }
}

pub(crate) struct AddShared {
    pub(crate) tx: Tx,
    pub(crate) own_type: String,
    pub(crate) added_by: MachineId,
    pub(crate) posted: Timestamp,
    pub(crate) notify: bool,
    pub(crate) added: Mutex<Vec<(String, Candidate)>>,
}

/// Adds follow-up tasks inside the transaction that consumes the completion.
#[derive(Clone)]
pub struct FollowAdd {
    pub(crate) inner: Arc<AddShared>,
    pub(crate) previous: TaskId,
}

impl FollowAdd {
    /// The completed task being followed.
    pub fn previous(&self) -> TaskId {
        self.previous
    }

    /// The transaction, to read or write the caller's own rows. An error inside it rolls the
    /// whole follow-up back; it is retried later.
    pub fn tx(&self) -> &Tx {
        &self.inner.tx
    }

    /// Adds one task of the follower's own type, with `previous_task` set.
    pub async fn add(&self) -> harmonydb::Result<TaskId> {
        let name = self.inner.own_type.clone();
        self.add_type(&name).await
    }

    /// Adds one task of any type, with `previous_task` set.
    pub async fn add_type(&self, name: &str) -> harmonydb::Result<TaskId> {
        validate_name(name).map_err(harmonydb::Error::external)?;
        let i = &self.inner;
        let c = Store::task_add(
            &i.tx,
            &NewTask {
                name,
                posted: i.posted,
                added_by: i.added_by,
                previous: Some(self.previous),
                notify: i.notify,
            },
        )
        .await?;
        let id = c.id;
        if let Ok(mut a) = i.added.lock() {
            a.push((name.to_owned(), c));
        }
        Ok(id)
    }
}

/// Wakes the follower loop when a completion of a type that a local type follows was queued
/// (by this node's recorder, or hinted by another node).
#[derive(Clone, Default)]
pub(crate) struct FollowWake {
    notify: Arc<Notify>,
    /// The types local types follow.
    from: Arc<[String]>,
}

impl FollowWake {
    /// A wake for local types following `from`.
    pub(crate) fn new(from: Vec<String>) -> Self {
        FollowWake {
            notify: Arc::new(Notify::new()),
            from: from.into(),
        }
    }

    /// Wakes the loop when a local type follows `from` (any type for `None`).
    pub(crate) fn wake(&self, from: Option<&str>) {
        if self.from.iter().any(|f| from.is_none_or(|n| f == n)) {
            self.notify.notify_one();
        }
    }

    /// Waits for a wake.
    pub(crate) async fn woken(&self) {
        self.notify.notified().await;
    }
}
