//! `harmony storage attach|list|detach` and `cost.storage`, against real node processes: tasks
//! reserve space on the node's paths (the best one that has room), give it back when they end
//! and when their node is SIGKILLed and reaped, and a task no path can hold waits with the
//! storage reason. On SQLite (the CLI and the nodes are separate processes on one file) and
//! Postgres.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually, free_port};
use nix::sys::signal::Signal;

harmony_testkit::both_backends!(
    tasks_reserve_storage_and_give_it_back,
    a_sigkilled_nodes_reservations_are_freed_by_the_reaper,
);

/// `hold` writes the storage path it got to `{arg.out}` and runs until `{arg.gate}` exists
/// (or its directory is gone, so that a command orphaned by a SIGKILLed node ends with the
/// test).
const TASKS: &str = r#"
[[task]]
name = "hold"
command = ["sh", "-c", "printf %s \"$HARMONY_STORAGE_PATH\" > \"$0.tmp\" && mv \"$0.tmp\" \"$0\"; while [ ! -e \"$1\" ] && [ -d \"$(dirname \"$1\")\" ]; do sleep 0.05; done", "{arg.out}", "{arg.gate}"]
cost = { storage = "2GiB" }

[[task]]
name = "huge"
command = ["true"]
cost = { storage = "10GiB", storage_kind = "store" }
"#;

const GIB: i64 = 1 << 30;

