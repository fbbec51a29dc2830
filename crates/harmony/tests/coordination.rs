//! Coordination between real `harmony run` processes, on SQLite (several processes on one file)
//! and Postgres: wake-ups with the safety-net poll an hour away, polling while notifications
//! are broken, follower chains that survive SIGKILL, singletons that never overlap and run at
//! once on request, cordon and restart.
//!
//! Nothing here waits by sleeping: every wait is on a process exit, a log line or a database
//! count, each with a deadline. Where a test must show that something happened *because of* a
//! wake-up, the nodes poll once an hour, so only the wake-up path can explain a prompt result.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use harmony_testkit::{Backend, TestDb, eventually, unique_suffix};
use harmonydb::Executor;
use nix::sys::signal::Signal;

harmony_testkit::both_backends!(
    a_wake_up_reaches_the_node_that_runs_the_type,
    notify_off_nodes_find_work_by_polling,
    a_follower_chain_survives_sigkill,
    a_singleton_never_overlaps_and_runs_now_on_request,
    cordon_stops_new_claims_until_uncordon,
    cordon_stops_can_yield_commands_with_sigterm_then_sigkill,
    restart_exits_100_only_after_the_running_task,
);

/// Flags that leave wake-ups as the only prompt way to find work.
const NO_POLL: &[&str] = &["--poll-interval", "1h", "--poll-interval-unhealthy", "1h"];

/// Node arguments: `--tasks FILE`, then `extra`.
fn node_args<'a>(file: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--tasks", file];
    args.extend_from_slice(extra);
    args
}

/// `harmony --db URL --json task add TYPE ARGS…`, which must succeed; the new ids.
async fn add(db: &str, name: &str, extra: &[&str]) -> Vec<i64> {
    let mut args = vec!["--db", db, "--json", "task", "add", name];
    args.extend_from_slice(extra);
    added_ids(&harmony(&args).await)
}

/// `harmony --db URL ARGS…`, which must succeed; its JSON output.
async fn ok_json(db: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--db", db, "--json"];
    all.extend_from_slice(args);
    harmony(&all).await.json()
}

const WAKE_TASKS: &str = r#"
[[task]]
name = "w_add"
builtin = "bench_noop"

[[task]]
name = "w_first"
builtin = "bench_noop"

[[task]]
name = "w_next"
builtin = "bench_noop"
follows = ["w_first"]
"#;

/// With the poll an hour away on every node: a task added by another process runs on the one
/// node that runs its type, and a completion on node A makes its follow-up run on node B.
/// Postgres: LISTEN/NOTIFY; SQLite: the change check of each process on the shared file.
async fn a_wake_up_reaches_the_node_that_runs_the_type(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), WAKE_TASKS);
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let a = Node::start(
        db,
        dir.path(),
        &node_args(file, &[&["--types", "w_first"][..], NO_POLL].concat()),
    );
    let b = Node::start(
        db,
        dir.path(),
        &node_args(file, &[&["--types", "w_add,w_next"][..], NO_POLL].concat()),
    );
    a.machine_id(t).await;
    b.machine_id(t).await;

    // A first round, which each node may also find with its start-up poll: once it has run,
    // both nodes are past that poll, and only wake-ups are left.
    add(db, "w_add", &[]).await;
    add(db, "w_first", &[]).await;
    wait_succeeded(t, "w_add", 1, Duration::from_secs(30)).await;
    wait_succeeded(t, "w_next", 1, Duration::from_secs(30)).await;

    add(db, "w_add", &["--count", "3"]).await;
    add(db, "w_first", &["--count", "2"]).await;
    add(db, "w_add", &[]).await;
    wait_succeeded(t, "w_add", 5, Duration::from_secs(30)).await;
    wait_succeeded(t, "w_next", 3, Duration::from_secs(30)).await;
    all_done(t, 5 + 3 + 3, Duration::from_secs(30)).await;

    for (name, node, n) in [("w_add", &b, 5), ("w_first", &a, 3), ("w_next", &b, 3)] {
        let by = completed_by(t, name).await;
        assert_eq!(by.len(), n, "{name}: {by:?}");
        assert!(
            by.iter().all(|h| *h == node.listen),
            "{name} ran only on {}: {by:?}",
            node.listen
        );
    }
}

