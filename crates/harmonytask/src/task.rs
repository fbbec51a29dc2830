//! The programming model: what a task type implements and declares.
//!
//! A task type is a [`Task`] implementation plus the [`TypeDetails`] it returns once, at
//! registration. The engine calls [`Task::run`] for each claimed task on its own tokio task and
//! records the outcome; [`Task::can_accept`] lets a type refuse candidates it cannot take now.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use harmonydb::Db;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result, TypeError};
pub use crate::model::{MachineId, RetryWait, TaskId};
pub use crate::name::{TASK_NAME_MAX, validate_name};
use crate::resources::Resources;

/// What a finished attempt says: `Done(true)` ends the task; `Done(false)` is a failed
/// attempt (retried per the type's `max_failures` and `retry_wait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done(pub bool);

/// A failed attempt's reason. Build one from any error with `?` or from text with
/// [`TaskError::new`]; the message is stored (bounded) in `harmony_task_history.err`.
///
/// A database error returned unchanged (`ctx.db().exec(..).await?`, or through
/// [`TaskError::database`] when adding context) keeps its [`harmonydb::ErrorKind`]. When that
/// kind is transient (connection, timeout, serialization) the attempt is not counted: the task
/// is released with its retries unchanged and runs again once the database is back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    db_kind: Option<harmonydb::ErrorKind>,
}

impl TaskError {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> Self {
        TaskError {
            message: message.into(),
            db_kind: None,
        }
    }

