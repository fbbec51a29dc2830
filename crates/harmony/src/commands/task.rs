//! `harmony task add|ls|show|history|restart|run-now|prune` (and `why|cancel|pause|resume`
//! in `operate`).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use harmonydb::Timestamp;
use harmonytask::{Admin, AttemptResult, Client, HistoryQuery, HistoryRow, TaskId, TaskRow};
use serde::Serialize;

use crate::catalog;
use crate::cli::{TaskAddArgs, TaskCommand};
use crate::command_task::valid_arg_name;
use crate::commands::peering::Peering;
use crate::commands::{
    EXIT_OK, UsageError, check_type_name, open_existing, open_migrated, operate,
};
use crate::output::{self, Table};
use crate::taskfile;

/// Most tasks one `task add` creates.
const ADD_COUNT_MAX: usize = 1_000_000;
/// Largest argument value, bytes.
const ARG_VALUE_BYTES_MAX: usize = 64 * 1024;
/// Most arguments per task.
const ARGS_MAX: usize = 100;
/// Largest `--limit`.
const LIMIT_MAX: usize = 100_000;
/// Most attempts `task show` lists.
const SHOW_ATTEMPTS_MAX: usize = 10_000;
/// Longest error text in a human table cell.
const ERR_CELL_CHARS_MAX: usize = 80;

/// Runs one `task` subcommand. `notify` says whether adds and run-now requests wake the nodes
/// (`--notify`).
pub async fn run(
    db_url: &str,
    json: bool,
    notify: &Peering,
    cmd: TaskCommand,
) -> anyhow::Result<u8> {
    match cmd {
        TaskCommand::Add(args) => add(db_url, json, notify, args).await,
        TaskCommand::Ls { type_name, limit } => ls(db_url, json, type_name, limit).await,
        TaskCommand::Show { id } => show(db_url, json, id).await,
        TaskCommand::History {
            type_name,
            failed,
            limit,
        } => history(db_url, json, type_name, failed, limit).await,
        TaskCommand::Restart { id } => restart(db_url, json, notify, id).await,
        TaskCommand::RunNow { name } => run_now(db_url, json, notify, &name).await,
        TaskCommand::Why { id, type_name } => operate::why(db_url, json, id, type_name).await,
        TaskCommand::Cancel {
            ids,
            all_waiting,
            type_name,
        } => operate::cancel(db_url, json, notify, ids, all_waiting, type_name).await,
        TaskCommand::Pause { name } => operate::pause(db_url, json, notify, &name, true).await,
        TaskCommand::Resume { name } => operate::pause(db_url, json, notify, &name, false).await,
        TaskCommand::Prune {
            older_than,
            type_name,
            dry_run,
        } => prune(db_url, json, older_than, type_name, dry_run).await,
    }
}

#[derive(Serialize)]
struct Added<'a> {
    #[serde(rename = "type")]
    type_name: &'a str,
    ids: Vec<TaskId>,
}

