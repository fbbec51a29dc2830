//! The `harmony` binary's commands, run as child processes: bad input is refused with one clear
//! line and writes nothing; the task and machine commands show what nodes did; the demo runs.

mod common;

use std::time::Duration;

use common::*;
use harmony_testkit::{TestDb, eventually};
use harmonydb::Executor;
use nix::sys::signal::Signal;

harmony_testkit::both_backends!(
    machine_ls_shows_the_cpu_budget_as_given,
    task_prune_deletes_old_history,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_task_add_input_is_refused_and_writes_nothing() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();

    let out = harmony(&["--db", db, "task", "add", "no_such_type"]).await;
    out.assert_usage_error(&[
        "unknown task type \"no_such_type\"",
        "bench_noop",
        "--force",
    ]);

    let out = harmony(&["--db", db, "task", "add", "a_name_of_twenty_ch"]).await;
    out.assert_usage_error(&["19 characters", "limit is 16"]);

    let sql = "x'); DROP TABLE harmony_task;--";
    let out = harmony(&["--db", db, "task", "add", sql]).await;
    out.assert_usage_error(&["31 characters", "limit is 16"]);
    // Even with --force (which skips only the known-type check).
    let out = harmony(&["--db", db, "task", "add", "--force", "x');DROP--"]).await;
    out.assert_usage_error(&["contains '\\''"]);
    let out = harmony(&["--db", db, "task", "add", "bad name"]).await;
    out.assert_usage_error(&["contains ' '"]);

    let out = harmony(&["--db", db, "task", "add", "bench_noop", "--count", "0"]).await;
    out.assert_usage_error(&["--count"]);
    let out = harmony(&["--db", db, "task", "add", "bench_noop", "--arg", "noequals"]).await;
    out.assert_usage_error(&["KEY=VALUE"]);
    let out = harmony(&["--db", db, "task", "add", "bench_noop", "--arg", "a;b=1"]).await;
    out.assert_usage_error(&["not a valid argument name"]);
    let big = format!("v={}", "x".repeat(100_000));
    let out = harmony(&["--db", db, "task", "add", "bench_noop", "--arg", &big]).await;
    out.assert_usage_error(&["the limit is 65536"]);
    let out = harmony(&["--db", db, "task", "ls", "--type", "x;y"]).await;
    out.assert_usage_error(&["--type"]);

    assert_nothing_written(&t).await;
    // The table the injection-shaped name aimed at is still there and usable.
    let ok = harmony(&["--db", db, "--json", "task", "add", "bench_noop"]).await;
    assert_eq!(added_ids(&ok).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_run_input_is_refused_and_writes_nothing() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();

    let out = harmony(&["--db", db, "run", "--ram", "12XB"]).await;
    out.assert_usage_error(&["--ram", "12XB", "unknown unit \"XB\""]);
    let out = harmony(&["--db", db, "run", "--cpu", "-4"]).await;
    out.assert_usage_error(&["--cpu", "non-negative", "-4"]);
    let out = harmony(&["--db", db, "run", "--gpu", "1e12"]).await;
    out.assert_usage_error(&["--gpu", "absurdly large"]);
    let out = harmony(&["--db", db, "run", "--ram", "99999999TiB"]).await;
    out.assert_usage_error(&["--ram", "out of range"]);
    let out = harmony(&["--db", db, "run", "--builtin", "--types", "bench_noop,nope"]).await;
    out.assert_usage_error(&["--types", "\"nope\"", "bench_sleep"]);
    let out = harmony(&["--db", db, "run", "--listen", "nowhere"]).await;
    out.assert_usage_error(&["--listen", "HOST:PORT"]);
    let out = harmony(&["--db", db, "run", "--poll-interval", "soon"]).await;
    out.assert_usage_error(&["--poll-interval"]);
    let out = harmony(&[
        "--db",
        db,
        "run",
        "--dead-after",
        "1s",
        "--heartbeat-interval",
        "2s",
    ])
    .await;
    out.assert_usage_error(&["dead_after", "--dead-after"]);

    // Invalid tasks files: the message names the file, the line, the task and the field.
    let cases: &[(&str, &[&str])] = &[
        (
            "[[task]]\nname = \"enc\"\ncommand = [\"true\"]\ncost = { cpu = -1 }\n",
            &["line 4", "task \"enc\"", "cost.cpu", "non-negative", "-1"],
        ),
        (
            "[[task]]\nname = \"enc\"\ncommand = [\"true\"]\n\ncost = { gpu = 1e9 }\n",
            &["line 5", "task \"enc\"", "cost.gpu", "absurdly large"],
        ),
        (
            "[[task]]\nname = \"enc\"\ncommand = [\"true\"]\ncost = { ram = \"12XB\" }\n",
            &["line 4", "cost.ram", "unknown unit \"XB\""],
        ),
        (
            "[[task]]\nname = \"enc\"\ncommand = [\"true\"]\ncost = { ram = \"9000000TiB\" }\n",
            &["line 4", "cost.ram"],
        ),
        (
            "[[task]]\nname = \"enc\"\ncommand = [\"true\"]\nmax = \"two\"\n",
            &["line 4", "task \"enc\"", "max:", "whole number"],
        ),
        (
            "[[task]]\nname = \"enc\"\ncommand = [\"true\"]\ncolour = \"red\"\n",
            &["line 4", "task \"enc\"", "unknown field `colour`"],
        ),
        (
            "[[task]]\nname = \"this_name_is_too_long\"\ncommand = [\"true\"]\n",
            &["line 2", "name:", "limit is 16"],
        ),
        (
            "[[task]]\nname = \"x');DROP--\"\ncommand = [\"true\"]\n",
            &["line 2", "name:", "use only"],
        ),
        (
            "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\n\n[[task]]\nname = \"a\"\nbuiltin = \"bench_sleep\"\n",
            &["line 5", "task \"a\"", "already declared on line 1"],
        ),
        (
            "[[task]]\nname = \"bench_sleep\"\nbuiltin = \"bench_sleep\"\n",
            &["line 1", "is a built-in type"],
        ),
        (
            "[[task]]\nname = \"a\"\ncommand = [\"echo\", \"{arg.}\"]\n",
            &["line 3", "command:", "unknown placeholder"],
        ),
        (
            "[[task]]\nname = \"enc\"\ncommand = [\"echo\", \"a\\u0000b\"]\n",
            &[
                "line 3",
                "task \"enc\"",
                "command:",
                "element 1",
                "NUL character",
            ],
        ),
        (
            "[[task]]\nname = \"a\"\ncommand = [\"true\"]\nretry_wait = \"soon\"\n",
            &["line 4", "retry_wait:", "not a duration"],
        ),
        ("[[task]]\nname = \"a\"\ncommand = [\"true\"\n", &["line 3"]),
        (
            "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nfollows = [\"stage0\"]\n",
            &[
                "line 4",
                "task \"a\"",
                "follows:",
                "unknown task type \"stage0\"",
            ],
        ),
        (
            "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nmay_follow = [\"b\"]\n\n[[task]]\nname = \"b\"\nbuiltin = \"bench_noop\"\nmay_follow = [\"a\"]\n",
            &["line 4", "task \"a\"", "may_follow:", "cycle a -> b -> a"],
        ),
        (
            "[[task]]\nname = \"a\"\nbuiltin = \"bench_noop\"\nsingleton = \"often\"\n",
            &["line 4", "task \"a\"", "singleton:", "not a duration"],
        ),
    ];
    for (text, needles) in cases {
        let file = tasks_file(dir.path(), text);
        let file = file.to_str().unwrap();
        let out = harmony(&["--db", db, "run", "--tasks", file]).await;
        let mut all = vec![file];
        all.extend_from_slice(needles);
        out.assert_usage_error(&all);
        // task add reads the same file the same way.
        let out = harmony(&["--db", db, "task", "add", "a", "--tasks", file]).await;
        out.assert_usage_error(&all);
    }
    let out = harmony(&["--db", db, "run", "--tasks", "/no/such/tasks.toml"]).await;
    out.assert_usage_error(&["/no/such/tasks.toml"]);

    assert_nothing_written(&t).await;
}

/// A tasks file that is not a regular file is refused before it is opened: a FIFO would block
/// start-up until a writer came, a device such as /dev/zero would be read until memory ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_files_that_are_not_regular_files_are_refused() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("tasks.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed");
    let fifo = fifo.to_str().unwrap();
    let folder = dir.path().to_str().unwrap();
    for (path, what) in [
        (fifo, "is a FIFO (named pipe)"),
        ("/dev/zero", "is a character device"),
        (folder, "is a directory"),
    ] {
        let out = harmony(&["--db", db, "run", "--tasks", path]).await;
        out.assert_usage_error(&[path, what, "not a regular file"]);
        let out = harmony(&["--db", db, "task", "add", "a", "--tasks", path]).await;
        out.assert_usage_error(&[path, what, "not a regular file"]);
    }
    assert_nothing_written(&t).await;
}