/// Postgres: the node's LISTEN connection is killed again and again while tasks are added
/// without notifications; polls still find them: the one the node makes each time its
/// listener reconnects, or the unhealthy poll (1 s; the healthy one is an hour). Once the
/// killing stops, the listener is back and a notified task runs at once. (A node with
/// `--notify off`, where only the timed poll can find work, is
/// `notify_off_nodes_find_work_by_polling`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_work_flows_while_notifications_are_broken() {
    let test = "postgres_work_flows_while_notifications_are_broken";
    let Some(t) = TestDb::postgres(test).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        "[[task]]\nname = \"nb\"\nbuiltin = \"bench_noop\"\n",
    );
    let file = file.to_str().unwrap();
    let app = format!("hn_{}", unique_suffix());
    let node_db = t.url_with("application_name", &app);
    let node = Node::start(
        &node_db,
        dir.path(),
        &node_args(
            file,
            &[
                "--types",
                "nb",
                "--poll-interval",
                "1h",
                "--poll-interval-unhealthy",
                "1s",
            ],
        ),
    );
    node.machine_id(&t).await;
    let listeners = |t: &TestDb| {
        let (db, app) = (t.db.clone(), app.clone());
        async move {
            db.scalar::<i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                &[&app],
            )
            .await
            .expect("read pg_stat_activity")
        }
    };
    eventually(
        "the node's LISTEN connection",
        Duration::from_secs(30),
        || {
            let n = listeners(&t);
            async move { (n.await > 0).then_some(()) }
        },
    )
    .await;

    // Kill the listener over and over, from another task, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicUsize::new(0));
    let killer = {
        let (db, app, stop, killed) = (t.db.clone(), app.clone(), stop.clone(), killed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let rows: Vec<(bool,)> = db
                    .select(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                        &[&app],
                    )
                    .await
                    .expect("terminate the listener");
                killed.fetch_add(rows.iter().filter(|r| r.0).count(), Ordering::SeqCst);
                // The pace of the disruption, not a wait for an event.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let db = t.url.as_str();
    for _ in 0..3 {
        let out = harmony(&[
            "--db", db, "--notify", "off", "--json", "task", "add", "nb", "--count", "2",
        ])
        .await;
        assert_eq!(added_ids(&out).len(), 2);
    }
    wait_succeeded(&t, "nb", 6, Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    killer.await.unwrap();
    assert!(
        killed.load(Ordering::SeqCst) > 0,
        "the listener was never terminated"
    );
    node.wait_log(&["notification connection lost"]).await;

    // The listener comes back by itself, and notifications work again.
    eventually(
        "the LISTEN connection to come back",
        Duration::from_secs(30),
        || {
            let n = listeners(&t);
            async move { (n.await > 0).then_some(()) }
        },
    )
    .await;
    add(db, "nb", &[]).await;
    wait_succeeded(&t, "nb", 7, Duration::from_secs(30)).await;
    assert_eq!(completed_by(&t, "nb").await.len(), 7);
}

/// A node with `--notify off` neither listens nor checks for changes; with the healthy poll an
/// hour away, the unhealthy poll (which `off` uses) is the only way it finds tasks added
/// without notifications.
async fn notify_off_nodes_find_work_by_polling(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        "[[task]]\nname = \"polled\"\nbuiltin = \"bench_noop\"\n",
    );
    let file = file.to_str().unwrap();
    let app = format!("hp_{}", unique_suffix());
    let node_db = match t.backend() {
        Backend::Postgres => t.url_with("application_name", &app),
        Backend::Sqlite => t.url.clone(),
    };
    let node = Node::start(
        &node_db,
        dir.path(),
        &node_args(
            file,
            &[
                "--types",
                "polled",
                "--notify",
                "off",
                "--poll-interval",
                "1h",
                "--poll-interval-unhealthy",
                "300ms",
            ],
        ),
    );
    node.machine_id(t).await;
    node.wait_log(&["node running", "notify=false"]).await;
    let db = t.url.as_str();
    for round in 1..=3 {
        let out = harmony(&[
            "--db", db, "--notify", "off", "--json", "task", "add", "polled", "--count", "2",
        ])
        .await;
        assert_eq!(added_ids(&out).len(), 2);
        wait_succeeded(t, "polled", 2 * round, Duration::from_secs(30)).await;
    }
    assert_eq!(
        completed_by(t, "polled").await,
        vec![node.listen.clone(); 6]
    );
    if t.backend() == Backend::Postgres {
        let listening: i64 = t
            .db
            .scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                &[&app],
            )
            .await
            .unwrap();
        assert_eq!(
            listening, 0,
            "a node with --notify off opened a LISTEN connection"
        );
    }
}

