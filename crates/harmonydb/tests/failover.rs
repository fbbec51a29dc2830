//! Failover between Postgres hosts as operators run it: a primary and a streaming-replication
//! standby (`pg_basebackup -R`, synchronous commit), both in the host list. Connections must go
//! to the host that accepts writes — never to a standby in recovery, wherever it stands in the
//! list — and after the primary is SIGKILLed and the standby promoted, the same `Db` handle
//! must continue on the promoted host without a restart, with every acknowledged commit there,
//! and stay there when the old primary comes back.

use std::time::{Duration, Instant};

use harmony_testkit::{TempPg, eventually};
use harmonydb::{Db, DbConfig, ErrorKind, Executor};

fn url(hosts: &[&TempPg], options: &str) -> String {
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| format!("127.0.0.1:{}", h.port))
        .collect();
    format!(
        "postgres://postgres@{}/harmony?connect_timeout=2&pool_size=4{options}",
        hosts.join(",")
    )
}

async fn open(url: &str) -> harmonydb::Result<Db> {
    Db::open(DbConfig::from_url(url).expect("valid URL")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_moves_to_the_promoted_standby_and_keeps_every_commit() {
    let Some((primary, standby)) = TempPg::replicated_pair() else {
        assert!(
            std::env::var("HARMONY_REQUIRE_PG").is_err(),
            "HARMONY_REQUIRE_PG=1 but initdb/pg_ctl are not installed"
        );
        return;
    };
    assert!(standby.in_recovery());

    // The standby listed first is skipped: it is reachable but in recovery, so it does not
    // accept writes (target_session_attrs=read-write semantics).
    let standby_first = open(&url(&[&standby, &primary], ""))
        .await
        .expect("open with the standby listed first");
    assert_eq!(
        standby_first.status().await.unwrap().host_index,
        Some(1),
        "a standby in recovery must never take connections for writes"
    );
    drop(standby_first);

    let db = open(&url(&[&primary, &standby], ""))
        .await
        .expect("open primary,standby");
    assert_eq!(db.status().await.unwrap().host_index, Some(0));
    let insert = "INSERT INTO harmony_task_args (task_id, key, value) VALUES ($1, 'k', 'v')";
    for id in 0..100i64 {
        db.exec(insert, &[&id]).await.unwrap();
    }
    // Synchronous commit: what the primary acknowledged is already on the standby.
    assert_eq!(
        standby.psql("SELECT count(*) FROM curio.harmony_task_args"),
        "100"
    );

    primary.kill();
    let killed = Instant::now();
    // Until the promotion only a standby in recovery is up: there is no writable host, so a
    // new handle refuses to open and the old one's statements fail, rather than either
    // writing to (or queueing on) the standby.
    let Err(refused) = open(&url(&[&primary, &standby], "&migrate=false")).await else {
        panic!("a handle opened with no writable host before the promotion");
    };
    assert_eq!(refused.kind(), ErrorKind::Connection, "{refused}");
    let e = db
        .exec(insert, &[&100i64])
        .await
        .expect_err("no write may succeed before the promotion");
    assert!(
        matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "unexpected error kind while the standby is in recovery: {e:?}"
    );
    assert!(standby.in_recovery());
    standby.promote();
    let promoted = killed.elapsed();

    // The handle recovers by itself, with no restart and no reconfiguration.
    eventually(
        "the first write on the promoted standby",
        Duration::from_secs(60),
        || {
            let db = db.clone();
            async move {
                match db.exec(insert, &[&100i64]).await {
                    Ok(_) => Some(()),
                    Err(e) => {
                        assert!(
                            matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout),
                            "unexpected error kind during failover: {e:?}"
                        );
                        None
                    }
                }
            }
        },
    )
    .await;
    let failover = killed.elapsed();
    println!(
        "FAILOVER: primary SIGKILLed; standby promoted after {:.0} ms; first write on it {:.0} ms after the kill",
        promoted.as_secs_f64() * 1000.0,
        failover.as_secs_f64() * 1000.0,
    );
    let status = db.status().await.unwrap();
    assert_eq!(
        status.host_index,
        Some(1),
        "connections moved to the standby"
    );
    assert!(db.metrics().failovers() >= 1);

    // The old primary comes back as a primary, a stale copy: as when its crashed machine
    // reboots with PostgreSQL enabled. It is first in the list and accepts writes, yet this
    // handle's new connections must stay on the promoted host, or its writes would be split
    // across two diverging servers. (`listen` always opens a new connection.)
    primary.start_again();
    assert!(!primary.in_recovery());
    let probe = db
        .listen(&["failover_probe"])
        .await
        .unwrap()
        .expect("a Postgres listener");
    let listening = "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN failover_probe'";
    assert_eq!(
        primary.psql(listening),
        "0",
        "a new connection went back to the stale old primary"
    );
    assert_eq!(standby.psql(listening), "1");
    drop(probe);

    // Work keeps flowing, and nothing acknowledged before the kill is missing.
    for id in 101..150i64 {
        db.exec(insert, &[&id]).await.unwrap();
    }
    let ids: Vec<(i64,)> = db
        .select(
            "SELECT task_id FROM harmony_task_args ORDER BY task_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        ids.into_iter().map(|r| r.0).collect::<Vec<_>>(),
        (0..150).collect::<Vec<i64>>()
    );
}
