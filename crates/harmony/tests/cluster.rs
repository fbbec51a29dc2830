//! Several `harmony run` processes on one database, on SQLite and Postgres: they share the
//! work without running a task twice at once, honour `max_cluster`, survive SIGKILL of a node,
//! fence a node that was stopped long enough to be declared dead, and hand work over at once
//! on SIGTERM.
//!
//! The checks read `harmony_test_attempt`, which the built-in task behaviour writes itself at
//! the start and end of every physical attempt, outside the engine's fencing.

mod common;

use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};
use harmonydb::Executor;
use nix::sys::signal::Signal;

harmony_testkit::both_backends!(
    three_nodes_share_2000_tasks,
    sigkill_loses_nothing,
    a_stopped_node_is_fenced_when_it_resumes,
    sigterm_hands_running_tasks_over_at_once,
);

const TASKS: &str = r#"
[[task]]
name = "t_noop"
builtin = "bench_noop"

[[task]]
name = "t_sleep"
builtin = "bench_sleep"
max_cluster = 2
"#;

/// 2,000 tasks over three processes. Only 12 of them are of the cluster-limited type: the
/// engine (as of this writing) pauses a type on a node for `refused_retry_interval` (1 s)
/// after every claim that the cluster limit cut short, even when it claimed some, so the
/// cluster runs about two of those tasks per second.
async fn three_nodes_share_2000_tasks(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), TASKS);
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let node_args = [
        "--tasks",
        file,
        "--cpu",
        "2",
        "--ram",
        "4GiB",
        "--gpu",
        "0",
        "--poll-interval",
        "100ms",
    ];
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(db, dir.path(), &node_args))
        .collect();
    let mut machines = Vec::new();
    for n in &nodes {
        machines.push(n.machine_id(t).await);
    }

    let sleepers = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "t_sleep", "--count", "12", "--arg", "ms=20",
        ])
        .await,
    );
    let noops = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "t_noop", "--count", "1988",
        ])
        .await,
    );
    assert_eq!((sleepers.len(), noops.len()), (12, 1988));
    all_done(t, 2000, Duration::from_secs(120)).await;

    // Each task exactly one successful attempt, and nothing else succeeded.
    let ok = successes(t).await;
    assert_eq!(ok.len(), 2000);
    for id in sleepers.iter().chain(&noops) {
        assert_eq!(ok.get(id).map(|s| s.0), Some(1), "task {id}");
    }
    // No two attempts of one task overlapped; every attempt ended.
    let by_task = attempts(t).await;
    assert_eq!(by_task.len(), 2000);
    assert_eq!(assert_no_overlap(&by_task, None), 0);
    assert!(
        by_task
            .values()
            .flatten()
            .all(|a| machines.contains(&a.machine))
    );
    // The cluster-wide limit held across the three processes.
    let peak = max_concurrent(&by_task, &sleepers);
    assert!(
        (1..=2).contains(&peak),
        "max_cluster = 2 but {peak} ran at once"
    );

    for n in &nodes {
        n.signal(Signal::SIGTERM);
    }
    for mut n in nodes {
        assert_eq!(n.exit_code(Duration::from_secs(30)).await, Some(0));
    }
    assert_eq!(count(t, "SELECT count(*) FROM harmony_machines").await, 0);
}

