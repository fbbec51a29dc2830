//! `harmony config …` and `harmony run --layers`: layers merge in order with flags and the
//! environment above them, invalid layers are refused with their line and key, every version
//! is kept, and a running node applies a changed layer without its process restarting. On
//! SQLite (the CLI and the node are separate processes on one file) and Postgres.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};

harmony_testkit::both_backends!(
    layers_merge_in_order_below_env_and_flags,
    an_invalid_layer_is_refused_with_its_line_and_key,
    history_and_diff_keep_every_version,
    a_running_node_applies_a_changed_max_and_a_new_type,
    a_change_the_node_cannot_run_is_not_applied,
);

/// Writes `text` to `dir/name.toml` and runs `harmony config set NAME FILE`.
async fn set(db: &str, dir: &Path, name: &str, text: &str) -> Output {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, text).unwrap();
    harmony(&["--db", db, "config", "set", name, file.to_str().unwrap()]).await
}

async fn set_ok(db: &str, dir: &Path, name: &str, text: &str) {
    let out = set(db, dir, name, text).await;
    assert_eq!(out.code, Some(0), "config set {name}: {}", out.stderr);
}

/// `harmony --json config resolved --layers LAYERS` with extra environment variables:
/// key → (value, source as "kind:name").
async fn resolved(
    db: &str,
    layers: &str,
    env: &[(&str, &str)],
) -> std::collections::BTreeMap<String, (String, String)> {
    let mut cmd = tokio::process::Command::new(HARMONY);
    cmd.args([
        "--db", db, "--json", "config", "resolved", "--layers", layers,
    ])
    .env_remove("HARMONY_DB")
    .stdin(Stdio::null());
    for key in ["HARMONY_POLL_INTERVAL", "HARMONY_CLAIM_BATCH_MAX"] {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("run harmony");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let source = format!(
                "{}:{}",
                r["source"]["kind"].as_str().unwrap(),
                r["source"]["name"].as_str().unwrap_or("")
            );
            (
                r["key"].as_str().unwrap().to_owned(),
                (r["value"].as_str().unwrap().to_owned(), source),
            )
        })
        .collect()
}

async fn layers_merge_in_order_below_env_and_flags(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    set_ok(
        db,
        dir.path(),
        "base",
        "[engine]\npoll_interval = \"30s\"\nclaim_batch_max = 10\ndead_after = \"20s\"\n",
    )
    .await;
    set_ok(
        db,
        dir.path(),
        "a",
        "[engine]\npoll_interval = \"5s\"\nclaim_batch_max = 11\n",
    )
    .await;
    set_ok(db, dir.path(), "b", "[engine]\nclaim_batch_max = 12\n").await;

    let r = resolved(db, "a,b", &[]).await;
    assert_eq!(r["engine.poll_interval"], ("5s".into(), "layer:a".into()));
    assert_eq!(r["engine.claim_batch_max"], ("12".into(), "layer:b".into()));
    assert_eq!(r["engine.dead_after"], ("20s".into(), "layer:base".into()));
    assert_eq!(
        r["engine.heartbeat_interval"],
        ("5s".into(), "default:".into())
    );
    // Order matters: b before a lets a win.
    let r = resolved(db, "b,a", &[]).await;
    assert_eq!(r["engine.claim_batch_max"], ("11".into(), "layer:a".into()));
    // The environment beats every layer.
    let r = resolved(db, "a,b", &[("HARMONY_POLL_INTERVAL", "2s")]).await;
    assert_eq!(
        r["engine.poll_interval"],
        ("2s".into(), "env:HARMONY_POLL_INTERVAL".into())
    );

    // A node reads them the same way, and a flag beats them all.
    let node = Node::start_plain(
        db,
        dir.path(),
        &["--layers", "a,b", "--poll-interval", "150ms"],
    );
    node.wait_log(&[
        "node running",
        "layers=base,a,b",
        "poll_interval=150ms",
        "claim_batch_max=12",
        "dead_after=20s",
    ])
    .await;
    let out = harmony(&["--db", db, "--json", "machine", "ls"])
        .await
        .json();
    assert_eq!(out[0]["layers"], "base,a,b", "{out}");

    // A layer that does not exist stops a node before it registers.
    let out = harmony(&[
        "--db",
        db,
        "run",
        "--layers",
        "nope",
        "--listen",
        "127.0.0.1:1",
    ])
    .await;
    out.assert_usage_error(&["--layers", "\"nope\" does not exist"]);
}

