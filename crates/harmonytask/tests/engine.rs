//! Engine behaviour on one node and on several engines in one process, on SQLite and Postgres.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};
use harmonydb::{Executor, Timestamp};
use harmonytask::{Admin, HistoryQuery};
use harmonytask::{
    Blocked, Done, Engine, Limiter, Resources, RetryWait, TaskError, TaskId, TypeDetails,
};

engine_suite!(
    runs_and_records_tasks,
    retries_wait_then_succeed,
    permanent_failure_after_max_failures,
    panics_and_timeouts_are_failed_attempts,
    fifo_within_a_type,
    can_accept_filters_and_blocks,
    max_is_respected_and_shared,
    reservations_never_exceed_the_budget,
    add_task_transaction_semantics,
    restart_a_failed_task,
    three_engines_share_the_work,
    cluster_limit_holds_across_engines,
    a_fenced_node_discards_its_result_and_stops,
    shutdown_releases_running_tasks,
    bad_declarations_are_refused,
    one_address_one_live_machine,
);

fn quick(name: &str) -> TypeDetails {
    TypeDetails::new(name)
}

async fn runs_and_records_tasks(t: &TestDb) {
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(quick("work"), move |_, ctx| {
            let r = r.clone();
            async move {
                assert!(
                    ctx.still_owned().await,
                    "a running task is owned by its node"
                );
                ctx.set_meta("k", "v");
                r.fetch_add(1, Ordering::SeqCst);
                Ok(Done(true))
            }
        }))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    let completed = Arc::new(Mutex::new(Vec::new()));
    let c = completed.clone();
    engine
        .on_task_complete(
            "work",
            Arc::new(move |id, meta: &HashMap<String, String>| {
                assert_eq!(meta.get("k").map(String::as_str), Some("v"));
                c.lock().unwrap().push(id);
            }),
        )
        .unwrap();
    for _ in 0..50 {
        engine
            .add_task("work", |_, _| async { Ok(true) })
            .await
            .unwrap()
            .unwrap();
    }
    let batch = engine
        .add_tasks("work", 50, |_, _| async { Ok(true) })
        .await
        .unwrap();
    assert_eq!(batch.len(), 50);
    drained(t, Duration::from_secs(30)).await;
    assert_eq!(ran.load(Ordering::SeqCst), 100);
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history WHERE result").await,
        100
    );
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task_history WHERE err <> ''"
        )
        .await,
        0
    );
    eventually("completion callbacks", Duration::from_secs(10), || {
        let n = completed.lock().unwrap().len();
        async move { (n == 100).then_some(()) }
    })
    .await;
    let status = engine.status().await.unwrap();
    assert!(status.running.is_empty());
    assert_eq!(status.reserved, Resources::default());
    shutdown(&engine).await;
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_machines").await,
        0,
        "machine row deleted at shutdown"
    );
}

async fn retries_wait_then_succeed(t: &TestDb) {
    let mut d = quick("flaky");
    d.retry_wait = RetryWait::constant(Duration::from_millis(300));
    d.max_failures = 0;
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(d, |_, ctx| async move {
            if ctx.retries() < 2 {
                Err(TaskError::new(format!(
                    "attempt {} fails",
                    ctx.retries() + 1
                )))
            } else {
                Ok(Done(true))
            }
        }))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    let id = engine
        .add_task("flaky", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    drained(t, Duration::from_secs(30)).await;
    let store = Admin::new(t.db.clone());
    let mut h = store
        .history(&HistoryQuery {
            task: Some(id),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    h.reverse();
    assert_eq!(
        h.iter().map(|r| r.result).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    assert_eq!(h[0].err, "attempt 1 fails");
    for pair in h.windows(2) {
        let gap = pair[1].work_start.since(pair[0].work_end);
        assert!(
            gap >= Duration::from_millis(290),
            "retry wait not honoured: {gap:?}"
        );
    }
    shutdown(&engine).await;
}

async fn permanent_failure_after_max_failures(t: &TestDb) {
    let mut d = quick("doomed");
    d.max_failures = 3;
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(d, |_, _| async { Ok(Done(false)) }))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    engine
        .add_task("doomed", |_, _| async { Ok(true) })
        .await
        .unwrap();
    drained(t, Duration::from_secs(30)).await;
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task_history WHERE NOT result"
        )
        .await,
        3
    );
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history WHERE result").await,
        0
    );
    shutdown(&engine).await;
}