const CHAIN_TASKS: &str = r#"
[[task]]
name = "c1"
builtin = "bench_sleep"
max = 20

[[task]]
name = "c2"
builtin = "bench_sleep"
follows = ["c1"]
may_follow = ["c1"]
max = 20

[[task]]
name = "c3"
builtin = "bench_sleep"
follows = ["c2"]
may_follow = ["c2"]
max = 20
"#;

/// 1,000 three-stage chains over three processes, one SIGKILLed mid-way: every chain
/// completes, and every follow-up is created exactly once.
async fn a_follower_chain_survives_sigkill(t: &TestDb) {
    const CHAINS: i64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), CHAIN_TASKS);
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let args = node_args(
        file,
        &[
            "--types",
            "c1,c2,c3",
            "--heartbeat-interval",
            "300ms",
            "--reaper-interval",
            "300ms",
            "--dead-after",
            "2s",
            "--poll-interval",
            "500ms",
        ],
    );
    let mut victim = Node::start(db, dir.path(), &args);
    let others = [
        Node::start(db, dir.path(), &args),
        Node::start(db, dir.path(), &args),
    ];
    let victim_id = victim.machine_id(t).await;
    for n in &others {
        n.machine_id(t).await;
    }

    // Stage 1 sleeps 10 ms; follow-ups carry no arguments, so stages 2 and 3 sleep 100 ms.
    let ids = add(
        db,
        "c1",
        &["--count", &CHAINS.to_string(), "--arg", "ms=10"],
    )
    .await;
    assert_eq!(ids.len() as i64, CHAINS);
    // Mid-way: follow-ups are flowing and the victim is running some of them.
    wait_succeeded(t, "c2", 150, Duration::from_secs(60)).await;
    running_on(t, victim_id, 1).await;
    let killed_at = now_us();
    victim.signal(Signal::SIGKILL);
    assert_eq!(victim.exit_code(Duration::from_secs(10)).await, None);
    assert!(
        succeeded(t, "c3").await < CHAINS,
        "the kill came after the work was done"
    );

    wait_succeeded(t, "c3", CHAINS, Duration::from_secs(120)).await;
    all_done(t, 3 * CHAINS, Duration::from_secs(60)).await;
    for stage in ["c1", "c2", "c3"] {
        let (ok_rows, ok_tasks, tasks): (i64, i64, i64) = t
            .db
            .query_row(
                "SELECT count(*) FILTER (WHERE result), count(DISTINCT task_id) FILTER (WHERE result), count(DISTINCT task_id) FROM harmony_task_history WHERE name = $1",
                &[&stage],
            )
            .await
            .unwrap();
        assert_eq!(ok_tasks, CHAINS, "{stage}: distinct tasks that succeeded");
        assert_eq!(ok_rows, CHAINS, "{stage}: no task succeeded twice");
        assert_eq!(
            tasks, CHAINS,
            "{stage}: tasks in history (a follow-up created twice would add one)"
        );
    }
    let pending = harmonytask::Admin::new(t.db.clone())
        .follow_pending()
        .await
        .unwrap();
    assert!(pending.is_empty(), "follow queue not empty: {pending:?}");
    // No task ran on two live nodes at once; the killed node's attempts were cut short.
    let by_task = attempts(t).await;
    let unended = assert_no_overlap(&by_task, Some(killed_at));
    assert!(unended >= 1, "the kill should have interrupted an attempt");
    for a in by_task.values().flatten().filter(|a| a.end_us.is_none()) {
        assert_eq!(
            a.machine, victim_id,
            "only the killed node leaves attempts open"
        );
    }
}

