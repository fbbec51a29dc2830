//! Several `harmony run` processes on one database, on SQLite and Postgres: they share the
//! work without running a task twice at once, honour `max_cluster`, survive SIGKILL of a node
//! that is running tasks, fence a node that was stopped long enough to be declared dead, and
//! hand work over at once on SIGTERM.
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

/// A long-running type whose cost, with [`BUDGET`], lets a node run two tasks at once: a node
/// is busy with several tasks when it is killed or stopped, and others wait their turn.
const COSTLY_SLEEP: &str =
    "[[task]]\nname = \"t_sleep\"\nbuiltin = \"bench_sleep\"\ncost = { cpu = 1 }\n";

/// Two CPUs: two `COSTLY_SLEEP` tasks at a time.
const BUDGET: &[&str] = &["--cpu", "2", "--ram", "4GiB", "--gpu", "0"];

/// `--tasks FILE`, [`BUDGET`] and [`FAST`].
fn costly_node_args(file: &str) -> Vec<&str> {
    let mut args = vec!["--tasks", file];
    args.extend_from_slice(BUDGET);
    args.extend_from_slice(FAST);
    args
}

/// Three processes; one is SIGKILLed while it runs two tasks. Its tasks must run again
/// elsewhere once it is declared dead, tasks added after the kill must run too, each task
/// must succeed exactly once, no two attempts of a task may overlap, and nothing may fail on
/// the way (on SQLite: no `database is locked` reaching a task or a client).
async fn sigkill_loses_nothing(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), COSTLY_SLEEP);
    let args = costly_node_args(file.to_str().unwrap());
    let db = t.url.as_str();
    let mut victim = Node::start(db, dir.path(), &args);
    let survivors = [
        Node::start(db, dir.path(), &args),
        Node::start(db, dir.path(), &args),
    ];
    let victim_id = victim.machine_id(t).await;
    for n in &survivors {
        n.machine_id(t).await;
    }

    // Six 3 s tasks on six slots: the cost lets no node take more than two, so each takes
    // two, the victim included. Long tasks, so that the victim's two are still running when
    // the kill comes, however loaded the machine, and the survivors' slots are free again
    // by the time the victim is declared dead: what is measured is the recovery, not a queue.
    let ids = add_sleeps(db, "t_sleep", 6, 3000).await;
    running_on(t, victim_id, 2).await;
    let killed_at = now_us();
    let killed = std::time::Instant::now();
    victim.signal(Signal::SIGKILL);
    assert_eq!(victim.exit_code(Duration::from_secs(10)).await, None);

    // Its unfinished attempts: the tasks it owned and was running. A dead process logs
    // nothing more, so this list is final.
    let orphans = unended_on(&attempts(t).await, victim_id);
    assert_eq!(
        orphans.len(),
        2,
        "the victim was running two tasks when killed: {orphans:?}"
    );
    // Writers after the crash (on SQLite: after a process died holding the file open) are
    // not refused, and their work runs too.
    let after = add_sleeps(db, "t_sleep", 3, 10).await;
    eventually(
        "the killed node's tasks to succeed elsewhere",
        Duration::from_secs(60),
        || async {
            let ok = successes(t).await;
            orphans.iter().all(|id| ok.contains_key(id)).then_some(())
        },
    )
    .await;
    let took = killed.elapsed();
    let by_task = attempts(t).await;
    let restarted_us = orphans
        .iter()
        .filter_map(|id| by_task[id].iter().find(|a| a.machine != victim_id))
        .map(|a| a.start_us - killed_at)
        .max()
        .unwrap_or_default();
    println!(
        "SIGKILL ({:?}, dead-after 3 s, 3 s tasks): the killed node's {} running tasks were all running again elsewhere {} ms after the kill, and all succeeded {:.0} ms after it",
        t.backend(),
        orphans.len(),
        restarted_us / 1000,
        took.as_secs_f64() * 1000.0
    );

    let ids: Vec<i64> = ids.into_iter().chain(after).collect();
    all_done(t, ids.len() as i64, Duration::from_secs(60)).await;
    let ok = assert_each_succeeded_once(t, &ids).await;
    assert_no_failed_attempts(t).await;
    let by_task = attempts(t).await;
    let unended = assert_no_overlap(&by_task, Some(killed_at));
    assert_eq!(
        unended,
        orphans.len(),
        "only the killed node leaves attempts open"
    );
    for id in &orphans {
        let last = by_task[id].last().unwrap();
        assert_ne!(last.machine, victim_id);
        assert!(
            survivors.iter().any(|n| n.listen == ok[id].1),
            "task {id} was finished by {}, not a survivor",
            ok[id].1
        );
    }
    // The cost limited every node, the victim included, to two tasks at a time.
    for (machine, peak) in peak_per_machine(&by_task) {
        assert!(peak <= 2, "machine {machine} ran {peak} tasks at once");
    }
}