/// SIGTERM stops a node that is still starting: here it waits on a database server that
/// accepted its connection and never answers (a hung server, a black-holed network).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_node_during_start_up() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::channel::<()>(1);
    let silent_server = tokio::spawn(async move {
        // Keep every connection open and never say a word.
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            let _ = accepted_tx.try_send(());
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://harmony@127.0.0.1:{port}/harmony?connect_timeout=600");
    let mut node = Node::start(&url, dir.path(), &[]);
    tokio::time::timeout(Duration::from_secs(60), accepted.recv())
        .await
        .expect("the node to connect to the silent server");

    node.signal(Signal::SIGTERM);
    // Well inside the 600 s the connection attempt would otherwise wait.
    assert_eq!(node.exit_code(Duration::from_secs(60)).await, Some(0));
    assert!(
        node.log().contains("signal received during start-up"),
        "{}",
        node.log()
    );
    silent_server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_and_run_now_refuse_unknown_targets() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let out = harmony(&["--db", db, "machine", "cordon", "999"]).await;
    out.assert_usage_error(&["no machine with id 999", "no machine is registered"]);
    let out = harmony(&["--db", db, "machine", "restart", "--self"]).await;
    out.assert_usage_error(&["no machine registered as 127.0.0.1:4701", "--listen"]);
    let out = harmony(&[
        "--db", db, "machine", "uncordon", "--self", "--listen", "nowhere",
    ])
    .await;
    out.assert_usage_error(&["--listen", "HOST:PORT"]);
    let out = harmony(&["--db", db, "machine", "uncordon", "5", "--listen", "a:1"]).await;
    out.assert_usage_error(&["--listen only goes with --self"]);
    let out = harmony(&["--db", db, "machine", "cordon"]).await;
    out.assert_usage_error(&["<ID|--self>"]);
    let out = harmony(&["--db", db, "machine", "cordon", "1", "--self"]).await;
    out.assert_usage_error(&["cannot be used with"]);
    let out = harmony(&["--db", db, "task", "run-now", "nope"]).await;
    out.assert_usage_error(&[
        "\"nope\" is not a singleton",
        "run-now only applies to singleton types",
        "singleton types: none",
    ]);
    let out = harmony(&["--db", db, "task", "run-now", "x');DROP--"]).await;
    out.assert_usage_error(&["contains '\\''"]);
    let out = harmony(&["--db", db, "--notify", "maybe", "task", "ls"]).await;
    out.assert_usage_error(&["--notify", "on, off"]);
    let out = harmony(&["--db", db, "run", "--iambored-interval", "0s"]).await;
    out.assert_usage_error(&["iambored_interval must be positive", "--iambored-interval"]);
    let out = harmony(&["--db", db, "run", "--poll-interval-unhealthy", "0s"]).await;
    out.assert_usage_error(&["--poll-interval-unhealthy"]);
    let out = harmony(&["--db", db, "run", "--change-check-interval", "soon"]).await;
    out.assert_usage_error(&["--change-check-interval"]);
    assert_nothing_written(&t).await;
    assert_eq!(
        count(&t, "SELECT count(*) FROM harmony_task_singletons").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_do_not_create_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.db");
    let url = format!("sqlite://{}", path.display());
    for args in [
        vec!["task", "ls"],
        vec!["task", "show", "1"],
        vec!["task", "history"],
        vec!["machine", "ls"],
    ] {
        let mut all = vec!["--db", url.as_str()];
        all.extend(args);
        let out = harmony(&all).await;
        assert_ne!(out.code, Some(0), "{all:?}");
        assert_eq!(out.stderr_lines().len(), 1, "{}", out.stderr);
        assert!(!path.exists(), "{all:?} created the database");
    }
}

/// The commands that work on what nodes wrote.
const READING: &[&[&str]] = &[
    &["task", "ls"],
    &["task", "show", "1"],
    &["task", "history"],
    &["task", "restart", "1"],
    &["task", "run-now", "bench_noop"],
    &["machine", "ls"],
    &["machine", "cordon", "1"],
    &["task", "prune", "--older-than", "7d"],
];

/// Pointed at a database that was never migrated, they say so and how to fix it, instead of
/// `no such table`; and they create nothing in it. `db status` still reports its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_a_database_without_a_harmony_schema_say_to_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.db");
    std::fs::File::create(&path).unwrap();
    let sqlite = format!("sqlite://{}", path.display());
    let mut urls = vec![sqlite.clone()];
    let pg_schema = format!("t_{}", harmony_testkit::unique_suffix());
    let pg = harmony_testkit::postgres_or_skip("no_schema").await;
    if pg {
        urls.push(harmony_testkit::with_option(
            &harmony_testkit::pg_base_url(),
            "schema",
            &pg_schema,
        ));
    }
    for url in &urls {
        for args in READING {
            let mut all = vec!["--db", url.as_str()];
            all.extend_from_slice(args);
            let out = harmony(&all).await;
            out.assert_usage_error(&["has no Harmony schema", "run `harmony db migrate`"]);
        }
        let out = harmony(&["--db", url, "db", "status"]).await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        assert!(
            out.stdout.contains("schema version:  none"),
            "{}",
            out.stdout
        );
    }
    let db = harmonydb::Db::open(
        harmonydb::DbConfig::from_url(&format!("{sqlite}?migrate=false")).unwrap(),
    )
    .await
    .unwrap();
    let tables: i64 = db
        .scalar("SELECT count(*) FROM sqlite_master", &[])
        .await
        .unwrap();
    assert_eq!(tables, 0, "a read-only command wrote to the database");
    if pg {
        // Opening a Postgres database creates the (empty) schema; drop it, on a thread of its
        // own because the cleanup runs its own runtime.
        let base = harmony_testkit::pg_base_url();
        std::thread::spawn(move || harmony_testkit::drop_schema(&base, &pg_schema))
            .join()
            .unwrap();
    }
}

/// A database migrated by a newer binary is refused by every command, as `harmony run` refuses
/// it, rather than read with a schema this binary does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_refuse_a_database_newer_than_the_binary() {
    let t = TestDb::sqlite().await;
    t.db.exec(
        "INSERT INTO harmony_schema_migrations (version, name, checksum, applied_at) VALUES (9999, '9999_future', 'x', $1)",
        &[&harmonydb::Timestamp::from_millis(0)],
    )
    .await
    .unwrap();
    let db = t.url.as_str();
    let run = harmony(&["--db", db, "run"]).await;
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stderr.contains("upgrade harmony"), "{}", run.stderr);
    let mut commands: Vec<&[&str]> = READING.to_vec();
    commands.push(&["db", "status"]);
    commands.push(&["db", "migrate"]);
    for args in commands {
        let mut all = vec!["--db", db];
        all.extend_from_slice(args);
        let out = harmony(&all).await;
        assert_eq!(out.code, run.code, "{all:?}: {}", out.stderr);
        let lines = out.stderr_lines();
        assert_eq!(lines.len(), 1, "{all:?}: {lines:#?}");
        assert!(
            lines[0].starts_with("error: ")
                && lines[0].contains("version 9999")
                && lines[0].contains("upgrade harmony"),
            "{all:?}: {}",
            lines[0]
        );
    }
}

