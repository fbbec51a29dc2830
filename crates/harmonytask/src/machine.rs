//! This node as a machine of the cluster: the heartbeat that keeps it alive and reads operator
//! flags, and the reaper that removes dead machines. (The flags themselves and the ownership
//! check behind `RunContext::still_owned` are in [`crate::ownership`].)
//!
//! Liveness is decided by the database: a machine whose `last_contact` (server clock) is older
//! than `dead_after` is deleted by any node's reaper, and `ON DELETE SET NULL` releases its
//! tasks in the same statement. A node that finds its own row gone (heartbeat updates nothing,
//! or a claim violates the owner foreign key) was declared dead: it stops at once, because its
//! tasks already belong to others.
//!
//! Cordon: the heartbeat reads `unschedulable`; the scheduler then claims nothing new (overrides
//! aside) and stops the running attempts of `can_yield` types, which are released with their
//! retries unchanged, so that other nodes take them at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::lifecycle::Supervisor;
use crate::metrics::EngineMetrics;
use crate::model::MachineId;
use crate::notify::Hint;
use crate::ownership::NodeFlags;
use crate::scheduler::inbox::{Inbox, Msg};
use crate::scheduler::state::{Event, RunningCounts};
use crate::store::Store;
use crate::store::prelude::*;

/// Bumps this machine's `last_contact` every `heartbeat_interval` and picks up operator flags.
pub(crate) struct Heartbeat {
    pub store: Store,
    pub machine: MachineId,
    pub interval: Duration,
    /// Wakes it early (a notification said operator flags may have changed).
    pub wake: Arc<Notify>,
    pub flags: Arc<NodeFlags>,
    pub inbox: Arc<Inbox>,
    pub supervisor: Arc<dyn Supervisor>,
    /// Running attempts: while there are any, each beat also reads which tasks this node
    /// still owns, so that an attempt whose task was cancelled (or taken over) stops even
    /// without notifications.
    pub counts: watch::Receiver<RunningCounts>,
}

impl Heartbeat {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let s = &self;
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                // Operator flags may have changed (a notification said so): read them now.
                () = s.wake.notified() => {}
            }
            match s.store.machine_heartbeat(s.machine).await {
                Ok(Some(flags)) => {
                    // The flag is set before the scheduler hears of it, so an attempt it starts
                    // in between sees the flag through `still_owned` (`Ownership::check`).
                    let was = s.flags.cordoned.swap(flags.unschedulable, Ordering::AcqRel);
                    if was != flags.unschedulable {
                        tracing::info!(cordoned = flags.unschedulable, "scheduling flag changed");
                        s.inbox.send(Msg::CordonChanged).await;
                        s.inbox.nudge();
                    }
                    if flags.restart_requested
                        && !s.flags.restart_requested.swap(true, Ordering::AcqRel)
                    {
                        tracing::info!("restart requested: draining, then exiting");
                        Arc::clone(&s.supervisor).restart();
                    }
                }
                Ok(None) => {
                    s.supervisor.fail(Error::Fenced(s.machine.0));
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; will retry"),
            }
            if s.counts.borrow().total > 0 {
                let asked = tokio::time::Instant::now();
                match s.store.task_owned(s.machine).await {
                    Ok(owned) => s.inbox.offer(Event::Owned {
                        owned: owned.into_iter().collect(),
                        asked,
                    }),
                    Err(e) => tracing::debug!(error = %e, "reading the owned tasks failed"),
                }
            }
        }
    }
}

/// Deletes dead machines every `reaper_interval`; their tasks become claimable at once.
pub(crate) struct Reaper {
    pub store: Store,
    pub machine: MachineId,
    pub interval: Duration,
    pub dead_after: Duration,
    /// Tell other nodes (Postgres) that machines were reaped.
    pub notify: bool,
    pub metrics: EngineMetrics,
    pub inbox: Arc<Inbox>,
}

impl Reaper {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let s = &self;
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match s.store.machine_reap(s.dead_after).await {
                Ok(reaped) if !reaped.is_empty() => {
                    for (id, host) in &reaped {
                        tracing::warn!(machine = %id, host = %host, "machine missed heartbeats; declared dead, its tasks are released");
                    }
                    s.metrics.reaped(reaped.len() as u64);
                    s.inbox.request_poll();
                    if s.notify
                        && let Err(e) = s.store.notify(&Hint::Machines.payload(s.machine)).await
                    {
                        tracing::debug!(error = %e, "could not notify other nodes of reaped machines");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reaper failed; will retry"),
            }
        }
    }
}
