//! `harmony demo`: the tour. A fresh `./harmony-demo.db`, one in-process node with a fixed
//! budget (4 CPUs, 16 GiB RAM, 1 GPU, so the run looks the same on every machine), and a
//! four-stage pipeline whose costs contend for that budget:
//!
//! | stage | cpu | ram | gpu | work | limited by |
//! |---|---|---|---|---|---|
//! | `DemoFetch` | 0.5 | 512 MiB | 0 | 40 ms | — |
//! | `DemoEncode` | 1 | 6 GiB | 0 | 200 ms | RAM: two at a time |
//! | `DemoProve` | 1 | 2 GiB | 1 | 80 ms | the GPU: one at a time |
//! | `DemoStore` | 0.5 | 256 MiB | 0 | 30 ms | — |
//!
//! Each item starts as a `DemoFetch` task; every stage, when it succeeds, adds the item's next
//! stage through the [`TaskAdder`] the engine handed to that stage. About one attempt in ten
//! fails on purpose (a deterministic hash of task, stage and retry count), to show retries;
//! never the last allowed attempt, so every item gets through. Work is simulated with sleeps
//! scaled by `--scale`. A progress bar runs until no task is left, then a per-type summary is
//! printed from the history table.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harmonydb::Db;
use harmonytask::{Admin, HistoryQuery};
use harmonytask::{
    ByteSize, Done, Engine, EngineConfig, Resources, RetryWait, RunContext, Task, TaskAdder,
    TaskError, TaskId, TypeDetails, async_trait,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cli::DemoArgs;
use crate::commands::{EXIT_OK, UsageError, open_migrated};
use crate::output::{self, Table};

/// Items sent through the pipeline by default.
pub const ITEMS_DEFAULT: usize = 100;
/// Most items accepted.
const ITEMS_MAX: usize = 10_000;
/// The demo's database file, in the working directory.
const DEMO_DB_FILE: &str = "harmony-demo.db";
/// How often the progress bar reads the database.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
/// Percentage of attempts that fail on purpose.
const FAIL_PERCENT: u64 = 10;
/// Attempts allowed per task.
const MAX_FAILURES: u32 = 3;
/// Wait before a retry, before scaling.
const RETRY_WAIT: Duration = Duration::from_millis(200);

/// One stage of the pipeline.
struct Stage {
    name: &'static str,
    cpu: f64,
    ram: &'static str,
    gpu: f64,
    work: Duration,
}

const STAGES: [Stage; 4] = [
    Stage {
        name: "DemoFetch",
        cpu: 0.5,
        ram: "512MiB",
        gpu: 0.0,
        work: Duration::from_millis(40),
    },
    Stage {
        name: "DemoEncode",
        cpu: 1.0,
        ram: "6GiB",
        gpu: 0.0,
        work: Duration::from_millis(200),
    },
    Stage {
        name: "DemoProve",
        cpu: 1.0,
        ram: "2GiB",
        gpu: 1.0,
        work: Duration::from_millis(80),
    },
    Stage {
        name: "DemoStore",
        cpu: 0.5,
        ram: "256MiB",
        gpu: 0.0,
        work: Duration::from_millis(30),
    },
];

/// The node's budget: fixed, so that the demo behaves the same everywhere.
fn budget() -> Resources {
    Resources::new(4.0, 16 << 30, 1.0)
}

/// Shared by the stages: the adders the engine hands out, and the time scale.
struct Pipeline {
    adders: Mutex<HashMap<&'static str, TaskAdder>>,
    scale: f64,
}

struct StageTask {
    index: usize,
    pipeline: Arc<Pipeline>,
}

#[async_trait]
impl Task for StageTask {
    fn type_details(&self) -> TypeDetails {
        let s = &STAGES[self.index];
        let mut d = TypeDetails::new(s.name);
        let ram = s.ram.parse::<ByteSize>().map_or(0, |b| b.0);
        d.cost = Resources::new(s.cpu, ram, s.gpu);
        d.max_failures = MAX_FAILURES;
        d.retry_wait = RetryWait::constant(RETRY_WAIT.mul_f64(self.pipeline.scale));
        if self.index > 0 {
            // Finish items already in the pipeline before starting new ones.
            d.may_follow = vec![STAGES[self.index - 1].name.to_owned()];
        }
        d
    }

    async fn run(&self, task: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        let roll = mix(task.0 as u64, self.index as u64, u64::from(ctx.retries()));
        // Between 0.5× and 1.5× the stage's nominal work.
        let jitter = 0.5 + (roll % 1000) as f64 / 1000.0;
        let work = STAGES[self.index]
            .work
            .mul_f64(jitter * self.pipeline.scale);
        tokio::select! {
            () = tokio::time::sleep(work) => {}
            () = ctx.cancelled().cancelled() => return Err(TaskError::new("cancelled")),
        }
        if (roll >> 20) % 100 < FAIL_PERCENT && ctx.retries() + 1 < MAX_FAILURES {
            return Err(TaskError::new(format!(
                "simulated failure (about {FAIL_PERCENT}% of attempts fail on purpose)"
            )));
        }
        if let Some(next) = STAGES.get(self.index + 1) {
            let adder = self
                .pipeline
                .adders
                .lock()
                .ok()
                .and_then(|a| a.get(next.name).cloned())
                .ok_or_else(|| TaskError::new(format!("no adder for {}", next.name)))?;
            adder.add(|_, _| async { Ok(true) }).await?;
        }
        Ok(Done(true))
    }

    fn adder(&self, add: TaskAdder) {
        if let Ok(mut a) = self.pipeline.adders.lock() {
            a.insert(STAGES[self.index].name, add);
        }
    }
}

/// A deterministic 64-bit mix (splitmix64 finaliser) of the inputs.
fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(b.wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(c.wrapping_mul(0x94D0_49BB_1331_11EB))
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One row of the summary.
#[derive(Serialize)]
struct TypeReport {
    #[serde(rename = "type")]
    type_name: String,
    tasks: usize,
    succeeded: usize,
    failed: usize,
    retries: usize,
    mean_wait_ms: f64,
    mean_run_ms: f64,
}

#[derive(Serialize)]
struct Report {
    database: String,
    items: usize,
    elapsed_ms: u64,
    interrupted: bool,
    types: Vec<TypeReport>,
}

/// Runs the demo; returns the exit code.
pub async fn run(
    args: DemoArgs,
    json: bool,
    notify: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<u8> {
    if !(args.scale.is_finite() && args.scale > 0.0 && args.scale <= 100.0) {
        return Err(UsageError(format!(
            "--scale: must be a number above 0 and at most 100, got {}",
            args.scale
        ))
        .into());
    }
    if args.items == 0 || args.items > ITEMS_MAX {
        return Err(UsageError(format!(
            "--items: must be between 1 and {ITEMS_MAX}, got {}",
            args.items
        ))
        .into());
    }
    crate::commands::run::check_listen(&args.listen)?;
    let db = fresh_database(Path::new(DEMO_DB_FILE)).await?;
    let pipeline = Arc::new(Pipeline {
        adders: Mutex::new(HashMap::new()),
        scale: args.scale,
    });
    let started = Instant::now();
    let mut builder = Engine::builder(db.clone()).config(EngineConfig {
        budget: Some(budget()),
        machine_name: "demo".into(),
        host_and_port: args.listen.clone(),
        notify,
        ..EngineConfig::default()
    });
    for index in 0..STAGES.len() {
        builder = builder.register(StageTask {
            index,
            pipeline: Arc::clone(&pipeline),
        });
    }
    let engine = builder.start().await?;
    let web = crate::commands::web::start(
        db.clone(),
        Some(engine.clone()),
        &args.listen,
        None,
        notify,
        None,
    )
    .await?;
    // On stderr: stdout carries the report (JSON with --json).
    eprintln!("dashboard: http://{}/", args.listen);
    engine
        .add_tasks(STAGES[0].name, args.items, |_, _| async { Ok(true) })
        .await?;

    let total = (args.items * STAGES.len()) as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:40}] {pos}/{len} tasks  {msg}",
        )
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let store = Admin::new(db.clone());
    let interrupted = loop {
        tokio::select! {
            () = tokio::time::sleep(PROGRESS_INTERVAL) => {}
            () = shutdown.cancelled() => break true,
            r = engine.wait() => {
                r?;
                break true;
            }
        }
        let done: i64 = store
            .type_summaries()
            .await?
            .iter()
            .map(|s| s.succeeded)
            .sum();
        bar.set_position(u64::try_from(done).unwrap_or(0));
        let counts = store.task_counts().await?;
        if counts.is_empty() {
            break false;
        }
        let running: Vec<String> = counts
            .iter()
            .filter(|(_, _, running)| *running > 0)
            .map(|(name, _, running)| format!("{} {running}", name.trim_start_matches("Demo")))
            .collect();
        bar.set_message(format!("running: {}", running.join(" · ")));
    };
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    let report = report(&db, args.items, elapsed, interrupted).await?;
    if json {
        output::json(&report)?;
    } else {
        print_report(&report);
    }
    if args.keep_open && !shutdown.is_cancelled() {
        eprintln!(
            "the dashboard stays open at http://{}/; Ctrl-C stops it",
            args.listen
        );
        shutdown.cancelled().await;
    }
    engine.shutdown().await?;
    web.stop().await;
    Ok(EXIT_OK)
}