async fn panics_and_timeouts_are_failed_attempts(t: &TestDb) {
    let mut p = quick("panics");
    p.max_failures = 1;
    let mut s = quick("slow");
    s.max_failures = 1;
    s.timeout = Some(Duration::from_millis(200));
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(p, |_, _| async {
            if true {
                panic!("task code panicked");
            }
            Ok(Done(true))
        }))
        .register(Probe::new(s, |_, _| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(Done(true))
        }))
        .register(Probe::new(quick("fine"), |_, _| async { Ok(Done(true)) }))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    engine
        .add_task("panics", |_, _| async { Ok(true) })
        .await
        .unwrap();
    engine
        .add_task("slow", |_, _| async { Ok(true) })
        .await
        .unwrap();
    drained(t, Duration::from_secs(30)).await;
    let errs: Vec<(String, String)> =
        t.db.select(
            "SELECT name, err FROM harmony_task_history ORDER BY name",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0].0, "panics");
    assert_eq!(errs[0].1, "panic: task code panicked");
    assert_eq!(errs[1].0, "slow");
    assert!(errs[1].1.starts_with("timeout"), "{}", errs[1].1);
    // The node is still healthy.
    engine
        .add_task("fine", |_, _| async { Ok(true) })
        .await
        .unwrap();
    drained(t, Duration::from_secs(30)).await;
    shutdown(&engine).await;
}

async fn fifo_within_a_type(t: &TestDb) {
    // Added before the engine starts, with distinct posted times, the reverse of id order for
    // half of them: FIFO is by posted_time, then id.
    let order = Arc::new(Mutex::new(Vec::new()));
    let store = Admin::new(t.db.clone());
    let mut expected = Vec::new();
    for i in 0..20i64 {
        let posted =
            Timestamp::from_millis(1_700_000_000_000 + if i < 10 { 1000 - i } else { 2000 + i });
        let id: i64 = t
            .db
            .scalar(
                "INSERT INTO harmony_task (name, posted_time, update_time, added_by) VALUES ('fifo', $1, $1, 0) RETURNING id",
                &[&posted],
            )
            .await
            .unwrap();
        expected.push((posted, id));
    }
    let _ = store;
    expected.sort();
    let mut d = quick("fifo");
    d.cost = Resources::new(1.0, 0, 0.0);
    let o = order.clone();
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(d, move |id, _| {
            let o = o.clone();
            async move {
                o.lock().unwrap().push(id.0);
                Ok(Done(true))
            }
        }))
        .config(config(Resources::new(1.0, 1 << 30, 0.0)))
        .start()
        .await
        .unwrap();
    drained(t, Duration::from_secs(30)).await;
    let want: Vec<i64> = expected.iter().map(|(_, id)| *id).collect();
    assert_eq!(*order.lock().unwrap(), want);
    shutdown(&engine).await;
}

async fn can_accept_filters_and_blocks(t: &TestDb) {
    let engine = Engine::builder(t.db.clone())
        .register(
            Probe::new(quick("picky"), |_, _| async { Ok(Done(true)) })
                .accepting(|c| c.iter().copied().filter(|id| id.0 % 2 == 0).collect()),
        )
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    let mut odd = 0;
    for _ in 0..10 {
        let id = engine
            .add_task("picky", |_, _| async { Ok(true) })
            .await
            .unwrap()
            .unwrap();
        odd += usize::from(id.0 % 2 == 1);
    }
    let db = t.db.clone();
    eventually(
        "even tasks done, odd ones refused",
        Duration::from_secs(30),
        || {
            let db = db.clone();
            let engine = engine.clone();
            async move {
                let left: i64 = db
                    .scalar("SELECT count(*) FROM harmony_task", &[])
                    .await
                    .ok()?;
                let st = engine.status().await.ok()?;
                (left as usize == odd && st.types[0].blocked == Some(Blocked::Refused))
                    .then_some(())
            }
        },
    )
    .await;
    let owned = count(
        t,
        "SELECT count(*) FROM harmony_task WHERE owner_id IS NOT NULL",
    )
    .await;
    assert_eq!(owned, 0, "refused tasks are never claimed");
    shutdown(&engine).await;
}

