//! The engine's value types, at the bottom of the module graph: ids, the scheduler's view of a
//! waiting task, how an attempt ended, the rows operators read, and why work is blocked.
//!
//! Everything here is plain data (plus the row mapping `harmonydb` needs), so that the store,
//! the hints, the status snapshot and the scheduler's pure parts can share these types without
//! importing each other or the engine. It must not import any other module of the crate except
//! `resources` (the units of [`Blocked`]).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use harmonydb::{FromRow, FromValue, Row, Timestamp, ToValue, Value};

use crate::resources::{Resource, format_amount};

/// The id of a task (`harmony_task.id`), stable across retries and restarts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl ToValue for TaskId {
    fn to_value(&self) -> Value {
        Value::Int(self.0)
    }
}

impl FromValue for TaskId {
    fn from_value(value: &Value, column: &str) -> harmonydb::Result<Self> {
        i64::from_value(value, column).map(TaskId)
    }
}

/// The id of a machine (`harmony_machines.id`): new for every process start.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct MachineId(pub i64);

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl ToValue for MachineId {
    fn to_value(&self) -> Value {
        Value::Int(self.0)
    }
}

impl FromValue for MachineId {
    fn from_value(value: &Value, column: &str) -> harmonydb::Result<Self> {
        i64::from_value(value, column).map(MachineId)
    }
}

/// How long to wait before retrying after `retries` failed attempts.
#[derive(Clone, Default)]
pub enum RetryWait {
    /// Retry at once.
    #[default]
    Immediate,
    /// The same wait every time.
    Constant(Duration),
    /// `initial + retries × step`.
    Linear {
        /// Wait after the first failure.
        initial: Duration,
        /// Added per further failure.
        step: Duration,
    },
    /// `initial × factor^retries`, capped at `max`.
    Exponential {
        /// Wait after the first failure.
        initial: Duration,
        /// Growth per failure (≥ 1).
        factor: f64,
        /// Largest wait.
        max: Duration,
    },
    /// Any function of the number of failures so far.
    Custom(Arc<dyn Fn(u32) -> Duration + Send + Sync>),
}

impl fmt::Debug for RetryWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryWait::Immediate => f.write_str("Immediate"),
            RetryWait::Constant(d) => write!(f, "Constant({d:?})"),
            RetryWait::Linear { initial, step } => write!(f, "Linear({initial:?} + n×{step:?})"),
            RetryWait::Exponential {
                initial,
                factor,
                max,
            } => {
                write!(f, "Exponential({initial:?} × {factor}^n ≤ {max:?})")
            }
            RetryWait::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl RetryWait {
    /// A constant wait.
    pub fn constant(d: Duration) -> Self {
        RetryWait::Constant(d)
    }

    /// A linear wait.
    pub fn linear(initial: Duration, step: Duration) -> Self {
        RetryWait::Linear { initial, step }
    }

    /// A capped exponential wait.
    pub fn exponential(initial: Duration, factor: f64, max: Duration) -> Self {
        RetryWait::Exponential {
            initial,
            factor,
            max,
        }
    }

    /// The wait after `retries` failed attempts (the first retry gets `retries == 1`).
    pub fn wait(&self, retries: u32) -> Duration {
        let n = retries.saturating_sub(1);
        match self {
            RetryWait::Immediate => Duration::ZERO,
            RetryWait::Constant(d) => *d,
            RetryWait::Linear { initial, step } => initial.saturating_add(step.saturating_mul(n)),
            RetryWait::Exponential {
                initial,
                factor,
                max,
            } => {
                let scaled = initial.as_secs_f64()
                    * factor.max(1.0).powi(i32::try_from(n).unwrap_or(i32::MAX));
                if !scaled.is_finite() || scaled >= max.as_secs_f64() {
                    *max
                } else {
                    Duration::from_secs_f64(scaled).min(*max)
                }
            }
            RetryWait::Custom(f) => f(retries),
        }
    }
}

