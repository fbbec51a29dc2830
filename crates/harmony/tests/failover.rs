//! `harmony run` nodes on the high-availability set-up operators run (docs/high-availability.md):
//! a primary and a streaming-replication standby with synchronous commit, both in the node's
//! host list. The nodes must ride out the loss of the primary (SIGKILL, then `pg_ctl promote`
//! of the standby) and restarts of the primary in place, by themselves, without a restart and
//! without losing or repeating work.
//!
//! Both tests run throw-away servers (`TempPg`); they need the Postgres binaries, not the
//! shared test server.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use harmony_testkit::{TempPg, TestDb, eventually};
use harmonydb::{Executor, Timestamp};

/// Long enough for a node to hold several tasks across an outage; a cost so that each node
/// runs a bounded number at once (`--cpu 4`: four).
const TASKS: &str = "[[task]]\nname = \"t_sleep\"\nbuiltin = \"bench_sleep\"\ncost = { cpu = 1 }\n";

/// The primary and the standby, or `None` (the test is skipped) without Postgres binaries.
fn pair_or_skip(test: &str) -> Option<(TempPg, TempPg)> {
    let pair = TempPg::replicated_pair();
    if pair.is_none() {
        assert!(
            std::env::var("HARMONY_REQUIRE_PG").is_err(),
            "{test}: HARMONY_REQUIRE_PG=1 but initdb/pg_ctl/pg_basebackup are not installed"
        );
        eprintln!("*** {test}: SKIPPED (no postgres binaries) ***");
    }
    pair
}

/// The URL operators write for the pair: both hosts, the primary first.
fn pair_url(primary: &TempPg, standby: &TempPg) -> String {
    format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/harmony?connect_timeout=2&pool_size=4",
        primary.port, standby.port
    )
}

/// `harmony task add t_sleep --count N --arg ms=MS` as a client runs it: the ids when the add
/// was acknowledged, the error text when it was not.
async fn add(url: &str, count: u32, ms: u32) -> Result<Vec<i64>, String> {
    let out = harmony(&[
        "--db",
        url,
        "--json",
        "task",
        "add",
        "t_sleep",
        "--count",
        &count.to_string(),
        "--arg",
        &format!("ms={ms}"),
    ])
    .await;
    if out.code == Some(0) {
        Ok(added_ids(&out))
    } else {
        Err(out.stderr)
    }
}

/// When a client's add returned (µs since the epoch) and what it returned.
type AddResult = (i64, Result<Vec<i64>, String>);

/// Successful attempts that ended after `since`.
async fn completed_since(t: &TestDb, since: Timestamp) -> Option<i64> {
    t.db.scalar(
        "SELECT count(*) FROM harmony_task_history WHERE result AND work_end > $1",
        &[&since],
    )
    .await
    .ok()
}

fn timestamp_now() -> Timestamp {
    Timestamp::from_millis(now_us() / 1000)
}

