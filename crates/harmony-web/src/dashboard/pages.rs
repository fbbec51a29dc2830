//! The pages' content: what each page reads, and its template. Text from users (type names,
//! arguments, error messages) goes through askama's HTML escaping; only the charts, built and
//! escaped in [`super::chart`], are inserted as markup.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::http::StatusCode;
use harmonytask::{
    HistoryPageQuery, HistoryRow, MachineId, MachineRow, QueueState, TaskId, TaskPageQuery,
    TaskRow, TaskState,
};
use serde::Deserialize;

use super::View;
use super::chart;
use super::live::{Rendered, Snapshot};
use super::units::{ago, bytes, duration_ms, percent, units, when};
use crate::State;
use crate::cluster::QUEUE_DEPTH_CAP;

/// Rows per page of the task and history lists.
pub const PAGE_ROWS: usize = 50;
/// A run of at least this many alike tasks (same type, state and owner) is folded into one
/// "N similar" row.
pub const SIMILAR_MIN: usize = 4;
/// Failures and attempts listed on a type's page.
pub const TYPE_HISTORY_ROWS: usize = 20;
/// Attempts listed on a task's page.
pub const TASK_ATTEMPTS_MAX: usize = 200;
/// A machine's page looks for its attempts among the cluster's newest this many.
pub const MACHINE_HISTORY_SCAN: usize = 10_000;

// ---- filters ----

/// `/tasks` query.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksFilter {
    #[serde(rename = "type", default)]
    name: Option<String>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    offset: Option<String>,
}

fn bad_filter(msg: String) -> Rendered {
    error_page(StatusCode::BAD_REQUEST, "Bad filter", &msg)
}

fn blank(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn parse_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, Rendered> {
    let uri: axum::http::Uri = format!("/?{query}")
        .parse()
        .map_err(|e| bad_filter(format!("{e}")))?;
    axum::extract::Query::<T>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| bad_filter(e.body_text()))
}

fn check_name(name: Option<&str>) -> Result<(), Rendered> {
    match name {
        Some(n) => harmonytask::validate_name(n).map_err(|e| bad_filter(format!("type: {e}"))),
        None => Ok(()),
    }
}

impl TasksFilter {
    pub fn parse(query: &str) -> Result<TasksFilter, Rendered> {
        let f: TasksFilter = parse_query(query)?;
        check_name(blank(&f.name))?;
        if let Some(o) = blank(&f.owner) {
            o.parse::<i64>()
                .map_err(|_| bad_filter(format!("owner {o:?} is not a machine id")))?;
        }
        match blank(&f.state) {
            None | Some("waiting" | "running") => {}
            Some(s) => return Err(bad_filter(format!("state {s:?}: waiting or running"))),
        }
        if let Some(o) = blank(&f.offset) {
            o.parse::<usize>()
                .map_err(|_| bad_filter(format!("offset {o:?} is not a number")))?;
        }
        Ok(f)
    }
    fn name(&self) -> Option<&str> {
        blank(&self.name)
    }
    fn owner(&self) -> Option<i64> {
        blank(&self.owner).and_then(|o| o.parse().ok())
    }
    fn state(&self) -> Option<QueueState> {
        match blank(&self.state) {
            Some("waiting") => Some(QueueState::Waiting),
            Some("running") => Some(QueueState::Running),
            _ => None,
        }
    }
    fn offset(&self) -> usize {
        blank(&self.offset)
            .and_then(|o| o.parse().ok())
            .unwrap_or(0)
    }
    fn url(&self, offset: usize) -> String {
        let mut q = Vec::new();
        if let Some(n) = self.name() {
            q.push(format!("type={n}"));
        }
        if let Some(o) = self.owner() {
            q.push(format!("owner={o}"));
        }
        if let Some(s) = blank(&self.state) {
            q.push(format!("state={s}"));
        }
        if offset > 0 {
            q.push(format!("offset={offset}"));
        }
        if q.is_empty() {
            "/tasks".into()
        } else {
            format!("/tasks?{}", q.join("&"))
        }
    }
}

/// `/history` query.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryFilter {
    #[serde(rename = "type", default)]
    name: Option<String>,
    #[serde(default)]
    failures: Option<String>,
    #[serde(default)]
    before: Option<String>,
}