/// A waiting task as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Task id.
    pub id: TaskId,
    /// Creation time (FIFO order).
    pub posted: Timestamp,
    /// Last release or failure (retry waits count from it).
    pub updated: Timestamp,
    /// Failed attempts so far.
    pub retries: u32,
}

impl Candidate {
    /// A task just added at `posted`: no failures, never released.
    pub fn added(id: TaskId, posted: Timestamp) -> Self {
        Candidate {
            id,
            posted,
            updated: posted,
            retries: 0,
        }
    }
}

impl FromRow for Candidate {
    fn from_row(row: &Row) -> harmonydb::Result<Self> {
        Ok(Candidate {
            id: row.get("id")?,
            posted: row.get("posted_time")?,
            updated: row.get("update_time")?,
            retries: row.get("retries")?,
        })
    }
}

/// Operator flags read with each heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineFlags {
    /// Cordoned: claim nothing new.
    pub unschedulable: bool,
    /// Restart requested at this time.
    pub restart_requested: bool,
}

/// One machine row with its details.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineRow {
    /// Id.
    pub id: MachineId,
    /// Address.
    pub host_and_port: String,
    /// Display name.
    pub name: String,
    /// Budget (may be fractional).
    pub cpu: f64,
    /// Budget, bytes.
    pub ram: i64,
    /// Budget.
    pub gpu: f64,
    /// Last heartbeat.
    pub last_contact: Timestamp,
    /// Cordoned.
    pub unschedulable: bool,
    /// Restart requested.
    pub restart_request: Option<Timestamp>,
    /// Task types it runs.
    pub tasks: String,
    /// Tasks it owns now.
    pub running: i64,
    /// Start time.
    pub startup_time: Option<Timestamp>,
    /// Build version.
    pub version: String,
    /// Layers it loaded (comma-separated).
    pub layers: String,
}

/// A claimed task.
pub type Claimed = Candidate;

/// What a claim got.
#[derive(Debug, Clone, Default)]
pub struct ClaimOutcome {
    /// The tasks now owned by the claimer.
    pub claimed: Vec<Claimed>,
    /// The cluster-wide limit left less room than asked for.
    pub cluster_full: bool,
}

/// How one attempt ended, for the completion batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Done: delete the row; history `result = true`.
    Done,
    /// Failed, will be retried: release with `retries + 1`.
    Retry,
    /// Failed for good: delete the row.
    Fail,
    /// Preempted or shut down: release, retries unchanged.
    Release,
}

/// One attempt's outcome to record.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The task.
    pub id: TaskId,
    /// Its type.
    pub name: String,
    /// Its creation time (history `posted`).
    pub posted: Timestamp,
    /// Attempt start.
    pub work_start: Timestamp,
    /// Attempt end.
    pub work_end: Timestamp,
    /// What to do with the row.
    pub fate: Fate,
    /// History `err` ("" for a clean success).
    pub err: String,
}

/// A task row (pending or running).
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskRow {
    /// Id.
    pub id: TaskId,
    /// Type.
    pub name: String,
    /// Owner, if running.
    pub owner_id: Option<MachineId>,
    /// Owner's address.
    pub owner_host: Option<String>,
    /// Created.
    pub posted_time: Timestamp,
    /// Last release/failure.
    pub update_time: Timestamp,
    /// Failed attempts so far.
    pub retries: i64,
    /// Added by machine.
    pub added_by: i64,
    /// Predecessor (followers).
    pub previous_task: Option<i64>,
}

impl FromRow for TaskRow {
    fn from_row(row: &Row) -> harmonydb::Result<Self> {
        Ok(TaskRow {
            id: row.get("id")?,
            name: row.get("name")?,
            owner_id: row.get::<Option<i64>>("owner_id")?.map(MachineId),
            owner_host: row.get("owner_host")?,
            posted_time: row.get("posted_time")?,
            update_time: row.get("update_time")?,
            retries: row.get("retries")?,
            added_by: row.get("added_by")?,
            previous_task: row.get("previous_task")?,
        })
    }
}

