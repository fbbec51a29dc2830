//! Helpers for tests that run the real `harmony` binary: one-shot commands, node processes that
//! are killed when the test ends (pass or fail), and checks over the attempt log.

#![allow(dead_code, missing_docs, unused_macros)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harmony_testkit::{TestDb, eventually, free_port};
use harmonydb::{Executor, Params, Timestamp};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The binary under test.
pub const HARMONY: &str = env!("CARGO_BIN_EXE_harmony");

/// What a finished command printed.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The stderr lines that are not empty.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Asserts a usage error: exit code 2 and exactly one `error:` line on stderr that contains
    /// every one of `needles`.
    pub fn assert_usage_error(&self, needles: &[&str]) {
        assert_eq!(
            self.code,
            Some(2),
            "expected exit code 2; stdout: {} stderr: {}",
            self.stdout,
            self.stderr
        );
        let lines = self.stderr_lines();
        assert_eq!(lines.len(), 1, "expected one stderr line, got: {lines:#?}");
        assert!(lines[0].starts_with("error: "), "{}", lines[0]);
        for n in needles {
            assert!(
                lines[0].contains(n),
                "{:?} does not mention {n:?}",
                lines[0]
            );
        }
    }

    /// Asserts success and returns stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, Some(0), "stderr: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `harmony ARGS` to completion (bounded) in `dir` (or the current directory).
pub async fn harmony_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(HARMONY);
    cmd.args(args)
        .env_remove("HARMONY_DB")
        .env_remove("HARMONY_LOG")
        .env_remove("HARMONY_NOTIFY")
        .env_remove("HARMONY_CLUSTER_SECRET")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("harmony {args:?} did not finish in 120 s"))
        .expect("run harmony");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `harmony ARGS` to completion.
pub async fn harmony(args: &[&str]) -> Output {
    harmony_in(None, args).await
}

/// Flags that make nodes notice each other's work and deaths quickly.
pub const FAST: &[&str] = &[
    "--poll-interval",
    "100ms",
    "--heartbeat-interval",
    "300ms",
    "--reaper-interval",
    "300ms",
    "--dead-after",
    "3s",
];

/// A `harmony run` process. Dropping it kills it (SIGKILL) and, when the test is failing,
/// prints its log.
pub struct Node {
    pub child: Child,
    pub listen: String,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Node {
    /// Starts `harmony run --db URL --listen 127.0.0.1:<free port> ARGS`, logging to a file in
    /// `dir`.
    /// The node also runs the built-in types (`--builtin`), which most tests use.
    pub fn start(db_url: &str, dir: &Path, args: &[&str]) -> Node {
        let listen = format!("127.0.0.1:{}", free_port());
        Node::spawn(db_url, dir, &listen, &with_builtins(args), true)
    }

    /// Like [`Node::start`], at the address `listen`.
    pub fn start_at(db_url: &str, dir: &Path, listen: &str, args: &[&str]) -> Node {
        Node::spawn(db_url, dir, listen, &with_builtins(args), true)
    }

    /// `harmony run` with exactly `args`: no built-ins unless they ask for them.
    pub fn start_plain(db_url: &str, dir: &Path, args: &[&str]) -> Node {
        let listen = format!("127.0.0.1:{}", free_port());
        Node::spawn(db_url, dir, &listen, args, true)
    }

    /// Like [`Node::start`], but its stdout and stderr are pipes whose reading ends are closed
    /// at once, as when a node's output goes to `| head -1` that has exited.
    pub fn start_with_closed_output(db_url: &str, dir: &Path, args: &[&str]) -> Node {
        let listen = format!("127.0.0.1:{}", free_port());
        Node::spawn(db_url, dir, &listen, args, false)
    }

    fn spawn(db_url: &str, dir: &Path, listen: &str, args: &[&str], log_to_file: bool) -> Node {
        let log = dir.join(format!("node-{}.log", listen.replace([':', '.'], "_")));
        let mut cmd = Command::new(HARMONY);
        cmd.args(["run", "--db", db_url, "--listen", listen, "--log", "info"])
            .args(args)
            .env_remove("HARMONY_DB")
            .env_remove("HARMONY_LOG")
            .env_remove("HARMONY_NOTIFY")
            .env_remove("HARMONY_CLUSTER_SECRET")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if log_to_file {
            let file = std::fs::File::create(&log).expect("node log file");
            cmd.stdout(Stdio::null()).stderr(file);
        } else {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = cmd.spawn().expect("spawn harmony run");
        // Dropping the reading ends closes them: every write of the node now fails (EPIPE).
        drop(child.stdout.take());
        drop(child.stderr.take());
        Node {
            child,
            listen: listen.to_owned(),
            log,
            exited: None,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("node still running") as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).unwrap_or_else(|e| panic!("kill {sig} {}: {e}", self.listen));
    }

    /// Waits (bounded) for the process to exit; returns its exit code (None: killed by a
    /// signal).
    pub async fn exit_code(&mut self, deadline: Duration) -> Option<i32> {
        if let Some(s) = self.exited {
            return s.code();
        }
        let status = tokio::time::timeout(deadline, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("node {} did not exit within {deadline:?}", self.listen))
            .expect("wait for node");
        self.exited = Some(status);
        status.code()
    }

    /// Whether the process is still running (it has not exited).
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait().expect("poll node process") {
            Some(status) => {
                self.exited = Some(status);
                false
            }
            None => true,
        }
    }

    /// Waits until a line of the node's log contains every one of `needles`.
    pub async fn wait_log(&self, needles: &[&str]) {
        eventually(
            &format!("node {} to log {needles:?}", self.listen),
            Duration::from_secs(30),
            || {
                let log = self.log();
                async move {
                    log.lines()
                        .any(|l| needles.iter().all(|n| l.contains(n)))
                        .then_some(())
                }
            },
        )
        .await;
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its machine id, once registered.
    pub async fn machine_id(&self, t: &TestDb) -> i64 {
        let db = t.db.clone();
        let host = self.listen.clone();
        eventually(
            &format!("node {host} to register"),
            Duration::from_secs(30),
            || {
                let db = db.clone();
                let host = host.clone();
                async move {
                    db.scalar_opt::<i64>(
                        "SELECT id FROM harmony_machines WHERE host_and_port = $1",
                        &[&host],
                    )
                    .await
                    .ok()
                    .flatten()
                }
            },
        )
        .await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!("----- log of node {} -----\n{}", self.listen, self.log());
        }
    }
}

fn with_builtins<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--builtin"];
    all.extend_from_slice(args);
    all
}

