//! The dashboard's one shared refresh per node, and the render cache its subscribers share.
//!
//! One loop ([`run`]) reads the cluster's state (bounded per-type counts and recent
//! completions every round; machines, blocked reasons, pauses and singletons every
//! [`SLOW_ROUNDS`] rounds, and in the round after an operator write made through this server;
//! the last day's counts at most every [`crate::cluster::HISTORY_COUNTS_TTL`]) and
//! publishes it as a numbered [`Snapshot`] on a watch channel. It wakes every
//! [`LIVE_INTERVAL`] while at least one browser is subscribed, every [`IDLE_SAMPLE_INTERVAL`]
//! otherwise (to keep the charts' ring filled), and early when a page load finds the snapshot
//! stale, but never twice within [`LIVE_INTERVAL`]. Browsers never query the database
//! themselves: an open page costs nothing beyond the shared refresh, whatever their number.
//!
//! Pages that need more than the snapshot (a task list, a type's history) render through
//! [`ViewCache`]: one render per view and snapshot number, shared by every subscriber and page
//! load of that view, so N browsers on one page cost one render per round, not N.
//!
//! Each round also appends a chart sample (queue depth and completions per second per type)
//! to an in-memory ring covering [`CHART_WINDOW`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use harmonydb::Timestamp;
use harmonytask::{BlockedRow, EngineStatus, HistoryCounts, MachineRow, PausedRow, TypeSettings};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::State;

/// How often the shared refresh runs while a browser is subscribed.
pub const LIVE_INTERVAL: Duration = Duration::from_secs(2);
/// The slow reads (machines, blocked reasons, pauses, singletons) run every this many
/// rounds, and after an operator write through this server: with them every round, a watched
/// node cost about 5 queries/s; this way about 2 (with two waiting types).
pub const SLOW_ROUNDS: u32 = 5;
/// How often it runs while nobody watches (chart samples only).
pub const IDLE_SAMPLE_INTERVAL: Duration = Duration::from_secs(30);
/// The span of the charts.
pub const CHART_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Most views kept in the render cache.
pub const VIEW_CACHE_MAX: usize = 256;
/// Longest a page load waits for a fresh snapshot before it shows the one it has.
pub const FRESH_WAIT_MAX: Duration = Duration::from_secs(5);

/// One chart sample of one type.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TypeSample {
    /// Waiting tasks (bounded count).
    pub waiting: i64,
    /// Attempts that ended per second since the previous sample.
    pub done_per_s: f64,
}

/// One chart sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Per type.
    pub per_type: BTreeMap<String, TypeSample>,
}

/// What the shared refresh read, numbered.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// 1 for the first refresh; 0 before it.
    pub generation: u64,
    /// When it was read (None before the first refresh).
    pub taken: Option<Instant>,
    /// Wall time of the read.
    pub now: Option<Timestamp>,
    /// Every registered machine.
    pub machines: Vec<MachineRow>,
    /// Waiting per type (bounded counts), sorted.
    pub waiting: Vec<(String, i64)>,
    /// Running per type, sorted.
    pub running: Vec<(String, i64)>,
    /// Attempts of the last 24 h per type.
    pub history24: Arc<Vec<HistoryCounts>>,
    /// When `history24` was read.
    pub history24_at: Option<Instant>,
    /// Singleton type names.
    pub singletons: Vec<String>,
    /// Paused types.
    pub paused: Vec<PausedRow>,
    /// Blocked reasons live nodes report.
    pub blocked: Vec<BlockedRow>,
    /// This node's engine, when it runs one.
    pub status: Option<EngineStatus>,
    /// This node's type settings.
    pub settings: Vec<TypeSettings>,
    /// Attempts per type that ended since the previous refresh.
    pub recent: Vec<HistoryCounts>,
    /// The chart ring, oldest first.
    pub samples: Arc<Vec<Sample>>,
    /// The last refresh failed with this (the data is the previous round's).
    pub error: Option<String>,
    /// When the slow reads (machines, singletons, pauses, blocked reasons) were made.
    pub slow_at: Option<Instant>,
}

/// The shared snapshot and who watches it.
pub struct Live {
    tx: watch::Sender<Arc<Snapshot>>,
    subscribers: AtomicUsize,
    poke: Notify,
    refreshes: AtomicU64,
    /// An operator write went through this server since the last slow reads.
    written: std::sync::atomic::AtomicBool,
}

