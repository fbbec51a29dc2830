//! Quick throughput probe used while developing: N no-op tasks through one engine.
//! `cargo run --release -p harmonytask --example quick_throughput -- URL N`
use std::time::{Duration, Instant};

use harmonydb::{Db, DbConfig, Executor};
use harmonytask::{
    Done, Engine, EngineConfig, Resources, RunContext, Task, TaskError, TaskId, TypeDetails,
    async_trait,
};

struct Noop;

#[async_trait]
impl Task for Noop {
    fn type_details(&self) -> TypeDetails {
        TypeDetails::new("noop")
    }
    async fn run(&self, _: TaskId, _: RunContext) -> Result<Done, TaskError> {
        Ok(Done(true))
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "sqlite:///tmp/qt.db".into());
    let n: usize = args.get(2).map_or(20_000, |s| s.parse().unwrap());
    let db = Db::open(DbConfig::from_url(&url).unwrap()).await.unwrap();
    db.exec("DELETE FROM harmony_task", &[]).await.unwrap();
    db.exec("DELETE FROM harmony_task_history", &[])
        .await
        .unwrap();
    let t0 = Instant::now();
    let client = harmonytask::Client::new(db.clone());
    let mut left = n;
    while left > 0 {
        let k = left.min(5000);
        client.add_tasks_with_args("noop", k, &[]).await.unwrap();
        left -= k;
    }
    println!(
        "insert: {:.0} tasks/s",
        n as f64 / t0.elapsed().as_secs_f64()
    );
    let cfg = EngineConfig {
        budget: Some(Resources::new(2.0, 1 << 30, 0.0)),
        host_and_port: format!("127.0.0.1:{}", std::process::id()),
        ..EngineConfig::default()
    };
    let t1 = Instant::now();
    let engine = Engine::builder(db.clone())
        .register(Noop)
        .config(cfg)
        .start()
        .await
        .unwrap();
    loop {
        let left: i64 = db
            .scalar("SELECT count(*) FROM harmony_task", &[])
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let el = t1.elapsed();
    println!(
        "drain: {n} in {:.2}s = {:.0} tasks/s",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64()
    );
    engine.shutdown().await.unwrap();
}
