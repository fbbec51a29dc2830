//! The task types registered on this node, by index and by name, with their completion
//! callbacks. Built once at start; read by the scheduler, the runner and the loops.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::metrics::TypeMetrics;
use crate::ownership::Ownership;
use crate::task::{Task, TaskId, TypeDetails};

/// Called after a task of the type completed successfully and its completion committed, with
/// the key/values the attempt set with `RunContext::set_meta`.
pub type CompleteCallback = Arc<dyn Fn(TaskId, &HashMap<String, String>) + Send + Sync>;

/// A registered type as the engine holds it.
pub(crate) struct TypeEntry {
    pub task: Arc<dyn Task>,
    pub details: TypeDetails,
    pub name: Arc<str>,
    pub ownership: Arc<Ownership>,
    pub metrics: TypeMetrics,
}

impl TypeEntry {
    pub(crate) fn is_singleton(&self) -> bool {
        self.details
            .iambored
            .as_ref()
            .is_some_and(|b| b.singleton_interval().is_some())
    }
}

/// The registered types.
pub(crate) struct Registry {
    pub types: Vec<TypeEntry>,
    /// Type name → index in `types`.
    pub index: HashMap<String, usize>,
    callbacks: RwLock<HashMap<usize, Vec<CompleteCallback>>>,
}

impl Registry {
    pub(crate) fn new(types: Vec<TypeEntry>) -> Self {
        let index = types
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.to_string(), i))
            .collect();
        Registry {
            types,
            index,
            callbacks: RwLock::new(HashMap::new()),
        }
    }

    /// Adds a completion callback; `false` when the lock was poisoned.
    pub(crate) fn on_complete(&self, ty: usize, callback: CompleteCallback) -> bool {
        match self.callbacks.write() {
            Ok(mut c) => {
                c.entry(ty).or_default().push(callback);
                true
            }
            Err(_) => false,
        }
    }

    /// Runs the completion callbacks of a successful task.
    pub(crate) fn task_completed(&self, ty: usize, id: TaskId, meta: &HashMap<String, String>) {
        let callbacks = self
            .callbacks
            .read()
            .map(|c| c.get(&ty).cloned().unwrap_or_default())
            .unwrap_or_default();
        for cb in callbacks {
            cb(id, meta);
        }
    }
}