/// One open event stream; dropping it unsubscribes.
pub struct Subscription {
    live: Arc<Live>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.live.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Default for Live {
    fn default() -> Self {
        Live {
            tx: watch::Sender::new(Arc::new(Snapshot::default())),
            subscribers: AtomicUsize::new(0),
            poke: Notify::new(),
            refreshes: AtomicU64::new(0),
            written: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Live {
    /// Says that an operator write went through this server: the next refresh runs at once
    /// (within the interval) and makes every read.
    pub fn written(&self) {
        self.written.store(true, Ordering::Release);
        self.poke.notify_one();
    }

    /// The snapshot now, however old.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Subscribes an event stream: the refresh runs every [`LIVE_INTERVAL`] while any is open.
    pub fn subscribe(self: &Arc<Self>) -> (watch::Receiver<Arc<Snapshot>>, Subscription) {
        self.subscribers.fetch_add(1, Ordering::AcqRel);
        self.poke.notify_one();
        (
            self.tx.subscribe(),
            Subscription {
                live: Arc::clone(self),
            },
        )
    }

    /// Open event streams.
    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Acquire)
    }

    /// Refreshes done since start.
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Acquire)
    }

    /// A snapshot at most `interval` old: asks the loop for a refresh when the current
    /// one is older, and waits for it at most [`FRESH_WAIT_MAX`].
    pub async fn fresh(&self, interval: Duration) -> Arc<Snapshot> {
        let mut rx = self.tx.subscribe();
        let cur = rx.borrow_and_update().clone();
        if cur.taken.is_some_and(|t| t.elapsed() < interval) {
            return cur;
        }
        self.poke.notify_one();
        match tokio::time::timeout(FRESH_WAIT_MAX, rx.changed()).await {
            Ok(Ok(())) => rx.borrow().clone(),
            _ => cur,
        }
    }
}

/// The shared refresh loop of one server; ends when `shutdown` fires.
pub(crate) async fn run(state: Arc<State>, shutdown: CancellationToken) {
    let mut ring: VecDeque<Sample> = VecDeque::new();
    let mut last: Option<(Instant, Timestamp)> = None;
    let mut generation = 0u64;
    let live = Arc::clone(&state.live);
    let interval = state.live_interval;
    loop {
        if let Some((at, _)) = last {
            let wait = if live.subscribers() > 0 {
                interval
            } else {
                IDLE_SAMPLE_INTERVAL.max(interval)
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until((at + wait).into()) => {}
                () = live.poke.notified() => {
                    // Asked early: still at most one refresh per interval.
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep_until((at + interval).into()) => {}
                    }
                }
            }
        }
        generation += 1;
        let prev = live.current();
        let started = Instant::now();
        let now = Timestamp::from_system(SystemTime::now());
        let since = last.map(|(_, t)| t);
        let snap = match read(&state, generation, now, since, &prev).await {
            Ok(mut snap) => {
                if let Some(sample) = sample(&snap, now, since) {
                    ring.push_back(sample);
                }
                let window = i64::try_from(CHART_WINDOW.as_millis()).unwrap_or(i64::MAX);
                while ring
                    .front()
                    .is_some_and(|s| s.at_ms < now.as_millis() - window)
                {
                    ring.pop_front();
                }
                snap.samples = Arc::new(ring.iter().cloned().collect());
                last = Some((started, now));
                snap
            }
            Err(e) => {
                tracing::debug!(error = %e, "dashboard refresh failed");
                last = Some((started, last.map_or(now, |(_, t)| t)));
                Snapshot {
                    generation,
                    taken: Some(started),
                    error: Some(e),
                    ..(*prev).clone()
                }
            }
        };
        live.refreshes.fetch_add(1, Ordering::AcqRel);
        live.tx.send_replace(Arc::new(snap));
    }
}

/// One refresh's reads.
async fn read(
    state: &State,
    generation: u64,
    now: Timestamp,
    since: Option<Timestamp>,
    prev: &Snapshot,
) -> Result<Snapshot, String> {
    let admin = &state.admin;
    let redact = |e: harmonytask::Error| harmonydb::redact(&e.to_string());
    // Its own reads, not the caches of `/metrics` and `/api/v1/types`: those answer with
    // what a scraper's own request loaded, unaffected by the dashboard.
    let counts = crate::cluster::load_counts(admin.clone())
        .await
        .map_err(redact)?;
    let written = state.live.written.swap(false, Ordering::AcqRel);
    let slow_due = written
        || prev
            .slow_at
            .is_none_or(|at| at.elapsed() >= state.live_interval * SLOW_ROUNDS);
    let (machines, singletons, paused, blocked, slow_at) = if slow_due {
        (
            admin.machines().await.map_err(redact)?,
            admin.singleton_names().await.map_err(redact)?,
            admin.paused().await.map_err(redact)?,
            admin
                .blocked(None, crate::api::dead_after())
                .await
                .map_err(redact)?,
            Some(Instant::now()),
        )
    } else {
        (
            prev.machines.clone(),
            prev.singletons.clone(),
            prev.paused.clone(),
            prev.blocked.clone(),
            prev.slow_at,
        )
    };
    // A day of history is read at most every HISTORY_COUNTS_TTL, however fast the refresh
    // runs.
    let history24 = match prev.history24_at {
        Some(at) if at.elapsed() < crate::cluster::HISTORY_COUNTS_TTL => {
            (Arc::clone(&prev.history24), Some(at))
        }
        _ => (
            crate::cluster::load_history_counts(admin.clone())
                .await
                .map_err(redact)?,
            Some(Instant::now()),
        ),
    };
    let recent = match since {
        Some(since) => Some(
            admin
                .history_counts_last(now.since(since))
                .await
                .map_err(redact)?,
        ),
        None => None,
    };
    let (status, settings) = match &state.engine {
        Some(engine) => (engine.status().await.ok(), engine.type_settings()),
        None => (None, Vec::new()),
    };
    Ok(Snapshot {
        generation,
        taken: Some(Instant::now()),
        now: Some(now),
        machines,
        waiting: counts.waiting.clone(),
        running: counts.running.clone(),
        history24: history24.0,
        history24_at: history24.1,
        singletons,
        paused,
        blocked,
        status,
        settings,
        recent: recent.unwrap_or_default(),
        samples: Arc::new(Vec::new()),
        error: None,
        slow_at,
    })
}