/// A node runs built-in and command types; the task commands show pending, running, done and
/// failed tasks with their attempts; a failed task can be restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_commands_follow_a_node() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(
        dir.path(),
        r#"
[[task]]
name = "echo"
command = ["sh", "-c", "test \"$0\" = \"{arg.word}\" && test \"$HARMONY_TASK_ID\" = \"{task_id}\" && test \"$GREETING\" = hi", "{arg.word}"]
env = { GREETING = "hi" }

[[task]]
name = "grumpy"
command = ["sh", "-c", "echo 'nothing to see' >&2; echo 'disk on fire' >&2; exit 3"]
max_failures = 2

[[task]]
name = "needs_arg"
command = ["echo", "{arg.input}"]
max_failures = 1

[[task]]
name = "slow"
command = ["sh", "-c", "echo $$ > \"$0\"; exec sleep 30", "{arg.pidfile}"]
timeout = "300ms"
max_failures = 1

[[task]]
name = "hang"
command = ["sh", "-c", "echo $$ > \"$0\"; exec sleep 30", "{arg.pidfile}"]
"#,
    );
    let file = file.to_str().unwrap();

    // Before any node runs, the tasks file makes its types known to `task add`.
    let word = "x'); DROP TABLE harmony_task;--";
    let arg = format!("word={word}");
    let echo = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "echo", "--tasks", file, "--arg", &arg,
        ])
        .await,
    )[0];
    let listed = harmony(&["--db", db, "--json", "task", "ls"]).await.json();
    assert_eq!(listed[0]["id"], echo);
    assert_eq!(listed[0]["state"], "pending");
    let shown = harmony(&["--db", db, "--json", "task", "show", &echo.to_string()])
        .await
        .json();
    assert_eq!(shown["state"], "pending");
    assert_eq!(shown["args"]["word"], word);

    let mut node = Node::start(
        db,
        dir.path(),
        &[
            "--tasks",
            file,
            "--poll-interval",
            "100ms",
            "--shutdown-grace",
            "0s",
        ],
    );
    node.machine_id(&t).await;
    // Now the node advertises its types, so they are known without --tasks.
    let add = |name: &'static str, extra: &'static [&'static str]| {
        let db = db.to_owned();
        async move {
            let mut args = vec!["--db", db.as_str(), "--json", "task", "add", name];
            args.extend_from_slice(extra);
            added_ids(&harmony(&args).await)[0]
        }
    };
    let grumpy = add("grumpy", &[]).await;
    let needs_arg = add("needs_arg", &["--arg", "other=1"]).await;
    let slow_pid = dir.path().join("slow.pid");
    let pid_arg = format!("pidfile={}", slow_pid.display());
    let slow = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "slow", "--arg", &pid_arg,
        ])
        .await,
    )[0];
    let fail = add("bench_fail", &["--arg", "fail_times=99"]).await;
    let noop = added_ids(
        &harmony(&[
            "--db",
            db,
            "--json",
            "task",
            "add",
            "bench_noop",
            "--count",
            "5",
        ])
        .await,
    );
    assert_eq!(noop.len(), 5);
    all_done(&t, 6, Duration::from_secs(60)).await;

    let show = |id: i64| {
        let db = db.to_owned();
        async move {
            harmony(&["--db", &db, "--json", "task", "show", &id.to_string()])
                .await
                .json()
        }
    };
    let s = show(echo).await;
    assert_eq!(s["state"], "done", "{s}");
    assert_eq!(s["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(s["attempts"][0]["completed_by_host_and_port"], node.listen);

    let s = show(grumpy).await;
    assert_eq!(s["state"], "failed", "{s}");
    assert_eq!(
        s["retries"], 2,
        "a failed task's retries come from its history: {s}"
    );
    let attempts = s["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "max_failures = 2 means two attempts");
    assert!(attempts.iter().all(|a| a["outcome"] == "failed"), "{s}");
    let err = attempts[0]["err"].as_str().unwrap();
    assert!(err.starts_with("exit status 3: "), "{err}");
    assert!(
        err.contains("nothing to see") && err.ends_with("disk on fire"),
        "{err}"
    );

    let s = show(needs_arg).await;
    assert_eq!(s["state"], "failed", "{s}");
    let err = s["attempts"][0]["err"].as_str().unwrap();
    assert!(
        err.contains("\"input\"") && err.contains("other") && err.contains("--arg input="),
        "{err}"
    );

    let s = show(slow).await;
    assert_eq!(s["state"], "failed", "{s}");
    let err = s["attempts"][0]["err"].as_str().unwrap();
    assert!(
        err.contains("timed out") || err.contains("timeout"),
        "{err}"
    );
    // The timed-out command was killed, not left running.
    wait_process_gone(&slow_pid).await;

    let s = show(fail).await;
    assert_eq!(s["state"], "failed", "{s}");
    assert_eq!(s["attempts"].as_array().unwrap().len(), 5);

    // Human output too.
    let out = harmony(&["--db", db, "task", "show", &grumpy.to_string()]).await;
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("state:    failed"), "{}", out.stdout);
    assert!(out.stdout.contains("disk on fire"), "{}", out.stdout);
    let out = harmony(&[
        "--db", db, "task", "history", "--failed", "--type", "grumpy",
    ])
    .await;
    assert_eq!(out.code, Some(0));
    assert_eq!(
        out.stdout.lines().count(),
        3,
        "header + 2 rows:\n{}",
        out.stdout
    );
    let hist = harmony(&["--db", db, "--json", "task", "history", "--failed"])
        .await
        .json();
    assert!(
        hist.as_array()
            .unwrap()
            .iter()
            .all(|r| r["result"] == false)
    );
    let hist = harmony(&["--db", db, "--json", "task", "history", "--limit", "3"])
        .await
        .json();
    assert_eq!(hist.as_array().unwrap().len(), 3);

    let machines = harmony(&["--db", db, "--json", "machine", "ls"])
        .await
        .json();
    assert_eq!(machines.as_array().unwrap().len(), 1);
    assert_eq!(machines[0]["host_and_port"], node.listen);
    assert!(machines[0]["tasks"].as_str().unwrap().contains("grumpy"));
    let out = harmony(&["--db", db, "machine", "ls"]).await;
    assert!(out.stdout.contains(&node.listen), "{}", out.stdout);

    // Restart: a done task cannot be, a failed one is re-queued with its id and runs again.
    let out = harmony(&["--db", db, "task", "restart", &echo.to_string()]).await;
    out.assert_usage_error(&["completed successfully"]);
    let out = harmony(&["--db", db, "task", "restart", "999999"]).await;
    out.assert_usage_error(&["does not exist"]);
    let out = harmony(&["--db", db, "task", "restart", &grumpy.to_string()]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let db2 = t.db.clone();
    harmony_testkit::eventually(
        "the restarted task to fail again",
        Duration::from_secs(30),
        || {
            let db2 = db2.clone();
            async move {
                use harmonydb::Executor;
                let n: i64 = db2
                    .scalar(
                        "SELECT count(*) FROM harmony_task_history WHERE task_id = $1",
                        &[&grumpy],
                    )
                    .await
                    .ok()?;
                let queued: i64 = db2
                    .scalar(
                        "SELECT count(*) FROM harmony_task WHERE id = $1",
                        &[&grumpy],
                    )
                    .await
                    .ok()?;
                (n == 4 && queued == 0).then_some(())
            }
        },
    )
    .await;

    // A command running at shutdown is killed, and its task released for another node.
    let hang_pid = dir.path().join("hang.pid");
    let pid_arg = format!("pidfile={}", hang_pid.display());
    let hang = added_ids(
        &harmony(&[
            "--db", db, "--json", "task", "add", "hang", "--arg", &pid_arg,
        ])
        .await,
    )[0];
    let pid_file = hang_pid.clone();
    harmony_testkit::eventually("the hang command to start", Duration::from_secs(30), || {
        let pid_file = pid_file.clone();
        async move {
            std::fs::read_to_string(&pid_file)
                .ok()
                .filter(|s| s.ends_with('\n'))
        }
    })
    .await;
    node.signal(Signal::SIGTERM);
    assert_eq!(node.exit_code(Duration::from_secs(30)).await, Some(0));
    wait_process_gone(&hang_pid).await;
    let s = show(hang).await;
    assert_eq!(s["state"], "pending", "{s}");
    assert_eq!(s["retries"], 0, "a shutdown costs no retry: {s}");
    assert_eq!(s["attempts"][0]["err"], "shutdown", "{s}");
    assert_eq!(s["attempts"][0]["outcome"], "shutdown", "{s}");
    // Tables say what happened: a released attempt is not shown as a failure.
    let out = harmony(&["--db", db, "task", "history", "--type", "hang"]).await;
    let row = out.stdout.lines().nth(1).unwrap_or_default().to_owned();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells.get(2), Some(&"shutdown"), "{}", out.stdout);
    let out = harmony(&["--db", db, "task", "show", &hang.to_string()]).await;
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("1 ") && l.contains(" shutdown ")),
        "{}",
        out.stdout
    );
    let machines = harmony(&["--db", db, "--json", "machine", "ls"])
        .await
        .json();
    assert!(machines.as_array().unwrap().is_empty());
}