async fn max_is_respected_and_shared(t: &TestDb) {
    let own = Gauge::default();
    let shared_gauge = Gauge::default();
    let mut a = quick("limited");
    a.max = Some(Limiter::new(2));
    let shared = Limiter::new(3);
    let mut b = quick("shareA");
    b.max = Some(shared.clone());
    let mut c = quick("shareB");
    c.max = Some(shared);
    let sleepy = |g: Gauge| {
        move |_, _| {
            let g = g.clone();
            async move {
                let _in = g.enter();
                tokio::time::sleep(Duration::from_millis(30)).await;
                Ok(Done(true))
            }
        }
    };
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(a, sleepy(own.clone())))
        .register(Probe::new(b, sleepy(shared_gauge.clone())))
        .register(Probe::new(c, sleepy(shared_gauge.clone())))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    for name in ["limited", "shareA", "shareB"] {
        engine
            .add_tasks(name, 12, |_, _| async { Ok(true) })
            .await
            .unwrap();
    }
    drained(t, Duration::from_secs(60)).await;
    assert_eq!(own.peak(), 2, "max 2 is reached and never exceeded");
    assert!(
        shared_gauge.peak() <= 3 && shared_gauge.peak() >= 2,
        "shared max 3: peak {}",
        shared_gauge.peak()
    );
    shutdown(&engine).await;
}