/// Writes a tasks file into `dir`.
pub fn tasks_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("tasks.toml");
    std::fs::write(&p, text).expect("write tasks file");
    p
}

/// `SELECT count(*) …`
pub async fn count(t: &TestDb, sql: &'static str) -> i64 {
    t.db.scalar(sql, &[]).await.expect(sql)
}

/// Asserts that bad input wrote nothing.
pub async fn assert_nothing_written(t: &TestDb) {
    assert_eq!(count(t, "SELECT count(*) FROM harmony_task").await, 0);
    assert_eq!(count(t, "SELECT count(*) FROM harmony_task_args").await, 0);
    assert_eq!(count(t, "SELECT count(*) FROM harmony_machines").await, 0);
    assert_eq!(
        count(t, "SELECT count(*) FROM harmony_task_history").await,
        0
    );
}

/// Waits until no task is queued or running and `n` tasks have a successful attempt.
pub async fn all_done(t: &TestDb, n: i64, deadline: Duration) {
    let db = t.db.clone();
    eventually(&format!("{n} tasks to succeed"), deadline, || {
        let db = db.clone();
        async move {
            let queued: i64 = db
                .scalar("SELECT count(*) FROM harmony_task", &[])
                .await
                .ok()?;
            let done: i64 = db
                .scalar(
                    "SELECT count(DISTINCT task_id) FROM harmony_task_history WHERE result",
                    &[],
                )
                .await
                .ok()?;
            (queued == 0 && done >= n).then_some(())
        }
    })
    .await;
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// One physical attempt of a built-in task, from `harmony_test_attempt`.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub task: i64,
    pub machine: i64,
    pub start_us: i64,
    /// End in microseconds (the column has millisecond precision, truncated, so this is never
    /// later than the real end). None: the attempt never logged its end (its process died).
    pub end_us: Option<i64>,
}

/// Every logged attempt, grouped by task, each group sorted by start.
pub async fn attempts(t: &TestDb) -> BTreeMap<i64, Vec<Attempt>> {
    let rows: Vec<(i64, i64, i64, Option<Timestamp>)> = t
        .db
        .select(
            "SELECT task_id, machine_id, started_us, ended FROM harmony_test_attempt ORDER BY task_id, started_us, id",
            &[],
        )
        .await
        .expect("read attempts");
    let mut by_task: BTreeMap<i64, Vec<Attempt>> = BTreeMap::new();
    for (task, machine, start_us, ended) in rows {
        by_task.entry(task).or_default().push(Attempt {
            task,
            machine,
            start_us,
            end_us: ended.map(|e| e.as_millis() * 1000),
        });
    }
    by_task
}