const SINGLETON_TASKS: &str = r#"
[[task]]
name = "single"
builtin = "bench_sleep"
singleton = "100ms"

[[task]]
name = "hourly"
builtin = "bench_noop"
singleton = "1h"
"#;

/// Three nodes race to run a 100 ms singleton every 100 ms (about ten seconds of it): never two
/// attempts at once. Then
/// an hourly singleton, with the poll an hour away, runs again at once on `task run-now`.
async fn a_singleton_never_overlaps_and_runs_now_on_request(t: &TestDb) {
    const RUNS: i64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), SINGLETON_TASKS);
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let fast = node_args(
        file,
        &[
            "--types",
            "single",
            "--iambored-interval",
            "20ms",
            "--poll-interval",
            "200ms",
            "--shutdown-grace",
            "10s",
        ],
    );
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::start(db, dir.path(), &fast)).collect();
    for n in &nodes {
        n.machine_id(t).await;
    }
    wait_succeeded(t, "single", RUNS, Duration::from_secs(90)).await;
    // Stop them gracefully, so every attempt logs its end.
    for n in &nodes {
        n.signal(Signal::SIGTERM);
    }
    for n in &mut nodes {
        assert_eq!(n.exit_code(Duration::from_secs(30)).await, Some(0));
    }
    let all: Vec<Attempt> = attempts(t).await.into_values().flatten().collect();
    assert!(all.len() as i64 >= RUNS, "{} attempts", all.len());
    assert_sequential(&all);
    // The three nodes really competed: the runs did not all land on one of them.
    let machines: std::collections::BTreeSet<i64> = all.iter().map(|a| a.machine).collect();
    assert!(machines.len() >= 2, "every run was on machine {machines:?}");

    // Run-now.
    let hourly = Node::start(
        db,
        dir.path(),
        &node_args(file, &[&["--types", "hourly"][..], NO_POLL].concat()),
    );
    hourly.machine_id(t).await;
    // Recorded in the transaction that deletes the task row: nothing of the type is left.
    wait_succeeded(t, "hourly", 1, Duration::from_secs(30)).await;
    let out = ok_json(db, &["task", "run-now", "hourly"]).await;
    assert_eq!(out["run_now"], "hourly");
    wait_succeeded(t, "hourly", 2, Duration::from_secs(30)).await;
    let singleton = harmonytask::Admin::new(t.db.clone())
        .singleton("hourly")
        .await
        .unwrap()
        .expect("singleton row");
    assert!(
        !singleton.run_now_request,
        "the run-now flag is cleared when it runs"
    );
    assert_eq!(
        completed_by(t, "hourly").await,
        vec![hourly.listen.clone(); 2]
    );
}