/// `--cpu 1.5` is stored, listed and printed as 1.5 (the engine schedules with 1.5; it was
/// once stored as an integer and shown as 2), and a whole number stays whole.
async fn machine_ls_shows_the_cpu_budget_as_given(t: &TestDb) {
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let budget = |cpu| {
        [
            "--types",
            "bench_noop",
            "--cpu",
            cpu,
            "--ram",
            "1GiB",
            "--gpu",
            "0",
        ]
    };
    let half = Node::start(db, dir.path(), &budget("1.5"));
    let whole = Node::start(db, dir.path(), &budget("4"));
    let half_id = half.machine_id(t).await;
    let whole_id = whole.machine_id(t).await;

    let machines = harmony(&["--db", db, "--json", "machine", "ls"])
        .await
        .json();
    let cpu_of = |id: i64| {
        machines
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("machine {id} not listed: {machines}"))["cpu"]
            .as_f64()
            .unwrap_or_else(|| panic!("cpu is not a number: {machines}"))
    };
    assert_eq!(cpu_of(half_id), 1.5);
    assert_eq!(cpu_of(whole_id), 4.0);

    let out = harmony(&["--db", db, "machine", "ls"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let header: Vec<&str> = out
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let cpu_col = header.iter().position(|h| *h == "CPU").expect("CPU column");
    for (node, shown) in [(&half, "1.5"), (&whole, "4")] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(&node.listen))
            .unwrap_or_else(|| panic!("{} not listed: {}", node.listen, out.stdout));
        // Every column before TASKS is one word (the name is the host part of the address).
        assert_eq!(
            line.split_whitespace().nth(cpu_col),
            Some(shown),
            "{}",
            out.stdout
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_and_prints_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    // A stale file from an earlier run is replaced, not reused.
    std::fs::write(dir.path().join("harmony-demo.db"), b"not a database").unwrap();
    let listen = format!("127.0.0.1:{}", harmony_testkit::free_port());
    let out = harmony_in(
        Some(dir.path()),
        &[
            "demo", "--scale", "0.01", "--items", "40", "--listen", &listen,
        ],
    )
    .await;
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains(&format!("dashboard: http://{listen}/")),
        "the demo prints its dashboard's address: {}",
        out.stderr
    );
    for stage in ["DemoFetch", "DemoEncode", "DemoProve", "DemoStore"] {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(stage))
            .unwrap_or_else(|| panic!("no summary row for {stage}:\n{}", out.stdout));
        let cols: Vec<&str> = line.split_whitespace().collect();
        // TYPE, COST (6 words), TASKS, SUCCEEDED, FAILED, …
        assert_eq!(cols[7], "40", "{line}");
        assert_eq!(cols[8], "40", "{line}");
        assert_eq!(cols[9], "0", "{line}");
    }
    assert!(out.stdout.contains("MEAN WAIT"), "{}", out.stdout);
    assert!(dir.path().join("harmony-demo.db").exists());

    let out = harmony_in(Some(dir.path()), &["demo", "--scale", "0"]).await;
    out.assert_usage_error(&["--scale"]);
}