async fn an_invalid_layer_is_refused_with_its_line_and_key(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    set_ok(db, dir.path(), "a", "[engine]\npoll_interval = \"5s\"\n").await;
    let cases: &[(&str, &[&str])] = &[
        (
            "[engine]\npoll_interval = \"5s\"\nheartbeat_interval = 3\n",
            &[
                "layer \"a\" line 3",
                "engine.heartbeat_interval",
                "duration",
            ],
        ),
        (
            "[engine]\n\n\ndead_after = \"0s\"\n",
            &["line 4", "engine.dead_after", "positive"],
        ),
        (
            "[engine]\npoll = \"1s\"\n",
            &["line 2", "engine.poll", "unknown key"],
        ),
        ("[engin]\n", &["line 1", "engin", "unknown field"]),
        ("[engine\n", &["line 1"]),
        (
            "[[task]]\nname = \"t\"\nbuiltin = \"bench_noop\"\nmax = -1\n",
            &["line 4", "task \"t\"", "max"],
        ),
    ];
    for (text, needles) in cases {
        let out = set(db, dir.path(), "a", text).await;
        out.assert_usage_error(needles);
    }
    // Nothing was written: the layer is what it was, with one version.
    let out = harmony(&["--db", db, "config", "get", "a"]).await;
    assert_eq!(out.stdout, "[engine]\npoll_interval = \"5s\"\n");
    let h = harmony(&["--db", db, "--json", "config", "history", "a"])
        .await
        .json();
    assert_eq!(h.as_array().unwrap().len(), 1, "{h}");
}