/// A cordoned node claims nothing new while another node takes the work, or while nobody
/// does; after uncordon it claims again.
async fn cordon_stops_new_claims_until_uncordon(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        "[[task]]\nname = \"cw\"\nbuiltin = \"bench_sleep\"\n",
    );
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let args = node_args(file, &[&["--types", "cw"][..], FAST].concat());
    let cordoned = Node::start(db, dir.path(), &args);
    let mut other = Node::start(db, dir.path(), &args);
    let cordoned_id = cordoned.machine_id(t).await;
    other.machine_id(t).await;

    let out = ok_json(db, &["machine", "cordon", &cordoned_id.to_string()]).await;
    assert_eq!(out["action"], "cordon");
    assert_eq!(out["machine"], cordoned_id);
    assert_eq!(out["changed"], true);
    cordoned
        .wait_log(&["scheduling flag changed", "cordoned=true"])
        .await;
    let machines = ok_json(db, &["machine", "ls"]).await;
    let row = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == cordoned_id)
        .expect("cordoned machine listed");
    assert_eq!(row["unschedulable"], true);
    let out = harmony(&["--db", db, "machine", "ls"]).await;
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&cordoned.listen))
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(line.contains("cordoned"), "{line}");
    // Cordoning again changes nothing and says so.
    let out = harmony(&["--db", db, "machine", "cordon", &cordoned_id.to_string()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("cordoned (it already was)"),
        "{}",
        out.stdout
    );

    // The other node takes everything.
    add(db, "cw", &["--count", "20", "--arg", "ms=20"]).await;
    all_done(t, 20, Duration::from_secs(60)).await;
    let by = completed_by(t, "cw").await;
    assert!(by.iter().all(|h| *h == other.listen), "{by:?}");
    let on_cordoned: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_test_attempt WHERE machine_id = $1",
            &[&cordoned_id],
        )
        .await
        .unwrap();
    assert_eq!(on_cordoned, 0, "the cordoned node started tasks");

    // Nobody else: the work waits for the uncordon.
    other.signal(Signal::SIGTERM);
    assert_eq!(other.exit_code(Duration::from_secs(30)).await, Some(0));
    let waiting = add(db, "cw", &["--count", "3", "--arg", "ms=10"]).await;
    let uncordoned_at = now_us();
    let out = ok_json(
        db,
        &[
            "machine",
            "uncordon",
            "--self",
            "--listen",
            &cordoned.listen,
        ],
    )
    .await;
    assert_eq!(out["machine"], cordoned_id);
    all_done(t, 23, Duration::from_secs(60)).await;
    let by_task = attempts(t).await;
    for id in &waiting {
        let list = &by_task[id];
        assert_eq!(list.len(), 1, "task {id}: {list:?}");
        assert_eq!(list[0].machine, cordoned_id);
        assert!(
            list[0].start_us > uncordoned_at,
            "task {id} started before the node was uncordoned"
        );
    }
}

/// Two `can_yield` command types; `{arg.dir}` is where they leave their marks. The first run
/// of each waits, the second (after the yield) exits 0 at once. `polite` traps TERM and says
/// so in a file; `stubborn` ignores TERM (the disposition survives `exec`, so the sleep that
/// replaces the shell ignores it too) and writes its pid.
const YIELD_TASKS: &str = r#"
[[task]]
name = "polite"
command = ["sh", "-c", """
d=$0
if [ -e "$d/polite.started" ]; then exit 0; fi
trap 'echo "$HARMONY_TASK_RETRIES" > "$d/polite.term"; kill $p; exit 0' TERM
sleep 60 & p=$!
echo started > "$d/polite.started"
wait $p
""", "{arg.dir}"]
can_yield = true

[[task]]
name = "stubborn"
command = ["sh", "-c", """
d=$0
if [ -e "$d/stubborn.pid" ]; then exit 0; fi
trap '' TERM
echo $$ > "$d/stubborn.tmp" && mv "$d/stubborn.tmp" "$d/stubborn.pid"
exec sleep 60
""", "{arg.dir}"]
can_yield = true
kill_grace = "500ms"
"#;