/// Deletes the demo database (and SQLite's side files) and creates it afresh.
async fn fresh_database(path: &Path) -> anyhow::Result<Db> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let p = format!("{}{suffix}", path.display());
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow::anyhow!("removing the old demo database {p}: {e}")),
        }
    }
    open_migrated(&format!("sqlite://./{}", path.display())).await
}

async fn report(
    db: &Db,
    items: usize,
    elapsed: Duration,
    interrupted: bool,
) -> anyhow::Result<Report> {
    let store = Admin::new(db.clone());
    let summaries = store.type_summaries().await?;
    // Per type: which tasks ran, and which of them succeeded (a task whose every attempt
    // failed failed for good).
    let rows = store
        .history(&HistoryQuery {
            limit: 1_000_000,
            ..HistoryQuery::default()
        })
        .await?;
    let mut tasks: BTreeMap<&str, (HashSet<i64>, HashSet<i64>)> = BTreeMap::new();
    for r in &rows {
        let e = tasks.entry(r.name.as_str()).or_default();
        e.0.insert(r.task_id);
        if r.result {
            e.1.insert(r.task_id);
        }
    }
    let types = STAGES
        .iter()
        .map(|stage| {
            let (all, ok) = tasks.get(stage.name).cloned().unwrap_or_default();
            let s = summaries.iter().find(|s| s.name == stage.name);
            TypeReport {
                type_name: stage.name.to_owned(),
                tasks: all.len(),
                succeeded: ok.len(),
                failed: all.len() - ok.len(),
                retries: s.map_or(0, |s| usize::try_from(s.failed).unwrap_or(0)),
                mean_wait_ms: s.map_or(0.0, |s| s.mean_wait_ms),
                mean_run_ms: s.map_or(0.0, |s| s.mean_run_ms),
            }
        })
        .collect();
    Ok(Report {
        database: DEMO_DB_FILE.to_owned(),
        items,
        elapsed_ms: elapsed.as_millis() as u64,
        interrupted,
        types,
    })
}