impl HistoryFilter {
    pub fn parse(query: &str) -> Result<HistoryFilter, Rendered> {
        let f: HistoryFilter = parse_query(query)?;
        check_name(blank(&f.name))?;
        if let Some(b) = blank(&f.before) {
            b.parse::<i64>()
                .map_err(|_| bad_filter(format!("before {b:?} is not a history id")))?;
        }
        Ok(f)
    }
    fn name(&self) -> Option<&str> {
        blank(&self.name)
    }
    fn failures(&self) -> bool {
        matches!(blank(&self.failures), Some("on" | "true" | "1"))
    }
    fn before(&self) -> Option<i64> {
        blank(&self.before).and_then(|b| b.parse().ok())
    }
    fn url(&self, before: Option<i64>) -> String {
        let mut q = Vec::new();
        if let Some(n) = self.name() {
            q.push(format!("type={n}"));
        }
        if self.failures() {
            q.push("failures=on".to_owned());
        }
        if let Some(b) = before {
            q.push(format!("before={b}"));
        }
        if q.is_empty() {
            "/history".into()
        } else {
            format!("/history?{}", q.join("&"))
        }
    }
}

// ---- shared pieces ----

/// A resource bar.
pub struct Bar {
    label: &'static str,
    text: String,
    pct: u32,
}

/// A machine as the pages show it.
pub struct MachineView {
    id: i64,
    name: String,
    addr: String,
    version: String,
    uptime: String,
    last_contact: String,
    stale: bool,
    cordoned: bool,
    restarting: bool,
    running: i64,
    layers: String,
    types: Vec<String>,
    bars: Vec<Bar>,
    local: bool,
}

fn machine_view(m: &MachineRow, snap: &Snapshot) -> MachineView {
    let now = snap.now.unwrap_or(m.last_contact);
    let local = snap
        .status
        .as_ref()
        .filter(|s| s.machine_id == m.id)
        .map(|s| s.reserved);
    let bar = |label, used: Option<f64>, budget: f64, fmt: fn(f64) -> String| match used {
        Some(u) => Bar {
            label,
            text: format!("{} of {} reserved", fmt(u), fmt(budget)),
            pct: percent(u, budget),
        },
        None => Bar {
            label,
            text: format!("budget {}", fmt(budget)),
            pct: 0,
        },
    };
    let mut bars = vec![
        bar("CPU", local.map(|r| r.cpu), m.cpu, units),
        bar("RAM", local.map(|r| r.ram as f64), m.ram as f64, bytes),
    ];
    if m.gpu > 0.0 {
        bars.push(bar("GPU", local.map(|r| r.gpu), m.gpu, units));
    }
    let dead_ms = i64::try_from(crate::api::dead_after().as_millis()).unwrap_or(i64::MAX);
    MachineView {
        id: m.id.0,
        name: if m.name.is_empty() {
            m.host_and_port.clone()
        } else {
            m.name.clone()
        },
        addr: m.host_and_port.clone(),
        version: m.version.clone(),
        uptime: m.startup_time.map_or_else(
            || "—".into(),
            |t| duration_ms(now.as_millis() - t.as_millis()),
        ),
        last_contact: ago(now, m.last_contact),
        stale: now.as_millis() - m.last_contact.as_millis() > dead_ms,
        cordoned: m.unschedulable,
        restarting: m.restart_request.is_some(),
        running: m.running,
        layers: m.layers.clone(),
        types: m
            .tasks
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        bars,
        local: local.is_some(),
    }
}

/// A type's card.
pub struct TypeCard {
    name: String,
    waiting: String,
    running: i64,
    ok24: i64,
    failed24: i64,
    rate: String,
    singleton: bool,
    paused: Option<String>,
    blocked: Option<String>,
}

fn type_cards(snap: &Snapshot) -> Vec<TypeCard> {
    let mut names: BTreeMap<&str, ()> = BTreeMap::new();
    for (n, _) in snap.waiting.iter().chain(&snap.running) {
        names.insert(n, ());
    }
    for c in snap.history24.iter() {
        names.insert(&c.name, ());
    }
    for m in &snap.machines {
        for t in m.tasks.split(',').filter(|t| !t.is_empty()) {
            names.insert(t, ());
        }
    }
    names.keys().map(|name| type_card(snap, name)).collect()
}

fn waiting_text(n: i64) -> String {
    if usize::try_from(n).is_ok_and(|n| n >= QUEUE_DEPTH_CAP) {
        format!("{n}+")
    } else {
        n.to_string()
    }
}

