//! One conformance suite for both backends: every case runs on a fresh SQLite file and on a
//! fresh Postgres schema (skipped loudly, or failed under `HARMONY_REQUIRE_PG=1`, when no
//! Postgres is reachable).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use harmony_testkit::{Backend, TestDb, eventually};
use harmonydb::{Db, ErrorKind, Executor, FromRow, Timestamp, TxOptions};

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let t = harmony_testkit::TestDb::new(harmony_testkit::Backend::Sqlite, stringify!($case)).await.unwrap();
                    super::$case(&t).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(t) = harmony_testkit::TestDb::new(harmony_testkit::Backend::Postgres, stringify!($case)).await else { return };
                    super::$case(&t).await;
                }
            )*
        }
    };
}

conformance!(
    crud_and_select_into_structs,
    error_kinds,
    transaction_isolation_and_rollback,
    transaction_commit_values_and_panics,
    non_transaction_call_inside_closure_is_refused,
    serialization_failure_is_retried,
    injection_shaped_strings_round_trip,
    timestamps_round_trip,
    arrays_bind_per_dialect,
    id_list_sql_on_both_dialects,
    batch_sql_inserts_and_updates_on_both_dialects,
    batch_sql_empty_and_large_batches,
    streaming_rows,
    migrations_are_idempotent_and_checked,
    concurrent_opens_migrate_once,
    parameter_mistakes_are_misuse,
);

#[derive(Debug, FromRow, PartialEq)]
struct TaskRow {
    id: i64,
    name: String,
    owner_id: Option<i64>,
    retries: i64,
    #[harmonydb(rename = "posted_time")]
    posted: Timestamp,
}

async fn insert_task(db: &impl Executor, name: &str, posted: Timestamp) -> i64 {
    db.scalar(
        "INSERT INTO harmony_task (name, posted_time, update_time, added_by) VALUES ($1, $2, $2, $3) RETURNING id",
        &[&name, &posted, &0i64],
    )
    .await
    .expect("insert task")
}

async fn crud_and_select_into_structs(t: &TestDb) {
    let db = &t.db;
    let posted = Timestamp::from_millis(1_700_000_000_123);
    let a = insert_task(db, "SDR", posted).await;
    let b = insert_task(db, "PoRep", posted).await;
    assert!(b > a);

    let rows: Vec<TaskRow> = db
        .select(
            "SELECT id, name, owner_id, retries, posted_time FROM harmony_task ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            TaskRow {
                id: a,
                name: "SDR".into(),
                owner_id: None,
                retries: 0,
                posted
            },
            TaskRow {
                id: b,
                name: "PoRep".into(),
                owner_id: None,
                retries: 0,
                posted
            },
        ]
    );

    let changed = db
        .exec(
            "UPDATE harmony_task SET retries = retries + 1 WHERE name = $1",
            &[&"SDR"],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
    let retries: i64 = db
        .scalar("SELECT retries FROM harmony_task WHERE id = $1", &[&a])
        .await
        .unwrap();
    assert_eq!(retries, 1);

    let none: Option<i64> = db
        .scalar_opt("SELECT id FROM harmony_task WHERE name = $1", &[&"missing"])
        .await
        .unwrap();
    assert_eq!(none, None);
    let owner: Option<i64> = db
        .scalar("SELECT owner_id FROM harmony_task WHERE id = $1", &[&a])
        .await
        .unwrap();
    assert_eq!(owner, None);

    let tuple: (i64, String) = db
        .query_row("SELECT id, name FROM harmony_task WHERE id = $1", &[&b])
        .await
        .unwrap();
    assert_eq!(tuple, (b, "PoRep".to_owned()));

    let deleted = db
        .exec("DELETE FROM harmony_task WHERE id = $1", &[&a])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let left: i64 = db
        .scalar("SELECT count(*) FROM harmony_task", &[])
        .await
        .unwrap();
    assert_eq!(left, 1);
}