impl Snapshot {
    /// Waiting tasks of `name` (bounded count).
    pub fn waiting_of(&self, name: &str) -> i64 {
        lookup(&self.waiting, name)
    }

    /// Running tasks of `name`.
    pub fn running_of(&self, name: &str) -> i64 {
        lookup(&self.running, name)
    }
}

fn lookup(v: &[(String, i64)], name: &str) -> i64 {
    v.binary_search_by(|(n, _)| n.as_str().cmp(name))
        .map_or(0, |i| v[i].1)
}

/// The chart sample of a refresh: queue depth per type, and completions per second since the
/// previous refresh (none for the first, which has no previous).
fn sample(snap: &Snapshot, now: Timestamp, since: Option<Timestamp>) -> Option<Sample> {
    let since = since?;
    let secs = now.since(since).as_secs_f64().max(0.001);
    let mut per_type: BTreeMap<String, TypeSample> = BTreeMap::new();
    for (name, n) in &snap.waiting {
        per_type.entry(name.clone()).or_default().waiting = *n;
    }
    for c in &snap.recent {
        per_type.entry(c.name.clone()).or_default().done_per_s =
            (c.succeeded + c.failed) as f64 / secs;
    }
    Some(Sample {
        at_ms: now.as_millis(),
        per_type,
    })
}

/// A rendered page body.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The page title.
    pub title: String,
    /// 200, or the error's status.
    pub status: axum::http::StatusCode,
    /// The `<main>` content.
    pub html: String,
}

type RenderFuture = Shared<BoxFuture<'static, Arc<Rendered>>>;

/// Renders shared per view and snapshot number.
#[derive(Default)]
pub struct ViewCache {
    map: Mutex<HashMap<String, (u64, RenderFuture)>>,
    renders: AtomicU64,
}

impl ViewCache {
    /// The render of `key` for snapshot `generation`, made by `render` once whoever asks.
    pub async fn get<F>(&self, key: &str, generation: u64, render: F) -> Arc<Rendered>
    where
        F: FnOnce() -> BoxFuture<'static, Arc<Rendered>>,
    {
        let fut = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(key) {
                Some((g, f)) if *g == generation => f.clone(),
                _ => {
                    if map.len() >= VIEW_CACHE_MAX {
                        map.retain(|_, (g, _)| *g >= generation);
                        if map.len() >= VIEW_CACHE_MAX {
                            map.clear();
                        }
                    }
                    self.renders.fetch_add(1, Ordering::AcqRel);
                    let f = render().shared();
                    map.insert(key.to_owned(), (generation, f.clone()));
                    f
                }
            }
        };
        fut.await
    }

    /// Renders made since start.
    pub fn renders(&self) -> u64 {
        self.renders.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_render_per_view_and_generation() {
        let cache = ViewCache::default();
        let r = || {
            async {
                Arc::new(Rendered {
                    title: "t".into(),
                    status: axum::http::StatusCode::OK,
                    html: "x".into(),
                })
            }
            .boxed()
        };
        for _ in 0..5 {
            cache.get("/tasks", 1, r).await;
        }
        assert_eq!(cache.renders(), 1);
        cache.get("/history", 1, r).await;
        cache.get("/tasks", 2, r).await;
        assert_eq!(cache.renders(), 3);
    }

    #[test]
    fn throughput_is_per_second_since_the_last_sample() {
        let mut snap = Snapshot {
            waiting: vec![("a".into(), 7)],
            recent: vec![HistoryCounts {
                name: "a".into(),
                succeeded: 8,
                failed: 2,
            }],
            ..Snapshot::default()
        };
        let t0 = Timestamp::from_millis(1_000_000);
        let t1 = Timestamp::from_millis(1_005_000);
        assert_eq!(sample(&snap, t1, None), None, "the first has no previous");
        let s = sample(&snap, t1, Some(t0)).unwrap();
        assert_eq!(s.per_type["a"].waiting, 7);
        assert!((s.per_type["a"].done_per_s - 2.0).abs() < 1e-9);
        snap.waiting.clear();
        assert_eq!(lookup(&snap.waiting, "a"), 0);
    }
}
