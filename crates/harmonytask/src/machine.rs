//! This node as a machine of the cluster: its flags, the heartbeat that keeps it alive and
//! reads operator flags, the reaper that removes dead machines, and the ownership check behind
//! `RunContext::still_owned`.
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
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::engine::Shared;
use crate::error::Error;
use crate::store::Store;
use crate::store::prelude::*;
use crate::task::{MachineId, TaskId};

/// Node state read by running tasks and the scheduler.
#[derive(Debug, Default)]
pub(crate) struct NodeFlags {
    /// `harmony_machines.unschedulable`, as of the last heartbeat.
    pub cordoned: AtomicBool,
    /// Shutting down or restarting: no new claims.
    pub draining: AtomicBool,
    /// An operator asked for a restart.
    pub restart_requested: AtomicBool,
}

impl NodeFlags {
    pub(crate) fn cordoned(&self) -> bool {
        self.cordoned.load(Ordering::Acquire)
    }

    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// The `still_owned` rule of one task type on this node.
pub(crate) struct Ownership {
    pub store: Store,
    pub machine: MachineId,
    pub flags: Arc<NodeFlags>,
    pub can_yield: bool,
    pub uninterruptible: bool,
}

impl Ownership {
    /// Whether this node may still act as the task's owner; an error when the database could
    /// not say.
    pub(crate) async fn check(&self, task: TaskId) -> Result<bool, harmonydb::Error> {
        if self.can_yield && self.flags.cordoned() {
            return Ok(false);
        }
        if self.uninterruptible && self.flags.draining() {
            return Ok(false);
        }
        match self.store.task_owner(task).await {
            Ok(Some(Some(owner))) => Ok(owner == self.machine),
            Ok(_) => Ok(false),
            Err(Error::Db(e)) => Err(e),
            Err(e) => Err(harmonydb::Error::external(e)),
        }
    }
}

/// Bumps this machine's `last_contact` every `heartbeat_interval` and picks up operator flags.
pub(crate) struct Heartbeat {
    pub shared: Arc<Shared>,
}

impl Heartbeat {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let s = &self.shared;
        let mut tick = tokio::time::interval(s.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                // Operator flags may have changed (a notification said so): read them now.
                () = s.wake_heartbeat.notified() => {}
            }
            match s.store.machine_heartbeat(s.machine).await {
                Ok(Some(flags)) => {
                    // The flag is set before the scheduler hears of it, so an attempt it starts
                    // in between sees the flag and yields at once (see `Scheduler::start`).
                    let was = s.flags.cordoned.swap(flags.unschedulable, Ordering::AcqRel);
                    if was != flags.unschedulable {
                        tracing::info!(cordoned = flags.unschedulable, "scheduling flag changed");
                        s.send(crate::scheduler::Msg::CordonChanged).await;
                        s.nudge();
                    }
                    if flags.restart_requested
                        && !s.flags.restart_requested.swap(true, Ordering::AcqRel)
                    {
                        tracing::info!("restart requested: draining, then exiting");
                        let shared = Arc::clone(s);
                        // Not on the tracker: the restart sequence closes and awaits the
                        // tracker, so a task on it would wait for itself. It ends with the
                        // engine (`done`), which `Engine::wait` awaits.
                        tokio::spawn(async move {
                            shared
                                .stop_with(crate::engine::StopCause::RestartRequested)
                                .await;
                        });
                    }
                }
                Ok(None) => {
                    s.fail(Error::Fenced(s.machine.0));
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed; will retry"),
            }
        }
    }
}

/// Deletes dead machines every `reaper_interval`; their tasks become claimable at once.
pub(crate) struct Reaper {
    pub shared: Arc<Shared>,
}

impl Reaper {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let s = &self.shared;
        let mut tick = tokio::time::interval(s.config.reaper_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match s.store.machine_reap(s.config.dead_after).await {
                Ok(reaped) if !reaped.is_empty() => {
                    for (id, host) in &reaped {
                        tracing::warn!(machine = %id, host = %host, "machine missed heartbeats; declared dead, its tasks are released");
                    }
                    s.metrics.reaped(reaped.len() as u64);
                    s.request_poll();
                    if s.config.notify
                        && let Err(e) = s
                            .store
                            .notify(&crate::notify::Hint::Machines.payload(s.machine))
                            .await
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