async fn error_kinds(t: &TestDb) {
    let db = &t.db;
    let ins = "INSERT INTO harmony_task_args (task_id, key, value) VALUES ($1, $2, $3)";
    db.exec(ins, &[&1i64, &"k", &"v"]).await.unwrap();
    let e = db.exec(ins, &[&1i64, &"k", &"v2"]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UniqueViolation, "{e}");
    assert!(e.is_unique_violation());

    let e = db
        .exec(
            "INSERT INTO harmony_task (name, posted_time, update_time, added_by, owner_id) VALUES ($1, $2, $2, 0, $3)",
            &[&"x", &Timestamp::from_millis(0), &424_242i64],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ForeignKey, "{e}");

    let e = db
        .query_row::<(i64,)>("SELECT id FROM harmony_task WHERE id = $1", &[&-1i64])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);

    let e = db
        .exec(
            "INSERT INTO harmony_task (name) VALUES ($1)",
            &[&"no-times"],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Constraint, "{e}");

    let e = db
        .scalar::<i64>(
            "SELECT owner_id FROM harmony_task_args, (SELECT NULL AS owner_id) n LIMIT 1",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Decode, "{e}");

    let e = db.exec("SELEKT 1", &[]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Other, "{e}");
}

async fn transaction_isolation_and_rollback(t: &TestDb) {
    let db = t.db.clone();
    let other = t.open_another().await;
    let count = "SELECT count(*) FROM harmony_task_args WHERE task_id = 7";

    // Inside the transaction the write is visible to the transaction and invisible to another
    // connection; after rollback it is gone for everyone.
    let seen = db
        .transaction(|tx| {
            let other = other.clone();
            async move {
                tx.exec(
                    "INSERT INTO harmony_task_args (task_id, key, value) VALUES (7, 'a', 'b')",
                    &[],
                )
                .await?;
                let mine: i64 = tx.scalar(count, &[]).await?;
                // A separate task: the closure's own task may not use a Db handle.
                let theirs: i64 = tokio::spawn(async move { other.scalar(count, &[]).await })
                    .await
                    .unwrap()?;
                Ok(if mine == 1 && theirs == 0 {
                    None
                } else {
                    Some((mine, theirs))
                })
            }
        })
        .await
        .unwrap();
    assert_eq!(
        seen, None,
        "uncommitted write was visible elsewhere (mine, theirs)"
    );
    assert_eq!(db.scalar::<i64>(count, &[]).await.unwrap(), 0);
    assert_eq!(other.scalar::<i64>(count, &[]).await.unwrap(), 0);

    // Ok(false) rolls back too; an error rolls back and is returned.
    let committed = db
        .transaction(|tx| async move {
            tx.exec("INSERT INTO harmony_task_args VALUES (7, 'x', 'y')", &[])
                .await?;
            Ok(false)
        })
        .await
        .unwrap();
    assert!(!committed);
    let e = db
        .transaction(|tx| async move {
            tx.exec("INSERT INTO harmony_task_args VALUES (7, 'x', 'y')", &[])
                .await?;
            Err::<bool, _>(harmonydb::Error::external(std::io::Error::other(
                "caller failed",
            )))
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::External);
    assert_eq!(db.scalar::<i64>(count, &[]).await.unwrap(), 0);

    // Ok(true) commits, visible to the other connection.
    assert!(
        db.transaction(|tx| async move {
            tx.exec("INSERT INTO harmony_task_args VALUES (7, 'x', 'y')", &[])
                .await?;
            Ok(true)
        })
        .await
        .unwrap()
    );
    assert_eq!(other.scalar::<i64>(count, &[]).await.unwrap(), 1);
}

async fn transaction_commit_values_and_panics(t: &TestDb) {
    let db = t.db.clone();
    let id = db
        .transaction(|tx| async move {
            let id: i64 = tx
                .scalar(
                    "INSERT INTO harmony_task (name, posted_time, update_time, added_by) VALUES ('v', $1, $1, 0) RETURNING id",
                    &[&Timestamp::from_millis(5)],
                )
                .await?;
            Ok(Some(id))
        })
        .await
        .unwrap()
        .expect("committed");
    assert_eq!(
        db.scalar::<String>("SELECT name FROM harmony_task WHERE id = $1", &[&id])
            .await
            .unwrap(),
        "v"
    );

    // A panicking closure rolls back and leaves the database usable.
    let db2 = db.clone();
    let joined = tokio::spawn(async move {
        db2.transaction(|tx| async move {
            tx.exec("DELETE FROM harmony_task", &[]).await?;
            if tx.dialect().name().len() < 100 {
                panic!("closure panics mid-transaction");
            }
            Ok(true)
        })
        .await
    })
    .await;
    assert!(joined.is_err_and(|e| e.is_panic()));
    let left: i64 = db
        .scalar("SELECT count(*) FROM harmony_task", &[])
        .await
        .unwrap();
    assert_eq!(left, 1, "the panicking transaction's delete must roll back");
    // The writer (SQLite) / pool (Postgres) still works.
    assert_eq!(
        db.exec("DELETE FROM harmony_task WHERE id = $1", &[&id])
            .await
            .unwrap(),
        1
    );
}

async fn non_transaction_call_inside_closure_is_refused(t: &TestDb) {
    let db = t.db.clone();
    let inner = db.clone();
    let e = db
        .transaction(|tx| {
            let inner = inner.clone();
            async move {
                tx.exec("INSERT INTO harmony_task_args VALUES (1, 'a', 'b')", &[])
                    .await?;
                inner
                    .exec("INSERT INTO harmony_task_args VALUES (2, 'a', 'b')", &[])
                    .await?;
                Ok(true)
            }
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Misuse, "{e}");
    assert!(e.to_string().contains("inside a transaction"), "{e}");
    let nested = db
        .transaction(|_tx| {
            let inner = inner.clone();
            async move { inner.transaction(|_t| async { Ok(true) }).await }
        })
        .await
        .unwrap_err();
    assert_eq!(nested.kind(), ErrorKind::Misuse);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM harmony_task_args", &[])
            .await
            .unwrap(),
        0
    );
}

async fn serialization_failure_is_retried(t: &TestDb) {
    match t.backend() {
        Backend::Postgres => serialization_retry_postgres(t).await,
        Backend::Sqlite => busy_retry_sqlite(t).await,
    }
}

/// Two SERIALIZABLE transactions read-then-write the same row in lockstep: one must fail with
/// 40001, and the retry option re-runs it to success.
async fn serialization_retry_postgres(t: &TestDb) {
    let db = t.db.clone();
    db.exec("INSERT INTO harmony_task_follow (from_type, to_type, last_history_id) VALUES ('a', 'b', 0)", &[])
        .await
        .unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let attempts = Arc::new(AtomicU32::new(0));
    let run = |db: Db, barrier: Arc<tokio::sync::Barrier>, attempts: Arc<AtomicU32>| async move {
        db.transaction_with(TxOptions::retry(), |tx| {
            let barrier = barrier.clone();
            let attempts = attempts.clone();
            async move {
                let n = attempts.fetch_add(1, Ordering::SeqCst);
                tx.exec("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", &[])
                    .await?;
                let v: i64 = tx
                    .scalar(
                        "SELECT last_history_id FROM harmony_task_follow WHERE from_type = 'a'",
                        &[],
                    )
                    .await?;
                // Only the first attempt of each side waits, so the two first attempts
                // overlap and the retry runs alone.
                if n < 2 {
                    barrier.wait().await;
                }
                tx.exec(
                    "UPDATE harmony_task_follow SET last_history_id = $1 WHERE from_type = 'a'",
                    &[&(v + 1)],
                )
                .await?;
                Ok(true)
            }
        })
        .await
    };
    let a = tokio::spawn(run(db.clone(), barrier.clone(), attempts.clone()));
    let b = tokio::spawn(run(db.clone(), barrier.clone(), attempts.clone()));
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
    let v: i64 = db
        .scalar(
            "SELECT last_history_id FROM harmony_task_follow WHERE from_type = 'a'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(v, 2, "both increments must land");
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "one side must have been retried"
    );
    assert!(db.metrics().retries() >= 1);
}

/// Another connection holds the write lock; our transaction's BEGIN IMMEDIATE gets BUSY, is
/// retried, and succeeds once the lock is released.
async fn busy_retry_sqlite(t: &TestDb) {
    let mut cfg = harmonydb::DbConfig::from_url(&t.url_with("busy_timeout_ms", "20")).unwrap();
    cfg.migrate_on_open = false;
    let contender = Db::open(cfg).await.unwrap();
    let holder = t.open_another().await;
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let (locked_tx, locked_rx) = tokio::sync::oneshot::channel::<()>();
    let release_rx = Arc::new(tokio::sync::Mutex::new(Some(release_rx)));
    let locked_tx = Arc::new(std::sync::Mutex::new(Some(locked_tx)));
    let hold = tokio::spawn(async move {
        holder
            .transaction(|tx| {
                let release_rx = release_rx.clone();
                let locked_tx = locked_tx.clone();
                async move {
                    tx.exec(
                        "INSERT INTO harmony_task_args VALUES (1, 'holder', 'x')",
                        &[],
                    )
                    .await?;
                    if let Some(l) = locked_tx.lock().unwrap().take() {
                        let _ = l.send(());
                    }
                    if let Some(r) = release_rx.lock().await.take() {
                        let _ = r.await;
                    }
                    Ok(true)
                }
            })
            .await
    });
    locked_rx.await.unwrap();
    let policy = harmonydb::RetryPolicy {
        max_attempts: 1000,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
    };
    let c = contender.clone();
    let contend = tokio::spawn(async move {
        c.transaction_with(
            TxOptions {
                retry: Some(policy),
            },
            |tx| async move {
                tx.exec(
                    "INSERT INTO harmony_task_args VALUES (1, 'contender', 'y')",
                    &[],
                )
                .await?;
                Ok(true)
            },
        )
        .await
    });
    eventually(
        "the contender to hit BUSY and retry",
        Duration::from_secs(20),
        || {
            let n = contender.metrics().retries();
            async move { (n >= 1).then_some(()) }
        },
    )
    .await;
    release_tx.send(()).unwrap();
    hold.await.unwrap().unwrap();
    assert!(contend.await.unwrap().unwrap());
    let n: i64 =
        t.db.scalar("SELECT count(*) FROM harmony_task_args", &[])
            .await
            .unwrap();
    assert_eq!(n, 2);
}

async fn injection_shaped_strings_round_trip(t: &TestDb) {
    let db = &t.db;
    let nasty = [
        "'); DROP TABLE harmony_task;--",
        "Robert'); DELETE FROM harmony_task_args WHERE ('1'='1",
        "$1 $2 ? :name @x",
        "\" OR 1=1 --",
        "back\\slash and 'quote' and \"dq\" and\nnewline and \u{0}nul-free ünïcödé 🦀",
    ];
    for (i, s) in nasty.iter().enumerate() {
        let s = s.replace('\u{0}', "");
        db.exec(
            "INSERT INTO harmony_task_args (task_id, key, value) VALUES ($1, $2, $3)",
            &[&(i as i64), &s, &s],
        )
        .await
        .unwrap();
        let back: (String, String) = db
            .query_row(
                "SELECT key, value FROM harmony_task_args WHERE task_id = $1",
                &[&(i as i64)],
            )
            .await
            .unwrap();
        assert_eq!(back, (s.clone(), s.clone()));
    }
    // The tables the strings talk about are intact.
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM harmony_task", &[])
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM harmony_task_args", &[])
            .await
            .unwrap(),
        nasty.len() as i64
    );
}