/// Checks shared by both tests at the end: every acknowledged task succeeded exactly once,
/// no task at all succeeded twice, nothing is left queued, and the same three processes, with
/// the same machine rows, are still running.
async fn assert_drained_by_the_same_nodes(
    t: &TestDb,
    nodes: &mut [Node],
    machines: &[i64],
    acknowledged: &[i64],
) {
    all_done(t, acknowledged.len() as i64, Duration::from_secs(180)).await;
    let ok = successes(t).await;
    for id in acknowledged {
        assert_eq!(
            ok.get(id).map(|s| s.0),
            Some(1),
            "task {id}: its add was acknowledged, so it must succeed exactly once"
        );
    }
    for (id, (n, _)) in &ok {
        assert_eq!(*n, 1, "task {id} succeeded {n} times");
    }
    for n in nodes.iter_mut() {
        assert!(n.is_running(), "node {} exited", n.listen);
    }
    let rows: Vec<(i64,)> =
        t.db.select("SELECT id FROM harmony_machines ORDER BY id", &[])
            .await
            .unwrap();
    let mut want = machines.to_vec();
    want.sort_unstable();
    assert_eq!(
        rows.into_iter().map(|r| r.0).collect::<Vec<_>>(),
        want,
        "the nodes kept their machine rows: none re-registered, none was declared dead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_move_to_the_promoted_standby_and_lose_nothing() {
    let Some((primary, standby)) = pair_or_skip("nodes_move_to_the_promoted_standby") else {
        return;
    };
    let url = pair_url(&primary, &standby);
    let t = TestDb::on_server(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), TASKS);
    let file = file.to_str().unwrap();
    // Default poll, heartbeat and dead-after: the figures printed are what operators get.
    let args = ["--tasks", file, "--cpu", "4", "--ram", "4GiB", "--gpu", "0"];
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&url, dir.path(), &args))
        .collect();
    let mut machines = Vec::new();
    for n in &nodes {
        machines.push(n.machine_id(&t).await);
    }

    let mut acknowledged = add(&url, 400, 100).await.expect("initial add");
    wait_succeeded(&t, "t_sleep", 40, Duration::from_secs(120)).await;

    // A client keeps adding work throughout, as producers do. Adds during the outage fail;
    // the client just tries again on its next round, and only acknowledged ids count.
    let log: Arc<Mutex<Vec<AddResult>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (log, stop, url) = (Arc::clone(&log), Arc::clone(&stop), url.clone());
        tokio::spawn(async move {
            // The client's rate, not a wait for anything.
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let r = add(&url, 5, 100).await;
                log.lock().unwrap().push((now_us(), r));
            }
        })
    };
    let acknowledged_adds_after = |since_us: i64| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(at, r)| *at > since_us && r.is_ok())
            .count()
    };
    eventually("the client's first adds", Duration::from_secs(60), || {
        let n = acknowledged_adds_after(0);
        async move { (n >= 2).then_some(()) }
    })
    .await;

    let killed_us = now_us();
    let killed_ts = timestamp_now();
    let killed = Instant::now();
    primary.kill();
    // Until the promotion the only server up is a standby in recovery, which must not take
    // writes: adds fail (they are not queued on the standby), like an operator's failover
    // delay. Promote once the client has seen that.
    eventually(
        "adds to fail while only the standby is up",
        Duration::from_secs(60),
        || {
            let n = log
                .lock()
                .unwrap()
                .iter()
                .filter(|(at, r)| *at > killed_us && r.is_err())
                .count();
            async move { (n >= 2).then_some(()) }
        },
    )
    .await;
    assert!(standby.in_recovery());
    standby.promote();
    let promoted = killed.elapsed();
    eventually(
        "five acknowledged adds after the promotion",
        Duration::from_secs(120),
        || {
            let n = acknowledged_adds_after(killed_us);
            async move { (n >= 5).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    client.await.unwrap();
    let log = std::mem::take(&mut *log.lock().unwrap());
    let mut failed_adds = 0;
    let mut first_add_after_kill_us = None;
    for (at, r) in log {
        match r {
            Ok(ids) => {
                if at > killed_us {
                    first_add_after_kill_us.get_or_insert(at - killed_us);
                }
                acknowledged.extend(ids);
            }
            Err(_) => failed_adds += 1,
        }
    }

    assert_drained_by_the_same_nodes(&t, &mut nodes, &machines, &acknowledged).await;
    // The nodes' work after the kill was done on the promoted standby, by all three: the old
    // primary is dead, and the handle the test reads through is on the second host.
    assert!(!standby.in_recovery());
    assert_eq!(t.db.status().await.unwrap().host_index, Some(1));
    for n in &nodes {
        let after: i64 =
            t.db.scalar(
                "SELECT count(*) FROM harmony_task_history WHERE result AND completed_by_host_and_port = $1 AND work_end > $2",
                &[&n.listen, &killed_ts],
            )
            .await
            .unwrap();
        assert!(
            after > 0,
            "node {} did no work after the failover",
            n.listen
        );
    }

    // The stall: the longest pause between two task completions around the failover (with
    // twelve 100 ms tasks running at a time, completions are otherwise milliseconds apart).
    // Backends of a SIGKILLed postmaster may still finish a commit or two right after the
    // kill, so "first completion after the kill" would understate it.
    let ends: Vec<(Timestamp,)> =
        t.db.select(
            "SELECT work_end FROM harmony_task_history WHERE result ORDER BY work_end",
            &[],
        )
        .await
        .unwrap();
    let stall_ms = ends
        .windows(2)
        .map(|w| (w[0].0.as_millis(), w[1].0.as_millis()))
        .filter(|(_, b)| *b > killed_ts.as_millis())
        .map(|(a, b)| b - a)
        .max()
        .unwrap_or(-1);
    let promoted_ts = Timestamp::from_millis(killed_ts.as_millis() + promoted.as_millis() as i64);
    let first_completion: Option<Timestamp> =
        t.db.scalar(
            "SELECT min(work_end) FROM harmony_task_history WHERE result AND work_end > $1",
            &[&promoted_ts],
        )
        .await
        .unwrap();
    let failed_attempts = count(
        &t,
        "SELECT count(*) FROM harmony_task_history WHERE NOT result",
    )
    .await;
    println!(
        "FAILOVER (3 nodes, primary SIGKILLed, standby promoted once adds failed): promoted {:.0} ms \
         after the kill; first task completion {} ms after the promotion; longest pause between \
         two completions (the stall) {stall_ms} ms; first acknowledged add {} ms after the kill; \
         {failed_adds} adds failed and were retried; {failed_attempts} attempts failed and were \
         retried; {} acknowledged tasks each succeeded once",
        promoted.as_secs_f64() * 1000.0,
        first_completion.map_or(-1, |c| c.as_millis() - promoted_ts.as_millis()),
        first_add_after_kill_us.map_or(-1, |us| us / 1000),
        acknowledged.len(),
    );
}

/// How many sessions on `pg` are `LISTEN` connections of nodes (their last statement).
fn listeners(pg: &TempPg) -> usize {
    pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN harmony'")
        .parse()
        .expect("a count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reconnect_and_listen_again_after_primary_restarts() {
    let Some((primary, standby)) = pair_or_skip("nodes_reconnect_after_primary_restarts") else {
        return;
    };
    let url = pair_url(&primary, &standby);
    let t = TestDb::on_server(&url).await;
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), TASKS);
    let file = file.to_str().unwrap();
    // Polls so rare that, within this test, only notifications can wake an idle node: the
    // safety net would take an hour while LISTEN is up and ten minutes while it is down.
    let args = [
        "--tasks",
        file,
        "--cpu",
        "4",
        "--ram",
        "4GiB",
        "--gpu",
        "0",
        "--poll-interval",
        "1h",
        "--poll-interval-unhealthy",
        "10m",
    ];
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&url, dir.path(), &args))
        .collect();
    let mut machines = Vec::new();
    for n in &nodes {
        machines.push(n.machine_id(&t).await);
    }
    eventually("three LISTEN sessions", Duration::from_secs(60), || {
        let n = listeners(&primary);
        async move { (n == 3).then_some(()) }
    })
    .await;

    // Enough work (at least 10 s at full speed) to be still draining at the second restart.
    let acknowledged = add(&url, 600, 200).await.expect("add");
    wait_succeeded(&t, "t_sleep", 30, Duration::from_secs(120)).await;

    let first = Instant::now();
    for round in 1..=2 {
        if round == 2 {
            // The fault schedule of the scenario (restarts 5 s apart), not a wait for an event.
            tokio::time::sleep_until((first + Duration::from_secs(5)).into()).await;
        }
        let queued = count(&t, "SELECT count(*) FROM harmony_task").await;
        assert!(queued > 0, "restart {round}: the work was already drained");
        let began = Instant::now();
        primary.restart();
        let restarted = began.elapsed();
        let up = timestamp_now();
        eventually(
            &format!("a task to complete after restart {round}"),
            Duration::from_secs(60),
            || async { completed_since(&t, up).await.filter(|n| *n > 0) },
        )
        .await;
        let working = began.elapsed();
        eventually(
            &format!("the three LISTEN sessions back after restart {round}"),
            Duration::from_secs(60),
            || {
                let n = listeners(&primary);
                async move { (n == 3).then_some(()) }
            },
        )
        .await;
        println!(
            "RESTART {round} ({queued} tasks queued): pg_ctl stop -m fast + start took {:.0} ms; \
             first completion {:.0} ms after the restart began; all three nodes LISTENing again after {:.0} ms",
            restarted.as_secs_f64() * 1000.0,
            working.as_secs_f64() * 1000.0,
            began.elapsed().as_secs_f64() * 1000.0,
        );
    }
    assert_drained_by_the_same_nodes(&t, &mut nodes, &machines, &acknowledged).await;

    // The nodes are idle now, and their next safety-net poll is minutes away. A task added
    // now starts quickly only if a node hears of it through its re-established LISTEN: the
    // deadline (30 s) is far below any poll the nodes have scheduled (10 min or 1 h).
    let mut latencies_ms = Vec::new();
    for _ in 0..5 {
        let before_us = now_us();
        let id = add(&url, 1, 10).await.expect("add after the restarts")[0];
        let started_us = eventually(
            &format!("task {id} to start through LISTEN/NOTIFY"),
            Duration::from_secs(30),
            || async {
                t.db.scalar::<Option<i64>>(
                    "SELECT min(started_us) FROM harmony_test_attempt WHERE task_id = $1",
                    &[&id],
                )
                .await
                .ok()
                .flatten()
            },
        )
        .await;
        latencies_ms.push((started_us - before_us) as f64 / 1000.0);
    }
    println!(
        "AFTER RESTARTS: add→start through LISTEN (from before the `harmony task add` process, \
         which includes its start and connect): {latencies_ms:.1?} ms"
    );
}
