//! The task types a `harmony run` node can register: the built-ins (`bench_noop`,
//! `bench_sleep`, `bench_fail`) and the types of a tasks file — commands, or built-in
//! behaviour under a new name ([`Renamed`]).

use std::sync::Arc;

use harmony_bench::builtin::{BUILTIN_TYPES, builtins};
use harmonydb::Db;
use harmonytask::{
    Done, EngineView, Resources, RunContext, Task, TaskAdder, TaskError, TaskId, TypeDetails,
    async_trait,
};

use crate::command_task::CommandTask;
use crate::taskfile::{TaskKind, TaskSpec};

/// A task type that runs another type's behaviour under its own name, cost and limits: `run`,
/// `can_accept` and `adder` go to the inner task; `type_details` is this one's.
///
/// This is how a tasks-file entry with `builtin = "bench_sleep"` becomes, say, a `sleepy` type
/// with `max_cluster = 2`, without changing the built-in's code.
pub struct Renamed {
    inner: Arc<dyn Task>,
    details: TypeDetails,
}

impl Renamed {
    /// Wraps `inner`, declaring `details` instead of its own.
    pub fn new(inner: Arc<dyn Task>, details: TypeDetails) -> Self {
        Renamed { inner, details }
    }
}

#[async_trait]
impl Task for Renamed {
    fn type_details(&self) -> TypeDetails {
        self.details.clone()
    }

    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        self.inner.run(task, ctx).await
    }

    async fn can_accept(
        &self,
        candidates: &[TaskId],
        engine: &EngineView,
    ) -> Result<Vec<TaskId>, TaskError> {
        self.inner.can_accept(candidates, engine).await
    }

    fn adder(&self, add: TaskAdder) {
        self.inner.adder(add);
    }
}

/// Names of the types the binary knows without asking the database: the tasks file's, after
/// the built-ins when `with_builtins`.
pub fn known_names(specs: &[TaskSpec], with_builtins: bool) -> Vec<String> {
    BUILTIN_TYPES
        .iter()
        .filter(|_| with_builtins)
        .map(|s| (*s).to_owned())
        .chain(specs.iter().map(|s| s.name().to_owned()))
        .collect()
}

/// Builds the task objects: the built-ins (free of cost) when `with_builtins`, then one per
/// tasks-file entry. All built-in behaviour, whether under its own name or renamed by a
/// tasks-file entry, shares one attempt log. Needs a tokio runtime.
pub fn build(db: &Db, specs: &[TaskSpec], with_builtins: bool) -> Vec<Arc<dyn Task>> {
    let base = builtins(db, Resources::default());
    let mut tasks = if with_builtins {
        base.clone()
    } else {
        Vec::new()
    };
    for spec in specs {
        let task: Arc<dyn Task> = match &spec.kind {
            TaskKind::Command(argv) => Arc::new(
                CommandTask::new(spec.details.clone(), argv.clone(), spec.env.clone())
                    .with_kill_grace(spec.kill_grace),
            ),
            TaskKind::Builtin(name) => {
                let inner = base
                    .iter()
                    .find(|t| t.type_details().name == *name)
                    .cloned()
                    // The tasks file only accepts names of BUILTIN_TYPES, which `builtins`
                    // returns; a mismatch is a bug in this crate, not bad input.
                    .unwrap_or_else(|| panic!("built-in {name} missing from builtins()"));
                Arc::new(Renamed::new(inner, spec.details.clone()))
            }
        };
        tasks.push(task);
    }
    tasks
}