async fn reservations_never_exceed_the_budget(t: &TestDb) {
    // Budget 4 CPU, 10 GiB, 1.5 GPU; a mix of costs including fractional GPUs. Every start
    // checks the sum of costs of what is running against the budget.
    let budget = Resources::new(4.0, 10 << 30, 1.5);
    let in_use = Arc::new(Mutex::new(Resources::default()));
    let violations = Arc::new(AtomicUsize::new(0));
    let peak_gpu = Arc::new(Mutex::new(0.0f64));
    let kinds = [
        ("cpuheavy", Resources::new(2.0, 1 << 30, 0.0)),
        ("ramheavy", Resources::new(0.5, 6 << 30, 0.0)),
        ("gpuhalf", Resources::new(0.5, 1 << 30, 0.5)),
        ("gputenth", Resources::new(0.25, 256 << 20, 0.1)),
    ];
    let mut builder = Engine::builder(t.db.clone()).config(config(budget));
    for (name, cost) in kinds {
        let mut d = quick(name);
        d.cost = cost;
        let (in_use, violations, peak_gpu) = (in_use.clone(), violations.clone(), peak_gpu.clone());
        builder = builder.register(Probe::new(d, move |_, _| {
            let (in_use, violations, peak_gpu) =
                (in_use.clone(), violations.clone(), peak_gpu.clone());
            async move {
                {
                    let mut u = in_use.lock().unwrap();
                    u.cpu += cost.cpu;
                    u.ram += cost.ram;
                    u.gpu += cost.gpu;
                    if u.cpu > budget.cpu + 1e-9 || u.ram > budget.ram || u.gpu > budget.gpu + 1e-9
                    {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut p = peak_gpu.lock().unwrap();
                    *p = p.max(u.gpu);
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
                let mut u = in_use.lock().unwrap();
                u.cpu -= cost.cpu;
                u.ram -= cost.ram;
                u.gpu -= cost.gpu;
                Ok(Done(true))
            }
        }));
    }
    let engine = builder.start().await.unwrap();
    for (name, _) in kinds {
        engine
            .add_tasks(name, 25, |_, _| async { Ok(true) })
            .await
            .unwrap();
    }
    drained(t, Duration::from_secs(120)).await;
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "reservations exceeded the budget"
    );
    assert!(
        *peak_gpu.lock().unwrap() > 1.0,
        "fractional GPUs were packed"
    );
    shutdown(&engine).await;
}

async fn add_task_transaction_semantics(t: &TestDb) {
    // "idle" needs a CPU and the node has none: its tasks wait, and say why.
    let mut idle = quick("idle");
    idle.cost = Resources::new(1.0, 0, 0.0);
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(idle, |_, _| async { Ok(Done(true)) }))
        .config(config(Resources::new(0.0, 0, 0.0)))
        .start()
        .await
        .unwrap();
    // false rolls back: no task.
    assert_eq!(
        engine
            .add_task("idle", |_, _| async { Ok(false) })
            .await
            .unwrap(),
        None
    );
    // An error rolls back and is returned.
    let e = engine
        .add_task("idle", |_, _| async {
            Err(harmonydb::Error::external(std::io::Error::other("nope")))
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nope"));
    // A unique violation from the closure means "already queued".
    let key = |id: TaskId, tx: harmonydb::Tx| async move {
        tx.exec(
            "INSERT INTO harmony_task_args (task_id, key, value) VALUES (-1, 'dedup', $1)",
            &[&id.0.to_string()],
        )
        .await?;
        Ok(true)
    };
    assert!(engine.add_task("idle", key).await.unwrap().is_some());
    assert_eq!(engine.add_task("idle", key).await.unwrap(), None);
    // A type this node does not run is accepted (another node may run it).
    assert!(
        engine
            .add_task("elsewhere", |_, _| async { Ok(true) })
            .await
            .unwrap()
            .is_some()
    );
    // Bad names are refused before touching the database.
    assert!(
        engine
            .add_task("this-name-is-bad", |_, _| async { Ok(true) })
            .await
            .is_err()
    );
    assert!(
        engine
            .add_task("seventeen_chars_x", |_, _| async { Ok(true) })
            .await
            .is_err()
    );
    assert_eq!(count(t, "SELECT count(*) FROM harmony_task").await, 2);
    eventually("the never-fits reason", Duration::from_secs(10), || {
        let engine = engine.clone();
        async move {
            let st = engine.status().await.ok()?;
            matches!(st.types[0].blocked, Some(Blocked::NeverFits { .. })).then_some(())
        }
    })
    .await;
    shutdown(&engine).await;
}

async fn restart_a_failed_task(t: &TestDb) {
    let fail = Arc::new(AtomicU32::new(1));
    let f = fail.clone();
    let mut d = quick("once");
    d.max_failures = 1;
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(d, move |_, _| {
            let f = f.clone();
            async move {
                if f.swap(0, Ordering::SeqCst) == 1 {
                    Err(TaskError::new("first run fails"))
                } else {
                    Ok(Done(true))
                }
            }
        }))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    let id = engine
        .add_task("once", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    drained(t, Duration::from_secs(30)).await;
    assert!(
        engine.restart_task(TaskId(999_999)).await.is_err(),
        "unknown task"
    );
    engine.restart_task(id).await.unwrap();
    drained(t, Duration::from_secs(30)).await;
    let results: Vec<(bool,)> =
        t.db.select(
            "SELECT result FROM harmony_task_history WHERE task_id = $1 ORDER BY id",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(results, vec![(false,), (true,)]);
    let e = engine.restart_task(id).await.unwrap_err().to_string();
    assert!(e.contains("completed successfully"), "{e}");
    shutdown(&engine).await;
}

async fn three_engines_share_the_work(t: &TestDb) {
    let attempts = Arc::new(Mutex::new(Vec::<(
        i64,
        i64,
        std::time::Instant,
        std::time::Instant,
    )>::new()));
    let mut engines = Vec::new();
    for _ in 0..3 {
        let db = t.open_another().await;
        let a = attempts.clone();
        let mut d = quick("shared");
        d.cost = Resources::new(1.0, 0, 0.0);
        let e = Engine::builder(db)
            .register(Probe::new(d, move |id, ctx| {
                let a = a.clone();
                async move {
                    let start = std::time::Instant::now();
                    tokio::task::yield_now().await;
                    a.lock().unwrap().push((
                        id.0,
                        ctx.machine_id().0,
                        start,
                        std::time::Instant::now(),
                    ));
                    Ok(Done(true))
                }
            }))
            .config(config(Resources::new(4.0, 1 << 30, 0.0)))
            .start()
            .await
            .unwrap();
        engines.push(e);
    }
    let ids = engines[0]
        .add_tasks("shared", 2000, |_, _| async { Ok(true) })
        .await
        .unwrap();
    for e in &engines[1..] {
        e.poll_now();
    }
    drained(t, Duration::from_secs(120)).await;
    let a = attempts.lock().unwrap().clone();
    let mut by_task: HashMap<i64, Vec<(i64, std::time::Instant, std::time::Instant)>> =
        HashMap::new();
    for (id, m, s, e) in a {
        by_task.entry(id).or_default().push((m, s, e));
    }
    assert_eq!(by_task.len(), ids.len(), "every task ran");
    let twice: Vec<_> = by_task.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(twice.is_empty(), "tasks ran twice: {twice:?}");
    let machines: std::collections::HashSet<i64> = by_task.values().map(|v| v[0].0).collect();
    assert!(machines.len() >= 2, "the work was shared: {machines:?}");
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history WHERE result").await,
        2000
    );
    assert_eq!(
        count(
            t,
            "SELECT count(DISTINCT task_id) FROM harmony_task_history"
        )
        .await,
        2000
    );
    for e in &engines {
        shutdown(e).await;
    }
}

async fn cluster_limit_holds_across_engines(t: &TestDb) {
    let gauge = Gauge::default();
    let mut engines = Vec::new();
    for _ in 0..3 {
        let mut d = quick("capped");
        d.max_cluster = 2;
        let g = gauge.clone();
        let e = Engine::builder(t.open_another().await)
            .register(Probe::new(d, move |_, _| {
                let g = g.clone();
                async move {
                    let _in = g.enter();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Ok(Done(true))
                }
            }))
            .config(config(big_budget()))
            .start()
            .await
            .unwrap();
        engines.push(e);
    }
    engines[0]
        .add_tasks("capped", 40, |_, _| async { Ok(true) })
        .await
        .unwrap();
    for e in &engines {
        e.poll_now();
    }
    drained(t, Duration::from_secs(120)).await;
    assert_eq!(gauge.peak(), 2, "max_cluster 2 reached and never exceeded");
    for e in &engines {
        shutdown(e).await;
    }
}

async fn a_fenced_node_discards_its_result_and_stops(t: &TestDb) {
    let release = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    let (r, s) = (release.clone(), started.clone());
    let mut cfg = config(big_budget());
    // Long heartbeat: the fence in the completion must catch the zombie before the heartbeat.
    cfg.heartbeat_interval = Duration::from_secs(3600);
    cfg.dead_after = Duration::from_secs(7200);
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(quick("zombie"), move |_, _| {
            let (r, s) = (r.clone(), s.clone());
            async move {
                s.notify_one();
                r.notified().await;
                Ok(Done(true))
            }
        }))
        .config(cfg)
        .start()
        .await
        .unwrap();
    let id = engine
        .add_task("zombie", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    started.notified().await;
    // The cluster declares this node dead: its row goes, its task is released and another
    // node takes it.
    t.db.exec(
        "DELETE FROM harmony_machines WHERE id = $1",
        &[&engine.machine_id()],
    )
    .await
    .unwrap();
    t.db.exec(
        "INSERT INTO harmony_machines (host_and_port, cpu, ram, gpu, last_contact) VALUES ('other:1', 1, 1, 0, $1)",
        &[&Timestamp::from_millis(4_102_444_800_000)],
    )
    .await
    .unwrap();
    t.db.exec(
        "UPDATE harmony_task SET owner_id = (SELECT id FROM harmony_machines WHERE host_and_port = 'other:1') WHERE id = $1",
        &[&id],
    )
    .await
    .unwrap();
    release.notify_one();
    // The zombie's success is discarded: the row is still the other node's, no history row.
    let db = t.db.clone();
    eventually(
        "the fenced outcome to be discarded",
        Duration::from_secs(30),
        || {
            let engine = engine.clone();
            async move {
                let st = engine.status().await.ok();
                st.map(|s| s.running.is_empty())
                    .unwrap_or(true)
                    .then_some(())
            }
        },
    )
    .await;
    let owner: Option<i64> = db
        .scalar("SELECT owner_id FROM harmony_task WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert!(owner.is_some(), "the task still belongs to the other node");
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history").await,
        0
    );
    // Adding work makes it try to claim: the owner FK fails, it fences itself and stops.
    engine
        .add_task("zombie", |_, _| async { Ok(true) })
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), engine.wait())
        .await
        .expect("the fenced engine stops")
        .unwrap_err();
    assert!(matches!(err, harmonytask::Error::Fenced(_)), "{err}");
}