/// `machine cordon` (the CLI) stops running `can_yield` commands: one that handles SIGTERM
/// gets it and exits; one that ignores it is SIGKILLed once its `kill_grace` is over. Both are
/// released with their retries unchanged (history `yielded`), wait while the node is cordoned,
/// and run again after uncordon.
async fn cordon_stops_can_yield_commands_with_sigterm_then_sigkill(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let marks = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), YIELD_TASKS);
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let node = Node::start(
        db,
        dir.path(),
        &node_args(file, &[&["--types", "polite,stubborn"][..], FAST].concat()),
    );
    let id = node.machine_id(t).await;
    let dir_arg = format!("dir={}", marks.path().display());
    let polite = add(db, "polite", &["--arg", &dir_arg]).await[0];
    let stubborn = add(db, "stubborn", &["--arg", &dir_arg]).await[0];
    let mark = |name: &str| marks.path().join(name);
    eventually("both commands to start", Duration::from_secs(30), || {
        let ready = mark("polite.started").exists() && mark("stubborn.pid").exists();
        async move { ready.then_some(()) }
    })
    .await;
    let stubborn_pid = std::fs::read_to_string(mark("stubborn.pid")).unwrap();
    let stubborn_pid = stubborn_pid.trim().to_owned();

    let out = ok_json(db, &["machine", "cordon", &id.to_string()]).await;
    assert_eq!(out["changed"], true);
    wait_count(
        t,
        "both tasks to yield",
        Duration::from_secs(30),
        2,
        "SELECT count(*) FROM harmony_task_history WHERE err = 'yielded'",
        &[],
    )
    .await;
    // SIGTERM reached the polite command, which stopped by itself; the stubborn one was
    // killed once its grace was over, and is gone.
    let term = std::fs::read_to_string(mark("polite.term"))
        .unwrap_or_else(|e| panic!("the polite command's TERM trap did not run: {e}"));
    assert_eq!(term.trim(), "0", "HARMONY_TASK_RETRIES seen by the trap");
    node.wait_log(&[
        "cancelled command stopped after SIGTERM",
        &format!("task={polite}"),
    ])
    .await;
    node.wait_log(&[
        "cancelled command ignored SIGTERM for its kill grace; sending SIGKILL",
        &format!("task={stubborn}"),
        "kill_grace=500ms",
    ])
    .await;
    assert!(
        !std::path::Path::new(&format!("/proc/{stubborn_pid}")).exists(),
        "the stubborn command (pid {stubborn_pid}) still runs"
    );
    // Released, not failed, and not taken back by the cordoned node.
    let rows: Vec<(i64, Option<i64>, i64)> =
        t.db.select(
            "SELECT id, owner_id, retries FROM harmony_task ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows, [(polite, None, 0), (stubborn, None, 0)]);
    let history: Vec<(i64, bool, String)> =
        t.db.select(
            "SELECT task_id, result, err FROM harmony_task_history ORDER BY task_id, id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        history,
        [
            (polite, false, "yielded".to_owned()),
            (stubborn, false, "yielded".to_owned())
        ]
    );

    ok_json(db, &["machine", "uncordon", &id.to_string()]).await;
    all_done(t, 2, Duration::from_secs(30)).await;
    let s = successes(t).await;
    assert_eq!(s.get(&polite), Some(&(1, node.listen.clone())));
    assert_eq!(s.get(&stubborn), Some(&(1, node.listen.clone())));
}

/// `machine restart`: the node drains, keeps running its task to the end, starts nothing new,
/// then exits with code 100 and removes its row.
async fn restart_exits_100_only_after_the_running_task(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        "[[task]]\nname = \"rs\"\nbuiltin = \"bench_sleep\"\n",
    );
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let mut node = Node::start(
        db,
        dir.path(),
        &node_args(file, &[&["--types", "rs"][..], FAST].concat()),
    );
    let id = node.machine_id(t).await;
    let long = add(db, "rs", &["--arg", "ms=4000"]).await[0];
    running_on(t, id, 1).await;

    let out = ok_json(db, &["machine", "restart", &id.to_string()]).await;
    assert_eq!(out["action"], "restart");
    node.wait_log(&["restart requested"]).await;
    let unended: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_test_attempt WHERE task_id = $1 AND ended IS NULL",
            &[&long],
        )
        .await
        .unwrap();
    assert_eq!(unended, 1, "the drain began while the task ran");
    assert!(node.is_running(), "the node exited while its task ran");
    // Work added while draining is left for others.
    let later = add(db, "rs", &["--arg", "ms=10"]).await[0];

    assert_eq!(node.exit_code(Duration::from_secs(60)).await, Some(100));
    // It exited only after the task finished: the attempt ended and its success is recorded.
    let s = successes(t).await;
    assert_eq!(s.get(&long), Some(&(1, node.listen.clone())));
    let ended: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_test_attempt WHERE task_id = $1 AND ended IS NOT NULL",
            &[&long],
        )
        .await
        .unwrap();
    assert_eq!(ended, 1);
    let rows: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_machines WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(rows, 0, "its machine row is gone");
    let (owner,): (Option<i64>,) =
        t.db.query_row("SELECT owner_id FROM harmony_task WHERE id = $1", &[&later])
            .await
            .unwrap();
    assert_eq!(
        owner, None,
        "the task added while draining is still waiting"
    );
    assert!(!s.contains_key(&later));
}

