//! `harmony task why|cancel|pause|resume`: asking why work waits, and steering it.

use harmonytask::{Admin, EngineConfig, TaskId, TaskState, TypeWhy};

use crate::commands::peering::Peering;
use crate::commands::{EXIT_OK, UsageError, check_type_name, open_existing};
use crate::output::{self, Table};

/// Who an operator write is recorded as: `cli:USER@HOST`.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("cli:{user}@{host}")
}

/// A node's heartbeat older than this (the engine's default dead-after) makes its reasons
/// stale.
fn dead_after() -> std::time::Duration {
    EngineConfig::default().dead_after
}

/// `task why ID` / `task why --type NAME`.
pub async fn why(
    db_url: &str,
    json: bool,
    id: Option<i64>,
    type_name: Option<String>,
) -> anyhow::Result<u8> {
    if let Some(name) = &type_name {
        check_type_name("--type", name)?;
    }
    let db = open_existing(db_url).await?;
    let admin = Admin::new(db);
    match (id, type_name) {
        (Some(id), _) => {
            let w = admin.why_task(TaskId(id), dead_after()).await?;
            if json {
                output::json(&w)?;
                return Ok(EXIT_OK);
            }
            let name = w.name.as_deref().unwrap_or("?");
            outln!("task {id} ({name}): {}", w.summary);
            if w.state == TaskState::Waiting
                && let Some(t) = &w.type_why
            {
                print_nodes(t);
            }
        }
        (None, Some(name)) => {
            let w = admin.why_type(&name, dead_after()).await?;
            if json {
                output::json(&w)?;
                return Ok(EXIT_OK);
            }
            outln!("{name}: {}", w.summary);
            print_nodes(&w);
        }
        (None, None) => return Err(UsageError("give a task id or --type NAME".into()).into()),
    }
    Ok(EXIT_OK)
}

fn print_nodes(w: &TypeWhy) {
    if w.nodes.is_empty() {
        return;
    }
    let mut t = Table::new(&["MACHINE", "ADDRESS", "REASON", "SINCE"]);
    for n in &w.nodes {
        t.row(vec![
            n.machine_id.to_string(),
            n.host_and_port.clone(),
            n.detail.clone(),
            n.since
                .map_or_else(|| "-".to_owned(), |s| s.to_sqlite_text()),
        ]);
    }
    t.print();
}

/// `task cancel ID…` / `task cancel --type NAME --all-waiting`.
pub async fn cancel(
    db_url: &str,
    json: bool,
    notify: &Peering,
    ids: Vec<i64>,
    all_waiting: bool,
    type_name: Option<String>,
) -> anyhow::Result<u8> {
    if let Some(name) = &type_name {
        check_type_name("--type", name)?;
    }
    if all_waiting && !ids.is_empty() {
        return Err(
            UsageError("give task ids or --type NAME --all-waiting, not both".into()).into(),
        );
    }
    let db = open_existing(db_url).await?;
    let admin = Admin::new(notify.attach(db)).with_notify(notify.enabled());
    let by = operator();
    if let (true, Some(name)) = (all_waiting, &type_name) {
        let n = admin.cancel_waiting(name, &by).await?;
        if json {
            output::json(&serde_json::json!({ "type": name, "cancelled": n }))?;
        } else {
            outln!("cancelled {n} waiting {name} tasks");
        }
        return Ok(EXIT_OK);
    }
    // Every id is tried; the unknown ones are reported together at the end.
    let mut done = Vec::new();
    let mut missing = Vec::new();
    for id in ids {
        match admin.cancel(TaskId(id), &by).await {
            Ok(c) => done.push(c),
            Err(harmonytask::Error::TaskNotFound(id)) => missing.push(id),
            Err(e) => return Err(e.into()),
        }
    }
    if json {
        output::json(&serde_json::json!({ "cancelled": done, "not_found": missing }))?;
    } else {
        for c in &done {
            match c.owner {
                Some(m) => outln!(
                    "cancelled task {} ({}): it was running on machine {m}, which stops it",
                    c.id,
                    c.name
                ),
                None => outln!("cancelled task {} ({})", c.id, c.name),
            }
        }
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
        return Err(UsageError(format!(
            "no waiting or running task {} (finished, cancelled already, or never added)",
            list.join(", ")
        ))
        .into());
    }
    Ok(EXIT_OK)
}

/// `task pause NAME` / `task resume NAME`.
pub async fn pause(
    db_url: &str,
    json: bool,
    notify: &Peering,
    name: &str,
    pause: bool,
) -> anyhow::Result<u8> {
    check_type_name("NAME", name)?;
    let db = open_existing(db_url).await?;
    let admin = Admin::new(notify.attach(db)).with_notify(notify.enabled());
    let changed = if pause {
        admin.pause(name, &operator()).await?
    } else {
        admin.resume(name).await?
    };
    if json {
        let key = if pause { "paused" } else { "resumed" };
        output::json(&serde_json::json!({ "type": name, key: changed }))?;
    } else {
        match (pause, changed) {
            (true, true) => {
                outln!("{name}: paused on every node; running tasks finish, none are claimed")
            }
            (true, false) => outln!("{name}: already paused"),
            (false, true) => outln!("{name}: resumed"),
            (false, false) => outln!("{name}: was not paused"),
        }
    }
    Ok(EXIT_OK)
}
