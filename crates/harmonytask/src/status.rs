//! A node's read-only status: what runs, what is reserved, and why waiting work is not
//! starting.

use serde::Serialize;

use crate::model::{Blocked, MachineId, TaskId};
use crate::resources::Resources;

/// Snapshot of one engine.
#[derive(Debug, Clone, Serialize)]
pub struct EngineStatus {
    /// This node's machine id.
    pub machine_id: MachineId,
    /// Its address.
    pub host_and_port: String,
    /// Its budget.
    pub budget: Resources,
    /// What running tasks and in-flight claims hold.
    pub reserved: Resources,
    /// Cordoned by an operator.
    pub cordoned: bool,
    /// Shutting down or restarting.
    pub draining: bool,
    /// Attempts running now.
    pub running: Vec<RunningTask>,
    /// Every registered type.
    pub types: Vec<TypeStatus>,
}

/// One running attempt.
#[derive(Debug, Clone, Serialize)]
pub struct RunningTask {
    /// Task id.
    pub id: TaskId,
    /// Type.
    pub name: String,
    /// Milliseconds since it started.
    pub running_for_ms: u64,
}

/// One registered type on this node.
#[derive(Debug, Clone, Serialize)]
pub struct TypeStatus {
    /// Type name.
    pub name: String,
    /// Waiting tasks in this node's view (at most the view size).
    pub waiting_known: usize,
    /// More may wait in the database than the view holds.
    pub more_waiting: bool,
    /// Running here.
    pub running: usize,
    /// Why waiting tasks are not starting here, if they are not.
    pub blocked: Option<Blocked>,
    /// The same, for humans.
    pub blocked_text: Option<String>,
    /// What one task costs.
    pub cost: Resources,
}

/// A registered type's settings on this node, as declared at registration (they live in the
/// node's registry, not the database: another node may register the same type otherwise).
#[derive(Debug, Clone, Serialize)]
pub struct TypeSettings {
    /// Type name.
    pub name: String,
    /// What one task costs.
    pub cost: Resources,
    /// Per-node limit on running tasks (`None`: unlimited), possibly shared with other types.
    pub max: Option<usize>,
    /// Cluster-wide limit on running tasks (0 = none).
    pub max_cluster: usize,
    /// Attempts before a task fails for good (0 = retry forever).
    pub max_failures: u32,
    /// The wait before a retry, for humans (`Constant(30s)`).
    pub retry_wait: String,
    /// Per-attempt deadline.
    pub timeout_ms: Option<u64>,
    /// Registered as a singleton.
    pub singleton: bool,
    /// Runs first and may preempt.
    pub time_sensitive: bool,
}
