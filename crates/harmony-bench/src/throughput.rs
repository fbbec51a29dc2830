//! Throughput, backlog and cluster workloads: how fast no-op tasks drain, unbounded
//! (`bench_noop`) or bounded by a per-node `max` and reading their input (`bench_read`,
//! `--max N --read-input`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::builtin::{BENCH_NOOP, BENCH_READ, BENCH_READ_INPUT, BENCH_SLEEP, BenchRead, builtins};
use crate::store::BenchStore;
use harmonydb::Db;
use harmonytask::{Client, Engine, EngineConfig, Resources};
use tokio::sync::Notify;

use crate::fresh::FreshDb;
use crate::node::NodeProcess;
use crate::reference::reference_commits_per_s;
use crate::{BenchOptions, BenchResult, peak_rss_mb, reset_peak_rss};

/// Largest insert transaction.
const INSERT_BATCH: usize = 10_000;

/// The input each task of a `--read-input` run carries (64 bytes).
const INPUT: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Name of the type a bounded cluster run declares in its nodes' tasks file.
const BENCH_BOUNDED: &str = "bench_bounded";

/// What a drain workload runs: `bench_noop` (no limit, its attempt log written) by default;
/// with `--max` or `--read-input`, `bench_read` with that limit (no attempt log).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drained {
    /// Per-node limit on attempts at once.
    pub max: Option<usize>,
    /// Each task carries an input that its attempt reads.
    pub read_input: bool,
}

impl Drained {
    pub(crate) fn of(opts: &BenchOptions) -> Self {
        Drained {
            max: opts.max,
            read_input: opts.read_input,
        }
    }

    /// The plain case: `bench_noop`, unbounded.
    pub(crate) const NOOP: Drained = Drained {
        max: None,
        read_input: false,
    };

    fn bounded(self) -> bool {
        self.max.is_some() || self.read_input
    }

    /// The type name in-process nodes run.
    pub(crate) fn name(self) -> &'static str {
        if self.bounded() {
            BENCH_READ
        } else {
            BENCH_NOOP
        }
    }

    /// Each task's arguments.
    fn args(self) -> Vec<(String, String)> {
        if self.read_input {
            vec![(BENCH_READ_INPUT.to_owned(), INPUT.to_owned())]
        } else {
            Vec::new()
        }
    }

    /// For the result's detail: `max 8, input read; ` or nothing.
    fn describe(self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.max {
            parts.push(format!("max {m}"));
        }
        if self.read_input {
            parts.push("input read".to_owned());
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("{}; ", parts.join(", "))
        }
    }
}

/// Inserts `n` `bench_noop` tasks in batches; returns tasks inserted per second.
pub(crate) async fn insert_noops(db: &Db, n: usize) -> anyhow::Result<f64> {
    insert_tasks(db, Drained::NOOP.name(), Drained::NOOP, n).await
}

