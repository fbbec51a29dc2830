//! The engine's error type.

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
    /// A task type's details are invalid (bad cost, bad retry settings, …).
    #[error("{0}")]
    InvalidType(String),
    /// Two registered types have the same name.
    #[error("task type {0} is registered twice")]
    DuplicateType(String),
    /// `may_follow` declarations form a cycle.
    #[error("may_follow cycle: {0}")]
    FollowCycle(String),
    /// A type is used that no node (or this node) runs.
    #[error("unknown task type {0:?}")]
    UnknownType(String),
    /// A run-now request for a type that no node registered as a singleton.
    #[error(
        "task type {0:?} is not a singleton (no node has registered it as one); run-now only applies to singleton types"
    )]
    NotSingleton(String),
    /// A task does not exist or is not in the state the operation needs.
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
    #[error("{0}")]
    Config(String),
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
