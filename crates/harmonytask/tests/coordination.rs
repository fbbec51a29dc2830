//! Cross-node wake-ups, followers, singletons, IAmBored, preemption, cordon and restart, on
//! SQLite (several handles on one file, as several processes would be) and Postgres.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};
use harmonydb::Executor;
use harmonytask::{
    Blocked, Client, Done, Engine, EngineConfig, IAmBored, Limiter, MachineId, Resources,
    TaskError, TypeDetails,
};

harmony_testkit::both_backends!(
    a_task_added_elsewhere_wakes_the_node_that_runs_it,
    follower_chains_complete_exactly_once,
    followers_run_on_other_nodes,
    singleton_never_runs_twice_at_once_and_run_now_works,
    run_now_during_a_run_is_served_after_it,
    run_now_through_the_engine_wakes_its_own_node,
    iambored_is_called_and_rate_limited,
    preemption_frees_the_cheapest_victim,
    preemption_across_nodes_is_done_by_one_node,
    cordon_stops_claims_and_yields,
    cordon_releases_can_yield_tasks_that_never_ask,
    restart_drains_then_stops,
    notify_off_still_works_by_polling,
);

/// Engine settings for wake-up tests: the safety-net poll is an hour away, so anything that
/// runs promptly was woken by a notification (or a change check).
fn no_poll(budget: Resources) -> EngineConfig {
    EngineConfig {
        poll_interval: Duration::from_secs(3600),
        poll_interval_unhealthy: Duration::from_secs(3600),
        iambored_interval: Duration::from_millis(50),
        ..config(budget)
    }
}

fn ok_task(name: &str) -> Probe {
    Probe::new(TypeDetails::new(name), |_, _| async { Ok(Done(true)) })
}

async fn a_task_added_elsewhere_wakes_the_node_that_runs_it(t: &TestDb) {
    let runner = Engine::builder(t.open_another().await)
        .register(ok_task("wake"))
        .config(no_poll(big_budget()))
        .start()
        .await
        .unwrap();
    // Let the runner finish its start-up poll, so the task below is found only by a wake-up.
    eventually("the runner's first poll", Duration::from_secs(10), || {
        let r = runner.clone();
        async move { r.status().await.ok().map(|_| ()) }
    })
    .await;
    // Added by a client that runs nothing (on SQLite: another connection, like another
    // process).
    let client = Client::new(t.open_another().await);
    for _ in 0..5 {
        client.add_task_with_args("wake", &[]).await.unwrap();
    }
    drained(t, Duration::from_secs(30)).await;
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history WHERE result").await,
        5
    );
    runner.shutdown().await.unwrap();
}

/// `Engine::run_now` wakes the engine's own scheduler directly: with the poll and the IAmBored
/// tick an hour away, and (on SQLite) no change check seeing this process's own commits, the
/// run still comes at once.
async fn run_now_through_the_engine_wakes_its_own_node(t: &TestDb) {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let e = Engine::builder(t.open_another().await)
        .register(Probe::new(
            TypeDetails::new("hourly").singleton(Duration::from_secs(3600)),
            move |_, _| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(Done(true))
                }
            },
        ))
        .config(EngineConfig {
            iambored_interval: Duration::from_secs(3600),
            ..no_poll(big_budget())
        })
        .start()
        .await
        .unwrap();
    for want in 1..=3 {
        if want > 1 {
            e.run_now("hourly").await.unwrap();
        }
        eventually("the singleton's run", Duration::from_secs(30), || {
            let n = runs.load(Ordering::SeqCst);
            async move { (n == want).then_some(()) }
        })
        .await;
        drained(t, Duration::from_secs(30)).await;
    }
    e.shutdown().await.unwrap();
}

/// Predecessors seen by follow-up tasks: (type, previous_task).
type Seen = Arc<Mutex<Vec<(String, i64)>>>;