/// `(path, capacity, available, reserved, health)` of every path, by directory.
async fn paths(db: &str) -> Vec<(String, i64, i64, i64, String)> {
    let v = harmony(&["--db", db, "--json", "storage", "list"])
        .await
        .json();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["local_path"].as_str().unwrap().to_owned(),
                p["capacity"].as_i64().unwrap(),
                p["available"].as_i64().unwrap(),
                p["reserved"].as_i64().unwrap(),
                p["health"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Attaches `dir/name` (created) at `listen` with a capacity in GiB; returns its
/// canonical path.
async fn attach(db: &str, dir: &Path, name: &str, gib: u32, listen: &str) -> String {
    let p = dir.join(name);
    std::fs::create_dir_all(&p).unwrap();
    let out = harmony(&[
        "--db",
        db,
        "storage",
        "attach",
        p.to_str().unwrap(),
        "--weight",
        "10",
        "--can-store",
        "--capacity",
        &format!("{gib}GiB"),
        "--listen",
        listen,
    ])
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    std::fs::canonicalize(&p)
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// Adds `n` hold tasks, each writing its path into `dir/out-K` and waiting for `gate`.
async fn add_holds(db: &str, dir: &Path, from: usize, n: usize, gate: &Path) -> Vec<String> {
    let mut outs = Vec::new();
    for k in from..from + n {
        let out = dir.join(format!("out-{k}"));
        let r = harmony(&[
            "--db",
            db,
            "task",
            "add",
            "hold",
            "--force",
            "--arg",
            &format!("out={}", out.display()),
            "--arg",
            &format!("gate={}", gate.display()),
        ])
        .await;
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        outs.push(out.to_string_lossy().into_owned());
    }
    outs
}

/// Waits until the type's reason on the node is `no_storage`; returns its detail.
async fn no_storage_detail(db: &str, name: &str) -> String {
    eventually(
        &format!("{name} to wait for storage"),
        Duration::from_secs(30),
        || async move {
            let w = harmony(&["--db", db, "--json", "task", "why", "--type", name])
                .await
                .json();
            (w["nodes"][0]["reason"] == "no_storage")
                .then(|| w["nodes"][0]["detail"].as_str().unwrap_or("").to_owned())
        },
    )
    .await
}

async fn tasks_reserve_storage_and_give_it_back(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    // Two paths with different free space: 5 GiB holds two tasks of 2 GiB, 3 GiB one.
    let big = attach(db, dir.path(), "big", 5, &listen).await;
    let small = attach(db, dir.path(), "small", 3, &listen).await;
    let file = tasks_file(dir.path(), TASKS);
    let _node = Node::start_at(
        db,
        dir.path(),
        &listen,
        &[
            "--tasks",
            file.to_str().unwrap(),
            "--poll-interval",
            "100ms",
        ],
    );
    let gate = dir.path().join("gate");
    let outs = add_holds(db, dir.path(), 0, 4, &gate).await;

    // Three run (two on big, one on small); the fourth waits for storage.
    let detail = no_storage_detail(db, "hold").await;
    assert_eq!(detail, "no storage: needs 2 GiB, best path has 1 GiB free");
    let got = eventually(
        "three tasks to say their path",
        Duration::from_secs(30),
        || {
            let outs = outs.clone();
            async move {
                let got: Vec<String> = outs
                    .iter()
                    .filter_map(|o| std::fs::read_to_string(o).ok())
                    .collect();
                (got.len() == 3).then_some(got)
            }
        },
    )
    .await;
    assert_eq!(got.iter().filter(|p| **p == big).count(), 2, "{got:?}");
    assert_eq!(got.iter().filter(|p| **p == small).count(), 1, "{got:?}");
    let list = paths(db).await;
    for (path, cap, avail, reserved, health) in &list {
        assert!(reserved <= avail, "{path}: {reserved} > {avail}");
        assert_eq!(health, "ok", "{list:?}");
        let want = if *path == big {
            (5 * GIB, 4 * GIB)
        } else {
            (3 * GIB, 2 * GIB)
        };
        assert_eq!((*cap, *reserved), want, "{list:?}");
    }

    // A task no path can hold waits, and says what it needs.
    let huge = harmony(&["--db", db, "task", "add", "huge"]).await;
    assert_eq!(huge.code, Some(0), "{}", huge.stderr);
    let detail = no_storage_detail(db, "huge").await;
    assert_eq!(detail, "no storage: needs 10 GiB, best path has 1 GiB free");

    // Completions give the space back: the fourth runs, then everything is free again.
    std::fs::write(&gate, b"").unwrap();
    wait_succeeded(t, "hold", 4, Duration::from_secs(60)).await;
    eventually(
        "every reservation to end",
        Duration::from_secs(30),
        || async move { paths(db).await.iter().all(|p| p.3 == 0).then_some(()) },
    )
    .await;
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task WHERE name = 'huge' AND owner_id IS NULL"
        )
        .await,
        1
    );

    // Detach: the path is gone from the list.
    let out = harmony(&["--db", db, "storage", "detach", &small, "--listen", &listen]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let left: Vec<String> = paths(db).await.into_iter().map(|p| p.0).collect();
    assert_eq!(left, [big]);
    harmony(&["--db", db, "storage", "detach", &small, "--listen", &listen])
        .await
        .assert_usage_error(&["not attached"]);
}

async fn a_sigkilled_nodes_reservations_are_freed_by_the_reaper(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    attach(db, dir.path(), "only", 4, &listen).await;
    let file = tasks_file(dir.path(), TASKS);
    let mut args = vec!["--tasks", file.to_str().unwrap()];
    args.extend_from_slice(FAST);
    let node = Node::start_at(db, dir.path(), &listen, &args);
    let gate = dir.path().join("gate");
    let outs = add_holds(db, dir.path(), 0, 2, &gate).await;
    eventually("both tasks to run", Duration::from_secs(30), || {
        let outs = outs.clone();
        async move { outs.iter().all(|o| Path::new(o).exists()).then_some(()) }
    })
    .await;
    assert_eq!(paths(db).await[0].3, 4 * GIB);

    // SIGKILL: nothing of the node runs, but its machine row (and so its reservations)
    // lasts until another node's reaper declares it dead.
    node.signal(Signal::SIGKILL);
    let mut other_args = vec!["--builtin"];
    other_args.extend_from_slice(FAST);
    let _reaper = Node::start_plain(db, dir.path(), &other_args);
    eventually(
        "the reaper to free the dead node's reservations",
        Duration::from_secs(60),
        || async move { (paths(db).await[0].3 == 0).then_some(()) },
    )
    .await;
    let list = paths(db).await;
    assert_eq!(list[0].4, "no node", "{list:?}");
    assert_eq!(
        count(
            t,
            "SELECT count(*) FROM harmony_task WHERE name = 'hold' AND owner_id IS NULL"
        )
        .await,
        2
    );
    std::fs::write(&gate, b"").unwrap();
}
