//! Recovery: SIGKILL a node while it runs tasks; how long until another node has finished
//! every task the dead one owned, with the default liveness settings (heartbeat 5 s, dead after
//! 30 s, reaper every 5 s) — as users run them.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use anyhow::bail;
use harmonydb::Timestamp;
use harmonytask::{Admin, Client, HistoryQuery, TaskId};

use crate::builtin::BENCH_SLEEP;
use crate::fresh::FreshDb;
use crate::node::NodeProcess;
use crate::store::BenchStore;
use crate::{BenchOptions, BenchResult};

/// How long each task sleeps.
const TASK_MS: u64 = 2_000;

pub(crate) async fn recovery(opts: &BenchOptions) -> anyhow::Result<Vec<BenchResult>> {
    let n = opts.tasks.unwrap_or(20);
    let fresh = FreshDb::create(&opts.db_url).await?;
    let db = fresh.open().await?;
    let store = BenchStore::new(db.clone());
    let admin = Admin::new(db.clone());
    let mut first = NodeProcess::spawn(&opts.harmony_exe, &fresh.url, &["--types", BENCH_SLEEP])?;
    first.wait_registered(&store).await?;
    // All tasks go to the first node, which then dies; the second is up before the kill.
    let ms = TASK_MS.to_string();
    let ids = Client::new(db.clone())
        .add_tasks_with_args(BENCH_SLEEP, n, &[("ms".to_owned(), ms)])
        .await?;
    let started = Instant::now();
    loop {
        let owned = admin.tasks(Some(BENCH_SLEEP), n + 1).await?;
        if owned.len() == n && owned.iter().all(|t| t.owner_id.is_some()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the first node did not claim every task within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut second = NodeProcess::spawn(&opts.harmony_exe, &fresh.url, &["--types", BENCH_SLEEP])?;
    second.wait_registered(&store).await?;
    let killed_at = Timestamp::from_system(SystemTime::now());
    first.kill().await?;
    let orphans: HashSet<TaskId> = ids.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    while store.any_task(BENCH_SLEEP).await? {
        if Instant::now() > deadline {
            bail!("orphaned tasks did not finish within 300 s of the kill");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let history = admin
        .history(&HistoryQuery {
            name: Some(BENCH_SLEEP.to_owned()),
            limit: 10 * n,
            ..Default::default()
        })
        .await?;
    let done: Vec<_> = history
        .iter()
        .filter(|h| h.result && orphans.contains(&TaskId(h.task_id)))
        .collect();
    let distinct = done.iter().map(|h| h.task_id).collect::<HashSet<_>>().len();
    let last_end = done.iter().map(|h| h.work_end).max().unwrap_or(killed_at);
    let first_restart = done.iter().map(|h| h.work_start).min().unwrap_or(killed_at);
    second.stop().await?;
    let secs = last_end.since(killed_at).as_secs_f64();
    let mut r = BenchResult::new("recovery", fresh.backend);
    r.nodes = 2;
    r.tasks = done.len();
    r.seconds = secs;
    r.detail = format!(
        "SIGKILL to last orphan finished elsewhere {secs:.1} s (to first orphan restarted {:.1} s); defaults: heartbeat 5 s, dead after 30 s, reaper 5 s; tasks sleep {TASK_MS} ms; {distinct} of {n} orphans finished, {} successes recorded",
        first_restart.since(killed_at).as_secs_f64(),
        done.len()
    );
    drop(store);
    drop(db);
    fresh.cleanup().await?;
    Ok(vec![r])
}