async fn timestamps_round_trip(t: &TestDb) {
    let db = &t.db;
    let ts = Timestamp::from_millis(1_767_225_600_007); // 2026-01-01 00:00:00.007 UTC
    let id = insert_task(db, "ts", ts).await;
    let back: Timestamp = db
        .scalar("SELECT posted_time FROM harmony_task WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(back, ts);
    if t.backend() == Backend::Sqlite {
        // Exactly one text format, comparable with SQLite's own functions.
        let raw: String = db
            .scalar("SELECT posted_time FROM harmony_task WHERE id = $1", &[&id])
            .await
            .unwrap();
        assert_eq!(raw, "2026-01-01 00:00:00.007");
        let older: i64 = db
            .scalar(
                "SELECT count(*) FROM harmony_task WHERE posted_time < strftime('%Y-%m-%d %H:%M:%f', 'now') AND substr(posted_time, 1, 19) = '2026-01-01 00:00:00'",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(older, 1);
    }
    // Ordering by timestamp columns matches time order.
    insert_task(db, "ts", ts + Duration::from_millis(1)).await;
    insert_task(db, "ts", ts - Duration::from_secs(3600)).await;
    let order: Vec<(i64,)> = db
        .select("SELECT id FROM harmony_task ORDER BY posted_time", &[])
        .await
        .unwrap();
    assert_eq!(order[1].0, id);
}

async fn arrays_bind_per_dialect(t: &TestDb) {
    let db = &t.db;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(insert_task(db, &format!("a{i}"), Timestamp::from_millis(i)).await);
    }
    let want = vec![ids[1], ids[3], 999_999];
    let sql = db.dialect().pick(
        "SELECT name FROM harmony_task WHERE id IN (SELECT value FROM json_each($1)) ORDER BY id",
        "SELECT name FROM harmony_task WHERE id = ANY($1) ORDER BY id",
    );
    let names: Vec<(String,)> = db.select(sql, &[&want]).await.unwrap();
    assert_eq!(names, vec![("a1".to_owned(),), ("a3".to_owned(),)]);
}

/// The one-parameter id list written by `id_list_sql!` selects and deletes exactly the listed
/// rows on both dialects, with parameters before and after the list, and an empty list matches
/// nothing.
async fn id_list_sql_on_both_dialects(t: &TestDb) {
    let db = &t.db;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(insert_task(db, &format!("b{i}"), Timestamp::from_millis(i)).await);
    }
    let select = harmonydb::id_list_sql!(
        "SELECT name FROM harmony_task WHERE name <> $1 AND ",
        "id",
        2,
        " ORDER BY id LIMIT $3"
    );
    let want = vec![ids[4], ids[0], ids[2], 999_999];
    let names: Vec<(String,)> = db
        .select(select.get(db.dialect()), &[&"b2", &want, &10i64])
        .await
        .unwrap();
    assert_eq!(names, vec![("b0".to_owned(),), ("b4".to_owned(),)]);
    let delete =
        harmonydb::id_list_sql!("DELETE FROM harmony_task WHERE ", "id", 1, " RETURNING id");
    let none: Vec<i64> = Vec::new();
    let gone: Vec<(i64,)> = db.select(delete.get(db.dialect()), &[&none]).await.unwrap();
    assert!(gone.is_empty());
    let gone: Vec<(i64,)> = db
        .select(delete.get(db.dialect()), &[&vec![ids[1], ids[3]]])
        .await
        .unwrap();
    let mut gone: Vec<i64> = gone.into_iter().map(|r| r.0).collect();
    gone.sort_unstable();
    assert_eq!(gone, vec![ids[1], ids[3]]);
    let left: i64 = db
        .scalar("SELECT count(*) FROM harmony_task", &[])
        .await
        .unwrap();
    assert_eq!(left, 3);
}

