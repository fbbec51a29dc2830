//! `/metrics`: the Prometheus text exposition.
//!
//! Two parts: the registry built once at start-up (the engine's counters and histograms, the
//! database handle's metrics), and gauges built fresh for each scrape from the node's status
//! and the cached cluster counts ([`crate::cluster`]). Labels are type names, resources and
//! reasons, never task ids.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::State;
use crate::cluster::QUEUE_DEPTH_CAP;

type TypeLabel = [(&'static str, String); 1];
type ResourceLabel = [(&'static str, &'static str); 1];
type BlockedLabel = [(&'static str, String); 2];

/// The static registry: series whose handles live as long as the server.
pub fn static_registry(db: &harmonydb::Db, engine: Option<&harmonytask::Engine>) -> Registry {
    let mut registry = Registry::default();
    db.metrics().register(&mut registry);
    if let Some(engine) = engine {
        engine.metrics().register(&mut registry);
    }
    registry
}

/// Renders every series.
pub async fn render(state: &State) -> String {
    let mut live = Registry::default();
    let r = live.sub_registry_with_prefix("harmony");

    let counts = state.counts().await;
    let up: Gauge = Gauge::default();
    up.set(i64::from(counts.is_ok()));
    r.register(
        "cluster_counts_up",
        "1 when the last read of the cluster counts (queue depth, running) succeeded",
        up,
    );
    if let Ok(counts) = &counts {
        let depth: Family<TypeLabel, Gauge> = Family::default();
        for (name, n) in &counts.waiting {
            depth.get_or_create(&[("task_type", name.clone())]).set(*n);
        }
        r.register(
            "queue_depth",
            format!(
                "Waiting tasks per type, cluster-wide, counted up to {QUEUE_DEPTH_CAP} by a bounded walk of the waiting index (a value of {QUEUE_DEPTH_CAP} means at least that many); cached for 1 s"
            ),
            depth,
        );
        let running: Family<TypeLabel, Gauge> = Family::default();
        for (name, n) in &counts.running {
            running
                .get_or_create(&[("task_type", name.clone())])
                .set(*n);
        }
        r.register(
            "cluster_tasks_running",
            "Tasks owned by any machine, per type, cluster-wide; cached for 1 s",
            running,
        );
    }

    if let Some(engine) = &state.engine {
        let healthy: Gauge = Gauge::default();
        healthy.set(i64::from(engine.notifications_healthy()));
        r.register(
            "notifications_healthy",
            "1 while wake-up notifications flow to this node; 0 while it relies on its fast safety-net poll",
            healthy,
        );
        // The status goes through the scheduler's inbox; a stopped engine has none, and the
        // node's gauges are then left out rather than reported as zero.
        if let Ok(status) = engine.status().await {
            let budget: Family<ResourceLabel, Gauge<f64, AtomicU64>> = Family::default();
            let reserved: Family<ResourceLabel, Gauge<f64, AtomicU64>> = Family::default();
            for (res, b, u) in [
                ("cpu", status.budget.cpu, status.reserved.cpu),
                (
                    "ram_bytes",
                    status.budget.ram as f64,
                    status.reserved.ram as f64,
                ),
                ("gpu", status.budget.gpu, status.reserved.gpu),
                (
                    "storage_bytes",
                    status.budget.storage as f64,
                    status.reserved.storage as f64,
                ),
            ] {
                budget.get_or_create(&[("resource", res)]).set(b);
                reserved.get_or_create(&[("resource", res)]).set(u);
            }
            r.register(
                "budget",
                "This node's budget per resource (cpu and gpu in units, ram and storage in bytes)",
                budget,
            );
            r.register(
                "reserved",
                "What running tasks and claims in flight hold of this node's budget, per resource",
                reserved,
            );
            let cordoned: Gauge = Gauge::default();
            cordoned.set(i64::from(status.cordoned));
            r.register("node_cordoned", "1 while this node is cordoned", cordoned);
            let blocked: Family<BlockedLabel, Gauge> = Family::default();
            for t in &status.types {
                if let Some(b) = &t.blocked {
                    blocked
                        .get_or_create(&[
                            ("task_type", t.name.clone()),
                            ("reason", blocked_reason(b)),
                        ])
                        .set(1);
                }
            }
            r.register(
                "type_blocked",
                "1 for each type with waiting tasks that this node does not start, by the reason",
                blocked,
            );
        }
    }

    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail.
    let _ = encode_registry(&mut out, &state.registry);
    let _ = encode_registry(&mut out, &live);
    let _ = encode_eof(&mut out);
    out
}

/// Converts OpenMetrics text (what `prometheus-client` writes) to the Prometheus text format
/// 0.0.4, for scrapers and tools that do not ask for OpenMetrics (`curl`, `promtool check
/// metrics`): a counter family is named with its `_total` suffix in `HELP` and `TYPE`, and the
/// `# UNIT` and `# EOF` lines, which that format does not have, are left out.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 256);
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The reason word of a blocked reason (its serde tag: `cordoned`, `at_max`, …).
fn blocked_reason(b: &harmonytask::Blocked) -> String {
    serde_json::to_value(b)
        .ok()
        .and_then(|v| v.get("reason").and_then(|r| r.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "other".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_name_in_prometheus_text() {
        let om = "# HELP a_things Things.\n# TYPE a_things counter\na_things_total{x=\"1\"} 2\n# HELP b Gauge.\n# TYPE b gauge\n# UNIT b seconds\nb 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_things_total Things.\n# TYPE a_things_total counter\na_things_total{x=\"1\"} 2\n# HELP b Gauge.\n# TYPE b gauge\nb 1\n"
        );
    }
}