    /// A failure caused by a database error, with what was being done: the message is
    /// `"{context}: {error}"` and the error's kind is kept.
    pub fn database(context: impl fmt::Display, error: &harmonydb::Error) -> Self {
        TaskError {
            message: format!("{context}: {error}"),
            db_kind: Some(error.kind()),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The kind of the database error behind this failure, when there is one.
    pub fn db_kind(&self) -> Option<harmonydb::ErrorKind> {
        self.db_kind
    }

    /// Whether the failure is the database's, not the task's: a transient database error
    /// (see [`harmonydb::ErrorKind::is_transient`]).
    pub fn is_database_unavailable(&self) -> bool {
        self.db_kind.is_some_and(harmonydb::ErrorKind::is_transient)
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + 'static> From<E> for TaskError {
    fn from(e: E) -> Self {
        // Only an error returned as it came from the database keeps its kind: once a task wraps
        // it in an error of its own, the task has decided what the failure means.
        let any: &(dyn std::error::Error + 'static) = &e;
        let db_kind = any
            .downcast_ref::<harmonydb::Error>()
            .map(harmonydb::Error::kind)
            .or_else(|| any.downcast_ref::<Error>().and_then(Error::db_kind));
        // Keep the whole chain: "reading input: file not found".
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        TaskError { message, db_kind }
    }
}

/// A per-node concurrency limit that several task types may share: each type holding a clone
/// counts against the same `n`.
#[derive(Clone)]
pub struct Limiter {
    id: Arc<()>,
    max: usize,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Limiter(max {})", self.max)
    }
}

impl Limiter {
    /// A limit of `max` running tasks (0 = unlimited).
    pub fn new(max: usize) -> Self {
        Limiter {
            id: Arc::new(()),
            max,
        }
    }

    /// The limit (0 = unlimited).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Identity shared by clones.
    pub(crate) fn key(&self) -> usize {
        Arc::as_ptr(&self.id) as usize
    }
}

/// A task type's declaration, read once at registration.
#[derive(Clone, Debug)]
pub struct TypeDetails {
    /// 1–16 characters of `[A-Za-z0-9_:]`.
    pub name: String,
    /// Per-node concurrency limit, possibly shared with other types (`None` = unlimited).
    pub max: Option<Limiter>,
    /// Cluster-wide limit on running tasks of this type, enforced in the claim (0 = none).
    pub max_cluster: usize,
    /// What one running task takes from the node's budget.
    pub cost: Resources,
    /// Storage one task reserves on a path of the claiming node for its life (`None`: none).
    /// A task is claimed only when a path has room; the reservation ends with the task.
    pub storage: Option<crate::model::StorageNeed>,
    /// Total attempts before the task fails for good (0 = retry forever).
    pub max_failures: u32,
    /// Wait before a retry.
    pub retry_wait: RetryWait,
    /// Per-attempt deadline; an attempt that runs longer fails with a timeout.
    pub timeout: Option<Duration>,
    /// Types whose tasks this type's tasks usually follow (ordering hint: finish pipelines
    /// before starting new ones).
    pub may_follow: Vec<String>,
    /// Runs before other types and may preempt ordinary work.
    pub time_sensitive: bool,
    /// Never preempted; awaited at shutdown.
    pub uninterruptible: bool,
    /// Gives way when the node is cordoned: the engine cancels its running attempts (the
    /// cancellation token fires, `still_owned()` is false) and releases them with retries
    /// unchanged (history `err = "yielded"`), and claims none on a cordoned node, whatever
    /// `scheduling_overrides` say.
    pub can_yield: bool,
    /// Types whose waiting work lets this type be claimed even on a cordoned node.
    pub scheduling_overrides: Vec<String>,
    /// Completions of other types that create tasks (of this type, usually).
    pub follows: Vec<crate::follow::Follow>,
    /// Called when the node has spare capacity for the type (see [`crate::singleton`]).
    pub iambored: Option<crate::singleton::IAmBored>,
}

impl TypeDetails {
    /// Details with defaults: unlimited, free, retry forever at once.
    pub fn new(name: impl Into<String>) -> Self {
        TypeDetails {
            name: name.into(),
            max: None,
            max_cluster: 0,
            cost: Resources::default(),
            storage: None,
            max_failures: 0,
            retry_wait: RetryWait::Immediate,
            timeout: None,
            may_follow: Vec::new(),
            time_sensitive: false,
            uninterruptible: false,
            can_yield: false,
            scheduling_overrides: Vec::new(),
            follows: Vec::new(),
            iambored: None,
        }
    }

    /// Makes the type a cluster-wide singleton run at most every `min_interval`.
    pub fn singleton(mut self, min_interval: Duration) -> Self {
        self.iambored = Some(crate::singleton::singleton(min_interval));
        self
    }

    /// Adds one task of this type for every successful completion of `from`.
    pub fn follows(mut self, from: impl Into<String>) -> Self {
        self.follows.push(crate::follow::Follow::chain(from));
        self
    }

    /// Checks the declaration; the error names the field and what is wrong.
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        let name = || self.name.clone();
        self.cost
            .validate()
            .map_err(|cost| TypeError::Cost { name: name(), cost })?;
        if let RetryWait::Exponential { factor, .. } = self.retry_wait
            && !(factor.is_finite() && factor >= 1.0)
        {
            return Err(TypeError::RetryFactor {
                name: name(),
                factor,
            }
            .into());
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(TypeError::ZeroTimeout { name: name() }.into());
        }
        let follow_names: Vec<String> = self.follows.iter().map(|f| f.from.clone()).collect();
        for other in self
            .may_follow
            .iter()
            .chain(&self.scheduling_overrides)
            .chain(&follow_names)
        {
            validate_name(other).map_err(|e| TypeError::BadReference {
                name: name(),
                problem: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// What a running task can ask of the engine.
#[derive(Clone)]
pub struct RunContext {
    pub(crate) task: TaskId,
    pub(crate) name: Arc<str>,
    pub(crate) retries: u32,
    pub(crate) db: Db,
    pub(crate) cancel: CancellationToken,
    pub(crate) ownership: Arc<crate::ownership::Ownership>,
    pub(crate) meta: Arc<std::sync::Mutex<HashMap<String, String>>>,
    pub(crate) machine: MachineId,
    /// The last transient database error met by one of the engine's own reads for this attempt
    /// (`args`, `still_owned`), whatever the task then made of it.
    pub(crate) db_trouble: Arc<std::sync::Mutex<Option<String>>>,
    /// The arguments, where the claim returned them (no read needed).
    pub(crate) claimed_args: Option<Arc<HashMap<String, String>>>,
}

impl RunContext {
    /// This task's id.
    pub fn task_id(&self) -> TaskId {
        self.task
    }

    /// The storage path reserved for this task on this node (its type declares
    /// [`TypeDetails::storage`]), or `None`.
    pub async fn storage_path(&self) -> crate::error::Result<Option<std::path::PathBuf>> {
        Ok(crate::store::Store::new(self.db.clone())
            .storage_of_task(self.task, self.machine)
            .await?
            .map(std::path::PathBuf::from))
    }

    /// This task's type name.
    pub fn task_name(&self) -> &str {
        &self.name
    }

    /// Failed attempts before this one.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// The machine running this attempt.
    pub fn machine_id(&self) -> MachineId {
        self.machine
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Fired when the attempt must stop: preemption, shutdown, a cordon (for a `can_yield`
    /// type), timeout, or loss of ownership found by the engine.
    pub fn cancelled(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether this node still owns the task. Call it before any step that only one owner may
    /// take: it is false once the attempt was cancelled, while the node is cordoned for a
    /// `can_yield` type, while the node drains for an `uninterruptible` one, and when the
    /// database says another node (or nobody) owns the task.
    pub async fn still_owned(&self) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        match self.ownership.check(self.task).await {
            Ok(owned) => owned,
            Err(e) => {
                // Unknown is not "yes": a step that only one owner may take must not run on a
                // guess. If the task gives up because of it, the database is to blame.
                tracing::warn!(task = %self.task, error = %e, "ownership check failed");
                self.note_db_error(&e);
                false
            }
        }
    }

    /// Remembers a transient failure of an engine read, so that the attempt it spoils is
    /// released instead of counted.
    fn note_db_error(&self, e: &harmonydb::Error) {
        if e.kind().is_transient()
            && let Ok(mut slot) = self.db_trouble.lock()
        {
            *slot = Some(e.to_string());
        }
    }

    /// Attaches a key/value for `on_task_complete` callbacks of this attempt.
    pub fn set_meta(&self, key: impl Into<String>, value: impl Into<String>) {
        if let Ok(mut m) = self.meta.lock() {
            m.insert(key.into(), value.into());
        }
    }

    /// The task's arguments (`harmony_task_args`), written when it was added. (On Postgres
    /// the claim returned them, so this reads nothing.)
    pub async fn args(&self) -> Result<HashMap<String, String>> {
        if let Some(args) = &self.claimed_args {
            return Ok(HashMap::clone(args));
        }
        let args = crate::store::Store::new(self.db.clone())
            .task_args(self.task)
            .await;
        if let Err(Error::Db(e)) = &args {
            self.note_db_error(e);
        }
        args
    }
}

/// Read-only information about the node, for `can_accept`.
#[derive(Clone)]
pub struct EngineView {
    pub(crate) machine: MachineId,
    pub(crate) db: Db,
    pub(crate) free: Resources,
}

impl EngineView {
    /// This node's machine id.
    pub fn machine_id(&self) -> MachineId {
        self.machine
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Resources not reserved by running tasks when the candidates were offered.
    pub fn free(&self) -> Resources {
        self.free
    }
}

/// A task type.
#[async_trait]
pub trait Task: Send + Sync + 'static {
    /// The type's declaration; read once at registration.
    fn type_details(&self) -> TypeDetails;

    /// Does the work of one attempt. Return `Ok(Done(true))` when the task is finished,
    /// `Ok(Done(false))` or an error for a failed attempt. A panic is caught and recorded as a
    /// failed attempt.
    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError>;

    /// Gets candidates oldest first; returns the ones this node will take now, in preference
    /// order. Called from several places at once, so it must be safe to call concurrently.
    /// An error or a panic counts as refusing all of them. Default: accept all.
    async fn can_accept(
        &self,
        candidates: &[TaskId],
        _engine: &EngineView,
    ) -> Result<Vec<TaskId>, TaskError> {
        Ok(candidates.to_vec())
    }

    /// Gets an adder for this type once the engine runs; keep it to add tasks later (from
    /// pollers, API handlers, …).
    fn adder(&self, _add: crate::client::TaskAdder) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("SDR").is_ok());
        assert!(validate_name("PDPv0_Prove").is_ok());
        assert!(validate_name("bg:Cleanup").is_ok());
        assert!(validate_name("abcdefghijklmnop").is_ok());
        let e = validate_name("abcdefghijklmnopq").unwrap_err().to_string();
        assert!(e.contains("17 characters") && e.contains("16"), "{e}");
        let e = validate_name("x'); DROP").unwrap_err().to_string();
        assert!(e.contains("'\\''"), "{e}");
        assert!(validate_name("").is_err());
        assert!(validate_name("naïve").is_err());
    }

    #[test]
    fn retry_waits() {
        let s = Duration::from_secs;
        assert_eq!(RetryWait::Immediate.wait(3), Duration::ZERO);
        assert_eq!(RetryWait::constant(s(2)).wait(7), s(2));
        let lin = RetryWait::linear(s(1), s(2));
        assert_eq!(lin.wait(1), s(1));
        assert_eq!(lin.wait(3), s(5));
        let exp = RetryWait::exponential(s(1), 2.0, s(10));
        assert_eq!(exp.wait(1), s(1));
        assert_eq!(exp.wait(2), s(2));
        assert_eq!(exp.wait(4), s(8));
        assert_eq!(exp.wait(5), s(10));
        assert_eq!(exp.wait(u32::MAX), s(10));
    }

    #[test]
    fn details_validation() {
        let mut d = TypeDetails::new("ok");
        assert!(d.validate().is_ok());
        d.cost.cpu = -1.0;
        assert!(d.validate().unwrap_err().to_string().contains("cpu"));
        let mut d = TypeDetails::new("ok");
        d.retry_wait = RetryWait::exponential(Duration::from_secs(1), 0.5, Duration::from_secs(2));
        assert!(d.validate().is_err());
        let mut d = TypeDetails::new("ok");
        d.may_follow = vec!["bad name".into()];
        assert!(d.validate().is_err());
    }
}
