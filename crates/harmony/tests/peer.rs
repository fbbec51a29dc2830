//! `--notify http` between real `harmony run` processes on Postgres: hints travel as signed
//! HTTP requests to each node's `--listen` address instead of `NOTIFY`, and a forged or
//! replayed request is refused.
//!
//! The nodes poll once an hour, so only a hint can explain a task that starts within the
//! tests' deadlines. Nothing waits by sleeping: every wait is on a log line or a database
//! count, with a deadline.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use harmony_peer::{ClusterSecret, HINTS_PATH, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use harmony_testkit::TestDb;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const SECRET: &str = "peer-test-cluster-secret";

/// Flags of a node that only hints can wake: HTTP peering, polls an hour away.
const HTTP_NO_POLL: &[&str] = &[
    "--notify",
    "http",
    "--cluster-secret",
    SECRET,
    "--poll-interval",
    "1h",
    "--poll-interval-unhealthy",
    "1h",
];

const TASKS: &str = r#"
[[task]]
name = "h_add"
builtin = "bench_noop"

[[task]]
name = "h_first"
builtin = "bench_noop"

[[task]]
name = "h_next"
builtin = "bench_noop"
follows = ["h_first"]
"#;

/// `harmony --db URL --json [--notify http --cluster-secret S] task add NAME`; the new ids.
async fn add(db: &str, name: &str, http: bool) -> Vec<i64> {
    let mut args = vec!["--db", db, "--json"];
    if http {
        args.extend_from_slice(&["--notify", "http", "--cluster-secret", SECRET]);
    } else {
        args.extend_from_slice(&["--notify", "off"]);
    }
    args.extend_from_slice(&["task", "add", name]);
    added_ids(&harmony(&args).await)
}

/// Posts a hint request to a node; the status and the answer.
async fn post(addr: &str, timestamp: &str, signature: &str, body: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = hyper::Request::post(format!("http://{addr}{HINTS_PATH}"))
        .header(TIMESTAMP_HEADER, timestamp)
        .header(SIGNATURE_HEADER, signature)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let resp = client.request(req).await.expect("the node answers");
    let status = resp.status().as_u16();
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&text).into_owned())
}

fn now_ms() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string()
}

/// Two nodes on Postgres with `--notify http`: a task added by the CLI starts on the node that
/// runs its type, a completion on node A starts its follow-up on node B, a hint signed with
/// the cluster secret wakes a node, and the same request forged or replayed is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_peers_start_each_others_work_and_refuse_forged_hints() {
    let Some(t) = TestDb::postgres("http_peers_start_each_others_work").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), TASKS);
    let file = file.to_str().unwrap();
    let db = t.url.as_str();
    let args = |types: &'static str| {
        let mut a = vec!["--tasks", file, "--types", types];
        a.extend_from_slice(HTTP_NO_POLL);
        a
    };
    let a = Node::start(db, dir.path(), &args("h_first"));
    let b = Node::start(db, dir.path(), &args("h_add,h_next"));
    a.machine_id(&t).await;
    b.machine_id(&t).await;
    // Each node sends hints to the peers it has read from the machine table.
    a.wait_log(&["hint peer list changed", "peers=1"]).await;
    b.wait_log(&["hint peer list changed", "peers=1"]).await;

    // A first round, which a node's start-up poll might also find; after it only hints are
    // left.
    add(db, "h_add", true).await;
    add(db, "h_first", true).await;
    wait_succeeded(&t, "h_add", 1, Duration::from_secs(30)).await;
    wait_succeeded(&t, "h_next", 1, Duration::from_secs(30)).await;

    // The CLI's hint reaches B; its hint reaches A, whose completion's hint reaches B.
    add(db, "h_add", true).await;
    add(db, "h_first", true).await;
    wait_succeeded(&t, "h_add", 2, Duration::from_secs(30)).await;
    wait_succeeded(&t, "h_next", 2, Duration::from_secs(30)).await;

    // A forged hint (signed with another secret) is refused, and wakes nobody.
    let ids = add(db, "h_add", false).await;
    assert_eq!(ids.len(), 1);
    let body =
        r#"{"from":"test","nonce":1,"hints":[{"channel":"harmony","payload":"add:h_add:0"}]}"#;
    let ts = now_ms();
    let forged = ClusterSecret::new("some-other-secret-entirely")
        .unwrap()
        .sign(&ts, body.as_bytes());
    let (status, text) = post(&b.listen, &ts, &forged, body).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("bad_signature"), "{text}");

    // The same hint signed with the cluster secret wakes B, which runs the task that was
    // added without any hint; sent again, it is refused as a replay.
    let signature = ClusterSecret::new(SECRET)
        .unwrap()
        .sign(&ts, body.as_bytes());
    let (status, text) = post(&b.listen, &ts, &signature, body).await;
    assert_eq!(status, 204, "{text}");
    let (status, text) = post(&b.listen, &ts, &signature, body).await;
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("replay"), "{text}");
    wait_succeeded(&t, "h_add", 3, Duration::from_secs(30)).await;

    all_done(&t, 3 + 2 + 2, Duration::from_secs(30)).await;
    for (name, node, n) in [("h_add", &b, 3), ("h_first", &a, 2), ("h_next", &b, 2)] {
        let by = completed_by(&t, name).await;
        assert_eq!(by.len(), n, "{name}: {by:?}");
        assert!(by.iter().all(|h| *h == node.listen), "{name}: {by:?}");
    }
}

/// `--notify http` needs a cluster secret of at least 16 bytes; the error names the flag and
/// never shows the secret.
#[tokio::test]
async fn http_without_a_good_secret_is_a_usage_error() {
    let out = harmony(&["--notify", "http", "task", "ls"]).await;
    out.assert_usage_error(&["--cluster-secret", "HARMONY_CLUSTER_SECRET"]);
    let out = harmony(&[
        "--notify",
        "http",
        "--cluster-secret",
        "tooshort",
        "task",
        "ls",
    ])
    .await;
    out.assert_usage_error(&["--cluster-secret", "16"]);
    assert!(!out.stderr.contains("tooshort"), "{}", out.stderr);
}
