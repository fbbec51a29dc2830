//! A Postgres restart in the middle of an attempt costs the task nothing: the attempt is
//! released with its retries unchanged and the task runs again once the server is back, even
//! for a type that allows a single attempt. Each test runs its own throw-away server
//! (restarting the shared one would break the tests running beside it).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use harmony_testkit::{TempPg, eventually, with_option};
use harmonydb::{Db, DbConfig, Executor};
use harmonytask::{Done, Engine, EngineConfig, TaskError, TaskId, TypeDetails};
use tokio::sync::{Notify, mpsc};

/// Deadline for everything that waits on the restarted server.
const DEADLINE: Duration = Duration::from_secs(60);

fn temp_pg() -> Option<TempPg> {
    let temp = TempPg::start();
    if temp.is_none() {
        assert!(
            std::env::var("HARMONY_REQUIRE_PG").is_err(),
            "HARMONY_REQUIRE_PG=1 but initdb/pg_ctl are not installed"
        );
    }
    temp
}

async fn open(temp: &TempPg) -> Db {
    let url = with_option(&temp.url(), "connect_timeout", "2");
    Db::open(DbConfig::from_url(&url).unwrap())
        .await
        .expect("open the temp server")
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        // The node must outlive the restart without being declared dead by itself.
        dead_after: Duration::from_secs(120),
        ..config(big_budget())
    }
}

/// The task's history rows (result, err), oldest first, once it has `n` of them.
async fn history(db: &Db, task: TaskId, n: usize) -> Vec<(bool, String)> {
    eventually(
        &format!("{n} history rows of task {task}"),
        DEADLINE,
        || {
            let db = db.clone();
            async move {
                let rows: Vec<(bool, String)> = db
                .select(
                    "SELECT result, err FROM harmony_task_history WHERE task_id = $1 ORDER BY id",
                    &[&task],
                )
                .await
                .ok()?;
                (rows.len() >= n).then_some(rows)
            }
        },
    )
    .await
}

async fn add_one(engine: &Engine, name: &str) -> TaskId {
    engine
        .add_task(name, |_, _| async { Ok(true) })
        .await
        .unwrap()
        .expect("task added")
}

/// Retries seen by each attempt, in order.
type Seen = Arc<Mutex<Vec<u32>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_the_tasks_own_query_releases_it_with_retries_unchanged() {
    let Some(temp) = temp_pg() else { return };
    let db = open(&temp).await;
    let seen: Seen = Arc::default();
    let (started_tx, mut started) = mpsc::channel::<()>(1);
    let go = Arc::new(Notify::new());

    let mut d = TypeDetails::new("blink");
    d.max_failures = 1;
    let probe = {
        let (seen, go) = (Arc::clone(&seen), Arc::clone(&go));
        Probe::new(d, move |_, ctx| {
            let (seen, go, started_tx) = (Arc::clone(&seen), Arc::clone(&go), started_tx.clone());
            async move {
                let first = {
                    let mut s = seen.lock().unwrap();
                    s.push(ctx.retries());
                    s.len() == 1
                };
                if !first {
                    return Ok(Done(true));
                }
                // The first attempt holds a connection across the restart, as a task in the
                // middle of its own transaction would; the restart breaks it.
                ctx.db()
                    .transaction(|tx| {
                        let (go, started_tx) = (Arc::clone(&go), started_tx.clone());
                        async move {
                            tx.scalar::<i64>("SELECT 1", &[]).await?;
                            let _ = started_tx.send(()).await;
                            go.notified().await;
                            tx.scalar::<i64>("SELECT 1", &[]).await?;
                            Ok(true)
                        }
                    })
                    .await?;
                Ok(Done(true))
            }
        })
    };
    let engine = Engine::builder(db.clone())
        .config(engine_config())
        .register(probe)
        .start()
        .await
        .unwrap();
    let id = add_one(&engine, "blink").await;
    tokio::time::timeout(DEADLINE, started.recv())
        .await
        .expect("the first attempt to start");

    temp.restart();
    go.notify_one();

    let rows = history(&db, id, 2).await;
    assert!(!rows[0].0, "the first attempt did not succeed: {rows:?}");
    assert!(
        rows[0].1.starts_with("database unavailable: "),
        "the first attempt is recorded as the database's fault: {rows:?}"
    );
    assert!(rows[1].0, "the task ran again and succeeded: {rows:?}");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![0, 0],
        "the interrupted attempt was not counted"
    );
    drained_db(&db, DEADLINE).await;
    shutdown(&engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_read_while_the_server_is_down_releases_the_task() {
    let Some(temp) = temp_pg() else { return };
    let db = open(&temp).await;
    let seen: Seen = Arc::default();
    let (started_tx, mut started) = mpsc::channel::<()>(1);
    let (failed_tx, mut failed) = mpsc::channel::<String>(1);
    let go = Arc::new(Notify::new());

    let mut d = TypeDetails::new("blink_args");
    d.max_failures = 1;
    let probe = {
        let (seen, go) = (Arc::clone(&seen), Arc::clone(&go));
        Probe::new(d, move |_, ctx| {
            let (seen, go) = (Arc::clone(&seen), Arc::clone(&go));
            let (started_tx, failed_tx) = (started_tx.clone(), failed_tx.clone());
            async move {
                let first = {
                    let mut s = seen.lock().unwrap();
                    s.push(ctx.retries());
                    s.len() == 1
                };
                if first {
                    let _ = started_tx.send(()).await;
                    go.notified().await;
                }
                // The engine's own read (the claim returned the arguments on Postgres, so
                // `args` reads nothing: the ownership check is the read that fails here).
                if ctx.still_owned().await {
                    Ok(Done(true))
                } else {
                    let _ = failed_tx.send("ownership unknown".to_owned()).await;
                    // The task words the failure its own way; the engine still knows that
                    // its own read failed because the database was away.
                    Err(TaskError::new("not sure this node still owns the task"))
                }
            }
        })
    };
    let engine = Engine::builder(db.clone())
        .config(engine_config())
        .register(probe)
        .start()
        .await
        .unwrap();
    let id = add_one(&engine, "blink_args").await;
    tokio::time::timeout(DEADLINE, started.recv())
        .await
        .expect("the first attempt to start");

    temp.stop();
    go.notify_one();
    let why = tokio::time::timeout(DEADLINE, failed.recv())
        .await
        .expect("the ownership check to fail while the server is down")
        .unwrap();
    temp.start_again();

    let rows = history(&db, id, 2).await;
    assert!(!rows[0].0, "{rows:?}");
    assert!(
        rows[0].1.starts_with("database unavailable: "),
        "the failed read ({why}) is recorded as the database's fault: {rows:?}"
    );
    assert!(rows[1].0, "the task ran again and succeeded: {rows:?}");
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(*seen.lock().unwrap(), vec![0, 0]);
    drained_db(&db, DEADLINE).await;
    shutdown(&engine).await;
}
