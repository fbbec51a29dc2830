//! The HTTP API through the real `harmony` binary: a `harmony run` node serves it on its
//! `--listen` address, `harmony web` serves it without running tasks, and a port that cannot
//! be bound stops start-up with a clear error. Requests are plain HTTP/1.1 over a TCP socket,
//! as curl sends them.

mod common;

use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request with `Connection: close`; the status and the body.
async fn http(addr: &str, method: &str, path: &str, headers: &[&str]) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// Waits until `GET path` answers `status`; returns the body.
async fn wait_for(addr: &str, path: &str, status: u16) -> String {
    eventually(
        &format!("GET {path} on {addr} to answer {status}"),
        Duration::from_secs(60),
        || async {
            let (s, body) = http(addr, "GET", path, &[]).await?;
            (s == status).then_some(body)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_the_api_on_its_listen_address() {
    let t = TestDb::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--api-token", "s3cret"];
    args.extend_from_slice(FAST);
    let mut node = Node::start(&t.url, dir.path(), &args);
    let machine = node.machine_id(&t).await;
    let body = wait_for(&node.listen, "/healthz", 200).await;
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["ok"], true);
    assert_eq!(h["machine"]["id"], machine);

    let out = harmony(&["--db", &t.url, "task", "add", "bench_noop", "--count", "3"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    all_done(&t, 3, Duration::from_secs(30)).await;
    let metrics = wait_for(&node.listen, "/metrics", 200).await;
    assert!(
        metrics.contains("harmony_tasks_completed_total{task_type=\"bench_noop\"} 3"),
        "{metrics}"
    );
    let (s, body) = http(&node.listen, "GET", "/api/v1/history", &[])
        .await
        .unwrap();
    assert_eq!(s, 200, "{body}");
    let hist: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(hist["history"].as_array().unwrap().len(), 3);

    // Writes need the token, even on loopback once one is configured.
    let cordon = format!("/api/v1/machines/{machine}/cordon");
    let (s, _) = http(&node.listen, "POST", &cordon, &[]).await.unwrap();
    assert_eq!(s, 401);
    let (s, body) = http(
        &node.listen,
        "POST",
        &cordon,
        &["Authorization: Bearer s3cret"],
    )
    .await
    .unwrap();
    assert_eq!(s, 200, "{body}");
    assert!(!node.log().contains("s3cret"), "the token is never logged");

    node.signal(Signal::SIGTERM);
    assert_eq!(
        node.exit_code(Duration::from_secs(30)).await,
        Some(0),
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harmony_web_serves_without_running_tasks() {
    let t = TestDb::sqlite().await;
    let listen = format!("127.0.0.1:{}", harmony_testkit::free_port());
    let out = harmony(&["--db", &t.url, "task", "add", "bench_noop", "--count", "4"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let mut web = tokio::process::Command::new(HARMONY)
        .args(["--db", &t.url, "web", "--listen", &listen])
        .env_remove("HARMONY_API_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let body = wait_for(&listen, "/api/v1/tasks?state=waiting", 200).await;
    let tasks: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        tasks["tasks"].as_array().unwrap().len(),
        4,
        "nothing runs them"
    );
    let metrics = wait_for(&listen, "/metrics", 200).await;
    assert!(
        metrics.contains("harmony_queue_depth{task_type=\"bench_noop\"} 4"),
        "{metrics}"
    );
    let (s, _) = http(&listen, "GET", "/healthz", &[]).await.unwrap();
    assert_eq!(s, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(web.id().unwrap() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = web.wait().await.unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_stops_start_up_with_a_clear_error() {
    let t = TestDb::sqlite().await;
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = holder.local_addr().unwrap().to_string();
    // (At `--log warn`: the node registers before it binds, and says so at info level.)
    let mut args = vec![
        "--db",
        t.url.as_str(),
        "--log",
        "warn",
        "run",
        "--listen",
        &listen,
        "--builtin",
    ];
    args.extend_from_slice(FAST);
    let out = harmony(&args).await;
    out.assert_usage_error(&["--listen", &listen, "in use", "choose another --listen"]);
    // The node stopped again: it left no machine row behind.
    assert_eq!(count(&t, "SELECT count(*) FROM harmony_machines").await, 0);
    let out = harmony(&["--db", &t.url, "web", "--listen", &listen]).await;
    out.assert_usage_error(&["--listen", &listen, "in use"]);
    drop(holder);
}
