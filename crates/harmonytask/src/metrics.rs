//! Engine metrics (Prometheus), labelled by task type name, never by task id.
//!
//! Per-type handles are created once at registration so that the hot path (claim, completion)
//! only touches atomics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type TypeLabel = [(&'static str, String); 1];
type ReasonLabel = [(&'static str, String); 2];

/// All engine series.
#[derive(Clone)]
pub struct EngineMetrics {
    added: Family<TypeLabel, Counter>,
    started: Family<TypeLabel, Counter>,
    completed: Family<TypeLabel, Counter>,
    failed: Family<TypeLabel, Counter>,
    released: Family<TypeLabel, Counter>,
    preempted: Family<TypeLabel, Counter>,
    fenced_out: Family<TypeLabel, Counter>,
    cancelled: Family<TypeLabel, Counter>,
    running: Family<TypeLabel, Gauge>,
    blocked: Family<ReasonLabel, Gauge>,
    duration: Family<TypeLabel, Histogram, fn() -> Histogram>,
    wait: Family<TypeLabel, Histogram, fn() -> Histogram>,
    claims: Counter,
    polls: Counter,
    reaped: Counter,
}

fn seconds_histogram() -> Histogram {
    // 100 µs … ~1.9 h
    Histogram::new(exponential_buckets(0.000_1, 3.0, 16))
}

impl EngineMetrics {
    pub(crate) fn new() -> Self {
        EngineMetrics {
            added: Family::default(),
            started: Family::default(),
            completed: Family::default(),
            failed: Family::default(),
            released: Family::default(),
            preempted: Family::default(),
            fenced_out: Family::default(),
            cancelled: Family::default(),
            running: Family::default(),
            blocked: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
            wait: Family::new_with_constructor(seconds_histogram),
            claims: Counter::default(),
            polls: Counter::default(),
            reaped: Counter::default(),
        }
    }

    /// Adds the series to `registry` under the `harmony_` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("harmony");
        r.register("tasks_added", "Tasks added, by type", self.added.clone());
        r.register(
            "tasks_started",
            "Attempts started, by type",
            self.started.clone(),
        );
        r.register(
            "tasks_completed",
            "Attempts that completed the task, by type",
            self.completed.clone(),
        );
        r.register(
            "tasks_failed",
            "Failed attempts, by type",
            self.failed.clone(),
        );
        r.register(
            "tasks_released",
            "Attempts released without counting as a failure (preempted, shut down), by type",
            self.released.clone(),
        );
        r.register(
            "tasks_preempted",
            "Attempts cancelled to make room for time-sensitive work, by the victim's type",
            self.preempted.clone(),
        );
        r.register(
            "tasks_fenced_out",
            "Outcomes discarded because another node owned the task by then, by type",
            self.fenced_out.clone(),
        );
        r.register(
            "tasks_cancelled",
            "Running attempts stopped because an operator cancelled their task, by type",
            self.cancelled.clone(),
        );
        r.register(
            "tasks_blocked",
            "Waiting tasks this node sees but does not start, by type and blocking reason (the node's view holds at most view_max_per_type per type)",
            self.blocked.clone(),
        );
        r.register(
            "tasks_running",
            "Tasks running on this node, by type",
            self.running.clone(),
        );
        r.register(
            "task_duration_seconds",
            "Attempt duration, by type",
            self.duration.clone(),
        );
        r.register(
            "task_wait_seconds",
            "Time from posting (or the last release) to the start of an attempt, by type",
            self.wait.clone(),
        );
        r.register("claims", "Claim statements run", self.claims.clone());
        r.register("polls", "Database polls run", self.polls.clone());
        r.register(
            "machines_reaped",
            "Dead machines removed by this node",
            self.reaped.clone(),
        );
    }

    pub(crate) fn for_type(&self, name: &str) -> TypeMetrics {
        let l: TypeLabel = [("task_type", name.to_owned())];
        TypeMetrics {
            added: self.added.get_or_create(&l).clone(),
            started: self.started.get_or_create(&l).clone(),
            completed: self.completed.get_or_create(&l).clone(),
            failed: self.failed.get_or_create(&l).clone(),
            released: self.released.get_or_create(&l).clone(),
            preempted: self.preempted.get_or_create(&l).clone(),
            fenced_out: self.fenced_out.get_or_create(&l).clone(),
            cancelled: self.cancelled.get_or_create(&l).clone(),
            running: self.running.get_or_create(&l).clone(),
            duration: self.duration.get_or_create(&l).clone(),
            wait: self.wait.get_or_create(&l).clone(),
        }
    }

    /// Sets the blocked gauge of a type and reason.
    pub(crate) fn set_blocked(&self, name: &str, reason: &str, waiting: i64) {
        let l: ReasonLabel = [
            ("task_type", name.to_owned()),
            ("reason", reason.to_owned()),
        ];
        self.blocked.get_or_create(&l).set(waiting);
    }

    /// Removes the blocked gauge of a type and reason (the type is no longer blocked by it).
    pub(crate) fn clear_blocked(&self, name: &str, reason: &str) {
        let l: ReasonLabel = [
            ("task_type", name.to_owned()),
            ("reason", reason.to_owned()),
        ];
        self.blocked.remove(&l);
    }

    pub(crate) fn claim(&self) {
        self.claims.inc();
    }

    pub(crate) fn poll(&self) {
        self.polls.inc();
    }

    pub(crate) fn reaped(&self, n: u64) {
        self.reaped.inc_by(n);
    }

    /// Added counter of a type not registered on this node.
    pub(crate) fn added_other(&self, name: &str, n: u64) {
        self.added
            .get_or_create(&[("task_type", name.to_owned())])
            .inc_by(n);
    }
}

/// Handles for one type.
#[derive(Clone)]
pub(crate) struct TypeMetrics {
    pub added: Counter,
    pub started: Counter,
    pub completed: Counter,
    pub failed: Counter,
    pub released: Counter,
    pub preempted: Counter,
    pub fenced_out: Counter,
    pub cancelled: Counter,
    pub running: Gauge,
    pub duration: Histogram,
    pub wait: Histogram,
}