/// `harmony run … 2>&1 | head -1`: once the log pipe is closed every log write fails. The node
/// must keep running its tasks and still stop gracefully on SIGTERM and on SIGINT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_output_pipe_closed_keeps_working_and_obeys_signals() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let tasks = tasks_file(
        dir.path(),
        "[[task]]\nname = \"quiet\"\ncommand = [\"true\"]\n",
    );
    let tasks = tasks.to_str().unwrap();
    let mut done = 0;
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let mut args = vec!["--tasks", tasks];
        args.extend_from_slice(FAST);
        let mut node = Node::start_with_closed_output(db, dir.path(), &args);
        let machine = node.machine_id(&t).await;
        // Each attempt and its outcome are logged, into the closed pipe.
        let out = harmony(&["--db", db, "task", "add", "quiet", "--count", "3"]).await;
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        done += 3;
        wait_succeeded(&t, "quiet", done, Duration::from_secs(60)).await;
        assert!(node.is_running(), "the node died after its log pipe closed");
        node.signal(sig);
        assert_eq!(
            node.exit_code(Duration::from_secs(60)).await,
            Some(0),
            "{sig} must stop the node gracefully"
        );
        let left: i64 =
            t.db.scalar(
                "SELECT count(*) FROM harmony_machines WHERE id = $1",
                &[&machine],
            )
            .await
            .unwrap();
        assert_eq!(left, 0, "a graceful stop deregisters the machine");
    }
}