fn type_card(snap: &Snapshot, name: &str) -> TypeCard {
    let h = snap.history24.iter().find(|c| c.name == name);
    let (ok, failed) = h.map_or((0, 0), |c| (c.succeeded, c.failed));
    let waiting = snap.waiting_of(name);
    let blocked = if waiting > 0 {
        let mut reasons: Vec<String> = snap
            .blocked
            .iter()
            .filter(|b| b.task_name == name)
            .map(|b| format!("{}: {}", b.host_and_port, b.detail))
            .collect();
        reasons.dedup();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    } else {
        None
    };
    TypeCard {
        name: name.to_owned(),
        waiting: waiting_text(waiting),
        running: snap.running_of(name),
        ok24: ok,
        failed24: failed,
        rate: if ok + failed == 0 {
            "—".into()
        } else {
            format!("{:.1} %", failed as f64 * 100.0 / (ok + failed) as f64)
        },
        singleton: snap.singletons.iter().any(|s| s == name),
        paused: snap
            .paused
            .iter()
            .find(|p| p.task_name == name)
            .map(|p| format!("paused by {} at {}", p.paused_by, when(p.paused_at))),
        blocked,
    }
}

/// A task row of a list.
pub struct TaskLine {
    id: i64,
    name: String,
    state: &'static str,
    owner: String,
    owner_id: Option<i64>,
    posted: String,
    retries: i64,
}

fn task_line(t: &TaskRow, now: harmonydb::Timestamp) -> TaskLine {
    TaskLine {
        id: t.id.0,
        name: t.name.clone(),
        state: if t.owner_id.is_some() {
            "running"
        } else {
            "waiting"
        },
        owner: t.owner_host.clone().unwrap_or_default(),
        owner_id: t.owner_id.map(|m| m.0),
        posted: ago(now, t.posted_time),
        retries: t.retries,
    }
}

/// Rows of a task list: a task, or a run of alike tasks folded into one.
pub enum TaskGroup {
    One(TaskLine),
    Similar {
        first: TaskLine,
        rest: Vec<TaskLine>,
    },
}

fn coalesce(lines: Vec<TaskLine>) -> Vec<TaskGroup> {
    let mut groups: Vec<Vec<TaskLine>> = Vec::new();
    for l in lines {
        match groups.last_mut() {
            Some(g)
                if g[0].name == l.name && g[0].state == l.state && g[0].owner_id == l.owner_id =>
            {
                g.push(l)
            }
            _ => groups.push(vec![l]),
        }
    }
    let mut out = Vec::new();
    for mut g in groups {
        if g.len() >= SIMILAR_MIN {
            let rest = g.split_off(1);
            let first = g.pop().expect("a group has a first line");
            out.push(TaskGroup::Similar { first, rest });
        } else {
            out.extend(g.into_iter().map(TaskGroup::One));
        }
    }
    out
}

/// A history row as the pages show it.
pub struct AttemptLine {
    task_id: i64,
    name: String,
    machine: String,
    posted: String,
    queued: String,
    took: String,
    ok: bool,
    err: String,
}

fn attempt_line(h: &HistoryRow) -> AttemptLine {
    AttemptLine {
        task_id: h.task_id,
        name: h.name.clone(),
        machine: h.completed_by_host_and_port.clone(),
        posted: when(h.posted),
        queued: duration_ms(h.work_start.as_millis() - h.posted.as_millis()),
        took: duration_ms(h.work_end.as_millis() - h.work_start.as_millis()),
        ok: h.result,
        err: h.err.clone(),
    }
}

// ---- templates ----

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage<'a> {
    updated: String,
    error: Option<&'a str>,
    machines: Vec<MachineView>,
    types: Vec<TypeCard>,
    waiting_total: String,
    running_total: i64,
    throughput_chart: String,
    queue_chart: String,
}

#[derive(Template)]
#[template(path = "tasks.html")]
struct TasksPage<'a> {
    filter_name: &'a str,
    filter_owner: String,
    filter_state: &'a str,
    type_names: Vec<String>,
    machines: Vec<(i64, String)>,
    groups: Vec<TaskGroup>,
    shown: usize,
    offset: usize,
    prev: Option<String>,
    next: Option<String>,
}

#[derive(Template)]
#[template(path = "history.html")]
struct HistoryPage<'a> {
    filter_name: &'a str,
    failures: bool,
    type_names: Vec<String>,
    rows: Vec<AttemptLine>,
    newest: Option<String>,
    older: Option<String>,
}

#[derive(Template)]
#[template(path = "type.html")]
struct TypePage {
    card: TypeCard,
    settings: Option<harmonytask::TypeSettings>,
    cost: String,
    machines: Vec<(i64, String)>,
    why: harmonytask::TypeWhy,
    singleton: Option<SingletonCard>,
    failures: Vec<AttemptLine>,
    recent: Vec<AttemptLine>,
}