/// One history row (one attempt).
#[derive(Debug, Clone, serde::Serialize, harmonydb::FromRow)]
pub struct HistoryRow {
    /// History id.
    pub id: i64,
    /// Task id.
    pub task_id: i64,
    /// Type.
    pub name: String,
    /// Task creation.
    pub posted: Timestamp,
    /// Attempt start.
    pub work_start: Timestamp,
    /// Attempt end.
    pub work_end: Timestamp,
    /// Success.
    pub result: bool,
    /// Error text.
    pub err: String,
    /// Who ran it.
    pub completed_by_host_and_port: String,
}

/// How an attempt ended, as its history row records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptResult {
    /// The task succeeded.
    Ok,
    /// A failed attempt: it counts against `max_failures`.
    Failed,
    /// Released because its node shut down; retries unchanged.
    Shutdown,
    /// Released for a time-sensitive task; retries unchanged.
    Preempted,
    /// Released because its node was cordoned (`can_yield`); retries unchanged.
    Yielded,
    /// Released because the database failed under it (connection, timeout, serialization);
    /// retries unchanged.
    DatabaseUnavailable,
    /// An operator cancelled the task (`harmony task cancel`): its row is gone, and a result
    /// its attempt returns later is discarded.
    Cancelled,
}

impl AttemptResult {
    /// The word shown in tables and JSON: `ok`, `failed`, `shutdown`, `preempted`, `yielded`,
    /// `db_unavailable`, `cancelled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::Failed => "failed",
            AttemptResult::Shutdown => "shutdown",
            AttemptResult::Preempted => "preempted",
            AttemptResult::Yielded => "yielded",
            AttemptResult::DatabaseUnavailable => "db_unavailable",
            AttemptResult::Cancelled => "cancelled",
        }
    }

    /// Whether the attempt counted as a failure (a retry used up).
    pub fn is_failure(self) -> bool {
        self == AttemptResult::Failed
    }

    /// The history `err` text the engine writes for a release of this kind (for
    /// `DatabaseUnavailable`, the start of it; the database's message follows).
    pub(crate) const fn release_text(self) -> &'static str {
        match self {
            AttemptResult::DatabaseUnavailable => "database unavailable: ",
            other => other.as_str(),
        }
    }
}

impl HistoryRow {
    /// How this attempt ended. A release writes `result = false` with one of the release
    /// texts as its error (the schema has no other column for it, as upstream).
    pub fn attempt_result(&self) -> AttemptResult {
        if self.result {
            return AttemptResult::Ok;
        }
        let db = AttemptResult::DatabaseUnavailable;
        if self.err.starts_with(db.release_text()) {
            return db;
        }
        [
            AttemptResult::Shutdown,
            AttemptResult::Preempted,
            AttemptResult::Yielded,
            AttemptResult::Cancelled,
        ]
        .into_iter()
        .find(|r| r.release_text() == self.err)
        .unwrap_or(AttemptResult::Failed)
    }
}

/// Filter of a history read (newest first).
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Only this type.
    pub name: Option<String>,
    /// Only this task.
    pub task: Option<TaskId>,
    /// Only failed attempts.
    pub failed_only: bool,
    /// At most this many rows, newest first.
    pub limit: usize,
}

/// Per-type counts of history and queue (for summaries).
#[derive(Debug, Clone, serde::Serialize, harmonydb::FromRow)]
pub struct TypeSummary {
    /// Type.
    pub name: String,
    /// Attempts recorded.
    pub attempts: i64,
    /// Successful attempts.
    pub succeeded: i64,
    /// Failed attempts.
    pub failed: i64,
    /// Mean milliseconds from post to start of the successful attempt.
    pub mean_wait_ms: f64,
    /// Mean milliseconds of attempts.
    pub mean_run_ms: f64,
}

