//! The store's conformance suite: every case is written against the store's traits and runs on
//! SQLite and on Postgres (River's `riverdrivertest.Exercise`). The cases pin the fencing rules
//! the engine's correctness rests on: a claim takes only unowned rows and each row once, a
//! record by a machine that no longer owns the task writes nothing, and the reaper releases a
//! dead machine's tasks.

use std::time::Duration;

use harmony_testkit::TestDb;
use harmonydb::{Executor, Timestamp};

use super::prelude::*;
use super::{MachineRegister, RecordBatch, Store, TaskClaim};
use crate::error::Error;
use crate::model::{Fate, HistoryQuery, MachineId, Outcome, TaskId};

fn now() -> Timestamp {
    Timestamp::from_millis(1_700_000_000_000)
}

async fn register<S: MachineStore>(s: &S, host: &str) -> MachineId {
    s.machine_register(&MachineRegister {
        host_and_port: host,
        cpu: 4.0,
        ram: 1 << 30,
        gpu: 0.0,
        tasks: "t",
        layers: "",
        name: host,
        version: "test",
        now: now(),
        dead_after: Duration::from_secs(30),
    })
    .await
    .unwrap()
    .id
}

async fn add<S: TaskStore>(s: &S, n: usize) -> Vec<TaskId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(
            s.task_insert_alone("t", now(), MachineId(0), false)
                .await
                .unwrap(),
        );
    }
    ids
}

fn claim<'a>(ids: &'a [TaskId], owner: MachineId) -> TaskClaim<'a> {
    TaskClaim {
        name: "t",
        ids,
        limit: ids.len(),
        owner,
        max_cluster: 0,
    }
}

fn outcome(id: TaskId, fate: Fate) -> Outcome {
    Outcome {
        id,
        name: "t".into(),
        posted: now(),
        work_start: now(),
        work_end: now(),
        fate,
        err: String::new(),
    }
}

fn batch<'a>(owner: MachineId, outcomes: &'a [Outcome]) -> RecordBatch<'a> {
    RecordBatch {
        notify: false,
        cluster_limited: &[],
        owner,
        host_and_port: "a:1",
        now: now(),
        outcomes,
        singletons: &[],
    }
}

/// A claim returns only unowned tasks, and a task once: a second claimer of the same ids gets
/// nothing, and the poll no longer offers claimed rows.
async fn claim_takes_only_unowned(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let b = register(&s, "b:1").await;
    let ids = add(&s, 3).await;
    let first = s.task_claim(&claim(&ids[..2], a)).await.unwrap();
    let got: Vec<TaskId> = first.claimed.iter().map(|c| c.id).collect();
    assert_eq!(got, ids[..2].to_vec());
    let second = s.task_claim(&claim(&ids, b)).await.unwrap();
    let got: Vec<TaskId> = second.claimed.iter().map(|c| c.id).collect();
    assert_eq!(got, vec![ids[2]], "b may take only the unowned task");
    assert!(s.task_poll("t", 10).await.unwrap().is_empty());
    assert_eq!(s.task_owner(ids[0]).await.unwrap(), Some(Some(a)));
    assert_eq!(s.task_owner(ids[2]).await.unwrap(), Some(Some(b)));
}

/// Two claims of the same ids racing on separate connections never both win a row.
async fn concurrent_claims_are_atomic(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let other = Store::new(t.open_another().await);
    let a = register(&s, "a:1").await;
    let b = register(&s, "b:1").await;
    let ids = add(&s, 20).await;
    let (for_a, for_b) = (claim(&ids, a), claim(&ids, b));
    let (x, y) = tokio::join!(s.task_claim(&for_a), other.task_claim(&for_b));
    let mut all: Vec<TaskId> = x
        .unwrap()
        .claimed
        .into_iter()
        .chain(y.unwrap().claimed)
        .map(|c| c.id)
        .collect();
    all.sort();
    assert_eq!(all, ids, "every task claimed exactly once");
}

