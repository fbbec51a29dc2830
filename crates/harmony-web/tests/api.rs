//! The web server against a real database and a real engine running real tasks, through
//! real HTTP requests, on both backends.

mod common;

use std::time::Duration;

use common::{engine, history_rows, promtool_check, serve};
use harmony_testkit::{TestDb, both_backends, eventually};
use harmonytask::TaskId;
use serde_json::Value;

/// Adds the work of the tests: 3 `ok_task` and 1 `fail_task` that end at once, 1 `hold`
/// that runs until shutdown, 7 `queued` that no node runs (they wait). Returns the ids of the
/// failing task and the held one, once every short attempt is in the history.
async fn add_work(t: &TestDb, e: &harmonytask::Engine) -> (TaskId, TaskId) {
    e.add_tasks("ok_task", 3, |_, _| async { Ok(true) })
        .await
        .unwrap();
    let failing = e
        .add_task("fail_task", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    let held = e
        .add_task("hold", |_, _| async { Ok(true) })
        .await
        .unwrap()
        .unwrap();
    e.add_tasks("queued", 7, |_, _| async { Ok(true) })
        .await
        .unwrap();
    history_rows(&t.db, 4).await;
    eventually("the held task to run", Duration::from_secs(30), || async {
        (e.status().await.ok()?.running.len() == 1).then_some(())
    })
    .await;
    (failing, held)
}

async fn reads_and_pages(t: &TestDb) {
    let e = engine(&t.db).await;
    let s = serve(&t.db, Some(&e), None, "127.0.0.1:0").await;
    let (failing, held) = add_work(t, &e).await;
    let http = &s.client;

    let h = http.get("/healthz").await.expect(200);
    assert_eq!(h.json["ok"], true);
    assert_eq!(h.json["machine"]["id"], e.machine_id().0);

    let m = http.get("/api/v1/machines").await.expect(200);
    let machines = m.json["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 1);
    assert_eq!(machines[0]["id"], e.machine_id().0);
    assert_eq!(machines[0]["unschedulable"], false);
    assert!(machines[0]["tasks"].as_str().unwrap().contains("ok_task"));

    // Pages of waiting tasks: 7 queued, in id order, 3 at a time.
    let mut seen = Vec::new();
    let mut offset = Some(0);
    while let Some(o) = offset {
        let p = http
            .get(&format!("/api/v1/tasks?state=waiting&limit=3&offset={o}"))
            .await
            .expect(200);
        assert_eq!(p.json["limit"], 3);
        for task in p.json["tasks"].as_array().unwrap() {
            assert_eq!(task["state"], "waiting");
            assert_eq!(task["name"], "queued");
            assert!(task["owner_id"].is_null());
            seen.push(task["id"].as_i64().unwrap());
        }
        offset = p.json["next_offset"].as_u64();
    }
    assert_eq!(seen.len(), 7);
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

    let r = http.get("/api/v1/tasks?state=running").await.expect(200);
    let running = r.json["tasks"].as_array().unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0]["id"], held.0);
    assert_eq!(running[0]["owner_id"], e.machine_id().0);
    let all = http.get("/api/v1/tasks").await.expect(200);
    assert_eq!(all.json["tasks"].as_array().unwrap().len(), 8);
    assert!(all.json["next_offset"].is_null());
    let typed = http.get("/api/v1/tasks?type=hold").await.expect(200);
    assert_eq!(typed.json["tasks"].as_array().unwrap().len(), 1);
    let none = http
        .get("/api/v1/tasks?type=queued&state=running")
        .await
        .expect(200);
    assert_eq!(none.json["tasks"], Value::Array(vec![]));

    // One task with its attempts.
    let f = http
        .get(&format!("/api/v1/tasks/{}", failing.0))
        .await
        .expect(200);
    assert_eq!(f.json["state"], "failed");
    assert!(f.json["task"].is_null());
    let attempts = f.json["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["result"], false);
    assert!(attempts[0]["err"].as_str().unwrap().contains("boom"));
    let h = http
        .get(&format!("/api/v1/tasks/{}", held.0))
        .await
        .expect(200);
    assert_eq!(h.json["state"], "running");
    assert_eq!(h.json["task"]["name"], "hold");
    assert_eq!(h.json["attempts"], Value::Array(vec![]));

    // History, newest first, in pages of 2 with the cursor; all 4 attempts exactly once.
    let mut ids = Vec::new();
    let mut path = "/api/v1/history?limit=2".to_owned();
    loop {
        let p = http.get(&path).await.expect(200);
        for row in p.json["history"].as_array().unwrap() {
            ids.push(row["id"].as_i64().unwrap());
        }
        match p.json["next_before"].as_i64() {
            Some(b) => path = format!("/api/v1/history?limit=2&before={b}"),
            None => break,
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((ids.len(), unique.len()), (4, 4), "{ids:?}");
    let failures = http.get("/api/v1/history?failures=true").await.expect(200);
    let rows = failures.json["history"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["task_id"], failing.0);
    let typed = http
        .get("/api/v1/history?type=ok_task&limit=500")
        .await
        .expect(200);
    assert_eq!(typed.json["history"].as_array().unwrap().len(), 3);

    // Per-type summaries.
    let ty = http.get("/api/v1/types").await.expect(200);
    let types = ty.json["types"].as_array().unwrap();
    let get = |n: &str| {
        types
            .iter()
            .find(|t| t["name"] == n)
            .unwrap_or_else(|| panic!("type {n} missing: {types:?}"))
            .clone()
    };
    assert_eq!(get("queued")["waiting"], 7);
    assert_eq!(get("queued")["waiting_capped"], false);
    assert_eq!(get("queued")["machines"], Value::Array(vec![]));
    assert_eq!(get("hold")["running"], 1);
    assert_eq!(get("ok_task")["succeeded_24h"], 3);
    assert_eq!(get("fail_task")["failed_24h"], 1);
    assert_eq!(get("ok_task")["machines"][0], e.machine_id().0);

    e.shutdown().await.unwrap();
    // The node's machine row is gone: unhealthy, and saying why.
    let h = http.get("/healthz").await.expect(503);
    assert_eq!(h.json["ok"], false);
    assert!(
        h.json["reason"].as_str().unwrap().contains("stopped"),
        "{h:?}"
    );
}

async fn bad_input(t: &TestDb) {
    let (e, release) = common::engine_with_release(&t.db).await;
    let s = serve(&t.db, Some(&e), None, "127.0.0.1:0").await;
    let (failing, held) = add_work(t, &e).await;
    let http = &s.client;
    let me = e.machine_id().0;

    http.get("/api/v1/tasks/999999")
        .await
        .error(404, &["no task 999999"]);
    http.get("/api/v1/tasks/abc").await.error(400, &["path"]);
    http.get("/api/v1/tasks?limit=0")
        .await
        .error(400, &["limit"]);
    http.get("/api/v1/tasks?limit=501")
        .await
        .error(400, &["501", "500"]);
    http.get("/api/v1/tasks?limit=x")
        .await
        .error(400, &["limit"]);
    http.get("/api/v1/tasks?state=done")
        .await
        .error(400, &["state"]);
    http.get("/api/v1/tasks?typ=hold")
        .await
        .error(400, &["typ"]);
    http.get("/api/v1/tasks?type=a%20b")
        .await
        .error(400, &["type"]);
    http.get("/api/v1/history?failures=maybe")
        .await
        .error(400, &["failures"]);
    http.get("/api/v1/history?before=x")
        .await
        .error(400, &["before"]);
    http.get("/api/v2/nothing")
        .await
        .error(404, &["/api/v2/nothing"]);
    http.send("DELETE", "/api/v1/machines", &[], Vec::new())
        .await
        .error(405, &["DELETE"]);
    http.get(&format!("/api/v1/machines/{me}/cordon"))
        .await
        .error(405, &["GET"]);

    // Writes with a bad body change nothing.
    let cordon = format!("/api/v1/machines/{me}/cordon");
    http.post_with(
        &cordon,
        &[("content-type", "application/json")],
        b"{bad".to_vec(),
    )
    .await
    .error(400, &["request body"]);
    http.post_with(&cordon, &[], br#"{"force": true}"#.to_vec())
        .await
        .error(400, &["force"]);
    http.post_with(&cordon, &[], vec![b' '; 100 * 1024])
        .await
        .error(413, &["limit"]);
    let m = http.get("/api/v1/machines").await.expect(200);
    assert_eq!(
        m.json["machines"][0]["unschedulable"], false,
        "nothing changed"
    );

    // Unknown targets.
    http.post("/api/v1/machines/424242/cordon")
        .await
        .error(404, &["424242"]);
    http.post("/api/v1/machines/424242/restart")
        .await
        .error(404, &["424242"]);
    http.post("/api/v1/tasks/999999/restart")
        .await
        .error(404, &["999999"]);
    http.post("/api/v1/types/nosuch/run-now")
        .await
        .error(404, &["nosuch", "singleton"]);
    // A running task cannot be restarted.
    http.post(&format!("/api/v1/tasks/{}/restart", held.0))
        .await
        .error(409, &["hold"]);

    // Writes that work (loopback, no token: allowed).
    let c = http
        .post_with(&cordon, &[], b"{}".to_vec())
        .await
        .expect(200);
    assert_eq!(c.json["ok"], true);
    let m = http.get("/api/v1/machines").await.expect(200);
    assert_eq!(m.json["machines"][0]["unschedulable"], true);
    http.post(&format!("/api/v1/machines/{me}/uncordon"))
        .await
        .expect(200);
    let m = http.get("/api/v1/machines").await.expect(200);
    assert_eq!(m.json["machines"][0]["unschedulable"], false);
    http.post(&format!("/api/v1/tasks/{}/restart", failing.0))
        .await
        .expect(200);
    // It fails again (one more attempt in its history), and is failed once more.
    eventually(
        "the restarted task to fail again",
        Duration::from_secs(30),
        || async {
            let r = http.get(&format!("/api/v1/tasks/{}", failing.0)).await;
            (r.json["state"] == "failed" && r.json["attempts"].as_array()?.len() == 2).then_some(())
        },
    )
    .await;

    // A restart request drains the node: once its held task ends, it stops and says why.
    http.post(&format!("/api/v1/machines/{me}/restart"))
        .await
        .expect(200);
    let m = http.get("/api/v1/machines").await.expect(200);
    assert!(
        m.json["machines"][0]["restart_request"].is_string(),
        "{m:?}"
    );
    release.cancel();
    let stopped = e.wait().await;
    assert!(
        matches!(stopped, Err(harmonytask::Error::RestartRequested)),
        "{stopped:?}"
    );
    http.get("/healthz").await.expect(503);
}

async fn metrics_pass_promtool(t: &TestDb) {
    let e = engine(&t.db).await;
    let s = serve(&t.db, Some(&e), None, "127.0.0.1:0").await;
    add_work(t, &e).await;
    let om = s
        .client
        .send(
            "GET",
            "/metrics",
            &[("accept", "application/openmetrics-text; version=1.0.0")],
            Vec::new(),
        )
        .await
        .expect(200);
    assert!(
        om.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(om.text.trim_end().ends_with("# EOF"));
    let r = s.client.get("/metrics").await.expect(200);
    assert!(
        r.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = r.text;
    for series in [
        "harmony_tasks_completed_total{task_type=\"ok_task\"} 3",
        "harmony_tasks_failed_total{task_type=\"fail_task\"} 1",
        "harmony_tasks_running{task_type=\"hold\"} 1",
        "harmony_queue_depth{task_type=\"queued\"} 7",
        "harmony_cluster_tasks_running{task_type=\"hold\"} 1",
        "harmony_cluster_counts_up 1",
        "harmony_budget{resource=\"cpu\"} 8.0",
        "harmony_reserved{resource=\"cpu\"}",
        "harmony_notifications_healthy",
        "harmony_task_duration_seconds_bucket{",
        "harmony_task_wait_seconds_count{task_type=\"ok_task\"} 3",
        "harmonydb_queries_total{backend=",
        "harmonydb_open_connections{backend=",
        "harmonydb_failovers_total{backend=",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    assert!(!text.contains("task_id"), "no label by task id");
    assert!(text.contains("# TYPE harmony_tasks_completed_total counter"));
    promtool_check(&text);

    // A server without an engine (`harmony web`): database series and cluster counts only.
    let web = serve(&t.db, None, None, "127.0.0.1:0").await;
    let r = web.client.get("/metrics").await.expect(200);
    assert!(
        r.text
            .contains("harmony_queue_depth{task_type=\"queued\"} 7")
    );
    assert!(!r.text.contains("harmony_tasks_started"));
    promtool_check(&r.text);
    let h = web.client.get("/healthz").await.expect(200);
    assert!(h.json.get("machine").is_none());
    e.shutdown().await.unwrap();
}

async fn token_policy(t: &TestDb) {
    // Loopback with a token: every write needs it.
    let s = serve(&t.db, None, Some("s3cret"), "127.0.0.1:0").await;
    let http = &s.client;
    let r = http
        .post("/api/v1/machines/1/cordon")
        .await
        .error(401, &["Bearer"]);
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    http.post_with(
        "/api/v1/machines/1/cordon",
        &[("authorization", "Bearer wrong")],
        Vec::new(),
    )
    .await
    .error(403, &["token"]);
    // The right token passes the rule (and the machine does not exist).
    http.post_with(
        "/api/v1/machines/1/cordon",
        &[("authorization", "Bearer s3cret")],
        Vec::new(),
    )
    .await
    .error(404, &["machine 1"]);
    // Reads need no token.
    http.get("/api/v1/machines").await.expect(200);
    // An unauthorized write's body is not even looked at.
    http.post_with("/api/v1/machines/1/cordon", &[], b"{bad".to_vec())
        .await
        .expect(401);

    // Beyond loopback (all addresses) without a token: read-only.
    let wide = serve(&t.db, None, None, "0.0.0.0:0").await;
    wide.client.get("/api/v1/machines").await.expect(200);
    wide.client
        .post("/api/v1/machines/1/cordon")
        .await
        .error(403, &["read-only", "--api-token"]);
    wide.client
        .post_with(
            "/api/v1/machines/1/cordon",
            &[("authorization", "Bearer anything")],
            Vec::new(),
        )
        .await
        .expect(403);
    // … and with one: writes with it.
    let wide = serve(&t.db, None, Some("s3cret"), "0.0.0.0:0").await;
    wide.client
        .post("/api/v1/machines/1/cordon")
        .await
        .expect(401);
    wide.client
        .post_with(
            "/api/v1/machines/1/cordon",
            &[("authorization", "Bearer s3cret")],
            Vec::new(),
        )
        .await
        .expect(404);
}

/// Why, cancel, cancel-waiting, pause and resume over HTTP.
async fn why_cancel_and_pause(t: &TestDb) {
    let e = engine(&t.db).await;
    let s = serve(&t.db, Some(&e), None, "127.0.0.1:0").await;
    let (_, held) = add_work(t, &e).await;
    let http = &s.client;

    // `queued` runs on no node: the answer says so, for the type and for a task of it.
    let w = http.get("/api/v1/why?type=queued").await.expect(200);
    assert_eq!(w.json["never_runs"], true, "{:?}", w.json);
    assert_eq!(w.json["waiting"], 7);
    assert!(
        w.json["summary"]
            .as_str()
            .unwrap()
            .starts_with("no live node runs queued"),
        "{:?}",
        w.json
    );
    let w = http
        .get(&format!("/api/v1/tasks/{held}/why"))
        .await
        .expect(200);
    assert_eq!(w.json["state"], "running");
    http.get("/api/v1/tasks/987654/why")
        .await
        .error(404, &["987654"]);
    http.get("/api/v1/why").await.error(400, &["type"]);
    http.get("/api/v1/why?type=a%20b")
        .await
        .error(400, &["type"]);

    // Cancel the running task: its attempt stops, the history says cancelled.
    let c = http
        .post(&format!("/api/v1/tasks/{held}/cancel"))
        .await
        .expect(200);
    assert_eq!(c.json["target"]["owner"], e.machine_id().0);
    eventually(
        "the cancelled attempt to end",
        Duration::from_secs(30),
        || async { e.status().await.ok()?.running.is_empty().then_some(()) },
    )
    .await;
    let w = http
        .get(&format!("/api/v1/tasks/{held}/why"))
        .await
        .expect(200);
    assert_eq!(w.json["state"], "cancelled", "{:?}", w.json);
    http.post(&format!("/api/v1/tasks/{held}/cancel"))
        .await
        .error(404, &[&held.to_string()]);

    // Pause and resume; cancel every waiting task of a type.
    let p = http.post("/api/v1/types/queued/pause").await.expect(200);
    assert_eq!(p.json["target"]["changed"], true);
    let w = http.get("/api/v1/why?type=queued").await.expect(200);
    assert!(
        w.json["summary"]
            .as_str()
            .unwrap()
            .starts_with("paused by web api"),
        "{:?}",
        w.json
    );
    let r = http.post("/api/v1/types/queued/resume").await.expect(200);
    assert_eq!(r.json["target"]["changed"], true);
    let c = http
        .post("/api/v1/types/queued/cancel-waiting")
        .await
        .expect(200);
    assert_eq!(c.json["target"]["cancelled"], 7);
    http.post("/api/v1/types/a%20b/pause")
        .await
        .error(400, &["type"]);
    e.shutdown().await.unwrap();
}

both_backends!(
    reads_and_pages,
    bad_input,
    metrics_pass_promtool,
    token_policy,
    why_cancel_and_pause
);

#[tokio::test]
async fn a_taken_port_is_a_clear_error() {
    let t = TestDb::sqlite().await;
    let first = harmony_web::WebServer::builder(t.db.clone())
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let addr = first.local_addr().to_string();
    let err = harmony_web::WebServer::builder(t.db.clone())
        .bind(&addr)
        .await
        .err()
        .expect("the second bind fails");
    let text = err.to_string();
    assert!(text.contains(&addr) && text.contains("in use"), "{text}");
}

#[tokio::test]
async fn write_modes_follow_the_listener() {
    let t = TestDb::sqlite().await;
    let mode = |listen: &'static str, token: Option<&'static str>| {
        let db = t.db.clone();
        async move {
            harmony_web::WebServer::builder(db)
                .token(token.and_then(harmony_web::ApiToken::new))
                .bind(listen)
                .await
                .unwrap()
                .write_mode()
        }
    };
    use harmony_web::WriteMode::*;
    assert_eq!(mode("127.0.0.1:0", None).await, OpenOnLoopback);
    assert_eq!(mode("[::1]:0", None).await, OpenOnLoopback);
    assert_eq!(mode("0.0.0.0:0", None).await, ReadOnly);
    assert_eq!(mode("0.0.0.0:0", Some("t")).await, TokenRequired);
    assert_eq!(mode("127.0.0.1:0", Some("t")).await, TokenRequired);
}