fn chain_engine(db: harmonydb::Db, types: &[&str], seen: &Seen) -> harmonytask::EngineBuilder {
    let mut b = Engine::builder(db).config(config(big_budget()));
    for name in types {
        let mut d = TypeDetails::new(*name);
        match *name {
            "stage_b" => d = d.follows("stage_a"),
            "stage_c" => d = d.follows("stage_b"),
            _ => {}
        }
        let seen = seen.clone();
        let name = (*name).to_owned();
        b = b.register(Probe::new(d, move |id, ctx| {
            let (seen, name) = (seen.clone(), name.clone());
            async move {
                // The row exists while the task runs: read the predecessor it names.
                let prev: Option<i64> = ctx
                    .db()
                    .scalar(
                        "SELECT previous_task FROM harmony_task WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .map_err(|e| TaskError::new(e.to_string()))?;
                if let Some(p) = prev {
                    seen.lock().unwrap().push((name, p));
                }
                Ok(Done(true))
            }
        }));
    }
    b
}

async fn check_chains(t: &TestDb, chains: i64, seen: &Seen) {
    let db = t.db.clone();
    eventually("every chain to complete", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            let c: i64 = db
                .scalar(
                    "SELECT count(*) FROM harmony_task_history WHERE name = 'stage_c' AND result",
                    &[],
                )
                .await
                .ok()?;
            let left: i64 = db
                .scalar("SELECT count(*) FROM harmony_task", &[])
                .await
                .ok()?;
            (c >= chains && left == 0).then_some(())
        }
    })
    .await;
    for stage in ["stage_a", "stage_b", "stage_c"] {
        let n: i64 = t
            .db
            .scalar(
                "SELECT count(DISTINCT task_id) FROM harmony_task_history WHERE name = $1 AND result",
                &[&stage],
            )
            .await
            .unwrap();
        assert_eq!(n, chains, "{stage}: each follow-up created exactly once");
    }
    // Every follow-up names its predecessor, and no predecessor was followed twice.
    let seen = seen.lock().unwrap().clone();
    for stage in ["stage_b", "stage_c"] {
        let prevs: Vec<i64> = seen
            .iter()
            .filter(|(n, _)| n == stage)
            .map(|(_, p)| *p)
            .collect();
        let distinct: HashSet<i64> = prevs.iter().copied().collect();
        assert_eq!(
            prevs.len() as i64,
            chains,
            "{stage}: every follow-up has previous_task"
        );
        assert_eq!(
            distinct.len(),
            prevs.len(),
            "{stage}: a predecessor was followed twice"
        );
    }
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_follow_queue").await,
        0
    );
}

async fn follower_chains_complete_exactly_once(t: &TestDb) {
    let seen = Seen::default();
    let engine = chain_engine(t.db.clone(), &["stage_a", "stage_b", "stage_c"], &seen)
        .start()
        .await
        .unwrap();
    engine
        .add_tasks("stage_a", 100, |_, _| async { Ok(true) })
        .await
        .unwrap();
    check_chains(t, 100, &seen).await;
    engine.shutdown().await.unwrap();
}

async fn followers_run_on_other_nodes(t: &TestDb) {
    // stage_a runs only on node 1, stage_b only on node 2, stage_c only on node 3.
    let seen = Seen::default();
    let mut engines = Vec::new();
    for types in [["stage_a"], ["stage_b"], ["stage_c"]] {
        engines.push(
            chain_engine(t.open_another().await, &types, &seen)
                .start()
                .await
                .unwrap(),
        );
    }
    engines[0]
        .add_tasks("stage_a", 60, |_, _| async { Ok(true) })
        .await
        .unwrap();
    check_chains(t, 60, &seen).await;
    for e in &engines {
        e.shutdown().await.unwrap();
    }
}

async fn singleton_never_runs_twice_at_once_and_run_now_works(t: &TestDb) {
    let gauge = Gauge::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut engines = Vec::new();
    for _ in 0..3 {
        let (g, r) = (gauge.clone(), runs.clone());
        let e = Engine::builder(t.open_another().await)
            .register(Probe::new(
                TypeDetails::new("tick").singleton(Duration::from_millis(20)),
                move |_, _| {
                    let (g, r) = (g.clone(), r.clone());
                    async move {
                        let _in = g.enter();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        r.fetch_add(1, Ordering::SeqCst);
                        Ok(Done(true))
                    }
                },
            ))
            .config(EngineConfig {
                iambored_interval: Duration::from_millis(5),
                ..config(big_budget())
            })
            .start()
            .await
            .unwrap();
        engines.push(e);
    }
    eventually("30 singleton runs", Duration::from_secs(60), || {
        let n = runs.load(Ordering::SeqCst);
        async move { (n >= 30).then_some(()) }
    })
    .await;
    assert_eq!(gauge.peak(), 1, "a singleton ran twice at once");
    for e in &engines {
        e.shutdown().await.unwrap();
    }
    // A node still running may have added the next "tick" after another one stopped, and
    // released it when it stopped in turn: no node runs "tick" any more, so clear it away.
    t.db.exec("DELETE FROM harmony_task WHERE name = 'tick'", &[])
        .await
        .unwrap();

    // Run-now: an hour-long interval, no polling; the first run happens, then only run-now
    // brings another.
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let e = Engine::builder(t.open_another().await)
        .register(Probe::new(
            TypeDetails::new("hourly").singleton(Duration::from_secs(3600)),
            move |_, _| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    Ok(Done(true))
                }
            },
        ))
        .config(no_poll(big_budget()))
        .start()
        .await
        .unwrap();
    eventually("the first run", Duration::from_secs(30), || {
        let n = runs.load(Ordering::SeqCst);
        async move { (n == 1).then_some(()) }
    })
    .await;
    drained(t, Duration::from_secs(30)).await;
    Client::new(t.open_another().await)
        .run_now("hourly")
        .await
        .unwrap();
    eventually("the run-now run", Duration::from_secs(30), || {
        let n = runs.load(Ordering::SeqCst);
        async move { (n == 2).then_some(()) }
    })
    .await;
    let singleton = harmonytask::Admin::new(t.db.clone())
        .singleton("hourly")
        .await
        .unwrap()
        .unwrap();
    assert!(
        !singleton.run_now_request,
        "the run-now flag is cleared when it runs"
    );
    e.shutdown().await.unwrap();
}