harmonydb::batch_sql! {
    /// Probe rows: every column type, every one nullable but the label.
    struct ProbeRows;
    "INSERT INTO batch_probe (label, at, flag, n, tag) SELECT p.label, p.at, p.flag, p.n, $1 FROM "
    rows($2) as p {
        label: text,
        at: Option<timestamptz>,
        flag: Option<boolean>,
        n: Option<bigint>,
        note: Option<text>,
    }
    " WHERE p.note IS NULL OR p.note <> 'skip' ORDER BY p.ord RETURNING id"
}

harmonydb::batch_sql! {
    /// New labels and flags by id.
    struct ProbeUpdates;
    "UPDATE batch_probe SET label = u.label, flag = u.flag, tag = $1 FROM "
    rows($2) as u {
        id: bigint,
        label: Option<text>,
        flag: Option<boolean>,
    }
    " WHERE batch_probe.id = u.id"
}

async fn create_batch_probe(db: &Db) {
    let ddl = db.dialect().pick(
        "CREATE TABLE batch_probe (id INTEGER PRIMARY KEY AUTOINCREMENT, label TEXT, at TEXT, flag INTEGER, n INTEGER, tag TEXT)",
        "CREATE TABLE batch_probe (id BIGSERIAL PRIMARY KEY, label TEXT, at TIMESTAMPTZ, flag BOOLEAN, n BIGINT, tag TEXT)",
    );
    db.exec_script(ddl).await.unwrap();
}

