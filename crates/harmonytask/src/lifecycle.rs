//! How a loop asks the engine to stop, without holding the engine.
//!
//! The engine's loops (heartbeat, scheduler, claim jobs) find the conditions under which the
//! node must stop — its machine row is gone (fenced), or an operator asked for a restart —
//! but the stop sequence itself (drain, release, unregister) is the engine's. They hold an
//! `Arc<dyn Supervisor>`, which the engine implements, so that no loop imports the engine.

use std::sync::Arc;

use crate::error::Error;

/// The engine's stop controls, as the loops see them.
pub(crate) trait Supervisor: Send + Sync {
    /// Stops at once: the node can no longer run tasks safely (`Error::Fenced`, or a fatal
    /// error). Running attempts are cancelled and their outcomes discarded.
    fn fail(&self, err: Error);

    /// An operator asked for a restart: drain (every running task finishes), then stop with
    /// `Error::RestartRequested`. Returns at once; the drain runs on its own task.
    fn restart(self: Arc<Self>);
}
