//! "Why is this task not running?" for operators: one answer from what the nodes wrote
//! (`harmony_task_blocked`), the live machines and the types they register, the pause table,
//! and the task's row or last history row. The reading is in [`Admin::why_type`] and
//! [`Admin::why_task`]; the answer is put together by pure functions, tested without a
//! database.

use std::time::Duration;

use crate::admin::Admin;
use crate::error::Result;
use crate::model::{
    AttemptResult, BlockedRow, HistoryQuery, HistoryRow, MachineId, NodeWhy, PausedRow, TaskId,
    TaskRow, TaskState, TypeWhy,
};
use crate::store::WHY_COUNT_MAX;

/// What `type_why` is built from.
pub(crate) struct TypeFacts<'a> {
    pub name: &'a str,
    pub waiting: i64,
    pub running: i64,
    pub paused: Option<PausedRow>,
    /// Live machines: id, address, registered types (comma-separated).
    pub live: &'a [(MachineId, String, String)],
    /// Blocked reasons of live machines for this type.
    pub blocked: &'a [BlockedRow],
}

/// The cluster's answer for one type.
pub(crate) fn type_why(f: TypeFacts<'_>) -> TypeWhy {
    let name = f.name;
    let nodes: Vec<NodeWhy> = f
        .live
        .iter()
        .filter(|(_, _, tasks)| tasks.split(',').any(|t| t == name))
        .map(
            |(id, host, _)| match f.blocked.iter().find(|b| b.machine_id == *id) {
                Some(b) => NodeWhy {
                    machine_id: *id,
                    host_and_port: host.clone(),
                    reason: Some(b.reason.clone()),
                    detail: b.detail.clone(),
                    since: Some(b.since),
                },
                None => NodeWhy {
                    machine_id: *id,
                    host_and_port: host.clone(),
                    reason: None,
                    detail: "no blocker reported: it claims when it next looks".to_owned(),
                    since: None,
                },
            },
        )
        .collect();
    let waiting_capped = f.waiting >= WHY_COUNT_MAX;
    let waiting_text = if waiting_capped {
        format!("at least {}", f.waiting)
    } else {
        f.waiting.to_string()
    };
    let mut never_runs = false;
    let summary = if let Some(p) = &f.paused {
        format!(
            "paused by {} since {}: no node claims it until `harmony task resume {name}`",
            p.paused_by, p.paused_at
        )
    } else if nodes.is_empty() {
        never_runs = true;
        format!(
            "no live node runs {name}: start a node that registers it (`harmony run --types {name}` or a tasks file)"
        )
    } else if nodes
        .iter()
        .all(|n| n.reason.as_deref() == Some("never_fits"))
    {
        never_runs = true;
        format!(
            "no node can ever run {name}: its cost exceeds every node's budget ({})",
            nodes[0].detail
        )
    } else if f.waiting == 0 {
        format!("nothing waiting ({} running)", f.running)
    } else if nodes.iter().all(|n| n.reason.is_some()) {
        let reasons: Vec<String> = nodes
            .iter()
            .map(|n| format!("{}: {}", n.host_and_port, n.detail))
            .collect();
        format!(
            "{waiting_text} waiting, every node that runs it is blocked: {}",
            reasons.join("; ")
        )
    } else {
        let free = nodes.iter().filter(|n| n.reason.is_none()).count();
        format!(
            "{waiting_text} waiting; {free} of {} nodes report no blocker and start it when they next claim",
            nodes.len()
        )
    };
    TypeWhy {
        name: name.to_owned(),
        waiting: f.waiting,
        waiting_capped,
        running: f.running,
        paused: f.paused,
        summary,
        never_runs,
        nodes,
    }
}

/// The answer for a task that is not waiting (its type's answer is added for waiting ones).
pub(crate) fn task_state(
    id: TaskId,
    row: Option<&TaskRow>,
    last: Option<&HistoryRow>,
) -> (TaskState, Option<String>, String) {
    if let Some(t) = row {
        return match t.owner_id {
            Some(owner) => (
                TaskState::Running,
                Some(t.name.clone()),
                format!(
                    "running on machine {owner} ({})",
                    t.owner_host.as_deref().unwrap_or("address unknown")
                ),
            ),
            None => (TaskState::Waiting, Some(t.name.clone()), String::new()),
        };
    }
    let Some(h) = last else {
        return (
            TaskState::Unknown,
            None,
            format!("no task {id}: it never existed, or it ended and its history was pruned"),
        );
    };
    let name = Some(h.name.clone());
    match h.attempt_result() {
        AttemptResult::Ok => (
            TaskState::Done,
            name,
            format!("done at {} on {}", h.work_end, h.completed_by_host_and_port),
        ),
        AttemptResult::Cancelled => (
            TaskState::Cancelled,
            name,
            format!(
                "cancelled at {} by {}",
                h.work_end, h.completed_by_host_and_port
            ),
        ),
        _ => (
            TaskState::Failed,
            name,
            format!(
                "failed for good at {}: {} (`harmony task restart {id}` runs it again)",
                h.work_end, h.err
            ),
        ),
    }
}