type Probe = (
    i64,
    Option<String>,
    Option<Timestamp>,
    Option<bool>,
    Option<i64>,
    String,
);

async fn probes(db: &Db) -> Vec<Probe> {
    db.select(
        "SELECT id, label, at, flag, n, tag FROM batch_probe ORDER BY id",
        &[],
    )
    .await
    .unwrap()
}

/// A batch written by `batch_sql!` inserts rows in batch order and updates rows by key on both
/// dialects, and NULLs, quotes, backslashes, unicode, timestamps (before the epoch too),
/// booleans and extreme integers come back the same from both.
async fn batch_sql_inserts_and_updates_on_both_dialects(t: &TestDb) {
    let db = &t.db;
    create_batch_probe(db).await;
    let labels = [
        "plain",
        "it's \"quoted\"",
        "back\\slash / and \\u0041 literally",
        "new\nline\ttab\r",
        "ünïcødé ✓ 🦀 日本",
        "'); DROP TABLE batch_probe; --",
        "",
        "skipped by the WHERE",
    ];
    let stamps = [
        Some(Timestamp::from_millis(1_767_225_600_007)),
        Some(Timestamp::from_millis(-1)),
        None,
        Some(Timestamp::from_millis(0)),
        Some(Timestamp::from_millis(4_102_444_800_999)),
        None,
        Some(Timestamp::from_millis(951_782_400_001)),
        None,
    ];
    let flags = [
        Some(true),
        Some(false),
        None,
        Some(true),
        None,
        Some(false),
        Some(true),
        None,
    ];
    let ns = [
        Some(0),
        Some(i64::MAX),
        Some(i64::MIN),
        None,
        Some(-7),
        Some(42),
        None,
        Some(1),
    ];
    let mut rows = ProbeRows::new(db.dialect(), labels.len());
    for i in 0..labels.len() {
        let note = match i {
            7 => Some("skip"),
            0 => Some("kept"),
            _ => None,
        };
        rows.push(labels[i], stamps[i], flags[i], ns[i], note);
    }
    let ids: Vec<(i64,)> = db
        .select(rows.sql(), &rows.params(&[&"first"]))
        .await
        .unwrap();
    assert_eq!(ids.len(), 7, "the row the WHERE skips is not inserted");
    let got = probes(db).await;
    let want: Vec<Probe> = (0..7)
        .map(|i| {
            (
                got[i].0,
                Some(labels[i].to_owned()),
                stamps[i],
                flags[i],
                ns[i],
                "first".to_owned(),
            )
        })
        .collect();
    assert_eq!(got, want, "rows come back as bound, in batch order");
    let mut returned: Vec<i64> = ids.into_iter().map(|r| r.0).collect();
    returned.sort_unstable();
    assert_eq!(returned, got.iter().map(|r| r.0).collect::<Vec<_>>());

    // Update three rows by id; one of the ids matches nothing.
    let mut updates = ProbeUpdates::new(db.dialect(), 3);
    updates.push(got[1].0, None, Some(true));
    updates.push(got[4].0, Some("ça «marche» \\ \"ok\""), None);
    updates.push(999_999, Some("nobody"), Some(false));
    let n = db
        .exec(updates.sql(), &updates.params(&[&"second"]))
        .await
        .unwrap();
    assert_eq!(n, 2);
    let after = probes(db).await;
    let mut want = want;
    want[1].1 = None;
    want[1].3 = Some(true);
    want[1].5 = "second".to_owned();
    want[4].1 = Some("ça «marche» \\ \"ok\"".to_owned());
    want[4].3 = None;
    want[4].5 = "second".to_owned();
    assert_eq!(after, want);

    // Inside a transaction, with the batch as the only parameters after the lead.
    let more = ProbeRows::new(db.dialect(), 0);
    let done = db
        .transaction(|tx| {
            let more = &more;
            async move {
                let ids: Vec<(i64,)> = tx.select(more.sql(), &more.params(&[&"tx"])).await?;
                Ok(Some(ids.len()))
            }
        })
        .await
        .unwrap();
    assert_eq!(done, Some(0));
}

