//! The follower loop: turns queued completions into follow-up tasks (see [`crate::follow`] for
//! the contract). One loop per node, for every pair whose `to_type` runs here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harmonydb::{Db, TxOptions};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::Client;
use crate::clock::Clock;
use crate::follow::{AddShared, FollowAdd, FollowMake, FollowWake};
use crate::model::{MachineId, TaskId};
use crate::notify::PollPace;
use crate::registry::Registry;
use crate::store::Store;

/// First wait before retrying failed follow-ups.
const FOLLOW_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between retries of failed follow-ups.
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Most queued follow-ups consumed per transaction.
const FOLLOW_BATCH_MAX: usize = 100;

/// The follower loop of one node: all pairs whose `to_type` runs here, with only what it
/// uses.
pub(crate) struct Followers {
    pub db: Db,
    pub registry: Arc<Registry>,
    pub clock: Arc<dyn Clock>,
    pub machine: MachineId,
    /// Send wake-up hints with the follow-ups' inserts.
    pub notify: bool,
    pub pace: Arc<PollPace>,
    pub wake: FollowWake,
    /// Offers the follow-ups to the local scheduler.
    pub client: Client,
}

struct Pair {
    from: String,
    to: usize,
    make: FollowMake,
}

impl Followers {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let s = &self;
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
                s.pace.interval()
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = s.wake.woken() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Consumes up to a batch of queued follow-ups of one pair in one transaction.
    async fn consume(&self, p: &Pair) -> crate::Result<usize> {
        let s = self;
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
                    notify: s.notify,
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
            s.client.tell_local(&name, vec![c]);
        }
        Ok(n)
    }
}