/// Asserts that no two attempts of one task overlapped: each attempt that logged an end ended
/// before the next began. An attempt without an end must be followed only by attempts that
/// began after `unended_before_us` (when the process running it was killed). Returns the
/// number of attempts without an end.
pub fn assert_no_overlap(
    by_task: &BTreeMap<i64, Vec<Attempt>>,
    unended_before_us: Option<i64>,
) -> usize {
    let mut unended = 0;
    for (task, list) in by_task {
        for pair in list.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            match a.end_us {
                Some(end) => assert!(
                    end <= b.start_us,
                    "task {task}: attempt on machine {} ended at {end} µs, after the next (machine {}) began at {} µs",
                    a.machine,
                    b.machine,
                    b.start_us
                ),
                None => {
                    let killed = unended_before_us.unwrap_or_else(|| {
                        panic!(
                            "task {task}: attempt on machine {} never ended, yet another began",
                            a.machine
                        )
                    });
                    assert!(
                        b.start_us > killed,
                        "task {task}: the next attempt began at {} µs, before the unfinished one's process was killed at {killed} µs",
                        b.start_us
                    );
                }
            }
        }
        unended += list.iter().filter(|a| a.end_us.is_none()).count();
    }
    unended
}

/// Asserts that `list` (attempts of any tasks, e.g. all of a singleton type) never overlapped:
/// sorted by start, each ended no later than the next began; every one of them ended.
pub fn assert_sequential(list: &[Attempt]) {
    let mut sorted = list.to_vec();
    sorted.sort_by_key(|a| a.start_us);
    for pair in sorted.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let end = a
            .end_us
            .unwrap_or_else(|| panic!("task {} on machine {} never ended", a.task, a.machine));
        assert!(
            end <= b.start_us,
            "attempts overlapped: task {} on machine {} ended at {end} µs, after task {} on machine {} began at {} µs",
            a.task,
            a.machine,
            b.task,
            b.machine,
            b.start_us
        );
    }
}

/// The most attempts of `tasks` running at the same moment, across all machines.
pub fn max_concurrent(by_task: &BTreeMap<i64, Vec<Attempt>>, tasks: &[i64]) -> usize {
    let mut events: Vec<(i64, i32)> = Vec::new();
    for t in tasks {
        for a in by_task.get(t).into_iter().flatten() {
            events.push((a.start_us, 1));
            events.push((a.end_us.unwrap_or(i64::MAX), -1));
        }
    }
    // At equal times an end comes before a start: touching attempts do not overlap.
    events.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        peak = peak.max(now);
    }
    peak as usize
}

/// Successful history rows per task.
pub async fn successes(t: &TestDb) -> HashMap<i64, (i64, String)> {
    let rows: Vec<(i64, i64, String)> = t
        .db
        .select(
            "SELECT task_id, count(*) AS n, max(completed_by_host_and_port) AS host FROM harmony_task_history WHERE result GROUP BY task_id",
            &[],
        )
        .await
        .expect("read history");
    rows.into_iter().map(|(id, n, h)| (id, (n, h))).collect()
}

/// Task ids from `harmony task add --json` output.
pub fn added_ids(out: &Output) -> Vec<i64> {
    out.json()["ids"]
        .as_array()
        .expect("ids")
        .iter()
        .map(|v| v.as_i64().expect("id"))
        .collect()
}

/// Waits until the count `sql` returns (with `params`) reaches at least `want`; returns it.
pub async fn wait_count(
    t: &TestDb,
    what: &str,
    deadline: Duration,
    want: i64,
    sql: &'static str,
    params: Params<'_>,
) -> i64 {
    eventually(what, deadline, || async move {
        let n: i64 = t.db.scalar(sql, params).await.ok()?;
        (n >= want).then_some(n)
    })
    .await
}

/// Waits until `machine` has at least `n` attempts that started and did not end.
pub async fn running_on(t: &TestDb, machine: i64, n: i64) {
    wait_count(
        t,
        &format!("{n} attempts running on machine {machine}"),
        Duration::from_secs(30),
        n,
        "SELECT count(*) FROM harmony_test_attempt WHERE machine_id = $1 AND ended IS NULL",
        &[&machine],
    )
    .await;
}

