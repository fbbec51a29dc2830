//! What this node is allowed to do right now: its operator and lifecycle flags, and the
//! `still_owned` rule that running tasks ask through `RunContext::still_owned`.
//!
//! The heartbeat writes the flags; the scheduler and running tasks read them. The ownership
//! rule asks the database, which is the authority: a task belongs to this node only while its
//! row says `owner_id = this machine`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::Error;
use crate::model::{MachineId, TaskId};
use crate::store::Store;
use crate::store::prelude::*;

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