async fn add(db_url: &str, json: bool, notify: &Peering, a: TaskAddArgs) -> anyhow::Result<u8> {
    harmonytask::validate_name(&a.type_name).map_err(|e| UsageError(e.to_string()))?;
    if a.count == 0 || a.count > ADD_COUNT_MAX {
        return Err(UsageError(format!(
            "--count: must be between 1 and {ADD_COUNT_MAX}, got {}",
            a.count
        ))
        .into());
    }
    check_args(&a.args)?;
    let specs = match &a.tasks {
        Some(path) => taskfile::load(path)?,
        None => Vec::new(),
    };
    let db = open_migrated(db_url).await?;
    if !a.force {
        // The built-ins count as known: any node started with --builtin runs them.
        let mut known: BTreeSet<String> = catalog::known_names(&specs, true).into_iter().collect();
        known.extend(Admin::new(db.clone()).types_in_cluster().await?);
        if !known.contains(&a.type_name) {
            return Err(UsageError(format!(
                "unknown task type {:?}: no running node runs it and it is neither built in nor in --tasks; known types: {}. Start a node that runs it, or add it anyway with --force",
                a.type_name,
                known.into_iter().collect::<Vec<_>>().join(", ")
            ))
            .into());
        }
    }
    let client = Client::new(notify.attach(db)).with_notify(notify.enabled());
    let ids = if a.count == 1 {
        client
            .add_task_with_args(&a.type_name, &a.args)
            .await?
            .into_iter()
            .collect()
    } else {
        client
            .add_tasks_with_args(&a.type_name, a.count, &a.args)
            .await?
    };
    if json {
        output::json(&Added {
            type_name: &a.type_name,
            ids,
        })?;
    } else {
        match ids.as_slice() {
            [] => outln!("nothing added: the task was already queued"),
            [one] => outln!("added task {one} ({})", a.type_name),
            [first, .., last] => outln!(
                "added {} tasks ({}): ids {first}…{last}",
                ids.len(),
                a.type_name
            ),
        }
    }
    Ok(EXIT_OK)
}

fn check_args(args: &[(String, String)]) -> anyhow::Result<()> {
    if args.len() > ARGS_MAX {
        return Err(UsageError(format!(
            "--arg: at most {ARGS_MAX} arguments per task, got {}",
            args.len()
        ))
        .into());
    }
    let mut seen = BTreeSet::new();
    for (k, v) in args {
        if !valid_arg_name(k) {
            return Err(UsageError(format!(
                "--arg: {k:?} is not a valid argument name; use 1-64 characters of A-Z, a-z, 0-9, _, - and ."
            ))
            .into());
        }
        if !seen.insert(k) {
            return Err(UsageError(format!("--arg: {k} is given twice")).into());
        }
        if v.len() > ARG_VALUE_BYTES_MAX {
            return Err(UsageError(format!(
                "--arg {k}: the value is {} bytes; the limit is {ARG_VALUE_BYTES_MAX}",
                v.len()
            ))
            .into());
        }
        if v.contains('\0') {
            return Err(
                UsageError(format!("--arg {k}: the value contains a NUL character")).into(),
            );
        }
    }
    Ok(())
}

fn check_limit(limit: usize) -> anyhow::Result<()> {
    if limit == 0 || limit > LIMIT_MAX {
        return Err(UsageError(format!(
            "--limit: must be between 1 and {LIMIT_MAX}, got {limit}"
        ))
        .into());
    }
    Ok(())
}

/// A timestamp for humans (UTC, milliseconds).
fn when(t: Timestamp) -> String {
    t.to_sqlite_text()
}

/// A duration for humans, rounded to milliseconds.
fn took(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

fn state_of(row: &TaskRow) -> &'static str {
    if row.owner_id.is_some() {
        "running"
    } else {
        "pending"
    }
}

fn short(s: &str) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() > ERR_CELL_CHARS_MAX {
        let cut: String = one_line.chars().take(ERR_CELL_CHARS_MAX - 1).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

async fn ls(
    db_url: &str,
    json: bool,
    type_name: Option<String>,
    limit: usize,
) -> anyhow::Result<u8> {
    if let Some(t) = &type_name {
        check_type_name("--type", t)?;
    }
    check_limit(limit)?;
    let db = open_existing(db_url).await?;
    let admin = Admin::new(db);
    let rows = admin.tasks(type_name.as_deref(), limit).await?;
    let why = why_of_waiting(&admin, &rows).await?;
    let why_for = |r: &TaskRow| -> Option<&str> {
        r.owner_id
            .is_none()
            .then(|| why.get(&r.name).map(String::as_str))
            .flatten()
    };
    if json {
        #[derive(Serialize)]
        struct Listed<'a> {
            #[serde(flatten)]
            row: &'a TaskRow,
            state: &'static str,
            why: Option<&'a str>,
        }
        let listed: Vec<Listed<'_>> = rows
            .iter()
            .map(|row| Listed {
                row,
                state: state_of(row),
                why: why_for(row),
            })
            .collect();
        output::json(&listed)?;
        return Ok(EXIT_OK);
    }
    if rows.is_empty() {
        outln!("no pending or running tasks");
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&["ID", "TYPE", "STATE", "OWNER", "POSTED", "RETRIES", "WHY"]);
    for r in &rows {
        t.row(vec![
            r.id.to_string(),
            r.name.clone(),
            state_of(r).to_owned(),
            match (&r.owner_host, r.owner_id) {
                (Some(h), Some(id)) => format!("{h} (machine {id})"),
                (None, Some(id)) => format!("machine {id}"),
                _ => "-".to_owned(),
            },
            when(r.posted_time),
            r.retries.to_string(),
            why_for(r).map_or_else(|| "-".to_owned(), short),
        ]);
    }
    t.print();
    if rows.len() == limit {
        outln!("(first {limit}; raise --limit for more)");
    }
    Ok(EXIT_OK)
}

