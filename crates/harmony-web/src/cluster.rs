//! Cluster-wide counts read from the database for `/metrics` and `/api/v1/types`, bounded and
//! cached.
//!
//! Bounded: the waiting types are found by a loose index scan of the waiting index (one probe
//! per type), each type's queue is counted up to [`QUEUE_DEPTH_CAP`] by a walk of that index,
//! and running tasks through the owner index; no statement reads the whole task table, so a
//! scrape costs the same with a million waiting tasks as with ten.
//!
//! Cached: a result is reused for [`COUNTS_TTL`]; concurrent requests that find it stale share
//! one refresh (a shared future), so many scrapers cost one query round per interval. No lock
//! is held while the database is queried.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use harmonytask::{Admin, HistoryCounts};

/// Waiting tasks of one type are counted up to this many; a count at the cap means "at least".
pub const QUEUE_DEPTH_CAP: usize = 10_000;

/// At most this many waiting types are counted.
pub const WAITING_TYPES_MAX: usize = 500;

/// How long cluster counts are reused.
pub const COUNTS_TTL: Duration = Duration::from_secs(1);

/// How long the 24-hour history counts are reused (they read a day of history).
pub const HISTORY_COUNTS_TTL: Duration = Duration::from_secs(5);

/// The window of the per-type history counts.
pub const HISTORY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Per-type counts of the whole cluster at one moment.
#[derive(Debug, Clone, Default)]
pub struct ClusterCounts {
    /// `(type, waiting counted up to QUEUE_DEPTH_CAP)`, sorted by type.
    pub waiting: Vec<(String, i64)>,
    /// `(type, running)`, sorted by type.
    pub running: Vec<(String, i64)>,
}

type Refresh<T> = Shared<BoxFuture<'static, Result<Arc<T>, String>>>;

/// A value computed by `load` at most once per `ttl`; concurrent callers share one load.
pub struct Cached<T> {
    ttl: Duration,
    slot: Mutex<Option<(Instant, Refresh<T>)>>,
}

impl<T: Send + Sync + 'static> Cached<T> {
    /// An empty cache whose values live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Cached {
            ttl,
            slot: Mutex::new(None),
        }
    }

    /// The cached value, or a fresh one from `load` when the last is older than the TTL (or
    /// failed). An error is the load's message.
    pub async fn get<F>(&self, load: F) -> Result<Arc<T>, String>
    where
        F: FnOnce() -> BoxFuture<'static, Result<Arc<T>, String>>,
    {
        let refresh = {
            let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some((at, fut))
                    if at.elapsed() < self.ttl && fut.peek().is_none_or(|r| r.is_ok()) =>
                {
                    fut.clone()
                }
                _ => {
                    let fut = load().shared();
                    *slot = Some((Instant::now(), fut.clone()));
                    fut
                }
            }
        };
        refresh.await
    }
}

/// Reads the cluster counts (uncached).
pub async fn load_counts(admin: Admin) -> Result<Arc<ClusterCounts>, harmonytask::Error> {
    let names = admin.waiting_types(WAITING_TYPES_MAX).await?;
    let mut waiting = Vec::with_capacity(names.len());
    for name in names {
        let n = admin.waiting_count(&name, QUEUE_DEPTH_CAP).await?;
        waiting.push((name, n));
    }
    let running = admin.running_counts().await?;
    Ok(Arc::new(ClusterCounts { waiting, running }))
}

/// Reads the history counts of the last [`HISTORY_WINDOW`] (uncached).
pub async fn load_history_counts(
    admin: Admin,
) -> Result<Arc<Vec<HistoryCounts>>, harmonytask::Error> {
    Ok(Arc::new(admin.history_counts_last(HISTORY_WINDOW).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let cache = Arc::new(Cached::<usize>::new(Duration::from_secs(3600)));
        let loads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut joins = Vec::new();
        for _ in 0..8 {
            let (cache, loads, gate) = (cache.clone(), loads.clone(), gate.clone());
            joins.push(tokio::spawn(async move {
                cache
                    .get(move || {
                        async move {
                            loads.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await;
                            Ok(Arc::new(7))
                        }
                        .boxed()
                    })
                    .await
            }));
        }
        // The first load waits on the gate until released; every caller gets its value.
        tokio::task::yield_now().await;
        while loads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for j in joins {
            assert_eq!(*j.await.unwrap().unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_load_is_not_kept() {
        let cache = Cached::<usize>::new(Duration::from_secs(3600));
        let e = cache.get(|| async { Err("down".to_owned()) }.boxed()).await;
        assert_eq!(e.unwrap_err(), "down");
        let v = cache.get(|| async { Ok(Arc::new(1)) }.boxed()).await;
        assert_eq!(*v.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_stale_value_is_reloaded() {
        let cache = Cached::<usize>::new(Duration::ZERO);
        let a = cache.get(|| async { Ok(Arc::new(1)) }.boxed()).await;
        let b = cache.get(|| async { Ok(Arc::new(2)) }.boxed()).await;
        assert_eq!((*a.unwrap(), *b.unwrap()), (1, 2));
    }
}
