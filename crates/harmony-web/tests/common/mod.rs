//! Helpers for the web server's tests: a real engine with a few task types, a real server on
//! a free loopback port, and a small real HTTP client.

#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use harmony_web::{ApiToken, WebServer};
use harmonytask::{
    Done, Engine, EngineConfig, Resources, RunContext, Task, TaskError, TaskId, TypeDetails,
    async_trait,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Succeeds at once.
pub struct OkTask;

#[async_trait]
impl Task for OkTask {
    fn type_details(&self) -> TypeDetails {
        TypeDetails::new("ok_task")
    }
    async fn run(&self, _: TaskId, _: RunContext) -> Result<Done, TaskError> {
        Ok(Done(true))
    }
}

/// Fails for good on its first attempt.
pub struct FailTask;

#[async_trait]
impl Task for FailTask {
    fn type_details(&self) -> TypeDetails {
        let mut d = TypeDetails::new("fail_task");
        d.max_failures = 1;
        d
    }
    async fn run(&self, _: TaskId, _: RunContext) -> Result<Done, TaskError> {
        Err(TaskError::new("boom"))
    }
}

/// Runs until its attempt is cancelled (the engine shuts down), or succeeds once `release`
/// fires (a draining node waits for it).
pub struct HoldTask {
    pub release: CancellationToken,
}

#[async_trait]
impl Task for HoldTask {
    fn type_details(&self) -> TypeDetails {
        TypeDetails::new("hold")
    }
    async fn run(&self, _: TaskId, ctx: RunContext) -> Result<Done, TaskError> {
        tokio::select! {
            () = ctx.cancelled().cancelled() => Err(TaskError::new("cancelled")),
            () = self.release.cancelled() => Ok(Done(true)),
        }
    }
}

pub fn config() -> EngineConfig {
    EngineConfig {
        host_and_port: format!("127.0.0.1:{}", harmony_testkit::free_port()),
        budget: Some(Resources::new(8.0, 8 << 30, 0.0)),
        poll_interval: Duration::from_millis(200),
        heartbeat_interval: Duration::from_millis(200),
        dead_after: Duration::from_secs(10),
        reaper_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_millis(100),
        cancel_wait: Duration::from_secs(2),
        poll_interval_unhealthy: Duration::from_millis(200),
        ..EngineConfig::default()
    }
}

pub async fn engine(db: &harmonydb::Db) -> Engine {
    engine_with_release(db).await.0
}

/// An engine and the token that lets its `hold` tasks succeed.
pub async fn engine_with_release(db: &harmonydb::Db) -> (Engine, CancellationToken) {
    let release = CancellationToken::new();
    let engine = Engine::builder(db.clone())
        .config(config())
        .register(OkTask)
        .register(FailTask)
        .register(HoldTask {
            release: release.clone(),
        })
        .start()
        .await
        .expect("engine starts");
    (engine, release)
}

/// A running server; stopped when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: CancellationToken,
    pub client: Http,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts a server on `listen` (port 0 for any) over `db`, with `engine` if given.
pub async fn serve(
    db: &harmonydb::Db,
    engine: Option<&Engine>,
    token: Option<&str>,
    listen: &str,
) -> Server {
    let mut b = WebServer::builder(db.clone()).token(token.and_then(ApiToken::new));
    if let Some(e) = engine {
        b = b.engine(e.clone());
    }
    let server = b.bind(listen).await.expect("bind");
    let mut addr = server.local_addr();
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    Server {
        addr,
        stop,
        client: Http::new(addr),
    }
}

/// A response: status, headers and body (parsed as JSON when it is).
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

impl Reply {
    /// Asserts the status; on a mismatch shows the body.
    #[track_caller]
    pub fn expect(self, status: u16) -> Reply {
        assert_eq!(self.status, status, "{self:?}");
        if status >= 400 {
            assert!(
                self.json["error"].as_str().is_some_and(|e| !e.is_empty()),
                "an error answer names the problem: {self:?}"
            );
        }
        self
    }

    /// Asserts an error whose message contains `words`.
    #[track_caller]
    pub fn error(self, status: u16, words: &[&str]) -> Reply {
        let r = self.expect(status);
        let e = r.json["error"].as_str().unwrap_or_default().to_owned();
        for w in words {
            assert!(e.contains(w), "{w:?} not in {e:?}");
        }
        r
    }
}

/// A small HTTP/1.1 client (hyper).
#[derive(Clone)]
pub struct Http {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Self {
        Http {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], Vec::new()).await
    }

    pub async fn post(&self, path: &str) -> Reply {
        self.send("POST", path, &[], Vec::new()).await
    }

    pub async fn post_with(&self, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
        self.send("POST", path, headers, body).await
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Reply {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::from(body))).unwrap();
        let res = self.client.request(req).await.expect("HTTP request");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            text,
            json,
        }
    }
}

/// Runs `promtool check metrics` on `text`: `Some(output)` on success; panics on a failure;
/// `None` when promtool is missing and `CI` is not set (under CI a missing promtool fails).
pub fn promtool_check(text: &str) -> Option<String> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is not installed (Debian package prometheus), and CI is set"
            );
            eprintln!("SKIPPED (no promtool)");
            return None;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{report}\n--- metrics ---\n{text}"
    );
    Some(report)
}

/// Waits until `n` attempts of all types are in the history.
pub async fn history_rows(db: &harmonydb::Db, n: i64) {
    use harmonydb::Executor;
    let db = db.clone();
    harmony_testkit::eventually(
        &format!("{n} history rows"),
        Duration::from_secs(30),
        || {
            let db = db.clone();
            async move {
                let got: i64 = db
                    .scalar("SELECT count(*) FROM harmony_task_history", &[])
                    .await
                    .ok()?;
                (got >= n).then_some(())
            }
        },
    )
    .await;
}