/// An empty batch changes nothing; a batch of a few thousand rows keeps its order.
async fn batch_sql_empty_and_large_batches(t: &TestDb) {
    let db = &t.db;
    create_batch_probe(db).await;
    let empty = ProbeRows::new(db.dialect(), 0);
    let ids: Vec<(i64,)> = db
        .select(empty.sql(), &empty.params(&[&"none"]))
        .await
        .unwrap();
    assert!(ids.is_empty());
    let empty = ProbeUpdates::new(db.dialect(), 0);
    assert_eq!(
        db.exec(empty.sql(), &empty.params(&[&"none"]))
            .await
            .unwrap(),
        0
    );

    let count = 5_000;
    let labels: Vec<String> = (0..count).map(|i| format!("row {i}")).collect();
    let mut rows = ProbeRows::new(db.dialect(), count);
    for (i, label) in labels.iter().enumerate() {
        let i = i as i64;
        rows.push(
            label,
            Some(Timestamp::from_millis(i)),
            Some(i % 2 == 0),
            Some(i),
            None,
        );
    }
    let ids: Vec<(i64,)> = db
        .select(rows.sql(), &rows.params(&[&"big"]))
        .await
        .unwrap();
    assert_eq!(ids.len(), count);
    let got = probes(db).await;
    let order: Vec<Option<i64>> = got.iter().map(|r| r.4).collect();
    assert_eq!(order, (0..count as i64).map(Some).collect::<Vec<_>>());
    assert!(
        got.iter()
            .all(|r| r.1.as_deref() == Some(&labels[r.4.unwrap() as usize]))
    );
}

