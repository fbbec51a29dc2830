//! The dashboard in a real browser (headless Chromium through chromedriver) against a real
//! `harmony run` node running real command tasks: the overview lists the machine and the
//! types and updates live; cordon, Run now and Restart work from the page (through the token
//! prompt); a type blocked by RAM shows why. Every wait polls the page with a deadline.
//!
//! Screenshots of every page go to `target/dashboard-screenshots/`.
//!
//! Without chromium and chromedriver the test prints `SKIPPED (no chromium)` and passes,
//! except under CI (`CI=true` or `HARMONY_REQUIRE_PG=1`), where it fails.

mod browser;
mod common;

use std::path::PathBuf;
use std::time::Duration;

use browser::{Browser, browser_required};
use common::*;
use harmony_testkit::{TestDb, eventually};

const TOKEN: &str = "dash-s3cret";

/// How long the page gets to show a change.
const PAGE_DEADLINE: Duration = Duration::from_secs(60);

const TASKS: &str = r#"
[[task]]
name = "nightly"
command = ["true"]
singleton = "1h"

[[task]]
name = "bigmem"
command = ["true"]
cost = { cpu = 1, ram = "8GiB" }

[[task]]
name = "flaky"
command = ["sh", "-c", "echo 'disk <full>' >&2; exit 3"]
max_failures = 1

[[task]]
name = "work"
command = ["true"]
"#;

fn screenshot_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is target/tmp; the screenshots go beside it.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(|t| t.join("dashboard-screenshots"))
        .expect("target folder")
}

/// Polls `check` (a page read) until it gives a value.
async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually(what, PAGE_DEADLINE, check).await
}

/// Text of `css`, once it contains `needle`.
async fn wait_text(b: &Browser, css: &str, needle: &str) -> String {
    until(&format!("{css} to show {needle:?}"), || async {
        b.text_of(css).await.filter(|t| t.contains(needle))
    })
    .await
}

/// Clicks the button `css` once it is there and enabled (a live swap may replace it in
/// between: then it is looked up again).
async fn click(b: &Browser, css: &str) {
    until(&format!("{css} to be clicked"), || async {
        let e = b.find(css).await?;
        if !b.enabled(&e).await {
            return None;
        }
        b.click(&e).await.then_some(())
    })
    .await
}

fn added_id(out: &Output) -> i64 {
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.stdout
        .split_whitespace()
        .nth(2)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("a task id in {:?}", out.stdout))
}

async fn add(t: &TestDb, name: &str) -> i64 {
    added_id(&harmony(&["--db", &t.url, "task", "add", name]).await)
}

