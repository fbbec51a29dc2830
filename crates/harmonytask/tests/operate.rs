//! Operators steering a cluster: why waiting work does not start (each blocking reason, as
//! `Admin::why_type` / `why_task` and the `tasks_blocked` metric give it), cancelling waiting
//! and running tasks, and pausing a type on every node. On SQLite and Postgres, and on
//! Postgres with notifications off (cancel then reaches the owner through its heartbeat).

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};
use harmonytask::{
    Admin, AttemptResult, Done, Engine, HistoryQuery, Limiter, Resources, RetryWait, TaskError,
    TaskId, TaskState, TypeDetails, TypeWhy,
};

engine_suite!(
    why_names_each_reason,
    why_a_type_nobody_can_run,
    why_a_task,
    cancel_a_waiting_task,
    cancel_a_running_task_discards_its_late_result,
    cancel_all_waiting_of_a_type,
    pause_stops_claims_on_every_node,
);

const DEAD_AFTER: Duration = Duration::from_secs(10);

/// The test settings, with a short shutdown grace: the blocking attempts end only when they
/// are cancelled.
fn settings(budget: Resources) -> harmonytask::EngineConfig {
    harmonytask::EngineConfig {
        shutdown_grace: Duration::from_millis(100),
        ..config(budget)
    }
}

fn admin(t: &TestDb) -> Admin {
    Admin::new(t.db.clone()).with_notify(!NOTIFY_OFF.with(std::cell::Cell::get))
}

/// A type whose attempts run until they are cancelled.
fn blocker(details: TypeDetails) -> Probe {
    Probe::new(details, |_, ctx| async move {
        ctx.cancelled().cancelled().await;
        Ok(Done(false))
    })
}

/// Waits until the type's answer has a node giving `reason`, and the engine's metric counts
/// it; returns the answer.
async fn wait_reason(t: &TestDb, engine: &Engine, name: &str, reason: &str) -> TypeWhy {
    let a = admin(t);
    let name = name.to_owned();
    let reason = reason.to_owned();
    let w = eventually(
        &format!("{name} to be blocked by {reason}"),
        Duration::from_secs(30),
        || {
            let a = a.clone();
            let (name, reason) = (name.clone(), reason.clone());
            async move {
                let w = a.why_type(&name, DEAD_AFTER).await.ok()?;
                w.nodes
                    .iter()
                    .any(|n| n.reason.as_deref() == Some(reason.as_str()))
                    .then_some(w)
            }
        },
    )
    .await;
    let mut registry = prometheus_client::registry::Registry::default();
    engine.metrics().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let series = format!("harmony_tasks_blocked{{task_type=\"{name}\",reason=\"{reason}\"}}");
    assert!(
        text.lines()
            .any(|l| l.starts_with(&series) && !l.ends_with(" 0")),
        "the metric counts the blocked tasks: {series} in\n{text}"
    );
    w
}

async fn why_names_each_reason(t: &TestDb) {
    let budget = Resources::new(4.0, 64 << 30, 0.0);
    let mut big = TypeDetails::new("big");
    big.cost = Resources::new(1.0, 40 << 30, 0.0);
    let mut one = TypeDetails::new("one");
    one.max = Some(Limiter::new(1));
    let mut flaky = TypeDetails::new("flaky");
    flaky.retry_wait = RetryWait::constant(Duration::from_secs(3600));
    flaky.max_failures = 5;
    let engine = Engine::builder(t.db.clone())
        .register(blocker(big))
        .register(blocker(one))
        .register(Probe::new(flaky, |_, _| async {
            Err(TaskError::new("not yet"))
        }))
        .config(settings(budget))
        .start()
        .await
        .unwrap();
    let add = |name: &'static str| {
        let e = engine.clone();
        async move {
            e.add_task(name, |_, _| async { Ok(true) })
                .await
                .unwrap()
                .unwrap()
        }
    };
    // RAM: one 40 GiB task runs, the second does not fit the 24 GiB left.
    add("big").await;
    add("big").await;
    let w = wait_reason(t, &engine, "big", "resources").await;
    let node = &w.nodes[0];
    assert!(
        node.detail.contains("ram") && node.detail.contains("40 GiB"),
        "{}",
        node.detail
    );
    assert!(!w.never_runs);
    // The per-node max.
    add("one").await;
    add("one").await;
    wait_reason(t, &engine, "one", "at_max").await;
    // A retry wait.
    add("flaky").await;
    let w = wait_reason(t, &engine, "flaky", "retry_wait").await;
    assert!(w.nodes[0].detail.starts_with("retry wait until"), "{:?}", w);
    // A cordon: every reason becomes the cordon.
    let a = admin(t);
    a.cordon(engine.machine_id()).await.unwrap();
    add("one").await;
    wait_reason(t, &engine, "one", "cordoned").await;
    a.uncordon(engine.machine_id()).await.unwrap();
    shutdown(&engine).await;
    // A stopped node's reasons are gone with its machine row.
    assert!(a.blocked(None, DEAD_AFTER).await.unwrap().is_empty());
}