async fn iambored_is_called_and_rate_limited(t: &TestDb) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let mut d = TypeDetails::new("idle_work");
    d.iambored = Some(IAmBored::new(move |ctx| {
        let c = c.clone();
        async move {
            if c.fetch_add(1, Ordering::SeqCst) < 3 {
                ctx.adder.add(|_, _| async { Ok(true) }).await?;
            }
            Ok(())
        }
    }));
    let start = std::time::Instant::now();
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(d, |_, _| async { Ok(Done(true)) }))
        .config(EngineConfig {
            iambored_interval: Duration::from_millis(100),
            ..config(big_budget())
        })
        .start()
        .await
        .unwrap();
    eventually(
        "three tasks added by IAmBored and run",
        Duration::from_secs(30),
        || {
            let db = t.db.clone();
            async move {
                let n: i64 = db
                    .scalar("SELECT count(*) FROM harmony_task_history", &[])
                    .await
                    .ok()?;
                (n == 3).then_some(())
            }
        },
    )
    .await;
    engine.shutdown().await.unwrap();
    // Rate limit: never more than one call per interval (plus the first).
    let allowed = start.elapsed().as_millis() as usize / 100 + 2;
    assert!(
        calls.load(Ordering::SeqCst) <= allowed,
        "{} calls in {:?}",
        calls.load(Ordering::SeqCst),
        start.elapsed()
    );
}