/// Why a type with waiting tasks is not being started on this node right now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Blocked {
    /// The node is cordoned and no scheduling override applies.
    Cordoned,
    /// The per-node limit (`max`) is reached.
    AtMax {
        /// The limit.
        max: usize,
    },
    /// The cost does not fit what is free now.
    Resources {
        /// The short resource.
        resource: Resource,
        /// What one task needs (scheduler units).
        needed: u64,
        /// What is free (scheduler units).
        free: u64,
    },
    /// The cost can never fit this node's whole budget.
    NeverFits {
        /// The short resource.
        resource: Resource,
        /// What one task needs.
        needed: u64,
        /// The node's whole budget of it.
        budget: u64,
    },
    /// `can_accept` refused every candidate.
    Refused,
    /// The cluster-wide limit (`max_cluster`) is reached.
    ClusterLimit {
        /// The limit.
        max: usize,
    },
    /// Every waiting task is in its retry wait.
    RetryWait {
        /// When the first becomes eligible.
        until: Timestamp,
    },
    /// The node is shutting down or restarting.
    Draining,
    /// The last claim failed in the database; it is tried again shortly.
    ClaimFailed {
        /// The error, as logged.
        error: String,
    },
}

impl Blocked {
    /// The reason's kind, as stored in `harmony_task_blocked.reason` and used as a metric
    /// label: `cordoned`, `at_max`, `resources`, `never_fits`, `refused`, `cluster_limit`,
    /// `retry_wait`, `draining`, `claim_failed`.
    pub const fn kind(&self) -> &'static str {
        match self {
            Blocked::Cordoned => "cordoned",
            Blocked::AtMax { .. } => "at_max",
            Blocked::Resources { .. } => "resources",
            Blocked::NeverFits { .. } => "never_fits",
            Blocked::Refused => "refused",
            Blocked::ClusterLimit { .. } => "cluster_limit",
            Blocked::RetryWait { .. } => "retry_wait",
            Blocked::Draining => "draining",
            Blocked::ClaimFailed { .. } => "claim_failed",
        }
    }
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Blocked::Cordoned => f.write_str("node is cordoned"),
            Blocked::AtMax { max } => write!(f, "at max ({max} running)"),
            Blocked::Resources {
                resource,
                needed,
                free,
            } => write!(
                f,
                "needs {resource} {} / free {}",
                format_amount(*resource, *needed),
                format_amount(*resource, *free)
            ),
            Blocked::NeverFits {
                resource,
                needed,
                budget,
            } => write!(
                f,
                "never fits: needs {resource} {} / node has {}",
                format_amount(*resource, *needed),
                format_amount(*resource, *budget)
            ),
            Blocked::Refused => f.write_str("refused by can_accept"),
            Blocked::ClusterLimit { max } => write!(f, "cluster limit reached ({max} running)"),
            Blocked::RetryWait { until } => write!(f, "retry wait until {until}"),
            Blocked::Draining => f.write_str("node is draining"),
            Blocked::ClaimFailed { error } => write!(f, "claim failed, retrying: {error}"),
        }
    }
}

/// A singleton type's row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SingletonRow {
    /// Its current task, while one is pending or running.
    pub task_id: Option<TaskId>,
    /// When its last task was created.
    pub last_run_time: Option<Timestamp>,
    /// An operator asked it to run now and no node has acted on it yet.
    pub run_now_request: bool,
}

/// Rows one prune step deleted (or, for a dry run, would delete).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneCounts {
    /// `harmony_task_history` rows.
    pub history: u64,
    /// `harmony_task_args` rows.
    pub args: u64,
}

impl std::ops::AddAssign for PruneCounts {
    fn add_assign(&mut self, other: PruneCounts) {
        self.history += other.history;
        self.args += other.args;
    }
}

/// One node's reason why a type's waiting tasks do not start there, as that node last wrote it
/// (`harmony_task_blocked`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, harmonydb::FromRow)]
pub struct BlockedRow {
    /// The node.
    pub machine_id: MachineId,
    /// Its address.
    pub host_and_port: String,
    /// The type.
    pub task_name: String,
    /// [`Blocked::kind`].
    pub reason: String,
    /// The reason for humans (`needs ram 54 GiB / free 12 GiB`).
    pub detail: String,
    /// Since when the node has given this reason.
    pub since: Timestamp,
}

