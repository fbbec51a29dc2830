//! Wake-ups across nodes. Hints only: the database stays the authority, and a lost hint costs
//! latency (the next poll finds the work), never correctness.
//!
//! * **Postgres**: statements that create or free work send `pg_notify('harmony', hint)` inside
//!   their own transaction, so the hint is delivered exactly when the work becomes visible. Each
//!   node keeps one `LISTEN` connection; when it breaks, the node marks notifications unhealthy
//!   (the safety-net poll drops from 30 s to 3 s), reconnects with backoff, and polls once on
//!   recovery to pick up whatever it missed.
//! * **SQLite**, several processes on one file: there is no NOTIFY. The listener reads
//!   `PRAGMA data_version` of the writer connection every `change_check_interval`; it changes
//!   only when another connection commits, and then the node polls.
//! * **Through a relay** (`Db::with_relay`; `harmony run --notify http` for YugabyteDB,
//!   CockroachDB or PgBouncer in transaction mode): the store's hints are the same, but
//!   `harmonydb` hands them to the relay after the commit instead of `pg_notify`, and
//!   `Db::listen` reads the relay's inbound side, which `harmony-peer`'s HTTP route feeds.
//!   Nothing here changes.
//! * **Off** (`EngineConfig::notify = false`): no hints are sent or read; the node polls every
//!   `poll_interval_unhealthy`.
//!
//! Hint payloads are short text: `add:TYPE:FROM`, `addt:TYPE:FROM:ID:POSTED_MS`, `rel:TYPE:FROM`,
//! `follow:TYPE:FROM`, `runnow:TYPE:FROM`, `machines:FROM`, where FROM is the sending machine
//! (0 for a client), so a node ignores its own hints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use harmonydb::Db;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::follow::FollowWake;
pub(crate) use crate::hint::{CHANNEL, Hint};
use crate::model::{Candidate, MachineId};
use crate::scheduler::inbox::Inbox;
use crate::scheduler::state::Event;

/// How long a notification connection must stay up for its loss to reset the reconnect backoff.
const LISTEN_STABLE: Duration = Duration::from_secs(10);

/// First wait before reconnecting the listener.
const RECONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
/// Longest wait between reconnection attempts of the listener.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The safety-net poll interval, which depends on whether notifications are flowing. The
/// listener sets it; the scheduler and the follower loop read it.
pub(crate) struct PollPace {
    healthy: AtomicBool,
    interval: Duration,
    interval_unhealthy: Duration,
}

impl PollPace {
    /// Starts unhealthy (polling fast) until the listener is up.
    pub(crate) fn new(interval: Duration, interval_unhealthy: Duration) -> Self {
        PollPace {
            healthy: AtomicBool::new(false),
            interval,
            interval_unhealthy,
        }
    }

    /// Sets the health; whether it changed.
    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::AcqRel) != healthy
    }

    /// Whether notifications flow now.
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// The safety-net poll interval in force now.
    pub(crate) fn interval(&self) -> Duration {
        if self.healthy.load(Ordering::Acquire) {
            self.interval
        } else {
            self.interval_unhealthy
        }
    }
}

/// Receives hints and turns them into scheduler events, with only what it uses.
pub(crate) struct Listener {
    pub db: Db,
    pub machine: MachineId,
    pub inbox: Arc<Inbox>,
    pub pace: Arc<PollPace>,
    /// How often SQLite's `data_version` is read.
    pub change_check_interval: Duration,
    /// Wakes the heartbeat (operator flags may have changed).
    pub wake_heartbeat: Arc<Notify>,
    pub followers: FollowWake,
}

impl Listener {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let s = &self;
        let mut backoff = Backoff::new(RECONNECT_BACKOFF_INITIAL, RECONNECT_BACKOFF_MAX);
        loop {
            let failed = match s.db.listen(&[CHANNEL]).await {
                Ok(Some(mut listener)) => {
                    let connected = std::time::Instant::now();
                    s.set_healthy(true);
                    // Whatever was sent while we were not listening is found by a poll.
                    s.inbox.request_poll();
                    let mut dropped = 0;
                    loop {
                        let n = tokio::select! {
                            () = shutdown.cancelled() => return,
                            n = listener.recv() => n,
                        };
                        let Some(n) = n else { break };
                        if listener.dropped() != dropped {
                            dropped = listener.dropped();
                            s.inbox.request_poll();
                        }
                        if let Some((hint, from)) = Hint::parse(&n.payload)
                            && from != s.machine
                        {
                            self.handle(hint).await;
                        }
                    }
                    s.set_healthy(false);
                    // A connection that stayed up a while resets the backoff; one that keeps
                    // dying at once (a killed or refused session) backs off further.
                    if connected.elapsed() >= LISTEN_STABLE {
                        backoff.reset();
                    }
                    tracing::warn!(
                        "notification connection lost; polling every {:?} until it is back",
                        s.pace.interval_unhealthy
                    );
                    None
                }
                Ok(None) => {
                    self.watch_sqlite(&shutdown).await;
                    return;
                }
                Err(e) => {
                    s.set_healthy(false);
                    Some(e)
                }
            };
            let wait = backoff.next_wait();
            if let Some(e) = failed {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot open the notification connection");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn handle(&self, hint: Hint) {
        let s = self;
        match hint {
            Hint::Added {
                name,
                task: Some((id, posted)),
            } => {
                if let Some(ty) = s.inbox.type_index(&name) {
                    let c = Candidate {
                        id,
                        posted,
                        updated: posted,
                        retries: 0,
                    };
                    s.inbox.offer(Event::Added { ty, tasks: vec![c] });
                }
            }
            Hint::Added { name, task: None } | Hint::Released { name } => {
                s.inbox.wake_type(&name);
            }
            Hint::Follow { from } => s.followers.wake(Some(&from)),
            Hint::RunNow { name } => s.inbox.run_now(&name),
            Hint::Machines => {
                s.wake_heartbeat.notify_one();
                s.inbox.request_poll();
            }
            Hint::Cancel { task } => s.inbox.offer(Event::Lost { ids: vec![task] }),
        }
    }

    /// SQLite: poll when another connection committed.
    async fn watch_sqlite(&self, shutdown: &CancellationToken) {
        let s = self;
        s.set_healthy(true);
        let mut last: Option<i64> = None;
        let mut tick = tokio::time::interval(s.change_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match s.db.data_version().await {
                Ok(Some(v)) => {
                    if last.is_none() {
                        // Commits before this first reading are not detected as changes: look
                        // once now that the baseline is set.
                        s.inbox.request_poll();
                        s.followers.wake(None);
                    }
                    if last.is_some_and(|l| l != v) {
                        s.inbox.request_poll();
                        s.followers.wake(None);
                        s.wake_heartbeat.notify_one();
                    }
                    last = Some(v);
                }
                Ok(None) => return,
                Err(e) => tracing::debug!(error = %e, "change check failed"),
            }
        }
    }
}

impl Listener {
    /// Records whether notifications flow; a change wakes the scheduler, whose poll interval
    /// depends on it.
    fn set_healthy(&self, healthy: bool) {
        if self.pace.set_healthy(healthy) {
            self.inbox.nudge();
        }
    }
}
