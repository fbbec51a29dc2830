//! `harmony bench`: reproducible benchmarks of Harmony, the same way every time.
//!
//! Every workload creates its own fresh database (a temporary SQLite file, or a new schema on
//! the given Postgres server, dropped afterwards), runs real engines — in-process for one
//! node, `harmony run` child processes for several — and reports one [`BenchResult`] per
//! measurement. Each run also measures the machine's reference commit rate with the raw driver
//! (SQLite single-row insert commits, Postgres single-row UPDATE commits, same settings), so
//! results can be read as ratios on noisy machines.
//!
//! Workloads: [`Workload::Throughput`], [`Workload::Latency`], [`Workload::Backlog`],
//! [`Workload::Cluster`], [`Workload::Packing`], [`Workload::Memory`], [`Workload::Db`] (the
//! SQL layer's overhead over the raw drivers), [`Workload::Recovery`] and [`Workload::Prune`]
//! (history retention under load).

mod api;
pub mod builtin;
mod db;
mod fresh;
mod latency;
mod memory;
mod node;
mod packing;
mod prune;
mod recovery;
mod reference;
pub mod store;
mod throughput;

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

pub use fresh::FreshDb;

/// Which benchmark to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Insert N `bench_noop` tasks in batches, then drain them with one in-process node.
    Throughput,
    /// Add tasks one at a time to an idle node at a steady rate; add-to-start percentiles.
    Latency,
    /// Drain throughput with 1,000 / 100,000 / 1,000,000 tasks queued.
    Backlog,
    /// 1, 2, 4, 8 `harmony run` processes on one database; aggregate rate, double-run check.
    Cluster,
    /// The Curio cost table with simulated durations on a fixed budget: budget use and
    /// makespan against its lower bound.
    Packing,
    /// RSS of an idle node process, and of one draining a 1,000,000-task backlog.
    Memory,
    /// Single-row insert+commit and point-select rates through `Db` versus the raw drivers.
    Db,
    /// SIGKILL a node running tasks: time until its orphaned tasks finished elsewhere.
    Recovery,
    /// Prune N old history rows while a node drains no-op tasks: prune rate, longest batch,
    /// drain rate during the prune against before it.
    Prune,
    /// The web server's endpoint latencies and `/metrics` scrape time with N waiting tasks
    /// (default 1,000,000) and `--history` rows.
    Api,
}

impl Workload {
    /// All workloads, in the order `all` runs them.
    pub const ALL: [Workload; 10] = [
        Workload::Db,
        Workload::Throughput,
        Workload::Latency,
        Workload::Backlog,
        Workload::Cluster,
        Workload::Packing,
        Workload::Memory,
        Workload::Recovery,
        Workload::Prune,
        Workload::Api,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Throughput => "throughput",
            Workload::Latency => "latency",
            Workload::Backlog => "backlog",
            Workload::Cluster => "cluster",
            Workload::Packing => "packing",
            Workload::Memory => "memory",
            Workload::Db => "db",
            Workload::Recovery => "recovery",
            Workload::Prune => "prune",
            Workload::Api => "api",
        }
    }
}

/// What to run and where.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The workload.
    pub workload: Workload,
    /// The database to benchmark on: a `sqlite://` URL (a temporary file is used; the path is
    /// ignored) or a `postgres://` server (a fresh schema is created and dropped).
    pub db_url: String,
    /// Node processes (cluster: run only this count instead of 1, 2, 4, 8).
    pub nodes: Option<usize>,
    /// Tasks (the workload's default when absent).
    pub tasks: Option<usize>,
    /// Latency: add on one process, run on a `harmony run` child process.
    pub cross_node: bool,
    /// Latency across nodes: hints travel over HTTP (`--notify http`) instead of `NOTIFY`.
    pub notify_http: bool,
    /// Throughput, backlog, cluster: the drained type's per-node limit (`bench_read` instead of
    /// `bench_noop`).
    pub max: Option<usize>,
    /// Throughput, backlog, cluster: each task carries an input that its attempt reads
    /// (`bench_read`).
    pub read_input: bool,
    /// Cluster: each task sleeps this long (`bench_sleep`).
    pub task_ms: Option<u64>,
    /// History rows to fill (`api`; its default when absent).
    pub history: Option<usize>,
    /// The `harmony` executable, for child node processes.
    pub harmony_exe: PathBuf,
}