async fn shutdown_releases_running_tasks(t: &TestDb) {
    let mut cfg = config(big_budget());
    cfg.shutdown_grace = Duration::from_millis(100);
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let mut d = quick("long");
    d.max_failures = 1;
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(d, move |_, ctx| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                ctx.cancelled().cancelled().await;
                Err(TaskError::new("cancelled"))
            }
        }))
        .config(cfg)
        .start()
        .await
        .unwrap();
    engine
        .add_tasks("long", 3, |_, _| async { Ok(true) })
        .await
        .unwrap();
    eventually("three running", Duration::from_secs(30), || {
        let n = started.load(Ordering::SeqCst);
        async move { (n == 3).then_some(()) }
    })
    .await;
    engine.shutdown().await.unwrap();
    // Released with retries unchanged (max_failures 1 would have deleted failed rows).
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task WHERE owner_id IS NULL AND retries = 0"
        )
        .await,
        3
    );
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task_history WHERE err = 'shutdown'"
        )
        .await,
        3
    );
    assert_eq!(count(t, "SELECT count(*) FROM harmony_machines").await, 0);
}

async fn bad_declarations_are_refused(t: &TestDb) {
    let ok = |_: TaskId, _: harmonytask::RunContext| async { Ok(Done(true)) };
    let start = |tasks: Vec<TypeDetails>| {
        let db = t.db.clone();
        async move {
            let mut b = Engine::builder(db).config(config(big_budget()));
            for d in tasks {
                b = b.register(Probe::new(d, ok));
            }
            b.start().await.map(|_| ()).map_err(|e| e.to_string())
        }
    };
    assert!(
        start(vec![quick("much_too_long_name")])
            .await
            .unwrap_err()
            .contains("16")
    );
    assert!(
        start(vec![quick("bad name")])
            .await
            .unwrap_err()
            .contains("' '")
    );
    assert!(
        start(vec![quick("dup"), quick("dup")])
            .await
            .unwrap_err()
            .contains("twice")
    );
    let mut neg = quick("neg");
    neg.cost = Resources::new(-1.0, 0, 0.0);
    assert!(start(vec![neg]).await.unwrap_err().contains("cpu"));
    let mut a = quick("a");
    a.may_follow = vec!["b".into()];
    let mut b = quick("b");
    b.may_follow = vec!["a".into()];
    let e = start(vec![a, b]).await.unwrap_err();
    assert!(
        e.contains("cycle") && e.contains("a") && e.contains("b"),
        "{e}"
    );
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_machines").await,
        0,
        "nothing registered"
    );
}

/// Engines starting at the same time at one address: exactly one registers, the others are
/// refused with `AddressInUse` naming the winner; the winner keeps running.
async fn one_address_one_live_machine(t: &TestDb) {
    let cfg = config(big_budget());
    let starts = (0..4).map(|_| {
        let db = t.db.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            Engine::builder(db)
                .config(cfg)
                .register(Probe::new(quick("addr_t"), |_, _| async { Ok(Done(true)) }))
                .start()
                .await
        })
    });
    let mut started = Vec::new();
    let mut refused = Vec::new();
    for s in starts {
        match s.await.unwrap() {
            Ok(e) => started.push(e),
            Err(e) => refused.push(e),
        }
    }
    assert_eq!(started.len(), 1, "refusals: {refused:?}");
    let winner = started[0].machine_id().0;
    for e in &refused {
        match e {
            harmonytask::Error::AddressInUse {
                host_and_port,
                machine,
                ..
            } => {
                assert_eq!(host_and_port, &cfg.host_and_port);
                assert_eq!(*machine, winner);
            }
            other => panic!("expected AddressInUse, got {other:?}"),
        }
    }
    assert_eq!(count(t, "SELECT count(*) FROM harmony_machines").await, 1);
    shutdown(&started[0]).await;
}