async fn sigkill_loses_nothing(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        "[[task]]\nname = \"t_sleep\"\nbuiltin = \"bench_sleep\"\nmax = 3\n",
    );
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let mut args = vec!["--tasks", file];
    args.extend_from_slice(FAST);
    let mut victim = Node::start(db, dir.path(), &args);
    let survivor = Node::start(db, dir.path(), &args);
    let victim_id = victim.machine_id(t).await;
    survivor.machine_id(t).await;

    let ids = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "t_sleep", "--count", "12", "--arg", "ms=800",
        ])
        .await,
    );
    running_on(t, victim_id, 1).await;
    let killed_at = now_us();
    victim.signal(Signal::SIGKILL);
    assert_eq!(victim.exit_code(Duration::from_secs(10)).await, None);

    all_done(t, 12, Duration::from_secs(60)).await;
    let ok = successes(t).await;
    for id in &ids {
        let (n, _) = ok.get(id).unwrap_or_else(|| panic!("task {id} lost"));
        assert_eq!(*n, 1, "task {id} succeeded {n} times");
    }
    let by_task = attempts(t).await;
    let unended = assert_no_overlap(&by_task, Some(killed_at));
    assert!(unended >= 1, "the kill should have interrupted an attempt");
    for a in by_task.values().flatten().filter(|a| a.end_us.is_none()) {
        assert_eq!(
            a.machine, victim_id,
            "only the killed node leaves attempts open"
        );
    }
    // The killed node's unfinished tasks were finished by the survivor.
    for list in by_task.values() {
        if list.iter().any(|a| a.end_us.is_none()) {
            let last = list.last().unwrap();
            assert_ne!(last.machine, victim_id);
            assert_eq!(ok[&last.task].1, survivor.listen);
        }
    }
}

async fn a_stopped_node_is_fenced_when_it_resumes(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        "[[task]]\nname = \"t_sleep\"\nbuiltin = \"bench_sleep\"\n",
    );
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let mut args = vec!["--tasks", file];
    args.extend_from_slice(FAST);

    let mut zombie = Node::start(db, dir.path(), &args);
    let zombie_id = zombie.machine_id(t).await;
    let task = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "t_sleep", "--arg", "ms=1500",
        ])
        .await,
    )[0];
    running_on(t, zombie_id, 1).await;
    zombie.signal(Signal::SIGSTOP);

    // Another node declares it dead and takes the task over.
    let heir = Node::start(db, dir.path(), &args);
    let heir_id = heir.machine_id(t).await;
    let db2 = t.db.clone();
    eventually("the heir to take the task over", Duration::from_secs(30), || {
        let db2 = db2.clone();
        async move {
            let n: i64 = db2
                .scalar(
                    "SELECT count(*) FROM harmony_test_attempt WHERE task_id = $1 AND machine_id = $2",
                    &[&task, &heir_id],
                )
                .await
                .ok()?;
            (n > 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_machines").await,
        1,
        "the stopped node was reaped"
    );
    // More work is waiting when it wakes up; it must not take any.
    let more = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "t_sleep", "--count", "4", "--arg", "ms=10",
        ])
        .await,
    );
    zombie.signal(Signal::SIGCONT);
    assert_eq!(
        zombie.exit_code(Duration::from_secs(30)).await,
        Some(4),
        "a fenced node exits with code 4"
    );
    assert!(
        zombie.log().contains("was declared dead"),
        "{}",
        zombie.log()
    );

    all_done(t, 5, Duration::from_secs(60)).await;
    let ok = successes(t).await;
    assert_eq!(
        ok[&task],
        (1, heir.listen.clone()),
        "the heir's result is the one recorded"
    );
    for id in &more {
        assert_eq!(ok[id], (1, heir.listen.clone()));
    }
    // The zombie's late result was discarded: it recorded nothing at all.
    let from_zombie: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_task_history WHERE completed_by_host_and_port = $1",
            &[&zombie.listen],
        )
        .await
        .unwrap();
    assert_eq!(from_zombie, 0);
    // It started nothing after it resumed: its only attempt is the first one.
    let zombie_attempts: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_test_attempt WHERE machine_id = $1",
            &[&zombie_id],
        )
        .await
        .unwrap();
    assert_eq!(zombie_attempts, 1);
}