struct SingletonCard {
    running: bool,
    pending_request: bool,
    task_id: Option<i64>,
    last_run: String,
}

#[derive(Template)]
#[template(path = "task.html")]
struct TaskPage {
    id: i64,
    name: String,
    state: &'static str,
    summary: String,
    owner: Option<(i64, String)>,
    posted: String,
    retries: Option<i64>,
    args: Vec<(String, String)>,
    attempts: Vec<AttemptLine>,
    can_cancel: bool,
    can_restart: bool,
}

#[derive(Template)]
#[template(path = "machine.html")]
struct MachinePage {
    m: MachineView,
    running: Vec<TaskLine>,
    local_running: Vec<(i64, String, String)>,
    recent: Vec<AttemptLine>,
    scan: usize,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    detail: &'a str,
}

/// An error page body with `status`.
pub fn error_page(status: StatusCode, title: &str, detail: &str) -> Rendered {
    Rendered {
        title: title.to_owned(),
        status,
        html: ErrorPage { title, detail }
            .render()
            .unwrap_or_else(|e| format!("template error: {e}")),
    }
}

fn ok(title: String, t: impl Template) -> Rendered {
    match t.render() {
        Ok(html) => Rendered {
            title,
            status: StatusCode::OK,
            html,
        },
        Err(e) => error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Template error",
            &e.to_string(),
        ),
    }
}

fn unavailable(e: harmonytask::Error) -> Rendered {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Database unavailable",
        &harmonydb::redact(&e.to_string()),
    )
}

/// Renders one page.
pub async fn render(state: &Arc<State>, view: &View, snap: &Arc<Snapshot>) -> Rendered {
    let r = match view {
        View::Overview => Ok(overview(snap)),
        View::Tasks(f) => tasks(state, snap, f).await,
        View::History(f) => history(state, snap, f).await,
        View::Type(name) => type_page(state, snap, name).await,
        View::Task(id) => task_page(state, snap, *id).await,
        View::Machine(id) => machine_page(state, snap, *id).await,
    };
    r.unwrap_or_else(unavailable)
}

fn type_names(snap: &Snapshot) -> Vec<String> {
    type_cards(snap).into_iter().map(|c| c.name).collect()
}

fn machine_names(snap: &Snapshot) -> Vec<(i64, String)> {
    snap.machines
        .iter()
        .map(|m| (m.id.0, m.host_and_port.clone()))
        .collect()
}

fn overview(snap: &Snapshot) -> Rendered {
    let now_ms = snap.now.map_or(0, |t| t.as_millis());
    let waiting: i64 = snap.waiting.iter().map(|(_, n)| n).sum();
    let capped = snap
        .waiting
        .iter()
        .any(|(_, n)| usize::try_from(*n).is_ok_and(|n| n >= QUEUE_DEPTH_CAP));
    ok(
        "Overview".into(),
        OverviewPage {
            updated: snap.now.map_or_else(|| "not yet".into(), when),
            error: snap.error.as_deref(),
            machines: snap
                .machines
                .iter()
                .map(|m| machine_view(m, snap))
                .collect(),
            types: type_cards(snap),
            waiting_total: if capped {
                format!("{waiting}+")
            } else {
                waiting.to_string()
            },
            running_total: snap.running.iter().map(|(_, n)| n).sum(),
            throughput_chart: chart::render(
                "Throughput (completions per second)",
                "per s",
                &snap.samples,
                now_ms,
                |s| s.done_per_s,
            ),
            queue_chart: chart::render(
                "Queue depth (waiting tasks)",
                "tasks",
                &snap.samples,
                now_ms,
                |s| s.waiting as f64,
            ),
        },
    )
}

