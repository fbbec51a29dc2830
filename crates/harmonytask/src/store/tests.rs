//! The store's conformance suite: every case is written against the store's traits and runs on
//! SQLite and on Postgres (River's `riverdrivertest.Exercise`). The cases pin the fencing rules
//! the engine's correctness rests on: a claim takes only unowned rows and each row once, a
//! record by a machine that no longer owns the task writes nothing, and the reaper releases a
//! dead machine's tasks.

use std::time::Duration;

use harmony_testkit::TestDb;
use harmonydb::{Executor, Timestamp};

use super::prelude::*;
use super::{MachineRegister, RecordBatch, Reserved, StorageAttach, Store, TaskClaim};
use crate::error::Error;
use crate::model::{Fate, HistoryQuery, MachineId, Outcome, StorageKind, StorageNeed, TaskId};

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

/// A Postgres claim returns the claimed tasks' arguments, an entry for each (empty for a task
/// without any), so that an attempt reads nothing; SQLite's claim leaves them to the attempt.
async fn claim_returns_arguments_on_postgres(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let ids = add(&s, 3).await;
    let args = [
        ("k".to_owned(), "v".to_owned()),
        ("x".to_owned(), "y".to_owned()),
    ];
    let (first, args) = (ids[0], &args);
    t.db.transaction(|tx| async move {
        Store::task_args_insert(&tx, first, args).await?;
        Ok(Some(()))
    })
    .await
    .unwrap();
    let got = s.task_claim(&claim(&ids[..2], a)).await.unwrap();
    let claimed: Vec<TaskId> = got.claimed.iter().map(|c| c.id).collect();
    assert_eq!(claimed, ids[..2].to_vec(), "each task once, oldest first");
    match t.db.dialect() {
        harmonydb::Dialect::Postgres => {
            let args = got.args.expect("the Postgres claim reads arguments");
            assert_eq!(args.len(), 2);
            assert_eq!(args[&ids[0]].len(), 2);
            assert_eq!(args[&ids[0]]["x"], "y");
            assert!(args[&ids[1]].is_empty());
        }
        harmonydb::Dialect::Sqlite => assert!(got.args.is_none()),
    }
    assert_eq!(s.task_args(ids[0]).await.unwrap().len(), 2);
}

async fn config_layers_keep_every_version(t: &TestDb) {
    let s = Store::new(t.db.clone());
    assert!(s.config_get("a").await.unwrap().is_none());
    assert!(s.config_set("a", "x = 1\n", now()).await.unwrap());
    // The same text again writes nothing.
    assert!(!s.config_set("a", "x = 1\n", now()).await.unwrap());
    let later = Timestamp::from_millis(now().as_millis() + 1000);
    assert!(s.config_set("a", "x = 2\n", later).await.unwrap());
    assert!(s.config_set("b", "y = 'it''s'\n", now()).await.unwrap());
    let a = s.config_get("a").await.unwrap().unwrap();
    assert_eq!((a.config.as_str(), a.timestamp), ("x = 2\n", later));
    let list = s.config_list().await.unwrap();
    let titles: Vec<&str> = list.iter().map(|l| l.title.as_str()).collect();
    assert_eq!(titles, ["a", "b"]);
    assert_eq!(list[0].bytes, 6);
    let h = s.config_history("a").await.unwrap();
    let versions: Vec<(i64, &str)> = h.iter().map(|v| (v.version, v.config.as_str())).collect();
    assert_eq!(versions, [(1, "x = 1\n"), (2, "x = 2\n")]);
    assert_eq!(h[1].changed_at, later);
    let many = s
        .config_get_many(&["b".into(), "none".into(), "a".into()])
        .await
        .unwrap();
    let titles: Vec<&str> = many.iter().map(|l| l.title.as_str()).collect();
    assert_eq!(titles, ["b", "a"]);
    assert!(s.config_remove("a").await.unwrap());
    assert!(!s.config_remove("a").await.unwrap());
    assert!(s.config_get("a").await.unwrap().is_none());
    assert_eq!(s.config_history("a").await.unwrap().len(), 2);
}

fn attach<'a>(host: &'a str, path: &'a str, weight: i64, bytes: u64) -> StorageAttach<'a> {
    StorageAttach {
        host_and_port: host,
        local_path: path,
        weight,
        capacity: bytes,
        available: bytes,
        can_seal: false,
        can_store: true,
    }
}

const STORE_10: StorageNeed = StorageNeed {
    bytes: 10,
    kind: StorageKind::Store,
};

/// The reserved bytes of each path, by directory.
async fn reserved(s: &Store) -> Vec<(String, i64, i64)> {
    s.storage_list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.local_path, p.reserved, p.available))
        .collect()
}