async fn streaming_rows(t: &TestDb) {
    let db = &t.db;
    db.transaction(|tx| async move {
        for i in 0..1000i64 {
            tx.exec("INSERT INTO harmony_task_args VALUES ($1, 'k', 'v')", &[&i])
                .await?;
        }
        Ok(true)
    })
    .await
    .unwrap();
    let mut stream = db.stream::<(i64,)>(
        "SELECT task_id FROM harmony_task_args ORDER BY task_id",
        &[],
    );
    let mut expect = 0;
    while let Some(row) = stream.next().await {
        assert_eq!(row.unwrap().0, expect);
        expect += 1;
    }
    assert_eq!(expect, 1000);
    // Dropping a stream early is fine and frees its connection.
    let mut partial = db.stream::<(i64,)>("SELECT task_id FROM harmony_task_args", &[]);
    assert!(partial.next().await.is_some());
    drop(partial);
    assert_eq!(
        db.scalar::<i64>("SELECT count(*) FROM harmony_task_args", &[])
            .await
            .unwrap(),
        1000
    );
}

async fn migrations_are_idempotent_and_checked(t: &TestDb) {
    let db = &t.db;
    assert!(
        db.migrate().await.unwrap().is_empty(),
        "second migrate applies nothing"
    );
    let status = db.migration_status().await.unwrap();
    assert_eq!(status.current_version, Some(status.latest_version));
    assert!(status.pending.is_empty());

    // A changed checksum is refused on the next open.
    db.exec(
        "UPDATE harmony_schema_migrations SET checksum = 'tampered' WHERE version = 1",
        &[],
    )
    .await
    .unwrap();
    let e = harmonydb::Db::open(harmonydb::DbConfig::from_url(&t.url).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Migration, "{e}");
    assert!(
        e.to_string().contains("changed after it was applied"),
        "{e}"
    );

    // A database newer than the binary is refused, and that is what the error says.
    db.exec(
        "INSERT INTO harmony_schema_migrations (version, name, checksum, applied_at) VALUES (9999, '9999_future', 'x', $1)",
        &[&Timestamp::from_millis(0)],
    )
    .await
    .unwrap();
    let e = db.migration_status().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Migration);
    assert!(e.to_string().contains("upgrade harmony"), "{e}");
}

