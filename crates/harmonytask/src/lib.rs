//! HarmonyTask: a pure, distributed, resource-aware task engine on SQL.
//!
//! Tasks are rows in `harmony_task`. Every node registers the task types it can run and
//! greedily claims the tasks that fit its CPU / RAM / GPU / storage budget. The database is the
//! single authority: a claim is one atomic statement, every outcome is recorded in a
//! transaction fenced by `owner_id = this machine`, and a dead node's tasks are released by
//! deleting its machine row. So a task never has two live owners, and nothing is lost when a
//! node dies.
//!
//! ```no_run
//! # use harmonytask::*;
//! # struct Seal;
//! # #[async_trait::async_trait] impl Task for Seal {
//! #   fn type_details(&self) -> TypeDetails { TypeDetails::new("Seal") }
//! #   async fn run(&self, _: TaskId, _: RunContext) -> Result<Done, TaskError> { Ok(Done(true)) }
//! # }
//! # async fn demo(db: harmonydb::Db) -> harmonytask::Result<()> {
//! let engine = Engine::builder(db).register(Seal).start().await?;
//! engine.add_task("Seal", |_id, _tx| async { Ok(true) }).await?;
//! engine.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! Code map: [`task`] (the programming model), [`engine`] (start, add, shutdown), `scheduler`
//! (the decisions without I/O in `SchedulerState`, and the actor that performs them),
//! `runner` (one attempt), `recorder` (batched, fenced outcomes), `machine` (heartbeat,
//! reaper), `ownership` (node flags, the `still_owned` rule), [`retention`] (history pruning,
//! one node at a time), `store` (all engine SQL, crate-private), [`Admin`] (the operator's
//! reads and writes), [`model`] (value types), [`resources`]. The layers and their rules are
//! in `ARCHITECTURE.md`. The deterministic simulator is the crate's own test module
//! `simulation`.

mod admin;
mod backoff;
mod client;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod follow;
mod follower;
pub mod graph;
mod hint;
mod lifecycle;
mod machine;
pub mod metrics;
pub mod model;
mod name;
mod notify;
mod ownership;
mod recorder;
mod registry;
mod reporter;
pub mod resources;
pub mod retention;
mod runner;
pub mod scheduler;
#[cfg(test)]
mod simulation;
pub mod singleton;
pub mod status;
pub(crate) mod store;
pub mod task;
mod why;

pub use admin::Admin;
pub use async_trait::async_trait;
pub use client::{Client, TaskAdder};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::EngineConfig;
pub use engine::{CompleteCallback, Engine, EngineBuilder};
pub use error::{ConfigError, CostError, Error, Result, TypeError};
pub use follow::{Follow, FollowAdd};
pub use hint::CONFIG_CHANNEL;
pub use model::{
    AttemptResult, Blocked, BlockedRow, Cancelled, ConfigLayer, ConfigLayerRow, ConfigVersion,
    HistoryCounts, HistoryPageQuery, HistoryQuery, HistoryRow, MachineRow, NodeWhy, PausedRow,
    PruneCounts, QueueState, SingletonRow, StorageKind, StorageNeed, StoragePathRow, TaskPageQuery,
    TaskRow, TaskState, TaskWhy, TypeSummary, TypeWhy,
};
pub use resources::{ByteSize, Resource, Resources};
pub use retention::{PruneOutcome, PruneReport, PruneRule};
pub use singleton::{BoredContext, IAmBored, singleton};
pub use status::{EngineStatus, RunningTask, TypeSettings, TypeStatus};
pub use store::{Reserved, StorageAttach};
pub use task::{
    Done, EngineView, Limiter, MachineId, RetryWait, RunContext, TASK_NAME_MAX, Task, TaskError,
    TaskId, TypeDetails, validate_name,
};