async fn sigterm_hands_running_tasks_over_at_once(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        "[[task]]\nname = \"t_sleep\"\nbuiltin = \"bench_sleep\"\nmax = 2\n",
    );
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    // Dead-after of an hour: if the tasks move, it is because they were released, not reaped.
    let args = [
        "--tasks",
        file,
        "--dead-after",
        "1h",
        "--poll-interval",
        "100ms",
        "--shutdown-grace",
        "0s",
    ];
    let mut leaving = Node::start(db, dir.path(), &args);
    let leaving_id = leaving.machine_id(t).await;
    let ids = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "t_sleep", "--count", "2", "--arg", "ms=4000",
        ])
        .await,
    );
    // The tasks are long enough to be still running after the second node has started, even
    // on a loaded machine.
    running_on(t, leaving_id, 2).await;
    let staying = Node::start(db, dir.path(), &args);
    staying.machine_id(t).await;

    leaving.signal(Signal::SIGTERM);
    assert_eq!(leaving.exit_code(Duration::from_secs(30)).await, Some(0));
    let rows: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_machines WHERE id = $1",
            &[&leaving_id],
        )
        .await
        .unwrap();
    assert_eq!(rows, 0, "a node that shut down deletes its machine row");
    let released: Vec<(i64,)> = t
        .db
        .select(
            "SELECT task_id FROM harmony_task_history WHERE completed_by_host_and_port = $1 AND NOT result AND err = 'shutdown' ORDER BY task_id",
            &[&leaving.listen],
        )
        .await
        .unwrap();
    assert_eq!(
        released.into_iter().map(|r| r.0).collect::<Vec<_>>(),
        ids,
        "both running tasks were released with err = 'shutdown'"
    );

    all_done(t, 2, Duration::from_secs(30)).await;
    let ok = successes(t).await;
    for id in &ids {
        assert_eq!(ok[id], (1, staying.listen.clone()));
    }
    let by_task = attempts(t).await;
    assert_eq!(assert_no_overlap(&by_task, None), 0);
}

/// The checkers above would catch what they look for.
mod checkers {
    use std::collections::BTreeMap;

    use super::common::{Attempt, assert_no_overlap, assert_sequential, max_concurrent};

    fn a(task: i64, machine: i64, start_us: i64, end_us: Option<i64>) -> Attempt {
        Attempt {
            task,
            machine,
            start_us,
            end_us,
        }
    }

    fn group(list: Vec<Attempt>) -> BTreeMap<i64, Vec<Attempt>> {
        let mut m: BTreeMap<i64, Vec<Attempt>> = BTreeMap::new();
        for x in list {
            m.entry(x.task).or_default().push(x);
        }
        m
    }

    #[test]
    fn touching_attempts_are_fine() {
        let g = group(vec![a(1, 1, 0, Some(10)), a(1, 2, 10, Some(20))]);
        assert_eq!(assert_no_overlap(&g, None), 0);
        let g = group(vec![a(1, 1, 0, None), a(1, 2, 50, Some(60))]);
        assert_eq!(assert_no_overlap(&g, Some(40)), 1);
    }

    #[test]
    #[should_panic(expected = "after the next")]
    fn overlapping_attempts_are_caught() {
        assert_no_overlap(
            &group(vec![a(1, 1, 0, Some(11)), a(1, 2, 10, Some(20))]),
            None,
        );
    }

    #[test]
    #[should_panic(expected = "before the unfinished one's process was killed")]
    fn a_takeover_before_the_kill_is_caught() {
        assert_no_overlap(
            &group(vec![a(1, 1, 0, None), a(1, 2, 30, Some(60))]),
            Some(40),
        );
    }

    #[test]
    fn sequential_attempts_of_different_tasks() {
        assert_sequential(&[
            a(2, 2, 10, Some(20)),
            a(1, 1, 0, Some(10)),
            a(3, 3, 25, Some(30)),
        ]);
    }

    #[test]
    #[should_panic(expected = "attempts overlapped")]
    fn overlapping_singleton_attempts_are_caught() {
        assert_sequential(&[a(1, 1, 0, Some(15)), a(2, 2, 10, Some(20))]);
    }

    #[test]
    #[should_panic(expected = "never ended")]
    fn an_unended_singleton_attempt_is_caught() {
        assert_sequential(&[a(1, 1, 0, None), a(2, 2, 10, Some(20))]);
    }

    #[test]
    fn concurrency_is_counted_across_machines() {
        let g = group(vec![
            a(1, 1, 0, Some(10)),
            a(2, 2, 5, Some(15)),
            a(3, 3, 9, Some(12)),
            a(4, 1, 15, Some(30)),
        ]);
        assert_eq!(max_concurrent(&g, &[1, 2, 3, 4]), 3);
        assert_eq!(max_concurrent(&g, &[2, 4]), 1);
    }
}