fn print_report(r: &Report) {
    let b = budget();
    outln!(
        "{} items through a {}-stage pipeline on one node (cpu {}, ram {}, gpu {}) in {:.1}s{}",
        r.items,
        STAGES.len(),
        b.cpu,
        harmonytask::resources::format_bytes(b.ram),
        b.gpu,
        r.elapsed_ms as f64 / 1000.0,
        if r.interrupted { " (interrupted)" } else { "" },
    );
    outln!();
    let mut t = Table::new(&[
        "TYPE",
        "COST",
        "TASKS",
        "SUCCEEDED",
        "FAILED",
        "RETRIES",
        "MEAN WAIT",
        "MEAN RUN",
    ]);
    for (row, stage) in r.types.iter().zip(STAGES.iter()) {
        t.row(vec![
            row.type_name.clone(),
            format!("cpu {} ram {} gpu {}", stage.cpu, stage.ram, stage.gpu),
            row.tasks.to_string(),
            row.succeeded.to_string(),
            row.failed.to_string(),
            row.retries.to_string(),
            format!("{:.0} ms", row.mean_wait_ms),
            format!("{:.0} ms", row.mean_run_ms),
        ]);
    }
    t.print();
    outln!();
    outln!(
        "RETRIES are failed attempts that were retried; FAILED are tasks that used up their {MAX_FAILURES} attempts."
    );
    outln!(
        "Explore: harmony --db sqlite://{} task history --failed",
        r.database
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_valid_and_contend() {
        let pipeline = Arc::new(Pipeline {
            adders: Mutex::new(HashMap::new()),
            scale: 1.0,
        });
        let b = budget().amounts();
        for index in 0..STAGES.len() {
            let d = StageTask {
                index,
                pipeline: Arc::clone(&pipeline),
            }
            .type_details();
            d.validate().unwrap();
            let (fit, _) = d.cost.amounts().how_many_fit(&b);
            assert!(fit >= 1, "{} must fit the budget", d.name);
        }
        // The RAM-heavy stage and the GPU stage are the bottlenecks the demo shows.
        let ram: u64 = STAGES[1].ram.parse::<ByteSize>().unwrap().0;
        assert_eq!((16u64 << 30) / ram, 2);
        assert_eq!(STAGES[2].gpu, budget().gpu);
    }

    #[test]
    fn failures_are_deterministic_and_rare() {
        let fails = (0..10_000u64)
            .filter(|t| (mix(*t, 1, 0) >> 20) % 100 < FAIL_PERCENT)
            .count();
        assert!((700..1300).contains(&fails), "{fails}");
        assert_eq!(mix(1, 2, 3), mix(1, 2, 3));
    }
}