async fn tasks(
    state: &State,
    snap: &Snapshot,
    f: &TasksFilter,
) -> Result<Rendered, harmonytask::Error> {
    let offset = f.offset();
    let limit = PAGE_ROWS + 1;
    let mut rows = match f.owner() {
        Some(owner) => {
            let mut rows = state
                .admin
                .machine_tasks(MachineId(owner), limit + offset, 0)
                .await?;
            rows.retain(|r| f.name().is_none_or(|n| r.name == n));
            rows.into_iter().skip(offset).collect()
        }
        None => {
            state
                .admin
                .task_page(&TaskPageQuery {
                    name: f.name().map(str::to_owned),
                    state: f.state(),
                    limit,
                    offset,
                })
                .await?
        }
    };
    let more = rows.len() > PAGE_ROWS;
    rows.truncate(PAGE_ROWS);
    let now = snap
        .now
        .unwrap_or_else(|| harmonydb::Timestamp::from_system(std::time::SystemTime::now()));
    let shown = rows.len();
    let lines = rows.iter().map(|t| task_line(t, now)).collect();
    Ok(ok(
        "Active tasks".into(),
        TasksPage {
            filter_name: f.name().unwrap_or(""),
            filter_owner: f.owner().map(|o| o.to_string()).unwrap_or_default(),
            filter_state: blank(&f.state).unwrap_or(""),
            type_names: type_names(snap),
            machines: machine_names(snap),
            groups: coalesce(lines),
            shown,
            offset,
            prev: (offset > 0).then(|| f.url(offset.saturating_sub(PAGE_ROWS))),
            next: more.then(|| f.url(offset + PAGE_ROWS)),
        },
    ))
}

async fn history(
    state: &State,
    snap: &Snapshot,
    f: &HistoryFilter,
) -> Result<Rendered, harmonytask::Error> {
    let mut rows = state
        .admin
        .history_page(&HistoryPageQuery {
            name: f.name().map(str::to_owned),
            failures_only: f.failures(),
            before: f.before(),
            limit: PAGE_ROWS + 1,
        })
        .await?;
    let more = rows.len() > PAGE_ROWS;
    rows.truncate(PAGE_ROWS);
    Ok(ok(
        "History".into(),
        HistoryPage {
            filter_name: f.name().unwrap_or(""),
            failures: f.failures(),
            type_names: type_names(snap),
            rows: rows.iter().map(attempt_line).collect(),
            newest: f.before().is_some().then(|| f.url(None)),
            older: if more {
                rows.last().map(|r| f.url(Some(r.id)))
            } else {
                None
            },
        },
    ))
}

async fn type_page(
    state: &State,
    snap: &Snapshot,
    name: &str,
) -> Result<Rendered, harmonytask::Error> {
    let card = type_card(snap, name);
    let machines: Vec<(i64, String)> = snap
        .machines
        .iter()
        .filter(|m| m.tasks.split(',').any(|t| t == name))
        .map(|m| (m.id.0, m.host_and_port.clone()))
        .collect();
    let why = state.admin.why_type(name, crate::api::dead_after()).await?;
    let known = !machines.is_empty()
        || snap.history24.iter().any(|c| c.name == name)
        || snap.waiting_of(name) > 0
        || snap.running_of(name) > 0;
    let failures = state
        .admin
        .history_page(&HistoryPageQuery {
            name: Some(name.to_owned()),
            failures_only: true,
            before: None,
            limit: TYPE_HISTORY_ROWS,
        })
        .await?;
    let recent = state
        .admin
        .history_page(&HistoryPageQuery {
            name: Some(name.to_owned()),
            failures_only: false,
            before: None,
            limit: TYPE_HISTORY_ROWS,
        })
        .await?;
    if !known && recent.is_empty() {
        return Ok(error_page(
            StatusCode::NOT_FOUND,
            "No such type",
            &format!(
                "No machine registers the type {name:?}, and it has no waiting, running or recorded tasks."
            ),
        ));
    }
    let singleton = if card.singleton {
        state.admin.singleton(name).await?.map(|s| SingletonCard {
            running: s.task_id.is_some(),
            pending_request: s.run_now_request,
            task_id: s.task_id.map(|t| t.0),
            last_run: s.last_run_time.map_or_else(|| "never".into(), when),
        })
    } else {
        None
    };
    let settings = snap.settings.iter().find(|s| s.name == name).cloned();
    let cost = settings.as_ref().map_or_else(String::new, |s| {
        let mut c = format!(
            "{} CPU, {} RAM",
            units(s.cost.cpu),
            bytes(s.cost.ram as f64)
        );
        if s.cost.gpu > 0.0 {
            c.push_str(&format!(", {} GPU", units(s.cost.gpu)));
        }
        if s.cost.storage > 0 {
            c.push_str(&format!(", {} storage", bytes(s.cost.storage as f64)));
        }
        c
    });
    Ok(ok(
        format!("Type {name}"),
        TypePage {
            card,
            settings,
            cost,
            machines,
            why,
            singleton,
            failures: failures.iter().map(attempt_line).collect(),
            recent: recent.iter().map(attempt_line).collect(),
        },
    ))
}

