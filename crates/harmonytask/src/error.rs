//! The engine's error type.

pub use crate::resources::CostError;

/// `Result` with the engine's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database operation failed.
    #[error(transparent)]
    Db(#[from] harmonydb::Error),
    /// A task type name breaks the naming rules.
    #[error("{0}")]
    InvalidName(String),
    /// A task type's details are invalid (bad cost, bad retry settings, a `may_follow` cycle).
    #[error(transparent)]
    InvalidType(#[from] TypeError),
    /// Two registered types have the same name.
    #[error("task type {0} is registered twice")]
    DuplicateType(String),
    /// A type is used that no node (or this node) runs.
    #[error("unknown task type {0:?}")]
    UnknownType(String),
    /// A run-now request for a type that no node registered as a singleton.
    #[error(
        "task type {0:?} is not a singleton (no node has registered it as one); run-now only applies to singleton types"
    )]
    NotSingleton(String),
    /// A task that is neither pending, running nor in the history.
    #[error("task {0} does not exist")]
    TaskNotFound(crate::model::TaskId),
    /// A restart of a task that is still pending or running.
    #[error("task {id} ({name}) is still queued or running; only failed tasks can be restarted")]
    TaskActive {
        /// The task.
        id: crate::model::TaskId,
        /// Its type.
        name: String,
    },
    /// A restart of a task whose last attempt succeeded.
    #[error("task {id} ({name}) completed successfully; there is nothing to restart")]
    TaskSucceeded {
        /// The task.
        id: crate::model::TaskId,
        /// Its type.
        name: String,
    },
    /// A transaction that should have decided an operation did not (an internal invariant
    /// failed); the text says which operation.
    #[error("{0}")]
    Task(String),
    /// This node's machine row was deleted (another node declared it dead): it must stop,
    /// because the tasks it was running now belong to other nodes.
    #[error("this node (machine {0}) was declared dead by the cluster and must stop")]
    Fenced(i64),
    /// Another machine is alive at the address this node registers with (its `--listen`):
    /// two live nodes never share an address, so this node does not start.
    #[error(
        "address {host_and_port} is in use by live machine {machine} (last heartbeat {seconds_since_contact:.1} s ago; a machine silent for dead-after, {dead_after:?}, is dead and frees its address); give this node its own address, or stop that node first"
    )]
    AddressInUse {
        /// The address.
        host_and_port: String,
        /// The live machine registered there.
        machine: i64,
        /// Seconds since that machine's last heartbeat (database clock).
        seconds_since_contact: f64,
        /// This node's dead-after setting.
        dead_after: std::time::Duration,
    },
    /// An operator action named a machine that is not registered (it stopped or was reaped).
    #[error("machine {0} is not registered")]
    MachineNotFound(crate::model::MachineId),
    /// An operator asked this node to restart; it has drained.
    #[error("restart requested")]
    RestartRequested,
    /// The engine is shutting down or has stopped.
    #[error("the engine has stopped")]
    Stopped,
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// A field of [`EngineConfig`](crate::EngineConfig) that is out of range. Callers that set
/// the field from somewhere else (a flag, a config file) map [`field`](Self::field) back to it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {problem}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The field's name in `EngineConfig` (`poll_interval`, `dead_after`, `budget`, …).
    pub field: &'static str,
    /// What is wrong with it, as a phrase that follows the field's name.
    pub problem: String,
    /// For `budget`: which amount is out of range.
    pub cost: Option<CostError>,
}

impl ConfigError {
    /// A budget with an amount out of range.
    pub(crate) fn budget(cost: CostError) -> Self {
        ConfigError {
            field: "budget",
            problem: format!("is invalid: {cost}"),
            cost: Some(cost),
        }
    }

    pub(crate) fn new(field: &'static str, problem: impl Into<String>) -> Self {
        ConfigError {
            field,
            problem: problem.into(),
            cost: None,
        }
    }
}

/// What is wrong with a task type's declaration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TypeError {
    /// Its cost is out of range.
    #[error("task type {name}: cost: {cost}")]
    Cost {
        /// The type.
        name: String,
        /// The amount.
        cost: CostError,
    },
    /// An exponential retry wait's factor is below 1 or not a number.
    #[error("task type {name}: retry_wait factor must be a finite number ≥ 1, got {factor}")]
    RetryFactor {
        /// The type.
        name: String,
        /// The factor.
        factor: f64,
    },
    /// A timeout of zero.
    #[error("task type {name}: timeout must be positive (leave it unset for none)")]
    ZeroTimeout {
        /// The type.
        name: String,
    },
    /// It names another type (`may_follow`, `follows`, a scheduling override) by an invalid
    /// name.
    #[error("task type {name}: {problem}")]
    BadReference {
        /// The type.
        name: String,
        /// Why the name it refers to is invalid.
        problem: String,
    },
    /// `may_follow` declarations form a cycle: `path` starts and ends with the same type.
    #[error("may_follow cycle: {}", path.join(" -> "))]
    FollowsCycle {
        /// The types on the cycle, the first repeated at the end.
        path: Vec<String>,
    },
}

impl Error {
    /// The database error kind, when this is a database error.
    pub fn db_kind(&self) -> Option<harmonydb::ErrorKind> {
        match self {
            Error::Db(e) => Some(e.kind()),
            _ => None,
        }
    }
}