/// Reservations pick the heavier path, then the freer one; they count while the path's
/// machine owns the task, and end with the task, its release, or its machine's reaping.
async fn storage_reservations_follow_their_tasks(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let a = register(&s, "a:1").await;
    let b = register(&s, "b:1").await;
    s.storage_attach(&attach("a:1", "/small", 10, 15))
        .await
        .unwrap();
    s.storage_attach(&attach("a:1", "/big", 10, 25))
        .await
        .unwrap();
    s.storage_attach(&attach("a:1", "/light", 1, 100))
        .await
        .unwrap();
    let mut seal_only = attach("a:1", "/seal", 99, 1000);
    (seal_only.can_seal, seal_only.can_store) = (true, false);
    s.storage_attach(&seal_only).await.unwrap();
    let ids = add(&s, 6).await;
    s.task_claim(&claim(&ids, a)).await.unwrap();
    let mut got = Vec::new();
    for id in &ids[..4] {
        match s.storage_reserve(*id, "a:1", STORE_10).await.unwrap() {
            Reserved::On { local_path, .. } => got.push(local_path),
            other => panic!("no room: {other:?}"),
        }
    }
    // Weight 10 first, the one with more free space each time (a tie goes to the older
    // path); then the light one. The seal-only path is never used for store.
    assert_eq!(got, ["/big", "/small", "/big", "/light"]);
    let free = s.storage_free("a:1", StorageKind::Store).await.unwrap();
    assert_eq!(free, [5, 5, 90], "small, big, light");
    // Another machine's claim of the same bytes does not see a's paths.
    assert_eq!(
        s.storage_reserve(ids[4], "b:1", STORE_10).await.unwrap(),
        Reserved::NoRoom { best_free: 0 }
    );
    assert_eq!(
        s.storage_of_task(ids[0], a).await.unwrap().as_deref(),
        Some("/big")
    );
    assert_eq!(s.storage_of_task(ids[0], b).await.unwrap(), None);

    // Done: the row goes, and its reservation with it.
    let done = [outcome(ids[0], Fate::Done)];
    s.task_record(&batch(a, &done)).await.unwrap();
    // Retried: released, so not counted.
    let retry = [outcome(ids[1], Fate::Retry)];
    s.task_record(&batch(a, &retry)).await.unwrap();
    // ids[0] and ids[2] were on /big, ids[1] on /small: /big keeps ids[2]'s 10 bytes.
    let r = reserved(&s).await;
    assert!(r.contains(&("/big".into(), 10, 25)), "{r:?}");
    assert!(r.contains(&("/small".into(), 0, 15)), "{r:?}");
    // A task claimed by another machine does not count on a's paths.
    s.task_claim(&claim(&ids[1..2], b)).await.unwrap();
    assert!(reserved(&s).await.contains(&("/small".into(), 0, 15)));

    // a dies and is reaped: nothing of it stays reserved.
    let age = t.db.dialect().pick(
        "UPDATE harmony_machines SET last_contact = strftime('%Y-%m-%d %H:%M:%f', 'now', '-3600 seconds') WHERE id = $1",
        "UPDATE harmony_machines SET last_contact = now() - interval '1 hour' WHERE id = $1",
    );
    t.db.exec(age, &[&a]).await.unwrap();
    assert!(reserved(&s).await.iter().any(|(_, r, _)| *r > 0));
    s.machine_reap(Duration::from_secs(60)).await.unwrap();
    assert!(
        reserved(&s).await.iter().all(|(_, r, _)| *r == 0),
        "{:?}",
        reserved(&s).await
    );
    assert!(s.storage_detach("a:1", "/big").await.unwrap());
    assert!(!s.storage_detach("a:1", "/big").await.unwrap());
}

/// Concurrent reservations through two database handles (two nodes' pools) never put more
/// on a path than it has available.
async fn concurrent_reservations_never_exceed_available(t: &TestDb) {
    let s = Store::new(t.db.clone());
    let other = Store::new(t.open_another().await);
    let a = register(&s, "a:1").await;
    s.storage_attach(&attach("a:1", "/one", 10, 95))
        .await
        .unwrap();
    s.storage_attach(&attach("a:1", "/two", 10, 55))
        .await
        .unwrap();
    let ids = add(&s, 40).await;
    s.task_claim(&claim(&ids, a)).await.unwrap();
    let mut joins = Vec::new();
    for (i, id) in ids.iter().copied().enumerate() {
        let st = if i % 2 == 0 { s.clone() } else { other.clone() };
        joins.push(tokio::spawn(async move {
            st.storage_reserve(id, "a:1", STORE_10).await.unwrap()
        }));
    }
    let mut granted = 0;
    for j in joins {
        if matches!(j.await.unwrap(), Reserved::On { .. }) {
            granted += 1;
        }
    }
    assert_eq!(granted, 9 + 5, "every 10 bytes that fit, and no more");
    for (path, reserved, available) in reserved(&s).await {
        assert!(reserved <= available, "{path}: {reserved} > {available}");
    }
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
    claim_returns_arguments_on_postgres,
    storage_reservations_follow_their_tasks,
    concurrent_reservations_never_exceed_available,
    config_layers_keep_every_version,
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