async fn why_a_type_nobody_can_run(t: &TestDb) {
    let mut huge = TypeDetails::new("huge");
    huge.cost = Resources::new(1.0, 500 << 30, 0.0);
    let engine = Engine::builder(t.db.clone())
        .register(blocker(huge))
        .config(settings(Resources::new(4.0, 64 << 30, 0.0)))
        .start()
        .await
        .unwrap();
    engine
        .add_task("huge", |_, _| async { Ok(true) })
        .await
        .unwrap();
    let w = wait_reason(t, &engine, "huge", "never_fits").await;
    assert!(w.never_runs);
    assert!(
        w.summary.starts_with("no node can ever run huge"),
        "{}",
        w.summary
    );
    // A type no live node registers.
    harmonytask::Client::new(t.db.clone())
        .add_task_with_args("ghost", &[])
        .await
        .unwrap();
    let w = admin(t).why_type("ghost", DEAD_AFTER).await.unwrap();
    assert!(w.never_runs);
    assert!(w.nodes.is_empty());
    assert_eq!(w.waiting, 1);
    assert!(
        w.summary.starts_with("no live node runs ghost"),
        "{}",
        w.summary
    );
    shutdown(&engine).await;
}

async fn why_a_task(t: &TestDb) {
    let ok = Arc::new(AtomicUsize::new(0));
    let o = ok.clone();
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(TypeDetails::new("quick"), move |_, _| {
            o.fetch_add(1, Ordering::SeqCst);
            async { Ok(Done(true)) }
        }))
        .register(blocker(TypeDetails::new("slow")))
        .config(settings(big_budget()))
        .start()
        .await
        .unwrap();
    let a = admin(t);
    let done = engine
        .add_task("quick", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    drained_of(t, "quick").await;
    let w = a.why_task(done, DEAD_AFTER).await.unwrap();
    assert_eq!(w.state, TaskState::Done);
    let slow = engine
        .add_task("slow", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    let w = eventually("the slow task to run", Duration::from_secs(10), || {
        let a = a.clone();
        async move {
            let w = a.why_task(slow, DEAD_AFTER).await.ok()?;
            (w.state == TaskState::Running).then_some(w)
        }
    })
    .await;
    assert_eq!(w.owner, Some(engine.machine_id()));
    assert!(w.summary.starts_with("running on machine"), "{}", w.summary);
    let ghost = harmonytask::Client::new(t.db.clone())
        .add_task_with_args("ghost", &[])
        .await
        .unwrap()
        .unwrap();
    let w = a.why_task(ghost, DEAD_AFTER).await.unwrap();
    assert_eq!(w.state, TaskState::Waiting);
    assert!(
        w.summary.contains("no live node runs ghost"),
        "{}",
        w.summary
    );
    assert!(w.type_why.is_some_and(|tw| tw.never_runs));
    let w = a.why_task(TaskId(987_654_321), DEAD_AFTER).await.unwrap();
    assert_eq!(w.state, TaskState::Unknown);
    shutdown(&engine).await;
}

/// Waits until no task of `name` is left.
async fn drained_of(t: &TestDb, name: &'static str) {
    let a = admin(t);
    eventually(
        &format!("{name} to finish"),
        Duration::from_secs(20),
        || {
            let a = a.clone();
            async move { a.tasks(Some(name), 10).await.ok()?.is_empty().then_some(()) }
        },
    )
    .await;
}

/// Every attempt of a task, newest first.
async fn history_of(a: &Admin, id: TaskId) -> Vec<harmonytask::HistoryRow> {
    a.history(&HistoryQuery {
        task: Some(id),
        limit: 10,
        ..HistoryQuery::default()
    })
    .await
    .unwrap()
}

fn attempts(rows: &[harmonytask::HistoryRow]) -> Vec<AttemptResult> {
    rows.iter().map(|h| h.attempt_result()).collect()
}

async fn cancel_a_waiting_task(t: &TestDb) {
    let a = admin(t);
    let id = harmonytask::Client::new(t.db.clone())
        .add_task_with_args("nobody", &[("k".into(), "v".into())])
        .await
        .unwrap()
        .unwrap();
    let c = a.cancel(id, "ops@test").await.unwrap();
    assert_eq!((c.id, c.name.as_str(), c.owner), (id, "nobody", None));
    assert!(a.task(id).await.unwrap().is_none());
    let h = history_of(&a, id).await;
    assert_eq!(attempts(&h), vec![AttemptResult::Cancelled]);
    assert_eq!(h[0].err, "cancelled");
    assert_eq!(h[0].completed_by_host_and_port, "ops@test");
    assert_eq!(
        a.why_task(id, DEAD_AFTER).await.unwrap().state,
        TaskState::Cancelled
    );
    // Cancelling again, or an unknown id, is refused and changes nothing.
    let e = a.cancel(id, "ops@test").await.unwrap_err();
    assert!(
        matches!(e, harmonytask::Error::TaskNotFound(i) if i == id),
        "{e}"
    );
    // A cancelled task can be restarted like a failed one.
    a.restart_task(id).await.unwrap();
    assert!(a.task(id).await.unwrap().is_some());
}

async fn cancel_a_running_task_discards_its_late_result(t: &TestDb) {
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let owned_after = Arc::new(AtomicBool::new(true));
    let (s, o) = (saw_cancel.clone(), owned_after.clone());
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(TypeDetails::new("long"), move |_, ctx| {
            let (s, o) = (s.clone(), o.clone());
            async move {
                ctx.cancelled().cancelled().await;
                s.store(true, Ordering::SeqCst);
                o.store(ctx.still_owned().await, Ordering::SeqCst);
                // A result that comes too late: it must be discarded.
                Ok(Done(true))
            }
        }))
        .config(settings(big_budget()))
        .start()
        .await
        .unwrap();
    let id = engine
        .add_task("long", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    let a = admin(t);
    eventually("the task to run", Duration::from_secs(10), || {
        let e = engine.clone();
        async move { (e.status().await.ok()?.running.len() == 1).then_some(()) }
    })
    .await;
    let c = a.cancel(id, "ops").await.unwrap();
    assert_eq!(c.owner, Some(engine.machine_id()));
    eventually(
        "the attempt's token to fire and the attempt to end",
        Duration::from_secs(20),
        || {
            let (e, s) = (engine.clone(), saw_cancel.clone());
            async move {
                (s.load(Ordering::SeqCst) && e.status().await.ok()?.running.is_empty())
                    .then_some(())
            }
        },
    )
    .await;
    assert!(!owned_after.load(Ordering::SeqCst), "still_owned is false");
    // Shutting down records whatever was still queued: nothing is recorded for the task.
    shutdown(&engine).await;
    let h = history_of(&a, id).await;
    assert_eq!(attempts(&h), vec![AttemptResult::Cancelled], "{h:?}");
    assert!(a.task(id).await.unwrap().is_none(), "the task stays gone");
}

async fn cancel_all_waiting_of_a_type(t: &TestDb) {
    let client = harmonytask::Client::new(t.db.clone());
    let ids = client.add_tasks_with_args("bulk", 1205, &[]).await.unwrap();
    let other = client
        .add_task_with_args("keep", &[])
        .await
        .unwrap()
        .unwrap();
    let a = admin(t);
    assert_eq!(a.cancel_waiting("bulk", "ops").await.unwrap(), 1205);
    assert!(a.tasks(Some("bulk"), 10).await.unwrap().is_empty());
    assert!(a.task(other).await.unwrap().is_some(), "other types stay");
    let h = a
        .history(&HistoryQuery {
            name: Some("bulk".into()),
            limit: 2000,
            ..HistoryQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(h.len(), ids.len());
    assert!(h.iter().all(|r| r.err == "cancelled"));
    assert!(a.cancel_waiting("bad name", "ops").await.is_err());
}

async fn pause_stops_claims_on_every_node(t: &TestDb) {
    let ran_paused = Arc::new(AtomicUsize::new(0));
    let marks = Arc::new(AtomicUsize::new(0));
    let start = || {
        let (p, m) = (ran_paused.clone(), marks.clone());
        Engine::builder(t.db.clone())
            .register(Probe::new(TypeDetails::new("held"), move |_, _| {
                p.fetch_add(1, Ordering::SeqCst);
                async { Ok(Done(true)) }
            }))
            .register(Probe::new(TypeDetails::new("mark"), move |_, _| {
                m.fetch_add(1, Ordering::SeqCst);
                async { Ok(Done(true)) }
            }))
            .config(settings(big_budget()))
            .start()
    };
    let e1 = start().await.unwrap();
    let e2 = start().await.unwrap();
    let a = admin(t);
    assert!(a.pause("held", "ops").await.unwrap());
    assert!(!a.pause("held", "ops").await.unwrap(), "already paused");
    // Added through both nodes (each offers its own adds to its scheduler at once) and by a
    // client; then marker tasks, which both nodes run once they have looked again.
    for e in [&e1, &e2] {
        e.add_tasks("held", 5, |_, _| async { Ok(true) })
            .await
            .unwrap();
    }
    harmonytask::Client::new(t.db.clone())
        .add_tasks_with_args("held", 5, &[])
        .await
        .unwrap();
    for e in [&e1, &e2] {
        e.add_tasks("mark", 20, |_, _| async { Ok(true) })
            .await
            .unwrap();
    }
    drained_of(t, "mark").await;
    assert_eq!(marks.load(Ordering::SeqCst), 40);
    assert_eq!(
        ran_paused.load(Ordering::SeqCst),
        0,
        "a paused type runs nowhere"
    );
    let w = a.why_type("held", DEAD_AFTER).await.unwrap();
    assert_eq!(w.waiting, 15);
    assert!(w.summary.starts_with("paused by ops"), "{}", w.summary);
    assert_eq!(a.paused().await.unwrap().len(), 1);
    assert!(a.resume("held").await.unwrap());
    assert!(!a.resume("held").await.unwrap(), "not paused any more");
    drained_of(t, "held").await;
    assert_eq!(ran_paused.load(Ordering::SeqCst), 15);
    shutdown(&e1).await;
    shutdown(&e2).await;
}