impl Admin {
    /// Why waiting tasks of `name` are (not) running, per live node, with one line that says
    /// it. Machines whose heartbeat is older than `dead_after` are ignored.
    pub async fn why_type(&self, name: &str, dead_after: Duration) -> Result<TypeWhy> {
        crate::name::validate_name(name)?;
        let store = self.store();
        let (waiting, running) = store.type_counts(name).await?;
        let paused = store.pause_of(name).await?;
        let live = store.machines_live(dead_after).await?;
        let blocked = store.blocked_list(Some(name), dead_after).await?;
        Ok(type_why(TypeFacts {
            name,
            waiting,
            running,
            paused,
            live: &live,
            blocked: &blocked,
        }))
    }

    /// Why task `id` is (not) running: running where, done, failed, cancelled, or waiting
    /// with its type's answer.
    pub async fn why_task(&self, id: TaskId, dead_after: Duration) -> Result<crate::TaskWhy> {
        let row = self.task(id).await?;
        let last = if row.is_none() {
            self.history(&HistoryQuery {
                task: Some(id),
                limit: 1,
                ..HistoryQuery::default()
            })
            .await?
            .into_iter()
            .next()
        } else {
            None
        };
        let (state, name, summary) = task_state(id, row.as_ref(), last.as_ref());
        let (summary, type_why) = match (&state, &name) {
            (TaskState::Waiting, Some(n)) => {
                let w = self.why_type(n, dead_after).await?;
                (format!("waiting: {}", w.summary), Some(w))
            }
            _ => (summary, None),
        };
        Ok(crate::TaskWhy {
            id,
            name,
            state,
            owner: row.and_then(|r| r.owner_id),
            summary,
            type_why,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use harmonydb::Timestamp;

    fn live(entries: &[(i64, &str)]) -> Vec<(MachineId, String, String)> {
        entries
            .iter()
            .map(|(id, tasks)| (MachineId(*id), format!("h{id}:1"), (*tasks).to_owned()))
            .collect()
    }

    fn blocked(machine: i64, reason: &str, detail: &str) -> BlockedRow {
        BlockedRow {
            machine_id: MachineId(machine),
            host_and_port: format!("h{machine}:1"),
            task_name: "SDR".into(),
            reason: reason.into(),
            detail: detail.into(),
            since: Timestamp::from_millis(0),
        }
    }

    fn facts<'a>(
        live: &'a [(MachineId, String, String)],
        blocked: &'a [BlockedRow],
    ) -> TypeFacts<'a> {
        TypeFacts {
            name: "SDR",
            waiting: 3,
            running: 0,
            paused: None,
            live,
            blocked,
        }
    }

    #[test]
    fn a_type_nobody_runs_says_so_in_one_line() {
        let l = live(&[(1, "PoRep"), (2, "SDRTrees,PoRep")]);
        let w = type_why(facts(&l, &[]));
        assert!(w.never_runs);
        assert!(w.nodes.is_empty());
        assert!(
            w.summary.starts_with("no live node runs SDR"),
            "{}",
            w.summary
        );
    }

    #[test]
    fn a_cost_beyond_every_budget_says_so() {
        let l = live(&[(1, "SDR"), (2, "SDR")]);
        let b = [
            blocked(
                1,
                "never_fits",
                "never fits: needs ram 54 GiB / node has 12 GiB",
            ),
            blocked(
                2,
                "never_fits",
                "never fits: needs ram 54 GiB / node has 32 GiB",
            ),
        ];
        let w = type_why(facts(&l, &b));
        assert!(w.never_runs);
        assert!(
            w.summary.contains("exceeds every node's budget"),
            "{}",
            w.summary
        );
    }

    #[test]
    fn each_node_gives_its_reason() {
        let l = live(&[(1, "SDR"), (2, "SDR"), (3, "Other")]);
        let b = [blocked(1, "resources", "needs ram 54 GiB / free 12 GiB")];
        let w = type_why(facts(&l, &b));
        assert!(!w.never_runs);
        assert_eq!(w.nodes.len(), 2);
        assert_eq!(w.nodes[0].reason.as_deref(), Some("resources"));
        assert_eq!(w.nodes[1].reason, None);
        assert!(w.summary.contains("1 of 2 nodes"), "{}", w.summary);
        let b = [
            blocked(1, "resources", "needs ram 54 GiB / free 12 GiB"),
            blocked(2, "cordoned", "node is cordoned"),
        ];
        let w = type_why(facts(&l, &b));
        assert!(
            w.summary.contains("every node that runs it is blocked"),
            "{}",
            w.summary
        );
        assert!(
            w.summary.contains("h2:1: node is cordoned"),
            "{}",
            w.summary
        );
    }

    #[test]
    fn a_pause_wins() {
        let l = live(&[(1, "SDR")]);
        let mut f = facts(&l, &[]);
        f.paused = Some(PausedRow {
            task_name: "SDR".into(),
            paused_at: Timestamp::from_millis(0),
            paused_by: "ops".into(),
        });
        let w = type_why(f);
        assert!(w.summary.starts_with("paused by ops"), "{}", w.summary);
        assert!(!w.never_runs);
    }
}