/// A second node with a live node's `--listen` refuses to start (exit 2, naming the address
/// and the live machine) and leaves the live one alone; once the first is dead (SIGKILL, then
/// silent for dead-after) a node at that address starts and takes over its tasks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_nodes_address_is_never_taken_over() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", harmony_testkit::free_port());
    let tasks = tasks_file(
        dir.path(),
        "[[task]]\nname = \"sleepy\"\nbuiltin = \"bench_sleep\"\n",
    );
    let mut args = vec!["--tasks", tasks.to_str().unwrap()];
    args.extend_from_slice(FAST);
    let mut first = Node::start_at(db, dir.path(), &listen, &args);
    let machine = first.machine_id(&t).await;
    let out = harmony(&["--db", db, "task", "add", "sleepy", "--arg", "ms=600000"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    running_on(&t, machine, 1).await;

    let mut second = vec!["--db", db, "run", "--listen", &listen];
    second.extend_from_slice(&args);
    let out = harmony(&second).await;
    out.assert_usage_error(&[
        "--listen",
        &listen,
        &format!("in use by live machine {machine}"),
        "own address",
    ]);
    assert!(first.is_running(), "the live node was evicted");
    let owner: Option<i64> =
        t.db.scalar("SELECT owner_id FROM harmony_task", &[])
            .await
            .unwrap();
    assert_eq!(owner, Some(machine), "the live node still owns its task");

    first.signal(Signal::SIGKILL);
    first.exit_code(Duration::from_secs(30)).await;
    // Once the dead node's heartbeat is older than dead-after (3 s), its address is free.
    eventually("the dead node's heartbeat to age past dead-after", Duration::from_secs(60), || async {
        let silent: i64 = t
            .db
            .scalar(
                "SELECT count(*) FROM harmony_machines WHERE id = $1 AND last_contact < strftime('%Y-%m-%d %H:%M:%f', 'now', '-3.2 seconds')",
                &[&machine],
            )
            .await
            .ok()?;
        (silent == 1).then_some(())
    })
    .await;
    let _heir = Node::start_at(db, dir.path(), &listen, &args);
    let heir = wait_count(
        &t,
        "a new machine at the dead node's address",
        Duration::from_secs(30),
        machine + 1,
        "SELECT coalesce(max(id), 0) FROM harmony_machines WHERE host_and_port = $1",
        &[&listen],
    )
    .await;
    let dead: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_machines WHERE id = $1",
            &[&machine],
        )
        .await
        .unwrap();
    assert_eq!(dead, 0, "the dead incarnation's row is replaced");
    running_on(&t, heir, 1).await;
}

/// `task run-now` on a type a node runs that is not a singleton is refused and writes nothing;
/// on a registered singleton it is accepted even before its first run finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_now_refuses_a_type_that_is_not_a_singleton() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let tasks = tasks_file(
        dir.path(),
        "[[task]]\nname = \"tick\"\nbuiltin = \"bench_noop\"\nsingleton = \"1h\"\n\n[[task]]\nname = \"plain\"\nbuiltin = \"bench_noop\"\n",
    );
    let node = Node::start(db, dir.path(), &["--tasks", tasks.to_str().unwrap()]);
    node.machine_id(&t).await;

    let out = harmony(&["--db", db, "task", "run-now", "plain"]).await;
    out.assert_usage_error(&["\"plain\" is not a singleton", "singleton types: tick"]);
    let stray: i64 =
        t.db.scalar(
            "SELECT count(*) FROM harmony_task_singletons WHERE task_name = $1",
            &[&"plain"],
        )
        .await
        .unwrap();
    assert_eq!(stray, 0, "a refused run-now writes nothing");

    let out = harmony(&["--db", db, "--json", "task", "run-now", "tick"]).await;
    assert_eq!(out.json()["run_now"], "tick");
}

/// A plain `harmony run` registers only its tasks file's types; the benchmark built-ins (and
/// their attempt log) only with `--builtin`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_types_run_only_when_asked() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let tasks = tasks_file(
        dir.path(),
        "[[task]]\nname = \"quiet\"\ncommand = [\"true\"]\n",
    );
    let tasks = tasks.to_str().unwrap();
    let types_of = |id: i64| {
        let db = t.db.clone();
        async move {
            db.scalar::<String>(
                "SELECT tasks FROM harmony_machine_details WHERE machine_id = $1",
                &[&id],
            )
            .await
            .unwrap()
        }
    };
    let plain = Node::start_plain(db, dir.path(), &["--tasks", tasks]);
    assert_eq!(types_of(plain.machine_id(&t).await).await, "quiet");
    let with = Node::start_plain(db, dir.path(), &["--tasks", tasks, "--builtin"]);
    assert_eq!(
        types_of(with.machine_id(&t).await).await,
        "bench_noop,bench_sleep,bench_fail,bench_read,quiet"
    );

    let out = harmony(&["--db", db, "run", "--types", "bench_noop"]).await;
    out.assert_usage_error(&[
        "--types",
        "\"bench_noop\"",
        "this node can run: none",
        "--builtin",
    ]);
}

