//! Engine settings, with the defaults of DESIGN §13. Every interval and limit has a name with
//! its unit last.

use std::time::Duration;

use crate::error::ConfigError;
use crate::resources::Resources;

/// How long task history is kept by default: 30 days.
pub const HISTORY_KEEP_DEFAULT: Duration = Duration::from_secs(30 * 24 * 3600);

/// How an engine runs. Build with [`EngineConfig::default`] and override fields.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The node's advertised address and identity across restarts (`harmony_machines
    /// .host_and_port`). Two live nodes must not share it.
    pub host_and_port: String,
    /// Display name (default: the host name part of `host_and_port`).
    pub machine_name: String,
    /// Build version recorded in the details row.
    pub version: String,
    /// Config layers recorded in the details row.
    pub layers: Vec<String>,
    /// The budget; `None` detects it (logical CPUs, total RAM, NVML GPUs).
    pub budget: Option<Resources>,
    /// Safety-net database poll while notifications are healthy.
    pub poll_interval: Duration,
    /// Database poll while notifications are down or off.
    pub poll_interval_unhealthy: Duration,
    /// Send and receive wake-up notifications (Postgres `LISTEN/NOTIFY`, SQLite change
    /// checks). Turn off for backends without `NOTIFY` (YugabyteDB, CockroachDB, PgBouncer in
    /// transaction mode): correctness never depends on them.
    pub notify: bool,
    /// SQLite: how often to check whether another process committed.
    pub change_check_interval: Duration,
    /// Shortest time between two IAmBored calls of one type (run-now requests excepted).
    pub iambored_interval: Duration,
    /// How long nodes collect bids before the cheapest one preempts work for a
    /// time-sensitive task.
    pub preempt_bid_window: Duration,
    /// Heartbeat period.
    pub heartbeat_interval: Duration,
    /// A machine whose heartbeat is older than this is dead.
    pub dead_after: Duration,
    /// How often this node looks for dead machines.
    pub reaper_interval: Duration,
    /// How long ordinary running tasks get to finish at shutdown before they are cancelled.
    pub shutdown_grace: Duration,
    /// After cancelling, how long to wait for tasks to return before releasing their rows
    /// anyway.
    pub cancel_wait: Duration,
    /// Most tasks of one type claimed by one statement.
    pub claim_batch_max: usize,
    /// Most waiting tasks of one type kept in memory (the poll reads this many).
    pub view_max_per_type: usize,
    /// Most outcomes recorded in one transaction.
    pub record_batch_max: usize,
    /// After `can_accept` refused everything (or the cluster limit was hit), wait this long
    /// before offering the type's tasks again, unless new work arrives.
    pub refused_retry_interval: Duration,
    /// Task history (and the arguments of finished tasks) older than this is deleted;
    /// `None` keeps it forever (unless `history_keep_per_type` applies).
    pub history_keep: Option<Duration>,
    /// Of each type, keep only the newest this many history rows; `None`: no per-type limit.
    pub history_keep_per_type: Option<u64>,
    /// How often a node tries to prune (one node at a time does, holding a lease).
    pub prune_interval: Duration,
    /// Most history rows deleted by one prune transaction.
    pub prune_batch_max: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            host_and_port: "127.0.0.1:4701".into(),
            machine_name: String::new(),
            version: env!("CARGO_PKG_VERSION").into(),
            layers: Vec::new(),
            budget: None,
            poll_interval: Duration::from_secs(30),
            poll_interval_unhealthy: Duration::from_secs(3),
            notify: true,
            change_check_interval: Duration::from_millis(2),
            iambored_interval: Duration::from_secs(1),
            preempt_bid_window: Duration::from_millis(100),
            heartbeat_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(30),
            reaper_interval: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            cancel_wait: Duration::from_secs(5),
            claim_batch_max: 100,
            view_max_per_type: 400,
            record_batch_max: 512,
            refused_retry_interval: Duration::from_secs(1),
            history_keep: Some(HISTORY_KEEP_DEFAULT),
            history_keep_per_type: None,
            prune_interval: Duration::from_secs(3600),
            prune_batch_max: 10_000,
        }
    }
}

impl EngineConfig {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("poll_interval", self.poll_interval),
            ("poll_interval_unhealthy", self.poll_interval_unhealthy),
            ("change_check_interval", self.change_check_interval),
            ("iambored_interval", self.iambored_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("dead_after", self.dead_after),
            ("reaper_interval", self.reaper_interval),
            ("refused_retry_interval", self.refused_retry_interval),
            ("prune_interval", self.prune_interval),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(ConfigError::new(name, "must be positive"));
            }
        }
        if self.dead_after <= self.heartbeat_interval {
            return Err(ConfigError::new(
                "dead_after",
                format!(
                    "({:?}) must be longer than heartbeat_interval ({:?}), or live nodes would be declared dead",
                    self.dead_after, self.heartbeat_interval
                ),
            ));
        }
        for (name, n) in [
            ("claim_batch_max", self.claim_batch_max),
            ("view_max_per_type", self.view_max_per_type),
            ("record_batch_max", self.record_batch_max),
        ] {
            if n == 0 {
                return Err(ConfigError::new(name, "must be positive"));
            }
        }
        if self.history_keep.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::new(
                "history_keep",
                "must be positive (None keeps history forever)",
            ));
        }
        if self.history_keep_per_type == Some(0) {
            return Err(ConfigError::new(
                "history_keep_per_type",
                "must be at least 1 (None: no per-type limit)",
            ));
        }
        if self.prune_batch_max == 0 {
            return Err(ConfigError::new("prune_batch_max", "must be positive"));
        }
        if self.host_and_port.is_empty() || self.host_and_port.len() > 300 {
            return Err(ConfigError::new(
                "host_and_port",
                "must be 1–300 characters",
            ));
        }
        if let Some(b) = &self.budget {
            b.validate().map_err(ConfigError::budget)?;
        }
        Ok(())
    }
}