/// Most task types whose why `task ls` looks up (one answer per type, not per task).
const LS_WHY_TYPES_MAX: usize = 50;

/// The one-line why of each type with waiting tasks among `rows`.
async fn why_of_waiting(
    admin: &Admin,
    rows: &[TaskRow],
) -> anyhow::Result<BTreeMap<String, String>> {
    let names: BTreeSet<&str> = rows
        .iter()
        .filter(|r| r.owner_id.is_none())
        .map(|r| r.name.as_str())
        .collect();
    let dead_after = harmonytask::EngineConfig::default().dead_after;
    let mut out = BTreeMap::new();
    for name in names.into_iter().take(LS_WHY_TYPES_MAX) {
        let w = admin.why_type(name, dead_after).await?;
        out.insert(name.to_owned(), w.summary);
    }
    Ok(out)
}

#[derive(Serialize)]
struct Shown {
    id: TaskId,
    #[serde(rename = "type")]
    type_name: String,
    state: &'static str,
    owner_id: Option<i64>,
    owner_host: Option<String>,
    posted: Option<Timestamp>,
    retries: Option<i64>,
    args: BTreeMap<String, String>,
    attempts: Vec<Attempt>,
}

/// A history row with how it ended (`ok`, `failed`, or the kind of release).
#[derive(Serialize)]
struct Attempt {
    #[serde(flatten)]
    row: HistoryRow,
    outcome: AttemptResult,
}

impl From<HistoryRow> for Attempt {
    fn from(row: HistoryRow) -> Self {
        Attempt {
            outcome: row.attempt_result(),
            row,
        }
    }
}