/// A node stopped (SIGSTOP) while running two tasks, past dead-after, is declared dead and its
/// tasks taken over; when it resumes (SIGCONT) its late results are discarded, it starts
/// nothing more, and it exits with code 4.
async fn a_stopped_node_is_fenced_when_it_resumes(t: &TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), COSTLY_SLEEP);
    let args = costly_node_args(file.to_str().unwrap());
    let db = t.url.as_str();

    let mut zombie = Node::start(db, dir.path(), &args);
    let zombie_id = zombie.machine_id(t).await;
    // Three tasks, two slots: the zombie runs two, one waits.
    let first = add_sleeps(db, "t_sleep", 3, 2000).await;
    running_on(t, zombie_id, 2).await;
    zombie.signal(Signal::SIGSTOP);
    let stopped = unended_on(&attempts(t).await, zombie_id);
    assert_eq!(stopped.len(), 2, "{stopped:?}");

    // Another node declares it dead and takes both of its tasks over.
    let heir = Node::start(db, dir.path(), &args);
    let heir_id = heir.machine_id(t).await;
    eventually(
        "the heir to take both tasks over",
        Duration::from_secs(30),
        || async {
            let by_task = attempts(t).await;
            stopped
                .iter()
                .all(|id| by_task[id].iter().any(|a| a.machine == heir_id))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_machines").await,
        1,
        "the stopped node was reaped"
    );
    // More work is waiting when it wakes up; it must not take any.
    let more = add_sleeps(db, "t_sleep", 4, 10).await;
    // It resumes while the heir still runs its former tasks: its own attempts are past their
    // end, so their results arrive while another node owns the tasks.
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

    let all: Vec<i64> = first.iter().chain(&more).copied().collect();
    all_done(t, all.len() as i64, Duration::from_secs(60)).await;
    let ok = assert_each_succeeded_once(t, &all).await;
    for id in &all {
        assert_eq!(
            ok[id].1, heir.listen,
            "task {id}: the heir's result is the one recorded"
        );
    }
    // The zombie's late results were discarded: it recorded nothing at all.
    let from_zombie: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_task_history WHERE completed_by_host_and_port = $1",
            &[&zombie.listen],
        )
        .await
        .unwrap();
    assert_eq!(from_zombie, 0);
    // It started nothing after it resumed: its only attempts are the two it was stopped in.
    let mut zombie_tasks: Vec<i64> = attempts(t)
        .await
        .values()
        .flatten()
        .filter(|a| a.machine == zombie_id)
        .map(|a| a.task)
        .collect();
    zombie_tasks.sort_unstable();
    let mut want = stopped.clone();
    want.sort_unstable();
    assert_eq!(zombie_tasks, want);
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

    use super::common::{
        Attempt, assert_no_overlap, assert_sequential, max_concurrent, peak_per_machine, unended_on,
    };

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

    #[test]
    fn concurrency_and_open_attempts_per_machine() {
        let g = group(vec![
            a(1, 1, 0, Some(10)),
            a(2, 1, 5, Some(15)),
            a(3, 2, 5, Some(15)),
            a(4, 1, 20, None),
            a(4, 2, 30, Some(40)),
        ]);
        let peaks = peak_per_machine(&g);
        assert_eq!((peaks[&1], peaks[&2]), (2, 1));
        assert_eq!(unended_on(&g, 1), vec![4]);
        assert!(unended_on(&g, 2).is_empty());
    }
}