/// Inserts `n` tasks of `name` with `what`'s arguments in batches; returns tasks inserted per
/// second.
async fn insert_tasks(db: &Db, name: &str, what: Drained, n: usize) -> anyhow::Result<f64> {
    let client = Client::new(db.clone());
    let args = what.args();
    let start = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(INSERT_BATCH);
        client.add_tasks_with_args(name, k, &args).await?;
        left -= k;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// An in-process node running the built-in types, with a completion counter.
pub(crate) struct Counted {
    pub engine: Engine,
    pub done: Arc<AtomicUsize>,
    pub notify: Arc<Notify>,
}

impl Counted {
    pub(crate) async fn start(db: &Db, budget: Resources) -> anyhow::Result<Counted> {
        Counted::start_with(db, budget, Drained::NOOP).await
    }

    /// A node whose `what.name()` type is `what`'s, counting its completions.
    pub(crate) async fn start_with(
        db: &Db,
        budget: Resources,
        what: Drained,
    ) -> anyhow::Result<Counted> {
        let mut builder = Engine::builder(db.clone()).config(EngineConfig {
            host_and_port: format!("bench-{}:{}", std::process::id(), fastrand::u32(..)),
            budget: Some(budget),
            shutdown_grace: Duration::ZERO,
            // A benchmark's history is minutes old; pruning would only add statements.
            history_keep: None,
            ..EngineConfig::default()
        });
        for t in builtins(db, Resources::default()) {
            if t.type_details().name != BENCH_READ {
                builder = builder.register_arc(t);
            }
        }
        builder = builder.register(BenchRead {
            read: what.read_input,
            max: what.max,
            cost: Resources::default(),
        });
        let engine = builder.start().await?;
        let done = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(Notify::new());
        let (d, n) = (done.clone(), notify.clone());
        engine.on_task_complete(
            what.name(),
            Arc::new(move |_, _| {
                d.fetch_add(1, Ordering::Relaxed);
                n.notify_one();
            }),
        )?;
        Ok(Counted {
            engine,
            done,
            notify,
        })
    }

    /// Waits until `target` completions were counted.
    pub(crate) async fn until(&self, target: usize) {
        while self.done.load(Ordering::Relaxed) < target {
            let _ = tokio::time::timeout(Duration::from_millis(100), self.notify.notified()).await;
        }
    }
}

pub(crate) fn node_budget() -> Resources {
    let detected = harmonytask::resources::detect();
    Resources::new(detected.cpu, detected.ram, detected.gpu)
}

/// Drain rate from history: tasks over (last end − first start) of the recorded attempts.
async fn history_rate(store: &BenchStore, name: &str, after: i64) -> anyhow::Result<(usize, f64)> {
    let span = store.history_span(name, after).await?;
    let secs = match (span.first_start, span.last_end) {
        (Some(a), Some(b)) => b.since(a).as_secs_f64().max(0.001),
        _ => 0.0,
    };
    Ok((span.attempts as usize, secs))
}

/// Insert N tasks, then drain them with one in-process node.
pub(crate) async fn throughput(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let n = opts.tasks.unwrap_or(20_000);
    let what = Drained::of(opts);
    let fresh = FreshDb::create(&opts.db_url).await?;
    let reference = reference_commits_per_s(&fresh.url).await?;
    let db = fresh.open().await?;
    let insert_rate = insert_tasks(&db, what.name(), what, n).await?;
    reset_peak_rss();
    let node = Counted::start_with(&db, node_budget(), what).await?;
    node.until(n).await;
    let store = BenchStore::new(db.clone());
    let (tasks, secs) = history_rate(&store, what.name(), 0).await?;
    node.engine.shutdown().await?;
    drop(db);
    let mut r = BenchResult::new("throughput", fresh.backend);
    r.tasks = tasks;
    r.seconds = secs;
    r.tasks_per_s = Some(tasks as f64 / secs);
    r.reference_commits_per_s = Some(reference);
    r.peak_rss_mb = peak_rss_mb(std::process::id());
    r.detail = format!(
        "{}insert {insert_rate:.0} tasks/s; in-process node; history written; {:.3}× reference",
        what.describe(),
        tasks as f64 / secs / reference
    );
    fresh.cleanup().await?;
    Ok(vec![r])
}

/// Drain rate with 1,000 / 100,000 / 1,000,000 queued (at most `--tasks`), and the ratio of
/// each to the smallest. Each size drains up to 20,000 tasks (rounds of 1,000 for the smallest)
/// so that every rate is measured over the same amount of work.
pub(crate) async fn backlog(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    const MEASURED: usize = 20_000;
    let max = opts.tasks.unwrap_or(1_000_000);
    let what = Drained::of(opts);
    let sizes: Vec<usize> = [1_000, 100_000, 1_000_000]
        .into_iter()
        .filter(|s| *s <= max)
        .collect();
    let mut results = Vec::new();
    let mut base_rate = None;
    for size in sizes {
        let fresh = FreshDb::create(&opts.db_url).await?;
        let reference = reference_commits_per_s(&fresh.url).await?;
        let db = fresh.open().await?;
        let store = BenchStore::new(db.clone());
        let mut rate_detail = String::new();
        let (measured, secs) = if size < MEASURED {
            // Rounds: queue `size`, drain it, repeat; only drain time counts.
            let node = Counted::start_with(&db, node_budget(), what).await?;
            let rounds = MEASURED / size;
            let mut drain = Duration::ZERO;
            for round in 1..=rounds {
                insert_tasks(&db, what.name(), what, size).await?;
                let start = Instant::now();
                node.until(round * size).await;
                drain += start.elapsed();
            }
            node.engine.shutdown().await?;
            rate_detail.push_str(&format!("{rounds} rounds of {size}"));
            (rounds * size, drain.as_secs_f64())
        } else {
            let insert_rate = insert_tasks(&db, what.name(), what, size).await?;
            let node = Counted::start_with(&db, node_budget(), what).await?;
            let before = store.history_max_id().await?;
            node.until(MEASURED).await;
            let (n, secs) = history_rate(&store, what.name(), before).await?;
            node.engine.shutdown().await?;
            rate_detail.push_str(&format!(
                "first {n} of {size} queued; insert {insert_rate:.0}/s"
            ));
            (n, secs)
        };
        let rate = measured as f64 / secs;
        let base = *base_rate.get_or_insert(rate);
        let mut r = BenchResult::new("backlog", fresh.backend);
        r.tasks = size;
        r.seconds = secs;
        r.tasks_per_s = Some(rate);
        r.reference_commits_per_s = Some(reference);
        r.detail = format!(
            "{}{rate_detail}; ratio to smallest {:.2}",
            what.describe(),
            rate / base
        );
        results.push(r);
        drop(store);
        drop(db);
        fresh.cleanup().await?;
    }
    Ok(results)
}

/// 1, 2, 4, 8 `harmony run` processes (or `--nodes`) on one database: aggregate tasks/s, and
/// a check that no task ran twice (from the attempts log, or for `bench_read`, which logs
/// nothing, from history: no task recorded twice). `--max` and `--task-ms` apply per node
/// (the type is declared in a tasks file, as a user would).
pub(crate) async fn cluster(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let n_tasks = opts.tasks.unwrap_or(20_000);
    let counts: Vec<usize> = match opts.nodes {
        Some(n) => vec![n],
        None => vec![1, 2, 4, 8],
    };
    let what = Drained::of(opts);
    let behaviour = match (opts.task_ms, what.read_input) {
        (Some(_), _) => BENCH_SLEEP,
        (None, true) => BENCH_READ,
        (None, false) => BENCH_NOOP,
    };
    let mut args = what.args();
    if let Some(ms) = opts.task_ms {
        args.push(("ms".to_owned(), ms.to_string()));
    }
    // With a limit, the nodes declare the type in a tasks file; otherwise they run the
    // built-in itself.
    let dir = tempfile::tempdir()?;
    let tasks_file = dir.path().join("tasks.toml");
    let name = match what.max {
        Some(max) => {
            std::fs::write(
                &tasks_file,
                format!(
                    "[[task]]\nname = \"{BENCH_BOUNDED}\"\nbuiltin = \"{behaviour}\"\nmax = {max}\n"
                ),
            )?;
            BENCH_BOUNDED
        }
        None => behaviour,
    };
    let tasks_arg = tasks_file.to_string_lossy().into_owned();
    let mut node_args = vec!["--types", name, "--shutdown-grace", "0s"];
    if what.max.is_some() {
        node_args.extend(["--tasks", tasks_arg.as_str()]);
    }
    let mut described = what.describe();
    if let Some(ms) = opts.task_ms {
        described.push_str(&format!("tasks sleep {ms} ms; "));
    }
    let mut results = Vec::new();
    for nodes in counts {
        let fresh = FreshDb::create(&opts.db_url).await?;
        let reference = reference_commits_per_s(&fresh.url).await?;
        let db = fresh.open().await?;
        let store = BenchStore::new(db.clone());
        let mut procs = Vec::new();
        for _ in 0..nodes {
            // Each node gets an even share of the machine, as separate machines would have.
            procs.push(NodeProcess::spawn(
                &opts.harmony_exe,
                &fresh.url,
                &node_args,
            )?);
        }
        for p in &mut procs {
            p.wait_registered(&store).await?;
        }
        let client = Client::new(db.clone());
        let mut left = n_tasks;
        while left > 0 {
            let k = left.min(INSERT_BATCH);
            client.add_tasks_with_args(name, k, &args).await?;
            left -= k;
        }
        while store.any_task(name).await? {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tasks, secs) = history_rate(&store, name, 0).await?;
        let rss = procs
            .iter()
            .filter_map(|p| peak_rss_mb(p.pid()))
            .fold(0.0f64, f64::max);
        for p in procs {
            p.stop().await?;
        }
        let (checked, twice) = if behaviour == BENCH_READ {
            let (recorded, twice) = store.history_repeats(name).await?;
            (format!("{recorded} attempts in history"), twice)
        } else {
            let attempts = store.attempts().await?;
            let mut per_task = std::collections::HashMap::<i64, usize>::new();
            for a in &attempts {
                *per_task.entry(a.task_id).or_default() += 1;
            }
            let twice = per_task.values().filter(|c| **c > 1).count();
            (format!("{} attempts logged", attempts.len()), twice)
        };
        let mut r = BenchResult::new("cluster", fresh.backend);
        r.nodes = nodes;
        r.tasks = tasks;
        r.seconds = secs;
        r.tasks_per_s = Some(tasks as f64 / secs);
        r.reference_commits_per_s = Some(reference);
        r.peak_rss_mb = Some(rss);
        r.double_runs = Some(twice);
        r.detail = format!(
            "{described}{checked}, {twice} tasks ran more than once{}",
            if twice > 0 { " (DOUBLE RUNS)" } else { "" }
        );
        results.push(r);
        drop(store);
        drop(db);
        fresh.cleanup().await?;
    }
    Ok(results)
}