/// A node with 2 CPUs running two ordinary 1-CPU tasks; a 1-CPU time-sensitive task arrives.
async fn preemption_frees_the_cheapest_victim(t: &TestDb) {
    let started = Arc::new(Mutex::new(Vec::<(i64, u32)>::new()));
    let s = started.clone();
    let mut ord = TypeDetails::new("ordinary");
    ord.cost = Resources::new(1.0, 0, 0.0);
    let mut urgent = TypeDetails::new("urgent");
    urgent.cost = Resources::new(1.0, 0, 0.0);
    urgent.time_sensitive = true;
    let mut locked = TypeDetails::new("locked");
    locked.cost = Resources::new(1.0, 0, 0.0);
    locked.uninterruptible = true;
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let locked_gate = Arc::new(tokio::sync::Notify::new());
    let lg = locked_gate.clone();
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(ord, move |id, ctx| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                s.lock().unwrap().push((id.0, ctx.retries()));
                tokio::select! {
                    () = g.notified() => Ok(Done(true)),
                    () = ctx.cancelled().cancelled() => {
                        assert!(!ctx.still_owned().await, "a preempted task is no longer owned");
                        Err(TaskError::new("preempted"))
                    }
                }
            }
        }))
        .register(Probe::new(urgent, |_, _| async { Ok(Done(true)) }))
        .register(Probe::new(locked, move |_, _| {
            let lg = lg.clone();
            async move {
                lg.notified().await;
                Ok(Done(true))
            }
        }))
        .config(config(Resources::new(3.0, 1 << 30, 0.0)))
        .start()
        .await
        .unwrap();
    // One uninterruptible task and two ordinary ones fill the 3 CPUs; the second ordinary one
    // started last, so it is the cheapest victim.
    let locked_id = engine
        .add_task("locked", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    let first = engine
        .add_task("ordinary", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    eventually("first ordinary running", Duration::from_secs(10), || {
        let n = started.lock().unwrap().len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    let second = engine
        .add_task("ordinary", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    eventually("both ordinary running", Duration::from_secs(10), || {
        let n = started.lock().unwrap().len();
        async move { (n == 2).then_some(()) }
    })
    .await;
    engine
        .add_task("urgent", |_, _| async { Ok(true) })
        .await
        .unwrap();
    eventually("the urgent task to run", Duration::from_secs(30), || {
        let db = t.db.clone();
        async move {
            let n: i64 = db
                .scalar(
                    "SELECT count(*) FROM harmony_task_history WHERE name = 'urgent' AND result",
                    &[],
                )
                .await
                .ok()?;
            (n == 1).then_some(())
        }
    })
    .await;
    let preempted: Vec<(i64, String)> =
        t.db.select(
            "SELECT task_id, err FROM harmony_task_history WHERE NOT result",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        preempted,
        vec![(second.0, "preempted".to_owned())],
        "only the cheapest victim"
    );
    // The victim is re-queued with retries unchanged and runs again; let everything finish.
    eventually("the victim to restart", Duration::from_secs(30), || {
        let v = started
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| *id == second.0)
            .count();
        async move { (v == 2).then_some(()) }
    })
    .await;
    assert!(
        started
            .lock()
            .unwrap()
            .iter()
            .all(|(_, retries)| *retries == 0),
        "preemption does not count as a failure"
    );
    let _ = (first, locked_id);
    gate.notify_waiters();
    let db = t.db.clone();
    eventually("ordinary tasks done", Duration::from_secs(30), || {
        let db = db.clone();
        let gate = gate.clone();
        async move {
            gate.notify_waiters();
            let n: i64 = db
                .scalar(
                    "SELECT count(*) FROM harmony_task WHERE name = 'ordinary'",
                    &[],
                )
                .await
                .ok()?;
            (n == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task_history WHERE name = 'locked'"
        )
        .await,
        0,
        "uninterruptible work is never preempted"
    );
    locked_gate.notify_one();
    engine.shutdown().await.unwrap();
}

async fn preemption_across_nodes_is_done_by_one_node(t: &TestDb) {
    let preemptions = Arc::new(AtomicUsize::new(0));
    let mut engines = Vec::new();
    for _ in 0..2 {
        let p = preemptions.clone();
        let mut ord = TypeDetails::new("ordinary");
        ord.cost = Resources::new(1.0, 0, 0.0);
        let mut urgent = TypeDetails::new("urgent");
        urgent.cost = Resources::new(1.0, 0, 0.0);
        urgent.time_sensitive = true;
        let e = Engine::builder(t.open_another().await)
            .register(Probe::new(ord, move |_, ctx| {
                let p = p.clone();
                async move {
                    ctx.cancelled().cancelled().await;
                    p.fetch_add(1, Ordering::SeqCst);
                    Err(TaskError::new("preempted"))
                }
            }))
            .register(Probe::new(urgent, |_, _| async { Ok(Done(true)) }))
            .config(config(Resources::new(1.0, 1 << 30, 0.0)))
            .start()
            .await
            .unwrap();
        engines.push(e);
    }
    engines[0]
        .add_tasks("ordinary", 2, |_, _| async { Ok(true) })
        .await
        .unwrap();
    for e in &engines {
        e.poll_now();
    }
    eventually("both nodes full", Duration::from_secs(30), || {
        let db = t.db.clone();
        async move {
            let n: i64 = db
                .scalar(
                    "SELECT count(DISTINCT owner_id) FROM harmony_task WHERE owner_id IS NOT NULL",
                    &[],
                )
                .await
                .ok()?;
            (n == 2).then_some(())
        }
    })
    .await;
    engines[1]
        .add_task("urgent", |_, _| async { Ok(true) })
        .await
        .unwrap();
    eventually("the urgent task to run", Duration::from_secs(30), || {
        let db = t.db.clone();
        async move {
            let n: i64 = db
                .scalar(
                    "SELECT count(*) FROM harmony_task_history WHERE name = 'urgent' AND result",
                    &[],
                )
                .await
                .ok()?;
            (n == 1).then_some(())
        }
    })
    .await;
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task_history WHERE err = 'preempted'"
        )
        .await,
        1,
        "exactly one node preempted exactly one victim"
    );
    for e in &engines {
        // The remaining ordinary tasks wait for cancellation: shut down with a short grace.
        let _ = e.shutdown().await;
    }
}

async fn cordon_stops_claims_and_yields(t: &TestDb) {
    let yielded = Arc::new(AtomicUsize::new(0));
    let y = yielded.clone();
    let mut yd = TypeDetails::new("yielding");
    yd.can_yield = true;
    let engine = Engine::builder(t.db.clone())
        .register(ok_task("work"))
        .register(Probe::new(yd, move |_, ctx| {
            let y = y.clone();
            async move {
                // Runs until the node is cordoned, then gives way.
                while ctx.still_owned().await {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                y.fetch_add(1, Ordering::SeqCst);
                Ok(Done(true))
            }
        }))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    add_and_wait_running(&engine, "yielding").await;
    let admin = harmonytask::Admin::new(t.db.clone());
    admin.cordon(engine.machine_id()).await.unwrap();
    eventually(
        "the node to see the cordon",
        Duration::from_secs(10),
        || {
            let e = engine.clone();
            async move { e.status().await.ok()?.cordoned.then_some(()) }
        },
    )
    .await;
    eventually(
        "the yielding task to give way",
        Duration::from_secs(10),
        || {
            let n = yielded.load(Ordering::SeqCst);
            async move { (n == 1).then_some(()) }
        },
    )
    .await;
    engine
        .add_tasks("work", 3, |_, _| async { Ok(true) })
        .await
        .unwrap();
    eventually(
        "work blocked by the cordon",
        Duration::from_secs(10),
        || {
            let e = engine.clone();
            async move {
                let st = e.status().await.ok()?;
                let work = st.types.iter().find(|t| t.name == "work")?;
                (work.blocked == Some(Blocked::Cordoned)).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task WHERE name = 'work'").await,
        3
    );
    admin.uncordon(engine.machine_id()).await.unwrap();
    drained(t, Duration::from_secs(30)).await;
    engine.shutdown().await.unwrap();
}

/// A `can_yield` task that never calls `still_owned` (it only honours its cancellation token,
/// as built-ins and commands do) gives way when its node is cordoned: the engine stops it,
/// writes a "yielded" history row and releases it with retries unchanged — with
/// `max_failures = 1`, counting the yield as a failure would end the task for good — and
/// another node runs it at once.
async fn cordon_releases_can_yield_tasks_that_never_ask(t: &TestDb) {
    // Each attempt: (machine, retries). The first one runs until cancelled.
    let runs = Arc::new(Mutex::new(Vec::<(MachineId, u32)>::new()));
    let polite = |runs: Arc<Mutex<Vec<(MachineId, u32)>>>| {
        let mut d = TypeDetails::new("polite");
        d.can_yield = true;
        d.max_failures = 1;
        Probe::new(d, move |_, ctx| {
            let runs = runs.clone();
            async move {
                let first = {
                    let mut r = runs.lock().unwrap();
                    r.push((ctx.machine_id(), ctx.retries()));
                    r.len() == 1
                };
                if first {
                    ctx.cancelled().cancelled().await;
                    return Err(TaskError::new("stopped"));
                }
                Ok(Done(true))
            }
        })
    };
    let a = Engine::builder(t.db.clone())
        .register(polite(runs.clone()))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    add_and_wait_running(&a, "polite").await;
    let task: i64 =
        t.db.scalar("SELECT id FROM harmony_task WHERE name = 'polite'", &[])
            .await
            .unwrap();
    let admin = harmonytask::Admin::new(t.db.clone());
    admin.cordon(a.machine_id()).await.unwrap();
    let history = |t: &TestDb| {
        let db = t.db.clone();
        async move {
            db.select::<(bool, String, String)>(
                "SELECT result, err, completed_by_host_and_port FROM harmony_task_history WHERE task_id = $1 ORDER BY id",
                &[&task],
            )
            .await
            .unwrap()
        }
    };
    let rows = eventually("the task to yield", Duration::from_secs(30), || {
        let rows = history(t);
        async move {
            let rows = rows.await;
            (!rows.is_empty()).then_some(rows)
        }
    })
    .await;
    let a_host = a.status().await.unwrap().host_and_port;
    assert_eq!(rows, [(false, "yielded".to_owned(), a_host)]);
    // Released, not failed: waiting again, owned by nobody, retries unchanged; and the
    // cordoned node does not take it back.
    let (owner, retries): (Option<i64>, i64) =
        t.db.query_row(
            "SELECT owner_id, retries FROM harmony_task WHERE id = $1",
            &[&task],
        )
        .await
        .unwrap();
    assert_eq!((owner, retries), (None, 0));
    let st = a.status().await.unwrap();
    assert!(st.running.is_empty(), "{:?}", st.running);

    let b = Engine::builder(t.open_another().await)
        .register(polite(runs.clone()))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    drained(t, Duration::from_secs(30)).await;
    let b_host = b.status().await.unwrap().host_and_port;
    assert_eq!(history(t).await[1..], [(true, String::new(), b_host)]);
    assert_eq!(
        *runs.lock().unwrap(),
        [(a.machine_id(), 0), (b.machine_id(), 0)]
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

async fn restart_drains_then_stops(t: &TestDb) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let g = gate.clone();
    let engine = Engine::builder(t.db.clone())
        .register(Probe::new(TypeDetails::new("slowish"), move |_, _| {
            let g = g.clone();
            async move {
                g.notified().await;
                Ok(Done(true))
            }
        }))
        .config(config(big_budget()))
        .start()
        .await
        .unwrap();
    add_and_wait_running(&engine, "slowish").await;
    let admin = harmonytask::Admin::new(t.db.clone());
    admin.request_restart(engine.machine_id()).await.unwrap();
    eventually("the node to drain", Duration::from_secs(10), || {
        let e = engine.clone();
        async move { e.status().await.ok()?.draining.then_some(()) }
    })
    .await;
    // Still running its task: it must not stop yet.
    assert!(!engine.is_stopped());
    engine
        .add_task("slowish", |_, _| async { Ok(true) })
        .await
        .unwrap();
    gate.notify_one();
    let r = tokio::time::timeout(Duration::from_secs(30), engine.wait())
        .await
        .expect("stops after draining");
    assert!(
        matches!(r, Err(harmonytask::Error::RestartRequested)),
        "{r:?}"
    );
    assert_eq!(count(t, "SELECT count(*) FROM harmony_machines").await, 0);
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history WHERE result").await,
        1,
        "the running task finished; the new one was not started while draining"
    );
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task WHERE owner_id IS NULL"
        )
        .await,
        1
    );
}

async fn notify_off_still_works_by_polling(t: &TestDb) {
    let cfg = EngineConfig {
        notify: false,
        poll_interval: Duration::from_secs(3600),
        poll_interval_unhealthy: Duration::from_millis(200),
        ..config(big_budget())
    };
    let mut ld = TypeDetails::new("limited");
    ld.max = Some(Limiter::new(1));
    ld.max_failures = 2;
    let runner = Engine::builder(t.open_another().await)
        .register(ok_task("polled"))
        .register(Probe::new(ld, |_, ctx| async move {
            if ctx.retries() == 0 {
                Err(TaskError::new("first attempt fails"))
            } else {
                Ok(Done(true))
            }
        }))
        .config(cfg)
        .start()
        .await
        .unwrap();
    let client = Client::new(t.open_another().await).with_notify(false);
    for _ in 0..10 {
        client.add_task_with_args("polled", &[]).await.unwrap();
    }
    client.add_task_with_args("limited", &[]).await.unwrap();
    drained(t, Duration::from_secs(60)).await;
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history WHERE result").await,
        11
    );
    runner.shutdown().await.unwrap();
}

async fn run_now_during_a_run_is_served_after_it(t: &TestDb) {
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let (r, g) = (runs.clone(), gate.clone());
    let e = Engine::builder(t.open_another().await)
        .register(Probe::new(
            TypeDetails::new("hourly").singleton(Duration::from_secs(3600)),
            move |_, _| {
                let (r, g) = (r.clone(), g.clone());
                async move {
                    if r.fetch_add(1, Ordering::SeqCst) == 0 {
                        g.notified().await;
                    }
                    Ok(Done(true))
                }
            },
        ))
        .config(no_poll(big_budget()))
        .start()
        .await
        .unwrap();
    eventually("the first run to start", Duration::from_secs(30), || {
        let n = runs.load(Ordering::SeqCst);
        async move { (n == 1).then_some(()) }
    })
    .await;
    // Asked while the first run is still going: it must not be lost.
    Client::new(t.open_another().await)
        .run_now("hourly")
        .await
        .unwrap();
    gate.notify_one();
    eventually(
        "the requested run after the first",
        Duration::from_secs(30),
        || {
            let n = runs.load(Ordering::SeqCst);
            async move { (n == 2).then_some(()) }
        },
    )
    .await;
    e.shutdown().await.unwrap();
}