/// Successful attempts of type `name` recorded so far.
pub async fn succeeded(t: &TestDb, name: &str) -> i64 {
    t.db.scalar(
        "SELECT count(*) FROM harmony_task_history WHERE name = $1 AND result",
        &[&name],
    )
    .await
    .expect("count successes")
}

/// Waits until `n` attempts of type `name` have succeeded.
pub async fn wait_succeeded(t: &TestDb, name: &str, n: i64, deadline: Duration) {
    wait_count(
        t,
        &format!("{n} successful {name} attempts"),
        deadline,
        n,
        "SELECT count(*) FROM harmony_task_history WHERE name = $1 AND result",
        &[&name],
    )
    .await;
}

/// The hosts that recorded successful attempts of type `name`, one entry per attempt.
pub async fn completed_by(t: &TestDb, name: &str) -> Vec<String> {
    let rows: Vec<(String,)> = t
        .db
        .select(
            "SELECT completed_by_host_and_port FROM harmony_task_history WHERE name = $1 AND result ORDER BY id",
            &[&name],
        )
        .await
        .expect("read history");
    rows.into_iter().map(|r| r.0).collect()
}

/// `harmony task add NAME --count N --arg ms=MS` (must succeed); the new ids.
pub async fn add_sleeps(db: &str, name: &str, count: u32, ms: u32) -> Vec<i64> {
    let ids = added_ids(
        &harmony(&[
            "--db",
            db,
            "--json",
            "task",
            "add",
            name,
            "--count",
            &count.to_string(),
            "--arg",
            &format!("ms={ms}"),
        ])
        .await,
    );
    assert_eq!(ids.len(), count as usize);
    ids
}

/// Asserts that each of `ids` has exactly one successful history row; returns every task's
/// successes (count, host).
pub async fn assert_each_succeeded_once(t: &TestDb, ids: &[i64]) -> HashMap<i64, (i64, String)> {
    let ok = successes(t).await;
    for id in ids {
        let (n, _) = ok
            .get(id)
            .unwrap_or_else(|| panic!("task {id} never succeeded"));
        assert_eq!(*n, 1, "task {id} succeeded {n} times");
    }
    ok
}

/// Asserts that no attempt failed. Where a test's tasks cannot fail, a failed history row is
/// an engine error that surfaced to a task: on SQLite, typically `database is locked`.
pub async fn assert_no_failed_attempts(t: &TestDb) {
    let failed: Vec<(i64, String)> =
        t.db.select(
            "SELECT task_id, err FROM harmony_task_history WHERE NOT result ORDER BY id",
            &[],
        )
        .await
        .expect("read history");
    assert!(failed.is_empty(), "failed attempts: {failed:?}");
}

/// The tasks whose attempt on `machine` never logged its end (the machine died under them).
pub fn unended_on(by_task: &BTreeMap<i64, Vec<Attempt>>, machine: i64) -> Vec<i64> {
    by_task
        .values()
        .flatten()
        .filter(|a| a.machine == machine && a.end_us.is_none())
        .map(|a| a.task)
        .collect()
}

/// The most attempts running at once on each machine.
pub fn peak_per_machine(by_task: &BTreeMap<i64, Vec<Attempt>>) -> BTreeMap<i64, usize> {
    let mut per: BTreeMap<i64, BTreeMap<i64, Vec<Attempt>>> = BTreeMap::new();
    for a in by_task.values().flatten() {
        per.entry(a.machine)
            .or_default()
            .entry(a.task)
            .or_default()
            .push(a.clone());
    }
    per.into_iter()
        .map(|(m, tasks)| {
            let ids: Vec<i64> = tasks.keys().copied().collect();
            (m, max_concurrent(&tasks, &ids))
        })
        .collect()
}

/// Waits until the process whose pid is in `pid_file` has exited (gone, or a zombie awaiting
/// its parent's reaping).
pub async fn wait_process_gone(pid_file: &Path) {
    let pid = std::fs::read_to_string(pid_file)
        .expect("pid file")
        .trim()
        .to_owned();
    eventually(
        &format!("process {pid} to exit"),
        Duration::from_secs(30),
        || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
            async move {
                match stat {
                    Err(_) => Some(()),
                    // The state follows the parenthesised command name.
                    Ok(s) => s
                        .rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('Z'))
                        .then_some(()),
                }
            }
        },
    )
    .await;
}
