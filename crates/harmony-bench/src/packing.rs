//! Packing: the Curio cost table (DESIGN §12) with simulated durations on a fixed budget.
//!
//! Every task is queued at the start; one in-process node runs them all. Reported: the
//! average use of each resource over the makespan, and the makespan against its lower bound —
//! the total work on the binding resource divided by its capacity.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harmonytask::{
    Done, Engine, EngineConfig, Resources, RunContext, Task, TaskError, TaskId, TypeDetails,
    async_trait,
};

use crate::fresh::FreshDb;
use crate::reference::reference_commits_per_s;
use crate::{BenchOptions, BenchResult, peak_rss_mb, reset_peak_rss};

const GIB: f64 = (1u64 << 30) as f64;

/// (type, cpu, ram GiB, gpu, simulated milliseconds, tasks per sector batch)
const CATALOGUE: [(&str, f64, f64, f64, u64, usize); 10] = [
    ("SDR", 4.0, 54.0, 0.0, 400, 1),
    ("SDRTrees", 1.0, 8.0, 1.0, 120, 1),
    ("PreCommitSubmit", 0.0, 1.0, 0.0, 5, 1),
    ("PoRep", 1.0, 50.0, 1.0, 80, 1),
    ("Finalize", 1.0, 0.1, 0.0, 20, 1),
    ("MoveStorage", 1.0, 0.128, 0.0, 30, 1),
    ("CommitSubmit", 0.0, 0.001, 0.0, 5, 1),
    ("WdPostSubmit", 0.0, 0.010, 0.0, 5, 1),
    ("WdPostRecover", 1.0, 0.128, 0.0, 40, 1),
    ("SendMessage", 0.0, 0.001, 0.0, 2, 1),
];

/// The node: a sealing machine.
fn budget() -> Resources {
    Resources::new(32.0, 512 << 30, 2.0)
}

type Spans = Arc<Mutex<Vec<(usize, Instant, Instant)>>>;

struct Sim {
    index: usize,
    details: TypeDetails,
    millis: u64,
    spans: Spans,
}

#[async_trait]
impl Task for Sim {
    fn type_details(&self) -> TypeDetails {
        self.details.clone()
    }

    async fn run(&self, _task: TaskId, _ctx: RunContext) -> Result<Done, TaskError> {
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(self.millis)).await;
        if let Ok(mut s) = self.spans.lock() {
            s.push((self.index, start, Instant::now()));
        }
        Ok(Done(true))
    }
}

pub(crate) async fn packing(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let sectors = opts.tasks.unwrap_or(3_200) / CATALOGUE.len();
    let sectors = sectors.max(1);
    let fresh = FreshDb::create(&opts.db_url).await?;
    let reference = reference_commits_per_s(&fresh.url).await?;
    let db = fresh.open().await?;
    let spans: Spans = Arc::default();
    let mut builder = Engine::builder(db.clone()).config(EngineConfig {
        host_and_port: format!("bench-packing-{}", std::process::id()),
        budget: Some(budget()),
        ..EngineConfig::default()
    });
    let mut costs = Vec::new();
    for (i, (name, cpu, ram, gpu, ms, _)) in CATALOGUE.iter().enumerate() {
        let mut d = TypeDetails::new(*name);
        d.cost = Resources::new(*cpu, (*ram * GIB) as u64, *gpu);
        costs.push((d.cost, *ms));
        builder = builder.register(Sim {
            index: i,
            details: d,
            millis: *ms,
            spans: spans.clone(),
        });
    }
    // Queue everything first, then start the node, so the order of arrival does not matter.
    let client = harmonytask::Client::new(db.clone());
    for (name, ..) in CATALOGUE {
        client.add_tasks_with_args(name, sectors, &[]).await?;
    }
    let total = sectors * CATALOGUE.len();
    reset_peak_rss();
    let engine = builder.start().await?;
    while spans.lock().map(|s| s.len()).unwrap_or(0) < total {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.shutdown().await?;
    let spans = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let first = spans.iter().map(|s| s.1).min().expect("tasks ran");
    let last = spans.iter().map(|s| s.2).max().expect("tasks ran");
    let makespan = last.duration_since(first).as_secs_f64();
    let cap = budget();
    let caps = [cap.cpu, cap.ram as f64, cap.gpu];
    let names = ["cpu", "ram", "gpu"];
    // Work actually done (cost × measured duration) and the lower bound from nominal durations.
    let mut used = [0.0f64; 3];
    let mut bound_work = [0.0f64; 3];
    for (i, s, e) in &spans {
        let (c, _) = costs[*i];
        let d = e.duration_since(*s).as_secs_f64();
        for (k, v) in [c.cpu, c.ram as f64, c.gpu].iter().enumerate() {
            used[k] += v * d;
        }
    }
    for (c, ms) in &costs {
        let d = *ms as f64 / 1000.0 * sectors as f64;
        for (k, v) in [c.cpu, c.ram as f64, c.gpu].iter().enumerate() {
            bound_work[k] += v * d;
        }
    }
    let bounds: Vec<f64> = (0..3).map(|k| bound_work[k] / caps[k]).collect();
    let binding = (0..3)
        .max_by(|a, b| bounds[*a].total_cmp(&bounds[*b]))
        .unwrap_or(0);
    let use_pct: Vec<f64> = (0..3)
        .map(|k| 100.0 * used[k] / (caps[k] * makespan))
        .collect();
    let mut r = BenchResult::new("packing", fresh.backend);
    r.tasks = total;
    r.seconds = makespan;
    r.tasks_per_s = Some(total as f64 / makespan);
    r.reference_commits_per_s = Some(reference);
    r.peak_rss_mb = peak_rss_mb(std::process::id());
    r.detail = format!(
        "budget {}; binding {}: use {:.1}%; makespan {:.2} s vs bound {:.2} s ({:.2}x); use cpu {:.1}% ram {:.1}% gpu {:.1}%",
        cap,
        names[binding],
        use_pct[binding],
        makespan,
        bounds[binding],
        makespan / bounds[binding],
        use_pct[0],
        use_pct[1],
        use_pct[2]
    );
    drop(db);
    fresh.cleanup().await?;
    Ok(vec![r])
}
