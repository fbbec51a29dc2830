//! `harmony task why|cancel|pause|resume` and the WHY column of `task ls`, against a real
//! node process, on SQLite (the CLI and the node are separate processes on one file) and
//! Postgres.

mod common;

use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};

harmony_testkit::both_backends!(operators_ask_why_and_steer);

async fn operators_ask_why_and_steer(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        r#"
[[task]]
name = "hang"
command = ["sh", "-c", "echo $$ > \"$0\"; exec sleep 30", "{arg.pidfile}"]

[[task]]
name = "big"
command = ["true"]
cost = { ram = "100GiB" }
"#,
    );
    let file = file.to_str().unwrap();
    let node = Node::start(
        db,
        dir.path(),
        &[
            "--tasks",
            file,
            "--ram",
            "8GiB",
            "--poll-interval",
            "100ms",
            "--heartbeat-interval",
            "200ms",
            "--shutdown-grace",
            "0s",
        ],
    );
    let machine = node.machine_id(t).await;
    let json = |args: Vec<String>| async move {
        let mut full = vec!["--db".to_owned(), db.to_owned(), "--json".to_owned()];
        full.extend(args);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        harmony(&refs).await.json()
    };
    let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();

    // A type no node runs says so, for the task and for the type.
    let ghost =
        added_ids(&harmony(&["--db", db, "--json", "task", "add", "ghost", "--force"]).await)[0];
    let w = json(args(&format!("task why {ghost}"))).await;
    assert_eq!(w["state"], "waiting", "{w}");
    assert_eq!(w["type_why"]["never_runs"], true, "{w}");
    let out = harmony(&["--db", db, "task", "why", &ghost.to_string()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("no live node runs ghost"),
        "{}",
        out.stdout
    );

    // A cost beyond the node's budget: the node reports it.
    harmony(&["--db", db, "task", "add", "big"]).await;
    let w = eventually(
        "the node to report that big never fits",
        Duration::from_secs(30),
        || async move {
            let w = json(args("task why --type big")).await;
            (w["nodes"][0]["reason"] == "never_fits").then_some(w)
        },
    )
    .await;
    assert_eq!(w["never_runs"], true, "{w}");
    assert_eq!(w["nodes"][0]["machine_id"], machine, "{w}");
    let out = harmony(&["--db", db, "task", "why", "--type", "big"]).await;
    assert!(
        out.stdout.contains("no node can ever run big"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("ram"), "{}", out.stdout);
    // `task ls` answers why for each waiting task.
    let out = harmony(&["--db", db, "task", "ls"]).await;
    assert!(
        out.stdout.lines().next().unwrap().contains("WHY"),
        "{}",
        out.stdout
    );
    let listed = json(args("task ls")).await;
    let big_row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "big")
        .unwrap()
        .clone();
    assert!(
        big_row["why"]
            .as_str()
            .unwrap()
            .contains("no node can ever run big"),
        "{big_row}"
    );

    // Cancel a running command task: its process is stopped, the history says cancelled.
    let pid_file = dir.path().join("hang.pid");
    let pid_arg = format!("pidfile={}", pid_file.display());
    let hang = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "hang", "--arg", &pid_arg,
        ])
        .await,
    )[0];
    eventually("the hang task to start", Duration::from_secs(30), || {
        let p = pid_file.clone();
        async move {
            std::fs::read_to_string(&p)
                .ok()
                .filter(|s| !s.trim().is_empty())
        }
    })
    .await;
    let out = harmony(&["--db", db, "task", "cancel", &hang.to_string()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("was running on machine"),
        "{}",
        out.stdout
    );
    wait_process_gone(&pid_file).await;
    let shown = json(args(&format!("task show {hang}"))).await;
    assert_eq!(shown["state"], "cancelled", "{shown}");
    let outcomes: Vec<&str> = shown["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["cancelled"],
        "no later result is recorded: {shown}"
    );
    // An unknown id is refused by name, and nothing else happens.
    harmony(&["--db", db, "task", "cancel", &hang.to_string(), "987654"])
        .await
        .assert_usage_error(&["987654", &hang.to_string()]);

    // Pause: nothing of the type is claimed until resume.
    let out = harmony(&["--db", db, "task", "pause", "hang"]).await;
    assert!(out.stdout.contains("paused"), "{}", out.stdout);
    let held = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "hang", "--count", "3", "--arg", &pid_arg,
        ])
        .await,
    );
    let w = json(args("task why --type hang")).await;
    assert!(
        w["summary"].as_str().unwrap().starts_with("paused by cli:"),
        "{w}"
    );
    assert_eq!(w["waiting"], 3, "{w}");
    // Cancel every waiting one, then resume.
    let c = json(args("task cancel --type hang --all-waiting")).await;
    assert_eq!(c["cancelled"], 3, "{c}");
    for id in held {
        let s = json(args(&format!("task show {id}"))).await;
        assert_eq!(s["state"], "cancelled", "{s}");
    }
    let r = json(args("task resume hang")).await;
    assert_eq!(r["resumed"], true, "{r}");

    // Bad input.
    harmony(&["--db", db, "task", "why"])
        .await
        .assert_usage_error(&["required"]);
    harmony(&["--db", db, "task", "pause", "no such"])
        .await
        .assert_usage_error(&["NAME"]);
    harmony(&["--db", db, "task", "cancel", "--all-waiting"])
        .await
        .assert_usage_error(&["--type"]);
    drop(node);
}