/// Rows of the table that follows the heading `id`.
fn rows_after(heading: &str) -> String {
    format!(
        "return document.querySelectorAll('section[aria-labelledby={heading}] tbody tr').length"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let Some(b) = Browser::start(1280, 1800).await else {
        assert!(
            !browser_required(),
            "chromium and chromedriver are required under CI (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "SKIPPED (no chromium): the dashboard browser test needs chromium and chromedriver on PATH"
        );
        return;
    };
    let shots = screenshot_dir();
    let t = TestDb::sqlite().await;
    let dir = tempfile::tempdir().unwrap();
    let file = tasks_file(dir.path(), TASKS);
    let file = file.to_str().unwrap();
    let mut args = vec![
        "--tasks",
        file,
        "--api-token",
        TOKEN,
        "--cpu",
        "4",
        "--ram",
        "2GiB",
    ];
    args.extend_from_slice(FAST);
    let node = Node::start_plain(&t.url, dir.path(), &args);
    let machine = node_machine(&t).await;
    let base = format!("http://{}", node.listen);

    // The overview lists the machine and the types, and goes live.
    b.goto(&format!("{base}/")).await;
    let card = format!("#machine-{machine}");
    until("the overview to list the machine", || async {
        b.find(&card).await
    })
    .await;
    for ty in ["nightly", "bigmem", "flaky", "work"] {
        wait_text(&b, "#live", ty).await;
    }
    wait_text(&b, "#live-status", "live").await;

    // A task added with the CLI appears without a reload; its type waits for RAM and says so.
    add(&t, "bigmem").await;
    wait_text(&b, r#"[data-type="bigmem"] .waiting"#, "1").await;
    let why = wait_text(&b, r#"[data-type="bigmem"] .blocked"#, "ram").await;
    assert!(why.contains("8 GiB"), "{why}");
    b.screenshot(&shots.join("overview.png")).await;

    // Cordon from the page: the token form asks for the token, then the node is cordoned and
    // claims nothing new.
    click(&b, &format!(r#"{card} button[data-action$="/cordon"]"#)).await;
    until("the token form", || async {
        let shown = b
            .script("return !document.getElementById('token-form').hidden")
            .await;
        (shown == serde_json::Value::Bool(true)).then_some(())
    })
    .await;
    let field = b.find("#token-input").await.expect("token field");
    b.type_into(&field, TOKEN).await;
    click(&b, "#token-save").await;
    wait_text(&b, &format!("{card} .badges"), "cordoned").await;
    let held = add(&t, "work").await;
    // The node saw the task and refused it because it is cordoned.
    wait_text(&b, r#"[data-type="work"] .blocked"#, "cordoned").await;
    let still = harmony(&["--db", &t.url, "task", "why", &held.to_string()]).await;
    assert!(
        still.stdout.contains("waiting") || still.stdout.contains("cordoned"),
        "{}",
        still.stdout
    );
    assert!(
        !history_has(&t, held).await,
        "a cordoned node claims nothing"
    );
    click(&b, &format!(r#"{card} button[data-action$="/uncordon"]"#)).await;
    until("the work task to run after uncordon", || async {
        history_has(&t, held).await.then_some(())
    })
    .await;

    // Run now on the singleton makes it run once more.
    b.goto(&format!("{base}/types/nightly")).await;
    wait_text(&b, "#live-status", "live").await;
    // Idle first (its first run, at start, is over): Run now is enabled only then.
    let before = until("the singleton to be idle", || async {
        let button = b.find("#run-now").await?;
        if !b.enabled(&button).await {
            return None;
        }
        b.script(&rows_after("recent-h")).await.as_u64()
    })
    .await;
    click(&b, "#run-now").await;
    until("Run now to run the singleton", || async {
        let n = b.script(&rows_after("recent-h")).await.as_u64()?;
        (n > before).then_some(())
    })
    .await;
    b.screenshot(&shots.join("type.png")).await;

    // Restart a failed task from its page: it is re-queued and runs (and fails) again.
    let flaky = add(&t, "flaky").await;
    b.goto(&format!("{base}/tasks/{flaky}")).await;
    wait_text(&b, "#task-state", "failed").await;
    wait_text(&b, "#live", "disk <full>").await;
    b.screenshot(&shots.join("task.png")).await;
    click(&b, "#restart-task").await;
    until("the restarted task to run again", || async {
        let n = b.script(&rows_after("attempts-h")).await.as_u64()?;
        (n >= 2).then_some(())
    })
    .await;

    // The other pages, for the screenshots: a run of alike tasks folds into "N similar".
    harmony(&["--db", &t.url, "task", "add", "bigmem", "--count", "6"]).await;
    b.goto(&format!("{base}/tasks")).await;
    wait_text(&b, "#live", "similar").await;
    b.screenshot(&shots.join("tasks.png")).await;
    b.goto(&format!("{base}/history")).await;
    wait_text(&b, "#live", "flaky").await;
    b.screenshot(&shots.join("history.png")).await;
    b.goto(&format!("{base}/machines/{machine}")).await;
    wait_text(&b, "#live", "Budget and use").await;
    b.screenshot(&shots.join("machine.png")).await;
    b.goto(&format!("{base}/types/bigmem")).await;
    wait_text(&b, "#live", "never fits").await;
    b.screenshot(&shots.join("type-blocked.png")).await;
    b.resize(390, 1600).await;
    b.goto(&format!("{base}/")).await;
    wait_text(&b, "#live-status", "live").await;
    b.screenshot(&shots.join("overview-phone.png")).await;
    b.quit().await;
    drop(node);
}

/// The machine id of the one registered node.
async fn node_machine(t: &TestDb) -> i64 {
    use harmonydb::Executor;
    eventually("the node to register", Duration::from_secs(60), || async {
        t.db.scalar::<i64>("SELECT id FROM harmony_machines ORDER BY id LIMIT 1", &[])
            .await
            .ok()
    })
    .await
}

/// Whether task `id` has a history row.
async fn history_has(t: &TestDb, id: i64) -> bool {
    use harmonydb::Executor;
    t.db.scalar::<i64>(
        "SELECT count(*) FROM harmony_task_history WHERE task_id = $1",
        &[&id],
    )
    .await
    .is_ok_and(|n| n > 0)
}