/// A record by a machine that does not own the task changes no row and writes no history;
/// the owner's record then applies.
async fn record_by_non_owner_writes_nothing(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let b = register(&s, "b:1").await;
    let ids = add(&s, 1).await;
    s.task_claim(&claim(&ids, a)).await.unwrap();
    let done = [outcome(ids[0], Fate::Done)];
    let r = s.task_record(&batch(b, &done)).await.unwrap();
    assert!(r.applied.is_empty());
    assert_eq!(r.fenced_out, ids);
    assert_eq!(s.task_owner(ids[0]).await.unwrap(), Some(Some(a)));
    let history = s.history(&HistoryQuery::default()).await.unwrap();
    assert!(history.is_empty(), "{history:?}");

    let r = s.task_record(&batch(a, &done)).await.unwrap();
    assert_eq!(r.applied.len(), 1);
    assert!(r.fenced_out.is_empty());
    assert_eq!(
        s.task_owner(ids[0]).await.unwrap(),
        None,
        "done deletes the row"
    );
    assert_eq!(s.history(&HistoryQuery::default()).await.unwrap().len(), 1);
}

/// One record writes every applied outcome's history row in outcome order (ascending ids),
/// field for field, and queues one follow-up per follower of each completed task's type; text
/// with quotes and non-ASCII characters is stored as given.
async fn record_writes_history_and_follow_ups(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    s.follow_register("t", "u").await.unwrap();
    s.follow_register("t", "v").await.unwrap();
    s.follow_register("nobody-runs", "t").await.unwrap();
    let ids = add(&s, 4).await;
    s.task_claim(&claim(&ids, a)).await.unwrap();
    let at = |ms: i64| Timestamp::from_millis(1_700_000_000_000 + ms);
    let outcomes: Vec<Outcome> = [
        (Fate::Done, ""),
        (Fate::Fail, "it's \"broken\": ünïcødé ✓ \\ 🦀"),
        (Fate::Done, ""),
        (Fate::Retry, "'); DROP TABLE harmony_task; --"),
    ]
    .into_iter()
    .zip(&ids)
    .enumerate()
    .map(|(i, ((fate, err), id))| Outcome {
        work_start: at(10 * i as i64 - 5_000),
        work_end: at(10 * i as i64 + 7),
        err: err.to_owned(),
        ..outcome(*id, fate)
    })
    .collect();
    let r = s.task_record(&batch(a, &outcomes)).await.unwrap();
    assert_eq!(r.applied.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    assert!(r.applied.windows(2).all(|w| w[0].1 < w[1].1), "{r:?}");
    assert_eq!(r.followed, vec!["t".to_owned()]);

    let mut history = s.history(&HistoryQuery::default()).await.unwrap();
    history.sort_by_key(|h| h.id);
    assert_eq!(history.len(), outcomes.len());
    for ((h, o), (_, history_id)) in history.iter().zip(&outcomes).zip(&r.applied) {
        assert_eq!(h.id, *history_id);
        assert_eq!(h.task_id, o.id.0);
        assert_eq!(h.name, o.name);
        assert_eq!(
            (h.posted, h.work_start, h.work_end),
            (o.posted, o.work_start, o.work_end)
        );
        assert_eq!(h.result, o.fate == Fate::Done);
        assert_eq!(h.err, o.err);
        assert_eq!(h.completed_by_host_and_port, "a:1");
    }

    let queued: Vec<(String, String, i64, i64)> =
        t.db.select(
            "SELECT from_type, to_type, task_id, history_id FROM harmony_task_follow_queue
             ORDER BY task_id, to_type",
            &[],
        )
        .await
        .unwrap();
    let want: Vec<(String, String, i64, i64)> = [0, 2]
        .into_iter()
        .flat_map(|i| {
            ["u", "v"].map(|to| ("t".to_owned(), to.to_owned(), ids[i].0, r.applied[i].1))
        })
        .collect();
    assert_eq!(queued, want);
}

/// A retry releases the row with one more failure; a release keeps retries.
async fn record_retry_and_release(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let ids = add(&s, 2).await;
    s.task_claim(&claim(&ids, a)).await.unwrap();
    let outcomes = [outcome(ids[0], Fate::Retry), outcome(ids[1], Fate::Release)];
    let r = s.task_record(&batch(a, &outcomes)).await.unwrap();
    assert_eq!(r.applied.len(), 2);
    let polled = s.task_poll("t", 10).await.unwrap();
    let retries: Vec<(TaskId, u32)> = polled.iter().map(|c| (c.id, c.retries)).collect();
    assert_eq!(retries, vec![(ids[0], 1), (ids[1], 0)]);
}

/// The reaper deletes a machine whose heartbeat is older than dead-after and so releases its
/// tasks; a fresh heartbeat keeps a machine.
async fn reap_releases_tasks(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let b = register(&s, "b:1").await;
    let ids = add(&s, 2).await;
    s.task_claim(&claim(&ids[..1], a)).await.unwrap();
    s.task_claim(&claim(&ids[1..], b)).await.unwrap();
    // Age a's heartbeat by an hour on the database's clock.
    let age = t.db.dialect().pick(
        "UPDATE harmony_machines SET last_contact = strftime('%Y-%m-%d %H:%M:%f', 'now', '-3600 seconds') WHERE id = $1",
        "UPDATE harmony_machines SET last_contact = now() - interval '1 hour' WHERE id = $1",
    );
    t.db.exec(age, &[&a]).await.unwrap();
    assert!(s.machine_heartbeat(b).await.unwrap().is_some());
    let reaped = s.machine_reap(Duration::from_secs(60)).await.unwrap();
    assert_eq!(reaped, vec![(a, "a:1".to_owned())]);
    assert_eq!(s.task_owner(ids[0]).await.unwrap(), Some(None));
    assert_eq!(s.task_owner(ids[1]).await.unwrap(), Some(Some(b)));
    assert_eq!(s.machine_heartbeat(a).await.unwrap(), None, "a is fenced");
    // The reaped machine's late record is discarded.
    let late = [outcome(ids[0], Fate::Done)];
    let r = s.task_record(&batch(a, &late)).await.unwrap();
    assert_eq!(r.fenced_out, vec![ids[0]]);
}

/// A type's cluster-wide limit counts owned tasks across machines.
async fn cluster_limit_counts_every_owner(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let b = register(&s, "b:1").await;
    let ids = add(&s, 3).await;
    let x = s
        .task_claim(&TaskClaim {
            max_cluster: 2,
            ..claim(&ids[..1], a)
        })
        .await
        .unwrap();
    assert_eq!(x.claimed.len(), 1);
    let y = s
        .task_claim(&TaskClaim {
            max_cluster: 2,
            ..claim(&ids[1..], b)
        })
        .await
        .unwrap();
    assert_eq!(y.claimed.len(), 1, "one slot left in the cluster");
    assert!(y.cluster_full);
}

/// Restarting a task: only a failed one is re-queued; the others are refused with their kind.
async fn restart_only_failed_tasks(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let ids = add(&s, 2).await;
    let restart = |id| s.task_restart(id, MachineId(0), now());
    assert!(matches!(
        restart(ids[0]).await,
        Err(Error::TaskActive { id, .. }) if id == ids[0]
    ));
    assert!(matches!(
        restart(TaskId(424_242)).await,
        Err(Error::TaskNotFound(TaskId(424_242)))
    ));
    s.task_claim(&claim(&ids, a)).await.unwrap();
    let outcomes = [outcome(ids[0], Fate::Done), outcome(ids[1], Fate::Fail)];
    s.task_record(&batch(a, &outcomes)).await.unwrap();
    assert!(matches!(
        restart(ids[0]).await,
        Err(Error::TaskSucceeded { id, .. }) if id == ids[0]
    ));
    assert_eq!(restart(ids[1]).await.unwrap(), "t");
    let polled = s.task_poll("t", 10).await.unwrap();
    assert_eq!(
        polled.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![ids[1]]
    );
}

/// A live machine's address is never taken over: the second registration fails with
/// `AddressInUse` and writes no machine row.
async fn register_refuses_a_live_address(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let second = s
        .machine_register(&MachineRegister {
            host_and_port: "a:1",
            cpu: 1.0,
            ram: 0,
            gpu: 0.0,
            tasks: "",
            layers: "",
            name: "again",
            version: "test",
            now: now(),
            dead_after: Duration::from_secs(30),
        })
        .await;
    assert!(
        matches!(second, Err(Error::AddressInUse { machine, .. }) if machine == a.0),
        "{second:?}"
    );
    let machines = s.machine_list().await.unwrap();
    assert_eq!(machines.iter().map(|m| m.id).collect::<Vec<_>>(), vec![a]);
}

/// The heartbeat reads the operator's flags; flags on a machine that is gone change nothing.
async fn heartbeat_reads_operator_flags(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let flags = s.machine_heartbeat(a).await.unwrap().unwrap();
    assert!(!flags.unschedulable && !flags.restart_requested);
    assert!(s.machine_set_unschedulable(a, true, false).await.unwrap());
    assert!(s.machine_request_restart(a, now(), false).await.unwrap());
    let flags = s.machine_heartbeat(a).await.unwrap().unwrap();
    assert!(flags.unschedulable && flags.restart_requested);
    s.machine_clear_restart(a).await.unwrap();
    let flags = s.machine_heartbeat(a).await.unwrap().unwrap();
    assert!(!flags.unschedulable && !flags.restart_requested);
    s.machine_unregister(a).await.unwrap();
    assert!(!s.machine_set_unschedulable(a, true, false).await.unwrap());
    assert_eq!(s.machine_heartbeat(a).await.unwrap(), None);
    // The operator API says so with its not-found kind.
    let admin = crate::Admin::new(t.db.clone()).with_notify(false);
    assert!(matches!(
        admin.cordon(a).await,
        Err(Error::MachineNotFound(m)) if m == a
    ));
    assert!(matches!(
        admin.request_restart(a).await,
        Err(Error::MachineNotFound(m)) if m == a
    ));
}

/// A machine's page lists only the tasks it owns, in id order and paged; its history lists
/// only the attempts it ran, newest first, within the scan bound.
async fn machine_tasks_and_history(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let b = register(&s, "b:1").await;
    let ids = add(&s, 5).await;
    s.task_claim(&claim(&ids[..3], a)).await.unwrap();
    s.task_claim(&claim(&ids[3..4], b)).await.unwrap();
    let page = |limit, offset| s.machine_tasks(a, limit, offset);
    let got: Vec<TaskId> = page(10, 0).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(got, ids[..3].to_vec());
    let got: Vec<TaskId> = page(1, 1).await.unwrap().iter().map(|r| r.id).collect();
    assert_eq!(got, vec![ids[1]]);
    let rows = s.machine_tasks(b, 10, 0).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].owner_host.as_deref(), Some("b:1"));

    let outcomes = [outcome(ids[0], Fate::Done), outcome(ids[1], Fate::Fail)];
    s.task_record(&batch(a, &outcomes)).await.unwrap();
    let hist = s.machine_history("a:1", 10, 1_000).await.unwrap();
    let mut got: Vec<i64> = hist.iter().map(|h| h.task_id).collect();
    got.sort_unstable();
    assert_eq!(got, vec![ids[0].0, ids[1].0]);
    assert!(
        s.machine_history("b:1", 10, 1_000)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.machine_history("a:1", 1, 1_000).await.unwrap().len(), 1);
    assert!(
        s.machine_tasks(a, 10, 0)
            .await
            .unwrap()
            .iter()
            .all(|r| r.id == ids[2]),
        "finished tasks are no longer the machine's"
    );
}

harmony_testkit::both_backends!(
    machine_tasks_and_history,
    register_refuses_a_live_address,
    heartbeat_reads_operator_flags,
    restart_only_failed_tasks,
    claim_takes_only_unowned,
    concurrent_claims_are_atomic,
    record_by_non_owner_writes_nothing,
    record_writes_history_and_follow_ups,
    record_retry_and_release,
    reap_releases_tasks,
    cluster_limit_counts_every_owner,
);
