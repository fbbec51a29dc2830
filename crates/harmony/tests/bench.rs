//! `harmony bench` runs its workloads end to end (small sizes; the numbers themselves are
//! measured by hand and published in docs/benchmarks.md, never asserted here).

mod common;

use common::*;
use harmony_testkit::{pg_base_url, postgres_or_skip};

/// Runs `harmony --json --db DB bench ARGS…` and returns its result objects.
async fn bench(db: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["--json", "--db", db, "bench"];
    all.extend_from_slice(args);
    let out = harmony(&all).await;
    assert_eq!(out.code, Some(0), "harmony {all:?}\nstderr: {}", out.stderr);
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn positive(r: &serde_json::Value, field: &str) -> f64 {
    let v = r[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing in {r}"));
    assert!(v > 0.0, "{field} = {v} in {r}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_drains_every_task_and_reports_the_reference_rate() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("ignored.db").display());
    let results = bench(&db, &["throughput", "--tasks", "300"]).await;
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["workload"], "throughput");
    assert_eq!(r["backend"], "sqlite");
    assert_eq!(r["nodes"], 1);
    assert_eq!(r["tasks"], 300, "every queued task was drained: {r}");
    positive(r, "tasks_per_s");
    positive(r, "reference_commits_per_s");
    positive(r, "peak_rss_mb");
    // The benchmark used a fresh database of its own, not the --db file.
    assert!(!dir.path().join("ignored.db").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_throughput_drains_a_limited_type_that_reads_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("ignored.db").display());
    let results = bench(
        &db,
        &["throughput", "--max", "4", "--read-input", "--tasks", "300"],
    )
    .await;
    let r = &results[0];
    assert_eq!(r["tasks"], 300, "every queued task was drained: {r}");
    positive(r, "tasks_per_s");
    let detail = r["detail"].as_str().unwrap();
    assert!(detail.starts_with("max 4, input read; "), "{r}");
    assert!(detail.contains("× reference"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_latency_measures_every_add() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("ignored.db").display());
    let results = bench(&db, &["latency", "--cross-node", "--tasks", "40"]).await;
    let r = &results[0];
    assert_eq!(r["nodes"], 2);
    assert_eq!(r["tasks"], 40);
    let p50 = positive(r, "p50_ms");
    let p99 = positive(r, "p99_ms");
    let max = positive(r, "max_ms");
    assert!(p50 <= p99 && p99 <= max, "percentiles out of order: {r}");
    assert!(
        r["detail"].as_str().unwrap().contains("40 of 40 started"),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_processes_on_postgres_runs_each_task_once() {
    if !postgres_or_skip("cluster_of_processes_on_postgres_runs_each_task_once").await {
        return;
    }
    let results = bench(
        &pg_base_url(),
        &["cluster", "--nodes", "2", "--tasks", "400"],
    )
    .await;
    assert_eq!(results.len(), 1);
    let r = &results[0];
    assert_eq!(r["workload"], "cluster");
    assert_eq!(r["backend"], "postgres");
    assert_eq!(r["nodes"], 2);
    assert_eq!(r["tasks"], 400);
    assert_eq!(r["double_runs"], 0, "{r}");
    positive(r, "peak_rss_mb");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_cluster_on_postgres_runs_each_task_once() {
    if !postgres_or_skip("bounded_cluster_on_postgres_runs_each_task_once").await {
        return;
    }
    // Input-reading tasks (checked from history) and sleeping ones (checked from the attempt
    // log), each under a per-node limit declared in a tasks file.
    for extra in [&["--read-input"][..], &["--task-ms", "5"][..]] {
        let mut args = vec!["cluster", "--nodes", "2", "--tasks", "200", "--max", "2"];
        args.extend_from_slice(extra);
        let results = bench(&pg_base_url(), &args).await;
        let r = &results[0];
        assert_eq!(r["tasks"], 200, "{args:?}: {r}");
        assert_eq!(r["double_runs"], 0, "{args:?}: {r}");
        assert!(
            r["detail"].as_str().unwrap().starts_with("max 2"),
            "{args:?}: {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_workload_is_refused() {
    let out = harmony(&["bench", "speed"]).await;
    out.assert_usage_error(&["unknown workload \"speed\"", "throughput", "all"]);
    let out = harmony(&["bench", "cluster", "--nodes", "0"]).await;
    out.assert_usage_error(&["--nodes"]);
    let out = harmony(&["bench", "latency", "--max", "8"]).await;
    out.assert_usage_error(&["--max", "throughput, backlog and cluster"]);
    let out = harmony(&["bench", "throughput", "--task-ms", "5"]).await;
    out.assert_usage_error(&["--task-ms", "cluster"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_every_old_row_while_a_node_drains() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("ignored.db").display());
    let results = bench(&db, &["prune", "--tasks", "25000"]).await;
    let r = &results[0];
    assert_eq!(r["workload"], "prune");
    assert_eq!(r["tasks"], 25_000, "every old row was pruned: {r}");
    positive(r, "tasks_per_s");
    positive(r, "max_ms");
    let detail = r["detail"].as_str().unwrap();
    assert!(detail.contains(", 0 old rows left;"), "{r}");
}