async fn show(db_url: &str, json: bool, id: i64) -> anyhow::Result<u8> {
    let db = open_existing(db_url).await?;
    let admin = Admin::new(db);
    let id = TaskId(id);
    let row = admin.task(id).await?;
    let mut attempts = admin
        .history(&HistoryQuery {
            task: Some(id),
            limit: SHOW_ATTEMPTS_MAX,
            ..HistoryQuery::default()
        })
        .await?;
    attempts.reverse(); // oldest first
    let attempts: Vec<Attempt> = attempts.into_iter().map(Attempt::from).collect();
    let args: BTreeMap<String, String> = admin.task_args(id).await?.into_iter().collect();
    let shown = match (&row, attempts.last()) {
        (Some(r), _) => Shown {
            id,
            type_name: r.name.clone(),
            state: state_of(r),
            owner_id: r.owner_id.map(|m| m.0),
            owner_host: r.owner_host.clone(),
            posted: Some(r.posted_time),
            retries: Some(r.retries),
            args,
            attempts,
        },
        (None, Some(last)) => Shown {
            id,
            type_name: last.row.name.clone(),
            state: match last.outcome {
                AttemptResult::Ok => "done",
                AttemptResult::Cancelled => "cancelled",
                _ => "failed",
            },
            owner_id: None,
            owner_host: None,
            posted: Some(last.row.posted),
            // The row is gone with the task; its history says how many attempts failed.
            retries: Some(attempts.iter().filter(|a| a.outcome.is_failure()).count() as i64),
            args,
            attempts,
        },
        (None, None) => {
            return Err(UsageError(format!(
                "task {id} does not exist (no queued task and no history with that id)"
            ))
            .into());
        }
    };
    if json {
        output::json(&shown)?;
        return Ok(EXIT_OK);
    }
    outln!("task:     {} ({})", shown.id, shown.type_name);
    match (&shown.owner_host, shown.owner_id) {
        (Some(h), Some(m)) => outln!("state:    {} on {h} (machine {m})", shown.state),
        _ => outln!("state:    {}", shown.state),
    }
    if let Some(p) = shown.posted {
        outln!("posted:   {}", when(p));
    }
    if let Some(r) = shown.retries {
        outln!("retries:  {r}");
    }
    if shown.args.is_empty() {
        outln!("args:     none");
    } else {
        let kv: Vec<String> = shown.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
        outln!("args:     {}", kv.join(" "));
    }
    if shown.attempts.is_empty() {
        outln!("attempts: none finished yet");
        return Ok(EXIT_OK);
    }
    outln!("attempts:");
    let mut t = Table::new(&["#", "START", "TOOK", "RESULT", "BY", "ERROR"]);
    for (i, a) in shown.attempts.iter().enumerate() {
        t.row(vec![
            (i + 1).to_string(),
            when(a.row.work_start),
            took(a.row.work_end.since(a.row.work_start)),
            a.outcome.as_str().to_owned(),
            a.row.completed_by_host_and_port.clone(),
            a.row.err.clone(),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}

async fn history(
    db_url: &str,
    json: bool,
    type_name: Option<String>,
    failed: bool,
    limit: usize,
) -> anyhow::Result<u8> {
    if let Some(t) = &type_name {
        check_type_name("--type", t)?;
    }
    check_limit(limit)?;
    let db = open_existing(db_url).await?;
    let rows = Admin::new(db)
        .history(&HistoryQuery {
            name: type_name,
            task: None,
            failed_only: failed,
            limit,
        })
        .await?;
    let rows: Vec<Attempt> = rows.into_iter().map(Attempt::from).collect();
    if json {
        output::json(&rows)?;
        return Ok(EXIT_OK);
    }
    if rows.is_empty() {
        outln!("no history");
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&["TASK", "TYPE", "RESULT", "ENDED", "TOOK", "BY", "ERROR"]);
    for a in &rows {
        let r = &a.row;
        t.row(vec![
            r.task_id.to_string(),
            r.name.clone(),
            a.outcome.as_str().to_owned(),
            when(r.work_end),
            took(r.work_end.since(r.work_start)),
            r.completed_by_host_and_port.clone(),
            short(&r.err),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}

async fn restart(db_url: &str, json: bool, notify: &Peering, id: i64) -> anyhow::Result<u8> {
    let db = open_existing(db_url).await?;
    let id = TaskId(id);
    Admin::new(notify.attach(db))
        .with_notify(notify.enabled())
        .restart_task(id)
        .await?;
    if json {
        output::json(&serde_json::json!({ "restarted": id }))?;
    } else {
        outln!("task {id} re-queued");
    }
    Ok(EXIT_OK)
}

/// Most history rows one `task prune` transaction deletes (as a node's default).
const PRUNE_BATCH_MAX: usize = 10_000;

/// `task prune`: one prune round under the same lease the nodes use, or (`--dry-run`) the
/// counts of what it would delete.
async fn prune(
    db_url: &str,
    json: bool,
    older_than: Duration,
    type_name: Option<String>,
    dry_run: bool,
) -> anyhow::Result<u8> {
    if let Some(name) = &type_name {
        check_type_name("--type", name)?;
    }
    if older_than.is_zero() {
        return Err(UsageError(
            "--older-than: must be positive (0s would delete all finished history)".into(),
        )
        .into());
    }
    let db = open_existing(db_url).await?;
    let admin = Admin::new(db);
    let now = Timestamp::from_system(std::time::SystemTime::now());
    let age = humantime::format_duration(older_than).to_string();
    let scope = type_name
        .as_deref()
        .map_or_else(String::new, |n| format!(" of type {n}"));
    if dry_run {
        let would = admin
            .prune_count(older_than, type_name.as_deref(), now)
            .await?;
        if json {
            output::json(&serde_json::json!({
                "dry_run": true,
                "history": would.history,
                "args": would.args,
            }))?;
        } else {
            outln!(
                "would delete {} history rows and {} argument rows{scope} older than {age} (dry run: nothing deleted)",
                would.history,
                would.args
            );
        }
        return Ok(EXIT_OK);
    }
    let rule = harmonytask::PruneRule {
        older_than: Some(older_than),
        keep_per_type: None,
        name: type_name,
    };
    let holder = format!("harmony task prune (pid {})", std::process::id());
    let outcome = admin
        .prune_history(
            &holder,
            &rule,
            now,
            PRUNE_BATCH_MAX,
            &tokio_util::sync::CancellationToken::new(),
        )
        .await?;
    let report = match outcome {
        harmonytask::PruneOutcome::Ran(r) => r,
        harmonytask::PruneOutcome::Busy { holder } => {
            anyhow::bail!(
                "{holder} is pruning history right now (it holds the prune lease); run this again once it is done"
            );
        }
    };
    if json {
        output::json(&serde_json::json!({
            "dry_run": false,
            "history": report.deleted.history,
            "args": report.deleted.args,
            "batches": report.batches,
            "longest_batch_ms": report.longest_batch_ms,
        }))?;
    } else {
        outln!(
            "deleted {} history rows and {} argument rows{scope} older than {age} ({} batches, longest {:.1} ms)",
            report.deleted.history,
            report.deleted.args,
            report.batches,
            report.longest_batch_ms
        );
    }
    Ok(EXIT_OK)
}

/// `task run-now`: the type must be one that a node registered as a singleton; anything
/// else is refused and writes nothing.
async fn run_now(db_url: &str, json: bool, notify: &Peering, name: &str) -> anyhow::Result<u8> {
    check_type_name("NAME", name)?;
    let db = open_existing(db_url).await?;
    let admin = Admin::new(notify.attach(db)).with_notify(notify.enabled());
    match admin.run_now(name).await {
        Ok(()) => {}
        Err(e @ harmonytask::Error::NotSingleton(_)) => {
            let singletons = admin.singleton_names().await?;
            return Err(UsageError(format!(
                "{e}; singleton types: {}",
                if singletons.is_empty() {
                    "none".to_owned()
                } else {
                    singletons.join(", ")
                }
            ))
            .into());
        }
        Err(e) => return Err(e.into()),
    }
    if json {
        output::json(&serde_json::json!({ "run_now": name }))?;
    } else if notify.enabled() {
        outln!("{name}: run-now requested; a node that runs it starts it now");
    } else {
        outln!("{name}: run-now requested; with --notify off the nodes see it at their next poll");
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn args_are_checked() {
        assert!(check_args(&[kv("ms", "10"), kv("input", "x'); DROP TABLE t;--")]).is_ok());
        assert!(check_args(&[kv("", "1")]).is_err());
        assert!(check_args(&[kv("a b", "1")]).is_err());
        assert!(check_args(&[kv("a", "1"), kv("a", "2")]).is_err());
        assert!(check_args(&[kv("a", &"x".repeat(ARG_VALUE_BYTES_MAX + 1))]).is_err());
        assert!(check_args(&[kv("a", "nul\0")]).is_err());
    }

    #[test]
    fn long_errors_are_cut() {
        assert_eq!(short("a\nb"), "a b");
        assert_eq!(short(&"x".repeat(200)).chars().count(), ERR_CELL_CHARS_MAX);
    }
}