/// A type paused cluster-wide (`harmony task pause`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, harmonydb::FromRow)]
pub struct PausedRow {
    /// The type.
    pub task_name: String,
    /// When.
    pub paused_at: Timestamp,
    /// Who asked (the CLI's user and host, or the API client).
    pub paused_by: String,
}

/// Where a task is, for `harmony task why` and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// In `harmony_task` with no owner.
    Waiting,
    /// Owned by a machine.
    Running,
    /// Gone from `harmony_task`; its last history row succeeded.
    Done,
    /// Gone; its last history row is a failure.
    Failed,
    /// Gone; cancelled by an operator.
    Cancelled,
    /// No row and no history (never existed, or its history was pruned).
    Unknown,
}

impl TaskState {
    /// The word shown in tables.
    pub const fn as_str(self) -> &'static str {
        match self {
            TaskState::Waiting => "waiting",
            TaskState::Running => "running",
            TaskState::Done => "done",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Unknown => "unknown",
        }
    }
}

/// One live node's answer for a type.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NodeWhy {
    /// The node.
    pub machine_id: MachineId,
    /// Its address.
    pub host_and_port: String,
    /// [`Blocked::kind`], or `None` when the node reports no blocker (it is claiming, or has
    /// not looked yet).
    pub reason: Option<String>,
    /// The reason for humans, or what the node is doing.
    pub detail: String,
    /// Since when it has given the reason.
    pub since: Option<Timestamp>,
}

/// Why a type's waiting tasks are (not) running, across the cluster.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TypeWhy {
    /// The type.
    pub name: String,
    /// Waiting tasks (counted up to a bound: see `waiting_capped`).
    pub waiting: i64,
    /// More are waiting than were counted.
    pub waiting_capped: bool,
    /// Running tasks.
    pub running: i64,
    /// Paused cluster-wide.
    pub paused: Option<PausedRow>,
    /// One line: the answer.
    pub summary: String,
    /// Nobody can ever run it (no live node registers it, or its cost exceeds every budget).
    pub never_runs: bool,
    /// Every live node that registers the type.
    pub nodes: Vec<NodeWhy>,
}

/// Why one task is (not) running.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskWhy {
    /// The task.
    pub id: TaskId,
    /// Its type, when known.
    pub name: Option<String>,
    /// Where it is.
    pub state: TaskState,
    /// Its owner, while running.
    pub owner: Option<MachineId>,
    /// One line: the answer.
    pub summary: String,
    /// For a waiting task, its type's answer.
    pub type_why: Option<TypeWhy>,
}

/// A task an operator cancelled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Cancelled {
    /// The task.
    pub id: TaskId,
    /// Its type.
    pub name: String,
    /// The machine that was running it, if any.
    pub owner: Option<MachineId>,
}

/// Which tasks a page lists: waiting (no owner) or running (owned), or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueState {
    /// Not owned by any machine: waiting to be claimed (or in its retry wait).
    Waiting,
    /// Owned by a machine.
    Running,
}

/// One page of pending and running tasks (see [`crate::Admin::task_page`] for the order).
#[derive(Debug, Clone, Default)]
pub struct TaskPageQuery {
    /// Only this type.
    pub name: Option<String>,
    /// Only waiting or only running tasks.
    pub state: Option<QueueState>,
    /// At most this many rows.
    pub limit: usize,
    /// Rows skipped first.
    pub offset: usize,
}

/// One page of history, newest first (see [`crate::Admin::history_page`]).
#[derive(Debug, Clone, Default)]
pub struct HistoryPageQuery {
    /// Only this type.
    pub name: Option<String>,
    /// Only failed attempts.
    pub failures_only: bool,
    /// Only rows older than this history row (its `work_end`, then its id): the cursor of
    /// the next page is the last row's id.
    pub before: Option<i64>,
    /// At most this many rows.
    pub limit: usize,
}

/// Attempts of one type that ended since some time (see [`crate::Admin::history_counts_since`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, harmonydb::FromRow)]
pub struct HistoryCounts {
    /// Type.
    pub name: String,
    /// Successful attempts.
    pub succeeded: i64,
    /// Other attempts (failed, released).
    pub failed: i64,
}
