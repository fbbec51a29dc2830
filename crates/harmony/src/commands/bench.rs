//! `harmony bench WORKLOAD`: runs the benchmark library against a fresh database on the
//! backend of `--db` (never the `--db` database itself).

use harmony_bench::{BenchOptions, Workload};

use crate::cli::BenchArgs;
use crate::commands::{EXIT_OK, UsageError};

pub async fn run(db: &str, json: bool, notify_http: bool, args: BenchArgs) -> anyhow::Result<u8> {
    if notify_http && !args.cross_node {
        return Err(UsageError(
            "--notify http applies to `bench latency --cross-node` only (hints between processes)"
                .into(),
        )
        .into());
    }
    let workloads: Vec<Workload> = if args.workload == "all" {
        Workload::ALL.to_vec()
    } else {
        let w = Workload::ALL
            .into_iter()
            .find(|w| w.name() == args.workload)
            .ok_or_else(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                UsageError(format!(
                    "unknown workload {:?}: use one of {} or all",
                    args.workload,
                    names.join(", ")
                ))
            })?;
        vec![w]
    };
    if args.nodes == Some(0) || args.tasks == Some(0) || args.max == Some(0) {
        return Err(UsageError("--nodes, --tasks and --max must be at least 1".into()).into());
    }
    let drains = [Workload::Throughput, Workload::Backlog, Workload::Cluster];
    if (args.max.is_some() || args.read_input) && !workloads.iter().all(|w| drains.contains(w)) {
        return Err(UsageError(
            "--max and --read-input apply to the throughput, backlog and cluster workloads".into(),
        )
        .into());
    }
    if args.task_ms.is_some() && workloads != [Workload::Cluster] {
        return Err(UsageError("--task-ms applies to the cluster workload".into()).into());
    }
    let harmony_exe = std::env::current_exe()?;
    for workload in workloads {
        let opts = BenchOptions {
            workload,
            db_url: db.to_owned(),
            nodes: args.nodes,
            tasks: args.tasks,
            cross_node: args.cross_node,
            notify_http,
            history: args.history,
            max: args.max,
            read_input: args.read_input,
            task_ms: args.task_ms,
            harmony_exe: harmony_exe.clone(),
        };
        let results = harmony_bench::run(&opts).await?;
        if json {
            for r in &results {
                outln!("{}", serde_json::to_string(r)?);
            }
        } else {
            out!("{}", harmony_bench::render_table(&results));
        }
        if let Some(r) = results.iter().find(|r| r.double_runs.unwrap_or(0) > 0) {
            anyhow::bail!(
                "{} tasks ran more than once in the {}-node {} run: this is a bug, please report it",
                r.double_runs.unwrap_or(0),
                r.nodes,
                r.workload
            );
        }
    }
    Ok(EXIT_OK)
}