/// Under `--json` a failing command's error is one JSON object on stderr, with the kind its
/// exit code stands for; the help of `task` lists every task command, and `--notify` is
/// explained once (under `run --help`), not on every subcommand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_errors_and_help_text() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let as_json = |out: &Output| -> serde_json::Value {
        let lines = out.stderr_lines();
        assert_eq!(lines.len(), 1, "one stderr line: {lines:#?}");
        serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("stderr is not JSON ({e}): {}", lines[0]))
    };
    let out = harmony(&["--db", db, "--json", "task", "show", "424242"]).await;
    assert_eq!(out.code, Some(2));
    let e = as_json(&out);
    assert_eq!(e["kind"], "usage");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("task 424242 does not exist"),
        "{e}"
    );
    // A parse error (clap's) too.
    let out = harmony(&[
        "--db",
        db,
        "--json",
        "task",
        "add",
        "bench_noop",
        "--count",
        "x",
    ])
    .await;
    assert_eq!(out.code, Some(2));
    assert_eq!(as_json(&out)["kind"], "usage");
    // An unreachable database.
    let out = harmony(&[
        "--db",
        "postgres://postgres@127.0.0.1:1/test?connect_timeout=2",
        "--json",
        "task",
        "ls",
    ])
    .await;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert_eq!(as_json(&out)["kind"], "database");
    // Without --json the same error stays one plain line.
    let out = harmony(&["--db", db, "task", "show", "424242"]).await;
    out.assert_usage_error(&["task 424242 does not exist"]);

    let help = harmony(&["task", "--help"]).await;
    assert_eq!(help.code, Some(0));
    for cmd in ["add", "ls", "show", "history", "restart", "run-now"] {
        assert!(
            help.stdout.lines().any(|l| l.trim_start().starts_with(cmd)),
            "task --help lists {cmd}:\n{}",
            help.stdout
        );
    }
    let ls_help = harmony(&["task", "ls", "--help"]).await;
    assert!(!ls_help.stdout.contains("YugabyteDB"), "{}", ls_help.stdout);
    let run_help = harmony(&["run", "--help"]).await;
    assert_eq!(
        run_help.stdout.matches("YugabyteDB").count(),
        1,
        "{}",
        run_help.stdout
    );
}

/// `harmony` or `harmony task` without a command: one usage line naming the commands (exit 2),
/// not the whole help printed as an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_command_prints_one_usage_line() {
    let out = harmony(&[]).await;
    out.assert_usage_error(&[
        "a command is missing",
        "usage: harmony [OPTIONS] <COMMAND>",
        "run, task, machine",
        "`harmony --help`",
    ]);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    let out = harmony(&["task"]).await;
    out.assert_usage_error(&["usage: harmony task", "add, ls", "`harmony task --help`"]);
}

/// A Postgres URL naming a database that does not exist is the server refusing us (exit 3, as
/// for a wrong password or an unreachable server), not bad input: the URL is well formed, and
/// the remedy is on the server. One line says so, for every kind of command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_database_that_does_not_exist_is_refused_with_exit_3() {
    if !harmony_testkit::postgres_or_skip("missing_database").await {
        return;
    }
    let base = harmony_testkit::pg_base_url();
    let (server, _) = base
        .rsplit_once('/')
        .expect("a database in HARMONY_TEST_PG");
    let name = format!("harmony_absent_{}", harmony_testkit::unique_suffix());
    let url = format!("{server}/{name}");
    let commands: &[&[&str]] = &[
        &["task", "ls"],
        &["db", "status"],
        &["db", "migrate"],
        &["task", "add", "bench_noop"],
        &["run", "--builtin"],
    ];
    for args in commands {
        let mut all = vec!["--db", url.as_str()];
        all.extend_from_slice(args);
        let out = harmony(&all).await;
        assert_eq!(out.code, Some(3), "{all:?}: {}", out.stderr);
        let lines = out.stderr_lines();
        let last = lines.last().copied().unwrap_or_default();
        assert!(
            last.starts_with("error: ")
                && last.contains(&format!("database \"{name}\" does not exist"))
                && last.contains("CREATE DATABASE"),
            "{all:?}: {lines:#?}"
        );
        // `run` logs its start first; every other command prints just the error.
        if args[0] != "run" {
            assert_eq!(lines.len(), 1, "{all:?}: {lines:#?}");
        }
    }
}

/// A huge bad value is not echoed in full: the error line shows its start and its length,
/// and keeps the advice. (A command-line argument is at most 128 KiB on Linux; the tasks file
/// carries a 1 MB one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bad_values_are_cut_in_errors() {
    let t = TestDb::sqlite().await;
    let db = t.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let big = "x".repeat(100_000);
    let mega = "y".repeat(1_000_000);
    let file = tasks_file(
        dir.path(),
        &format!("[[task]]\nname = \"{mega}\"\ncommand = [\"true\"]\n"),
    );
    let file = file.to_str().unwrap();
    let pg_url = format!("postgres://u@h:{big}/db");
    let ram = format!("{big}GiB");
    let arg = format!("{big}=1");
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["--db", &pg_url, "task", "ls"], &["invalid port"]),
        (vec!["--db", db, "run", "--ram", &ram], &["--ram"]),
        (vec!["--db", db, "task", "add", &big], &["limit is 16"]),
        (
            vec!["--db", db, "task", "add", "bench_noop", "--arg", &arg],
            &["not a valid argument name"],
        ),
        (
            vec!["--db", db, "run", "--tasks", file],
            &["line 2", "name:", "limit is 16"],
        ),
    ];
    for (args, needles) in cases {
        let out = harmony(&args).await;
        out.assert_usage_error(needles);
        let line = out.stderr_lines()[0];
        assert!(line.len() < 1_000, "{} bytes: {line}", line.len());
        assert!(line.contains(" characters in all]"), "{line}");
    }
    assert_nothing_written(&t).await;
}

