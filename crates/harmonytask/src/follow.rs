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
use std::time::Duration;

use harmonydb::{Timestamp, Tx, TxOptions};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::engine::Shared;
use crate::store::{Candidate, NewTask, Store};
use crate::task::{MachineId, TaskId, validate_name};

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

struct AddShared {
    tx: Tx,
    own_type: String,
    added_by: MachineId,
    posted: Timestamp,
    notify: bool,
    added: Mutex<Vec<(String, Candidate)>>,
}

/// Adds follow-up tasks inside the transaction that consumes the completion.
#[derive(Clone)]
pub struct FollowAdd {
    inner: Arc<AddShared>,
    previous: TaskId,
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

/// First wait before retrying failed follow-ups.
const FOLLOW_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between retries of failed follow-ups.
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Most queued follow-ups consumed per transaction.
const FOLLOW_BATCH_MAX: usize = 100;

/// The follower loop of one node: all pairs whose `to_type` runs here.
pub(crate) struct Followers {
    pub shared: Arc<Shared>,
}

struct Pair {
    from: String,
    to: usize,
    make: FollowMake,
}

impl Followers {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let s = &self.shared;
        let pairs: Vec<Pair> = s
            .registry
            .types
            .iter()
            .enumerate()
            .flat_map(|(to, e)| {
                e.details.follows.iter().map(move |f| Pair {
                    from: f.from.clone(),
                    to,
                    make: Arc::clone(&f.make),
                })
            })
            .collect();
        if pairs.is_empty() {
            return;
        }
        let mut backoff = Backoff::new(FOLLOW_BACKOFF_INITIAL, FOLLOW_BACKOFF_MAX);
        loop {
            let mut failed = false;
            for p in &pairs {
                loop {
                    match self.consume(p).await {
                        Ok(n) if n >= FOLLOW_BATCH_MAX => continue,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(from = %p.from, to = %s.registry.types[p.to].name, error = %e, "follow-up failed; will retry");
                            failed = true;
                            break;
                        }
                    }
                }
            }
            let wait = if failed {
                backoff.next_wait()
            } else {
                backoff.reset();
                s.poll_interval()
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = s.follow_wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Consumes up to a batch of queued follow-ups of one pair in one transaction.
    async fn consume(&self, p: &Pair) -> crate::Result<usize> {
        let s = &self.shared;
        let to_name = s.registry.types[p.to].name.to_string();
        let posted = s.clock.now();
        let (from, to, make) = (&p.from, &to_name, &p.make);
        let done =
            s.db.transaction_with(TxOptions::retry(), |tx| async move {
                let queued = Store::follow_take(&tx, from, to, FOLLOW_BATCH_MAX).await?;
                if queued.is_empty() {
                    return Ok(Some((0, Vec::new())));
                }
                let shared = Arc::new(AddShared {
                    tx,
                    own_type: to.clone(),
                    added_by: s.machine,
                    posted,
                    notify: s.config.notify,
                    added: Mutex::new(Vec::new()),
                });
                for q in &queued {
                    let add = FollowAdd {
                        inner: Arc::clone(&shared),
                        previous: TaskId(q.task_id),
                    };
                    make(TaskId(q.task_id), add).await?;
                }
                let ids: Vec<i64> = queued.iter().map(|q| q.id).collect();
                let last_history = queued.iter().map(|q| q.history_id).max().unwrap_or(0);
                Store::follow_done(&shared.tx, from, to, &ids, last_history).await?;
                let added = shared.added.lock().map(|a| a.clone()).unwrap_or_default();
                Ok(Some((queued.len(), added)))
            })
            .await?;
        let (n, added) = done.unwrap_or_default();
        for (name, c) in added {
            s.notify_added(&name, vec![c]);
        }
        Ok(n)
    }
}
