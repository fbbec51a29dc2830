//! The dashboard's pages through real HTTP requests against a real engine and database:
//! every page renders, user text is escaped, unknown ids answer 404 pages, and any number
//! of open event streams costs the database no more than one.

mod common;

use std::time::Duration;

use common::{engine, history_rows, serve};
use harmony_testkit::{TestDb, both_backends, eventually};
use harmony_web::WebServer;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

async fn pages_render_and_escape(t: &TestDb) {
    let e = engine(&t.db).await;
    let s = serve(&t.db, Some(&e), None, "127.0.0.1:0").await;
    let http = &s.client;
    let hostile = "<script>alert('x')</script> & \"quoted\"";
    let waiting = e
        .add_task_with_args("queued", &[("note".into(), hostile.into())])
        .await
        .unwrap()
        .unwrap();
    let failing = e
        .add_task("fail_task", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    history_rows(&t.db, 1).await;
    let machine = e.machine_id().0;

    // A page shows the shared snapshot, at most one refresh interval old.
    let overview = eventually(
        "the overview to list the types",
        Duration::from_secs(30),
        || async {
            let r = http.get("/").await;
            (r.status == 200 && r.text.contains("queued")).then_some(r)
        },
    )
    .await;
    assert!(
        overview.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    for needle in [
        "Machines",
        "fail_task",
        "ok_task",
        "queued",
        "/assets/dashboard.js",
    ] {
        assert!(
            overview.text.contains(needle),
            "{needle} in {}",
            overview.text
        );
    }

    let task = http.get(&format!("/tasks/{}", waiting.0)).await;
    assert_eq!(task.status, 200, "{task:?}");
    assert!(!task.text.contains("<script>alert"), "{}", task.text);
    assert!(
        task.text
            .contains("&#60;script&#62;alert(&#39;x&#39;)&#60;/script&#62; &#38; &#34;quoted&#34;")
            || task.text.contains(
                "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;quoted&quot;"
            ),
        "the argument is shown escaped: {}",
        task.text
    );
    assert!(
        task.text.contains("Cancel"),
        "a waiting task can be cancelled"
    );

    let failed = http.get(&format!("/tasks/{}", failing.0)).await;
    assert_eq!(failed.status, 200);
    assert!(failed.text.contains("boom") && failed.text.contains("restart-task"));

    for page in [
        "/tasks".to_owned(),
        "/tasks?type=queued&state=waiting".to_owned(),
        format!("/tasks?owner={machine}"),
        "/history".to_owned(),
        "/history?type=fail_task&failures=on".to_owned(),
        "/types/fail_task".to_owned(),
        "/types/queued".to_owned(),
        format!("/machines/{machine}"),
    ] {
        let r = http.get(&page).await;
        assert_eq!(r.status, 200, "{page}: {r:?}");
    }
    let history = http.get("/history?failures=on").await;
    assert!(history.text.contains("boom"));
    assert!(!history.text.contains(">ok<"), "failures only");

    for (page, status) in [
        ("/tasks/987654321", 404),
        ("/tasks/abc", 404),
        ("/machines/987654321", 404),
        ("/types/never_seen", 404),
        ("/types/bad%20name", 404),
        ("/tasks?owner=x", 400),
        ("/history?colour=red", 400),
    ] {
        let r = http.get(page).await;
        assert_eq!(r.status, status, "{page}: {r:?}");
        assert!(r.text.contains("<main"), "{page} is an HTML page: {r:?}");
    }
    // The JSON API's own 404 is unchanged.
    http.get("/api/v1/nope").await.expect(404);
    e.shutdown().await.unwrap();
}

both_backends!(pages_render_and_escape);

/// Reads an event stream until its first `fragment` event; keeps it open.
/// A server over `t` refreshing every `interval`, running until the token fires.
async fn live_server(
    t: &TestDb,
    interval: Duration,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<harmony_web::dashboard::live::Live>,
    CancellationToken,
) {
    let server = WebServer::builder(t.db.clone())
        .live_interval(interval)
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let addr = server.local_addr();
    let live = server.live();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(stop.clone()));
    (addr, live, stop)
}

async fn first_fragment(body: &mut hyper::body::Incoming) -> String {
    let mut seen = String::new();
    while !seen.contains("event: fragment") {
        let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
            .await
            .expect("a fragment within 30 s")
            .expect("the stream stays open")
            .expect("a frame");
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    seen
}

/// Queries the database answered while the refresh ran `rounds` more times.
async fn queries_over(
    db: &harmonydb::Db,
    live: &harmony_web::dashboard::live::Live,
    rounds: u64,
) -> (u64, u64) {
    let (q0, r0) = (db.metrics().queries(), live.refreshes());
    eventually("refresh rounds", Duration::from_secs(60), || async {
        (live.refreshes() >= r0 + rounds).then_some(())
    })
    .await;
    (db.metrics().queries() - q0, live.refreshes() - r0)
}

/// Twenty browsers on one page cost the database what one costs: the refresh is shared and
/// the page is rendered once per round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_server_refreshes_the_slow_reads_at_once() {
    let t = TestDb::sqlite().await;
    let client = harmonytask::Client::new(t.db.clone());
    client
        .add_task_with_args("alpha", &[])
        .await
        .unwrap()
        .unwrap();
    let (addr, live, stop) = live_server(&t, Duration::from_millis(200)).await;
    let (mut rx, _watching) = live.subscribe();
    // Wait for a round that made the slow reads; the round after it would not make them
    // again on time alone (they run every SLOW_ROUNDS rounds).
    let mut slow_at = rx.borrow_and_update().slow_at;
    loop {
        rx.changed().await.unwrap();
        let snap = rx.borrow_and_update().clone();
        if snap.slow_at.is_some() && snap.slow_at != slow_at {
            slow_at = snap.slow_at;
            break;
        }
        slow_at = snap.slow_at;
    }
    let http = Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    let req = hyper::Request::post(format!("http://{addr}/api/v1/types/alpha/pause"))
        .body(http_body_util::Full::new(hyper::body::Bytes::new()))
        .unwrap();
    let r = http.request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    rx.changed().await.unwrap();
    let next = rx.borrow_and_update().clone();
    assert_ne!(
        next.slow_at, slow_at,
        "the round after a write makes the slow reads"
    );
    assert!(
        next.paused.iter().any(|p| p.task_name == "alpha"),
        "the pause shows in the next round: {:?}",
        next.paused
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_share_one_refresh() {
    let t = TestDb::sqlite().await;
    let client = harmonytask::Client::new(t.db.clone());
    for name in ["alpha", "beta", "gamma"] {
        for _ in 0..3 {
            client.add_task_with_args(name, &[]).await.unwrap().unwrap();
        }
    }
    let (addr, live, stop) = live_server(&t, Duration::from_millis(100)).await;
    let http = Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Empty<hyper::body::Bytes>>();
    let open = |view: &str| {
        let uri: hyper::Uri = format!("http://{addr}/events?view={view}").parse().unwrap();
        let http = http.clone();
        async move {
            let r = http.get(uri).await.expect("events");
            assert_eq!(r.status(), 200);
            let mut body = r.into_body();
            let first = first_fragment(&mut body).await;
            (body, first)
        }
    };
    const ROUNDS: u64 = 10;
    let mut streams = Vec::new();
    for view in ["%2Ftasks", "%2F"] {
        let (body, first) = open(view).await;
        assert!(first.contains("alpha"), "{first}");
        streams.push(body);
    }
    let (one, r1) = queries_over(&t.db, &live, ROUNDS).await;
    for _ in 0..18 {
        let (body, _) = open("%2Ftasks").await;
        streams.push(body);
    }
    assert_eq!(live.subscribers(), 20);
    let (twenty, r20) = queries_over(&t.db, &live, ROUNDS).await;
    // Per round, within one round's worth of queries at the edges of the windows.
    let per_round = one.div_ceil(r1);
    assert!(
        twenty * r1 <= (one + per_round) * r20,
        "20 subscribers: {twenty} queries in {r20} rounds; 1 per view: {one} in {r1}"
    );
    drop(streams);
    eventually("the streams to close", Duration::from_secs(30), || async {
        (live.subscribers() == 0).then_some(())
    })
    .await;
    stop.cancel();
}
