//! Failover between Postgres hosts: a throw-away server first in the host list and the shared
//! test server second. Killing the first (SIGKILL to its postmaster) must leave the same `Db`
//! handle working on the second, without a restart.

use std::time::{Duration, Instant};

use harmony_testkit::{TempPg, pg_base_url, postgres_or_skip, unique_suffix, with_option};
use harmonydb::{BackendConfig, Db, DbConfig, ErrorKind, Executor};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_continue_on_the_second_host_after_the_first_dies() {
    if !postgres_or_skip("failover").await {
        return;
    }
    let Some(temp) = TempPg::start() else {
        assert!(
            std::env::var("HARMONY_REQUIRE_PG").is_err(),
            "HARMONY_REQUIRE_PG=1 but initdb/pg_ctl are not installed"
        );
        return;
    };
    let schema = format!("t_{}", unique_suffix());

    // The shared server's schema is migrated first, as a standby would already hold it, so
    // the handle finds its tables wherever it lands.
    let shared_url = with_option(&pg_base_url(), "schema", &schema);
    let shared = Db::open(DbConfig::from_url(&shared_url).unwrap())
        .await
        .unwrap();

    // Host list: [temp server, shared server], same user, database and schema on both.
    let mut cfg = DbConfig::from_url(&shared_url).unwrap();
    let BackendConfig::Postgres(pg) = &mut cfg.backend else {
        unreachable!("postgres URL")
    };
    if pg.database != "harmony" {
        temp.create_database(&pg.database);
    }
    pg.hosts.insert(
        0,
        harmonydb::PgHost {
            host: "127.0.0.1".into(),
            port: temp.port,
        },
    );
    pg.connect_timeout = Duration::from_secs(2);
    pg.pool_size = 4;

    let db = Db::open(cfg).await.expect("open with two hosts");
    assert_eq!(
        db.status().await.unwrap().host_index,
        Some(0),
        "connections start on the first host"
    );
    let insert = "INSERT INTO harmony_task_args (task_id, key, value) VALUES ($1, 'k', 'v')";
    db.exec(insert, &[&1i64]).await.unwrap();
    assert_eq!(
        shared
            .scalar::<i64>("SELECT count(*) FROM harmony_task_args", &[])
            .await
            .unwrap(),
        0,
        "the first write went to the first host"
    );

    temp.kill();
    let killed = Instant::now();
    // Statements on connections that died with the server fail with a connection error; the
    // handle recovers by itself, with no restart and no reconfiguration.
    let mut failed = 0u32;
    let mut id = 2i64;
    while let Err(e) = db.exec(insert, &[&id]).await {
        assert!(
            matches!(e.kind(), ErrorKind::Connection | ErrorKind::Timeout),
            "unexpected error kind during failover: {e:?}"
        );
        failed += 1;
        id += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no failover within 30 s"
        );
    }
    let failover = killed.elapsed();
    println!(
        "FAILOVER: first successful statement on the second host {:.1} ms after SIGKILL of the first ({failed} statements failed before it)",
        failover.as_secs_f64() * 1000.0
    );
    assert_eq!(
        db.status().await.unwrap().host_index,
        Some(1),
        "connections moved to the second host"
    );
    assert!(db.metrics().failovers() >= 1);

    // Work keeps flowing on the new host.
    for i in 0..50i64 {
        db.exec(insert, &[&(1000 + i)]).await.unwrap();
    }
    let on_shared: i64 = shared
        .scalar(
            "SELECT count(*) FROM harmony_task_args WHERE task_id >= 1000",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(on_shared, 50);
    drop(db);
    drop(shared);
    let base = pg_base_url();
    std::thread::spawn(move || harmony_testkit::drop_schema(&base, &schema))
        .join()
        .unwrap();
}