/// Commands that start children of their own: each shell starts a `sleep` in the background,
/// writes its pid, and waits for it. `g_timeout` times out, `g_yield` is stopped by a cordon,
/// `g_stay` by the node's shutdown.
const GROUP_TASKS: &str = r#"
[[task]]
name = "g_timeout"
command = ["sh", "-c", "sleep 300 & echo $! > \"$0.tmp\" && mv \"$0.tmp\" \"$0\"; wait", "{arg.pidfile}"]
timeout = "3s"
max_failures = 1

[[task]]
name = "g_yield"
command = ["sh", "-c", "sleep 300 & echo $! > \"$0.tmp\" && mv \"$0.tmp\" \"$0\"; wait", "{arg.pidfile}"]
can_yield = true

[[task]]
name = "g_stay"
command = ["sh", "-c", "sleep 300 & echo $! > \"$0.tmp\" && mv \"$0.tmp\" \"$0\"; wait", "{arg.pidfile}"]
"#;

/// A command's own children die with its attempt, whichever way the attempt ends: a timeout,
/// a cancellation (a cordon stopping a `can_yield` type) and the node's shutdown each stop the
/// whole process group, not only the shell the node started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_children_are_stopped_with_it() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), GROUP_TASKS);
    let file = file.to_str().unwrap();
    let mut node = Node::start_plain(
        db,
        dir.path(),
        &node_args(file, &[&["--shutdown-grace", "100ms"][..], FAST].concat()),
    );
    let machine = node.machine_id(&t).await;
    let pid_of = |name: &str| dir.path().join(format!("{name}.pid"));
    let add_with_pidfile = |name: &'static str| {
        let arg = format!("pidfile={}", pid_of(name).display());
        async move { add(db, name, &["--arg", &arg]).await[0] }
    };
    let started = |names: &'static [&'static str]| {
        let files: Vec<_> = names.iter().map(|n| pid_of(n)).collect();
        async move {
            eventually(
                &format!("{names:?} to start their children"),
                Duration::from_secs(30),
                || {
                    let all = files.iter().all(|f| f.exists());
                    async move { all.then_some(()) }
                },
            )
            .await;
        }
    };

    add_with_pidfile("g_timeout").await;
    started(&["g_timeout"]).await;
    wait_process_gone(&pid_of("g_timeout")).await;
    wait_count(
        &t,
        "the timed-out attempt to be recorded",
        Duration::from_secs(30),
        1,
        "SELECT count(*) FROM harmony_task_history WHERE name = 'g_timeout' AND err LIKE 'timeout%'",
        &[],
    )
    .await;

    add_with_pidfile("g_yield").await;
    let stay = add_with_pidfile("g_stay").await;
    started(&["g_yield", "g_stay"]).await;
    ok_json(db, &["machine", "cordon", &machine.to_string()]).await;
    wait_process_gone(&pid_of("g_yield")).await;
    wait_count(
        &t,
        "the yielded attempt to be recorded",
        Duration::from_secs(30),
        1,
        "SELECT count(*) FROM harmony_task_history WHERE name = 'g_yield' AND err = 'yielded'",
        &[],
    )
    .await;

    node.signal(Signal::SIGTERM);
    assert_eq!(node.exit_code(Duration::from_secs(30)).await, Some(0));
    wait_process_gone(&pid_of("g_stay")).await;
    let released: Vec<(i64, Option<i64>)> =
        t.db.select(
            "SELECT id, owner_id FROM harmony_task WHERE name = 'g_stay'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(released, [(stay, None)], "released at shutdown");
}
