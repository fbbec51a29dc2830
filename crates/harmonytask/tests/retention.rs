//! History retention on SQLite and Postgres: what a prune deletes and what it keeps, the dry
//! run, the per-type limit, the lease that lets one pruner at a time work, and an engine that
//! prunes on its own.

mod common;

use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};
use harmonydb::{Executor, Timestamp};
use harmonytask::retention::PRUNE_LEASE;
use harmonytask::{Admin, PruneCounts};
use harmonytask::{Engine, PruneOutcome, PruneReport, PruneRule};
use tokio_util::sync::CancellationToken;

harmony_testkit::both_backends!(
    old_history_and_finished_tasks_args_go_the_rest_stays,
    keep_per_type_keeps_the_newest_rows_of_each_type,
    the_lease_lets_one_pruner_at_a_time,
    racing_holders_get_the_lease_once,
    an_engine_prunes_by_itself,
);

const DAY: Duration = Duration::from_secs(24 * 3600);

fn now() -> Timestamp {
    Timestamp::from_system(std::time::SystemTime::now())
}

fn ago(now: Timestamp, d: Duration) -> Timestamp {
    Timestamp::from_millis(now.as_millis() - d.as_millis() as i64)
}

async fn history(t: &TestDb, task: i64, name: &str, end: Timestamp) {
    t.db.exec(
        "INSERT INTO harmony_task_history (task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port)
         VALUES ($1, $2, $3, $3, $3, $4, '', 'test:1')",
        &[&task, &name, &end, &true],
    )
    .await
    .unwrap();
}

async fn arg(t: &TestDb, task: i64, key: &str) {
    t.db.exec(
        "INSERT INTO harmony_task_args (task_id, key, value) VALUES ($1, $2, 'v')",
        &[&task, &key],
    )
    .await
    .unwrap();
}

/// A pending task row with this id.
async fn pending(t: &TestDb, id: i64, name: &str, posted: Timestamp) {
    t.db.exec(
        "INSERT INTO harmony_task (id, name, posted_time, update_time, added_by, retries) VALUES ($1, $2, $3, $3, 0, 1)",
        &[&id, &name, &posted],
    )
    .await
    .unwrap();
}

async fn ids(t: &TestDb, sql: &'static str) -> Vec<i64> {
    let rows: Vec<(i64,)> = t.db.select(sql, &[]).await.unwrap();
    rows.into_iter().map(|(i,)| i).collect()
}

fn ran(outcome: PruneOutcome) -> PruneReport {
    match outcome {
        PruneOutcome::Ran(r) => r,
        PruneOutcome::Busy { holder } => panic!("the lease was held by {holder}"),
    }
}

/// Older than the cutoff goes, newer stays; a pending task keeps its old history and its
/// arguments; a finished task's arguments go once none of its history is left; arguments
/// with no history at all cannot be dated and stay. The dry run counts exactly what the prune
/// then deletes, and deletes nothing.
async fn old_history_and_finished_tasks_args_go_the_rest_stays(t: &TestDb) {
    let store = Admin::new(t.db.clone());
    let now = now();
    // Task 1: finished, all history old. Task 2: finished, one old and one new attempt.
    // Task 3: pending (retrying) with an old attempt. Task 4: finished, new. Task 5: arguments
    // only.
    history(t, 1, "a", ago(now, 10 * DAY)).await;
    history(t, 1, "a", ago(now, 9 * DAY)).await;
    history(t, 2, "a", ago(now, 8 * DAY)).await;
    history(t, 2, "a", ago(now, DAY)).await;
    history(t, 3, "b", ago(now, 20 * DAY)).await;
    pending(t, 3, "b", ago(now, 21 * DAY)).await;
    history(t, 4, "b", ago(now, Duration::from_secs(60))).await;
    for task in 1..=5 {
        arg(t, task, "k1").await;
        arg(t, task, "k2").await;
    }
    let want = PruneCounts {
        history: 3,
        args: 2,
    };
    let dry = store.prune_count(7 * DAY, None, now).await.unwrap();
    assert_eq!(dry, want);
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history").await,
        6
    );
    assert_eq!(count(t, "SELECT count(*) FROM harmony_task_args").await, 10);
    assert_eq!(
        store.prune_count(7 * DAY, Some("b"), now).await.unwrap(),
        PruneCounts::default(),
        "type b has only a pending task's old row"
    );

    let rule = PruneRule {
        older_than: Some(7 * DAY),
        ..PruneRule::default()
    };
    // Batches of one id: (0, 1], (1, 2], (2, 3]; id 3 is the newest row older than the cutoff.
    let report = ran(store
        .prune_history("me", &rule, now, 1, &CancellationToken::new())
        .await
        .unwrap());
    assert_eq!(report.deleted, want);
    assert_eq!(
        report.batches, 3,
        "ranges of one id from the oldest row to the newest old one"
    );
    assert!(!report.interrupted);
    assert_eq!(
        ids(t, "SELECT task_id FROM harmony_task_history ORDER BY id").await,
        [2, 3, 4]
    );
    assert_eq!(
        ids(
            t,
            "SELECT DISTINCT task_id FROM harmony_task_args ORDER BY task_id"
        )
        .await,
        [2, 3, 4, 5]
    );
    assert_eq!(
        store.lease_holder(PRUNE_LEASE).await.unwrap(),
        None,
        "the lease is handed back after the round"
    );
    // Nothing left to do.
    let again = ran(store
        .prune_history("me", &rule, now, 100, &CancellationToken::new())
        .await
        .unwrap());
    assert_eq!(again.deleted, PruneCounts::default());
}