async fn history_and_diff_keep_every_version(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    set_ok(
        db,
        dir.path(),
        "a",
        "[engine]\npoll_interval = \"5s\"\ndead_after = \"9s\"\n",
    )
    .await;
    set_ok(
        db,
        dir.path(),
        "a",
        "[engine]\npoll_interval = \"7s\"\ndead_after = \"9s\"\n",
    )
    .await;
    // The same text again is no new version.
    let out = set(
        db,
        dir.path(),
        "a",
        "[engine]\npoll_interval = \"7s\"\ndead_after = \"9s\"\n",
    )
    .await;
    assert!(out.stdout.contains("unchanged"), "{}", out.stdout);
    set_ok(db, dir.path(), "a", "[engine]\ndead_after = \"9s\"\n").await;

    let h = harmony(&["--db", db, "--json", "config", "history", "a"])
        .await
        .json();
    let versions: Vec<(i64, String)> = h
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_i64().unwrap(),
                v["config"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(versions.len(), 3, "{h}");
    assert_eq!(
        versions[1],
        (
            2,
            "[engine]\npoll_interval = \"7s\"\ndead_after = \"9s\"\n".into()
        )
    );
    assert!(h[0]["changed_at"].is_string(), "{h}");

    // Default: the version before the last against the current text.
    let out = harmony(&["--db", db, "config", "diff", "a"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let body: Vec<&str> = out.stdout.lines().skip(2).collect();
    assert_eq!(
        body,
        [
            " [engine]",
            "-poll_interval = \"7s\"",
            " dead_after = \"9s\""
        ]
    );
    let out = harmony(&["--db", db, "config", "diff", "a", "1"]).await;
    assert!(out.stdout.contains("--- a version 1"), "{}", out.stdout);
    assert!(
        out.stdout.contains("-poll_interval = \"5s\""),
        "{}",
        out.stdout
    );
    harmony(&["--db", db, "config", "diff", "a", "9"])
        .await
        .assert_usage_error(&["no version 9"]);

    // Removing a layer keeps its history.
    let list = harmony(&["--db", db, "--json", "config", "list"])
        .await
        .json();
    assert_eq!(list[0]["title"], "a", "{list}");
    assert_eq!(
        harmony(&["--db", db, "config", "rm", "a"]).await.code,
        Some(0)
    );
    harmony(&["--db", db, "config", "get", "a"])
        .await
        .assert_usage_error(&["\"a\" does not exist"]);
    let h = harmony(&["--db", db, "--json", "config", "history", "a"])
        .await
        .json();
    assert_eq!(h.as_array().unwrap().len(), 3, "{h}");
}

const ONE_AT_A_TIME: &str = r#"
[[task]]
name = "slow"
builtin = "bench_sleep"
max = 1
"#;

const THREE_AND_A_NEW_TYPE: &str = r#"
[[task]]
name = "slow"
builtin = "bench_sleep"
max = 3

[[task]]
name = "fresh"
builtin = "bench_noop"
"#;

async fn a_running_node_applies_a_changed_max_and_a_new_type(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    set_ok(db, dir.path(), "work", ONE_AT_A_TIME).await;
    let mut node = Node::start_plain(
        db,
        dir.path(),
        &[
            "--layers",
            "work",
            "--poll-interval",
            "100ms",
            "--shutdown-grace",
            "10s",
        ],
    );
    let pid = node.child.id();
    node.wait_log(&["node running", "types=slow"]).await;
    let first = add_sleeps(db, "slow", 4, 150).await;
    wait_succeeded(t, "slow", 4, Duration::from_secs(60)).await;
    let by_task = attempts(t).await;
    assert_eq!(max_concurrent(&by_task, &first), 1, "max = 1 held");

    // The layer changes: the node picks it up without its process restarting.
    set_ok(db, dir.path(), "work", THREE_AND_A_NEW_TYPE).await;
    eventually(
        "the node to run the new type",
        Duration::from_secs(30),
        || async move {
            let out = harmony(&["--db", db, "--json", "machine", "ls"])
                .await
                .json();
            let tasks = out[0]["tasks"].as_str().unwrap_or("").to_owned();
            (tasks.split(',').any(|t| t == "fresh")).then_some(())
        },
    )
    .await;
    assert!(node.is_running(), "the node process kept running");
    assert_eq!(node.child.id(), pid);

    let second = add_sleeps(db, "slow", 6, 1500).await;
    wait_count(
        t,
        "three slow attempts at once",
        Duration::from_secs(30),
        3,
        "SELECT count(*) FROM harmony_test_attempt WHERE ended IS NULL",
        &[],
    )
    .await;
    harmony(&["--db", db, "task", "add", "fresh"]).await;
    wait_succeeded(t, "fresh", 1, Duration::from_secs(30)).await;
    wait_succeeded(t, "slow", 10, Duration::from_secs(60)).await;
    let by_task = attempts(t).await;
    assert_eq!(max_concurrent(&by_task, &second), 3, "max = 3 applied");

    // A layer that no longer checks as a whole (it follows a type nobody declares) is not
    // applied; the node says so and keeps running what it ran.
    set_ok(
        db,
        dir.path(),
        "work",
        "[[task]]\nname = \"slow\"\nbuiltin = \"bench_sleep\"\nfollows = [\"elsewhere\"]\n",
    )
    .await;
    layers_not_applied(db).await;
    let out = harmony(&["--db", db, "--json", "machine", "ls"])
        .await
        .json();
    assert!(out[0]["tasks"].as_str().unwrap().contains("fresh"), "{out}");
    assert!(node.is_running());
}

/// Waits until `machine ls` says the node did not apply its layers; returns its LAYERS text.
async fn layers_not_applied(db: &str) -> String {
    eventually(
        "machine ls to say the layers were not applied",
        Duration::from_secs(30),
        || async move {
            let out = harmony(&["--db", db, "--json", "machine", "ls"])
                .await
                .json();
            let layers = out[0]["layers"].as_str().unwrap_or("").to_owned();
            layers.contains("not applied").then_some(layers)
        },
    )
    .await
}

async fn a_change_the_node_cannot_run_is_not_applied(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    set_ok(db, dir.path(), "work", ONE_AT_A_TIME).await;
    let mut node = Node::start_plain(
        db,
        dir.path(),
        &[
            "--layers",
            "work",
            "--types",
            "slow",
            "--poll-interval",
            "100ms",
        ],
    );
    node.wait_log(&["node running", "types=slow"]).await;
    // The layer checks on its own, but this node was told to run `slow`, which it no longer
    // declares: the node keeps running `slow` and says why it did not apply the change.
    set_ok(
        db,
        dir.path(),
        "work",
        "[[task]]\nname = \"fresh\"\nbuiltin = \"bench_noop\"\n",
    )
    .await;
    let layers = layers_not_applied(db).await;
    assert!(layers.contains("--types"), "{layers}");
    assert!(node.is_running());
    add_sleeps(db, "slow", 1, 10).await;
    wait_succeeded(t, "slow", 1, Duration::from_secs(30)).await;
}