async fn concurrent_opens_migrate_once(t: &TestDb) {
    // A brand-new database (schema / file) opened by four handles at once.
    let url = match t.backend() {
        Backend::Sqlite => {
            let dir = t.sqlite_path().unwrap();
            format!("sqlite://{}", dir.with_file_name("concurrent.db").display())
        }
        Backend::Postgres => harmony_testkit::with_option(
            &harmony_testkit::pg_base_url(),
            "schema",
            &format!("t_{}", harmony_testkit::unique_suffix()),
        ),
    };
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(
                async move { Db::open(harmonydb::DbConfig::from_url(&url).unwrap()).await },
            )
        })
        .collect();
    let mut handles = Vec::new();
    for o in opens {
        handles.push(o.await.unwrap().expect("every concurrent open succeeds"));
    }
    let ledger: Vec<(i64,)> = handles[0]
        .select(
            "SELECT version FROM harmony_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    let versions: Vec<i64> = ledger.into_iter().map(|r| r.0).collect();
    assert_eq!(versions, (1..=versions.len() as i64).collect::<Vec<_>>());
    assert!(versions.len() >= 2);
    if let Some(schema) = url.split("schema=").nth(1) {
        drop(handles);
        let schema = schema.to_owned();
        let base = harmony_testkit::pg_base_url();
        std::thread::spawn(move || harmony_testkit::drop_schema(&base, &schema))
            .join()
            .unwrap();
    }
}

async fn parameter_mistakes_are_misuse(t: &TestDb) {
    let db = &t.db;
    let e = db.exec("SELECT $1 || ''", &[&"a", &"b"]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Misuse, "{e}");
    let e = db.exec("SELECT $1 || $2", &[&"a"]).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Misuse | ErrorKind::Other),
        "{e}"
    );
    // The same parameter used twice binds once, in both dialects.
    let v: String = db.scalar("SELECT $1 || '-' || $1", &[&"x"]).await.unwrap();
    assert_eq!(v, "x-x");
    // Out-of-order use binds by number, not by first appearance.
    let v: String = db
        .scalar("SELECT $2 || '-' || $1", &[&"one", &"two"])
        .await
        .unwrap();
    assert_eq!(v, "two-one");
}

#[tokio::test]
async fn sqlite_uses_wal_and_foreign_keys() {
    let t = TestDb::sqlite().await;
    let mode: String = t.db.scalar("PRAGMA journal_mode", &[]).await.unwrap();
    assert_eq!(mode, "wal");
    let fk: i64 = t.db.scalar("PRAGMA foreign_keys", &[]).await.unwrap();
    assert_eq!(fk, 1);
}