/// The per-type limit keeps the newest N rows of every type, whatever their age, and never
/// deletes a pending task's rows; with `name` it applies to that type only.
async fn keep_per_type_keeps_the_newest_rows_of_each_type(t: &TestDb) {
    let store = Admin::new(t.db.clone());
    let now = now();
    // Type a: tasks 1..=5, task 1 the oldest; task 1 is still pending. Type b: two rows.
    for task in 1..=5_i64 {
        history(
            t,
            task,
            "a",
            ago(now, Duration::from_secs(600 - task as u64 * 60)),
        )
        .await;
        arg(t, task, "k").await;
    }
    pending(t, 1, "a", ago(now, DAY)).await;
    history(t, 10, "b", ago(now, 3 * DAY)).await;
    history(t, 11, "b", ago(now, 2 * DAY)).await;
    history(t, 20, "c", ago(now, 3 * DAY)).await;
    history(t, 21, "c", ago(now, 2 * DAY)).await;
    history(t, 22, "c", ago(now, DAY)).await;

    let only_c = PruneRule {
        keep_per_type: Some(1),
        name: Some("c".into()),
        ..PruneRule::default()
    };
    let r = ran(store
        .prune_history("me", &only_c, now, 10, &CancellationToken::new())
        .await
        .unwrap());
    assert_eq!(r.deleted.history, 2);
    assert_eq!(
        ids(
            t,
            "SELECT task_id FROM harmony_task_history WHERE name = 'c'"
        )
        .await,
        [22]
    );

    let rule = PruneRule {
        keep_per_type: Some(3),
        ..PruneRule::default()
    };
    let r = ran(store
        .prune_history("me", &rule, now, 10, &CancellationToken::new())
        .await
        .unwrap());
    // Type a: 3, 4, 5 are the newest three; 2 goes, 1 is pending and stays.
    assert_eq!(
        r.deleted,
        PruneCounts {
            history: 1,
            args: 1
        }
    );
    assert_eq!(
        ids(
            t,
            "SELECT task_id FROM harmony_task_history WHERE name = 'a' ORDER BY task_id"
        )
        .await,
        [1, 3, 4, 5]
    );
    assert_eq!(
        ids(t, "SELECT task_id FROM harmony_task_args ORDER BY task_id").await,
        [1, 3, 4, 5]
    );
    assert_eq!(
        ids(
            t,
            "SELECT task_id FROM harmony_task_history WHERE name = 'b' ORDER BY task_id"
        )
        .await,
        [10, 11]
    );
}