async fn task_page(
    state: &State,
    snap: &Snapshot,
    id: i64,
) -> Result<Rendered, harmonytask::Error> {
    let tid = TaskId(id);
    let why = state.admin.why_task(tid, crate::api::dead_after()).await?;
    if why.state == TaskState::Unknown {
        return Ok(error_page(
            StatusCode::NOT_FOUND,
            "No such task",
            &why.summary,
        ));
    }
    let row = state.admin.task(tid).await?;
    let attempts = state.admin.task_attempts(tid, TASK_ATTEMPTS_MAX).await?;
    let mut args: Vec<(String, String)> = state.admin.task_args(tid).await?.into_iter().collect();
    args.sort();
    let now = snap
        .now
        .unwrap_or_else(|| harmonydb::Timestamp::from_system(std::time::SystemTime::now()));
    let name = why
        .name
        .clone()
        .or_else(|| attempts.last().map(|a| a.name.clone()))
        .unwrap_or_default();
    Ok(ok(
        format!("Task {id}"),
        TaskPage {
            id,
            name,
            state: why.state.as_str(),
            summary: why.summary.clone(),
            owner: row.as_ref().and_then(|r| {
                r.owner_id
                    .map(|o| (o.0, r.owner_host.clone().unwrap_or_default()))
            }),
            posted: row
                .as_ref()
                .map(|r| format!("{} ({})", when(r.posted_time), ago(now, r.posted_time)))
                .or_else(|| attempts.first().map(|a| when(a.posted)))
                .unwrap_or_default(),
            retries: row.as_ref().map(|r| r.retries),
            args,
            attempts: attempts.iter().map(attempt_line).collect(),
            can_cancel: matches!(why.state, TaskState::Waiting | TaskState::Running),
            can_restart: why.state == TaskState::Failed,
        },
    ))
}

async fn machine_page(
    state: &State,
    snap: &Snapshot,
    id: i64,
) -> Result<Rendered, harmonytask::Error> {
    let Some(m) = snap.machines.iter().find(|m| m.id.0 == id) else {
        return Ok(error_page(
            StatusCode::NOT_FOUND,
            "No such machine",
            &format!(
                "Machine {id} is not registered (it stopped, or the cluster declared it dead)."
            ),
        ));
    };
    let now = snap.now.unwrap_or(m.last_contact);
    let running = state
        .admin
        .machine_tasks(m.id, PAGE_ROWS, 0)
        .await?
        .iter()
        .map(|t| task_line(t, now))
        .collect();
    let recent = state
        .admin
        .machine_history(&m.host_and_port, TYPE_HISTORY_ROWS, MACHINE_HISTORY_SCAN)
        .await?;
    let local_running = snap
        .status
        .as_ref()
        .filter(|s| s.machine_id == m.id)
        .map(|s| {
            s.running
                .iter()
                .map(|r| {
                    (
                        r.id.0,
                        r.name.clone(),
                        duration_ms(i64::try_from(r.running_for_ms).unwrap_or(i64::MAX)),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let view = machine_view(m, snap);
    Ok(ok(
        format!("Machine {}", view.name),
        MachinePage {
            m: view,
            running,
            local_running,
            recent: recent.iter().map(attempt_line).collect(),
            scan: MACHINE_HISTORY_SCAN,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: i64, name: &str) -> TaskLine {
        TaskLine {
            id,
            name: name.into(),
            state: "waiting",
            owner: String::new(),
            owner_id: None,
            posted: String::new(),
            retries: 0,
        }
    }

    #[test]
    fn long_runs_of_alike_tasks_fold() {
        let mut lines: Vec<TaskLine> = (1..=6).map(|i| line(i, "a")).collect();
        lines.push(line(7, "b"));
        lines.push(line(8, "a"));
        let groups = coalesce(lines);
        assert_eq!(groups.len(), 3);
        assert!(
            matches!(&groups[0], TaskGroup::Similar { first, rest } if first.id == 1 && rest.len() == 5)
        );
        assert!(matches!(&groups[1], TaskGroup::One(l) if l.id == 7));
    }

    #[test]
    fn filters_refuse_bad_values() {
        assert!(TasksFilter::parse("type=a&owner=&state=").is_ok());
        assert_eq!(
            TasksFilter::parse("owner=x").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            TasksFilter::parse("color=red").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let f = HistoryFilter::parse("type=a&failures=on").unwrap();
        assert_eq!(f.url(Some(9)), "/history?type=a&failures=on&before=9");
    }
}