/// One measurement. Fields that do not apply to a workload are `None`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BenchResult {
    /// Workload name.
    pub workload: String,
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// Engine nodes.
    pub nodes: usize,
    /// Tasks measured.
    pub tasks: usize,
    /// Measured wall time.
    pub seconds: f64,
    /// Tasks per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks_per_s: Option<f64>,
    /// Latency percentiles and maximum, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    /// Maximum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<f64>,
    /// The machine's reference commit rate, measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_commits_per_s: Option<f64>,
    /// Peak resident memory of the node process (the largest, with several), MiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
    /// Tasks with more than one logged attempt (cluster: must be 0; `harmony bench` exits
    /// non-zero otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub double_runs: Option<usize>,
    /// What else was measured, for humans (`insert 812345/s`, `ratio 0.97`, …).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl BenchResult {
    fn new(workload: &str, backend: &str) -> Self {
        BenchResult {
            workload: workload.to_owned(),
            backend: backend.to_owned(),
            nodes: 1,
            ..Default::default()
        }
    }
}

/// Runs one workload.
pub async fn run(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    match opts.workload {
        Workload::Throughput => throughput::throughput(opts).await,
        Workload::Backlog => throughput::backlog(opts).await,
        Workload::Cluster => throughput::cluster(opts).await,
        Workload::Latency => latency::latency(opts).await,
        Workload::Packing => packing::packing(opts).await,
        Workload::Memory => memory::memory(opts).await,
        Workload::Db => db::db_overhead(opts).await,
        Workload::Recovery => recovery::recovery(opts).await,
        Workload::Prune => prune::prune(opts).await,
        Workload::Api => api::api(opts).await,
    }
}

/// A human table of results.
pub fn render_table(results: &[BenchResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:<8} {:>5} {:>9} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7}  detail",
        "workload",
        "backend",
        "nodes",
        "tasks",
        "seconds",
        "tasks/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "ref c/s",
        "rss MB"
    );
    let f = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
    for r in results {
        let _ = writeln!(
            out,
            "{:<11} {:<8} {:>5} {:>9} {:>8.2} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7}  {}",
            r.workload,
            r.backend,
            r.nodes,
            r.tasks,
            r.seconds,
            f(r.tasks_per_s, 0),
            f(r.p50_ms, 3),
            f(r.p95_ms, 3),
            f(r.p99_ms, 3),
            f(r.max_ms, 3),
            f(r.reference_commits_per_s, 0),
            f(r.peak_rss_mb, 1),
            r.detail
        );
    }
    out
}

/// Percentile (0–100) of sorted samples.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Peak resident set size of a process (`VmHWM`), MiB.
pub(crate) fn peak_rss_mb(pid: u32) -> Option<f64> {
    proc_status_kb(pid, "VmHWM:").map(|kb| kb as f64 / 1024.0)
}

/// Current resident set size of a process (`VmRSS`), MiB.
pub(crate) fn rss_mb(pid: u32) -> Option<f64> {
    proc_status_kb(pid, "VmRSS:").map(|kb| kb as f64 / 1024.0)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets this process's peak RSS (Linux `clear_refs` 5), so that `VmHWM` measures one
/// workload, not everything before it.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn reads_own_rss() {
        assert!(rss_mb(std::process::id()).is_some_and(|m| m > 0.0));
        assert!(peak_rss_mb(std::process::id()).is_some());
    }

    #[test]
    fn table_has_a_row_per_result() {
        let mut r = BenchResult::new("throughput", "sqlite");
        r.tasks_per_s = Some(1234.0);
        let t = render_table(&[r.clone(), r]);
        assert_eq!(t.lines().count(), 3);
        assert!(t.contains("1234"));
    }
}