/// While one holder has the lease, another's prune deletes nothing and names the holder; a
/// lease is renewed by its holder, taken once it is released or has expired.
async fn the_lease_lets_one_pruner_at_a_time(t: &TestDb) {
    let store = Admin::new(t.db.clone());
    let now = now();
    history(t, 1, "a", ago(now, 10 * DAY)).await;
    let rule = PruneRule {
        older_than: Some(DAY),
        ..PruneRule::default()
    };
    let stop = CancellationToken::new();

    assert!(
        store
            .lease_acquire(PRUNE_LEASE, "node-a", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert!(
        store
            .lease_acquire(PRUNE_LEASE, "node-a", Duration::from_secs(60))
            .await
            .unwrap(),
        "the holder renews its own lease"
    );
    assert!(
        !store
            .lease_acquire(PRUNE_LEASE, "node-b", Duration::from_secs(60))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .prune_history("node-b", &rule, now, 10, &stop)
            .await
            .unwrap(),
        PruneOutcome::Busy {
            holder: "node-a".into()
        }
    );
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history").await,
        1
    );
    // Releasing someone else's lease does nothing.
    store.lease_release(PRUNE_LEASE, "node-b").await.unwrap();
    assert_eq!(
        store.lease_holder(PRUNE_LEASE).await.unwrap().as_deref(),
        Some("node-a")
    );
    store.lease_release(PRUNE_LEASE, "node-a").await.unwrap();
    assert_eq!(
        ran(store
            .prune_history("node-b", &rule, now, 10, &stop)
            .await
            .unwrap())
        .deleted
        .history,
        1
    );

    // A holder that died lets its lease expire; then another takes it.
    assert!(
        store
            .lease_acquire(PRUNE_LEASE, "dead", Duration::from_millis(300))
            .await
            .unwrap()
    );
    history(t, 2, "a", ago(now, 10 * DAY)).await;
    let got = eventually(
        "the dead holder's lease to expire",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            let rule = rule.clone();
            let stop = stop.clone();
            async move {
                match store
                    .prune_history("node-b", &rule, now, 10, &stop)
                    .await
                    .unwrap()
                {
                    PruneOutcome::Ran(r) => Some(r),
                    PruneOutcome::Busy { holder } => {
                        // The lease may expire between the failed take and the read of its
                        // holder (a loaded machine): then no name is known.
                        assert!(
                            holder == "dead" || holder == "another holder, just now",
                            "{holder}"
                        );
                        None
                    }
                }
            }
        },
    )
    .await;
    assert_eq!(got.deleted.history, 1);
}

/// Many holders asking for a free lease at the same moment: exactly one gets it.
async fn racing_holders_get_the_lease_once(t: &TestDb) {
    let store = Admin::new(t.db.clone());
    for round in 0..5 {
        let name = format!("race{round}");
        let mut racers = Vec::new();
        for i in 0..8 {
            let store = store.clone();
            let name = name.clone();
            racers.push(tokio::spawn(async move {
                store
                    .lease_acquire(&name, &format!("holder{i}"), Duration::from_secs(60))
                    .await
                    .unwrap()
            }));
        }
        let mut winners = 0;
        for r in racers {
            winners += usize::from(r.await.unwrap());
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

/// An engine with a retention setting prunes on its own, through the lease.
async fn an_engine_prunes_by_itself(t: &TestDb) {
    let now = now();
    history(t, 1, "a", ago(now, 40 * DAY)).await;
    arg(t, 1, "k").await;
    history(t, 2, "a", ago(now, 20 * DAY)).await;
    let mut cfg = config(big_budget());
    cfg.history_keep = Some(30 * DAY);
    cfg.prune_interval = Duration::from_millis(100);
    let engine = Engine::builder(t.db.clone())
        .config(cfg)
        .register(Probe::new(
            harmonytask::TypeDetails::new("a"),
            |_, _| async { Ok(harmonytask::Done(true)) },
        ))
        .start()
        .await
        .unwrap();
    let db = t.db.clone();
    eventually("the engine to prune", Duration::from_secs(30), || {
        let db = db.clone();
        async move {
            let left: Vec<(i64,)> = db
                .select("SELECT task_id FROM harmony_task_history", &[])
                .await
                .ok()?;
            let args: i64 = db
                .scalar("SELECT count(*) FROM harmony_task_args", &[])
                .await
                .ok()?;
            (left == [(2,)] && args == 0).then_some(())
        }
    })
    .await;
    shutdown(&engine).await;
}