/// `task prune`: the dry run counts and deletes nothing, the prune deletes what is older than
/// `--older-than` (of one type with `--type`) and keeps the rest and a pending task's rows;
/// while a node holds the prune lease it refuses; bad flags are usage errors. A node started
/// with `--history-keep` prunes by itself.
async fn task_prune_deletes_old_history(t: &TestDb) {
    let db = t.url.as_str();
    let now = harmonydb::Timestamp::from_system(std::time::SystemTime::now());
    let days = |n: i64| harmonydb::Timestamp::from_millis(now.as_millis() - n * 86_400_000);
    // (task, type, age in days); task 3 is still pending.
    for (task, name, age) in [
        (1_i64, "a", 10),
        (1, "a", 9),
        (2, "b", 8),
        (3, "a", 20),
        (4, "a", 1),
    ] {
        t.db.exec(
            "INSERT INTO harmony_task_history (task_id, name, posted, work_start, work_end, result, err, completed_by_host_and_port)
             VALUES ($1, $2, $3, $3, $3, $4, '', 'test:1')",
            &[&task, &name, &days(age), &true],
        )
        .await
        .unwrap();
        t.db.exec(
            "INSERT INTO harmony_task_args (task_id, key, value) VALUES ($1, 'k', 'v') ON CONFLICT DO NOTHING",
            &[&task],
        )
        .await
        .unwrap();
    }
    t.db.exec(
        "INSERT INTO harmony_task (id, name, posted_time, update_time, added_by, retries) VALUES (3, 'a', $1, $1, 0, 1)",
        &[&days(21)],
    )
    .await
    .unwrap();
    let history = || count(t, "SELECT count(*) FROM harmony_task_history");

    let dry = harmony(&[
        "--db",
        db,
        "--json",
        "task",
        "prune",
        "--older-than",
        "7d",
        "--dry-run",
    ])
    .await
    .json();
    assert_eq!(
        (dry["history"].as_u64(), dry["args"].as_u64()),
        (Some(3), Some(2)),
        "{dry}"
    );
    let out = harmony(&[
        "--db",
        db,
        "task",
        "prune",
        "--older-than",
        "7d",
        "--dry-run",
    ])
    .await;
    assert!(
        out.stdout
            .contains("would delete 3 history rows and 2 argument rows older than 7days"),
        "{}",
        out.stdout
    );
    assert_eq!(history().await, 5);

    // Type b only: task 2's row and its arguments.
    let done = harmony(&[
        "--db",
        db,
        "--json",
        "task",
        "prune",
        "--older-than",
        "7d",
        "--type",
        "b",
    ])
    .await
    .json();
    assert_eq!(
        (done["history"].as_u64(), done["args"].as_u64()),
        (Some(1), Some(1)),
        "{done}"
    );
    // A node mid-prune holds the lease: the command names it and deletes nothing.
    harmonytask::Admin::new(t.db.clone())
        .lease_acquire(
            harmonytask::retention::PRUNE_LEASE,
            "machine 7 (10.0.0.5:4701)",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let out = harmony(&["--db", db, "task", "prune", "--older-than", "7d"]).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("machine 7 (10.0.0.5:4701) is pruning history right now"),
        "{}",
        out.stderr
    );
    assert_eq!(history().await, 4);
    harmonytask::Admin::new(t.db.clone())
        .lease_release(
            harmonytask::retention::PRUNE_LEASE,
            "machine 7 (10.0.0.5:4701)",
        )
        .await
        .unwrap();
    let out = harmony(&["--db", db, "task", "prune", "--older-than", "7d"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout
            .starts_with("deleted 2 history rows and 1 argument rows older than 7days"),
        "{}",
        out.stdout
    );
    let left: Vec<(i64,)> =
        t.db.select(
            "SELECT task_id FROM harmony_task_history ORDER BY task_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        left,
        [(3,), (4,)],
        "the pending task's and the new row stay"
    );

    for (args, needles) in [
        (
            &["task", "prune", "--older-than", "soon"][..],
            &["--older-than"][..],
        ),
        (
            &["task", "prune", "--older-than", "0s"][..],
            &["--older-than", "positive"][..],
        ),
        (
            &["task", "prune", "--older-than", "7d", "--type", "x;y"][..],
            &["--type"][..],
        ),
        (
            &["run", "--history-keep", "never"][..],
            &["--history-keep", "or off"][..],
        ),
        (
            &["run", "--history-keep", "0s"][..],
            &["--history-keep", "use off"][..],
        ),
        (
            &["run", "--history-keep-per-type", "0"][..],
            &["--history-keep-per-type", "at least 1"][..],
        ),
    ] {
        let mut all = vec!["--db", db];
        all.extend_from_slice(args);
        harmony(&all).await.assert_usage_error(needles);
    }

    // A node keeping 12 hours of history prunes task 4's day-old row by itself; task 3's stays.
    let dir = tempfile::tempdir().unwrap();
    let _node = Node::start(
        db,
        dir.path(),
        &["--history-keep", "12h", "--prune-interval", "100ms"],
    );
    eventually("the node to prune", Duration::from_secs(30), || async {
        let left: Vec<(i64,)> =
            t.db.select("SELECT task_id FROM harmony_task_history", &[])
                .await
                .ok()?;
        (left == [(3,)]).then_some(())
    })
    .await;
}
