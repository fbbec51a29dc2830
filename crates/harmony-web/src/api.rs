//! The handlers: `/healthz`, `/metrics` and the JSON API under `/api/v1/`.
//!
//! Every input is checked before anything is read or written: path ids and query parameters
//! parse into typed values (unknown query parameters are refused, so a typo is not silently
//! ignored), write bodies must be empty or a JSON object without unknown fields, and a write
//! passes the token rule ([`crate::auth`]) first. Errors answer with [`ApiError`].

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use harmonytask::{
    HistoryPageQuery, HistoryRow, MachineId, MachineRow, QueueState, TaskId, TaskPageQuery, TaskRow,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::{WriteDecision, write_access};
use crate::cluster::QUEUE_DEPTH_CAP;
use crate::error::ApiError;
use crate::{PAGE_LIMIT_DEFAULT, PAGE_LIMIT_MAX, State};

/// Most attempts listed for one task.
const TASK_ATTEMPTS_MAX: usize = 1_000;

type Shared = AxState<Arc<State>>;
type ApiResult<T = Response> = Result<T, ApiError>;

/// Query parameters parsed with a JSON 400 on error.
pub(crate) struct Q<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Q(v))
            .map_err(|e| ApiError::bad_request(format!("query parameters: {}", e.body_text())))
    }
}

/// Path parameters parsed with a JSON 400 on error.
pub(crate) struct P<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| P(v))
            .map_err(|e| ApiError::bad_request(format!("path: {}", e.body_text())))
    }
}

/// The body of a write action: empty, or a JSON object. No action takes options yet; an
/// unknown field is refused so that a client never believes an option was applied.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {}

fn check_action_body(body: &Bytes) -> ApiResult<()> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    serde_json::from_slice::<ActionBody>(body)
        .map(|_| ())
        .map_err(|e| ApiError::bad_request(format!("request body: {e} (send no body, or {{}})")))
}

/// Applies the token rule to a write request.
fn authorize(state: &State, headers: &HeaderMap) -> ApiResult<()> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match write_access(state.write_mode, state.token.as_ref(), authorization) {
        WriteDecision::Allow => Ok(()),
        WriteDecision::ReadOnly => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "read_only",
            message: "this server is read-only: it listens beyond loopback and no API token is configured (start it with --api-token or HARMONY_API_TOKEN)".into(),
        }),
        WriteDecision::MissingToken => Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "unauthorized",
            message: "write actions need the header Authorization: Bearer <API token>".into(),
        }),
        WriteDecision::WrongToken => Err(ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "forbidden",
            message: "the bearer token is not this server's API token".into(),
        }),
    }
}

/// Checks authorization and the body, in that order (an unauthorized client learns nothing
/// about the body rules).
fn precheck_write(state: &State, headers: &HeaderMap, body: &Body) -> ApiResult<()> {
    authorize(state, headers)?;
    match body {
        Ok(bytes) => check_action_body(bytes),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "too_large",
            message: format!(
                "request body over the limit of {} bytes",
                crate::BODY_LIMIT_BYTES
            ),
        }),
        Err(rejection) => Err(ApiError::bad_request(format!(
            "request body: {}",
            rejection.body_text()
        ))),
    }
}

/// A write action's body, read up to the body limit.
type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

/// A type name from a path or query: a 400 naming the rule when it breaks it.
fn check_type(name: &str) -> ApiResult<()> {
    harmonytask::validate_name(name).map_err(|e| ApiError::bad_request(format!("type: {e}")))
}

fn ok_action(action: &str, target: Value) -> Response {
    Json(json!({ "ok": true, "action": action, "target": target })).into_response()
}

// ---- health and metrics ----

pub async fn healthz(AxState(state): Shared) -> Response {
    let mut r = health(&state).await;
    if r.0 != StatusCode::OK {
        // The same `error` field as every other failed request.
        r.1["error"] = r.1["reason"].clone();
        r.1["kind"] = json!("unhealthy");
        r.1["status"] = json!(r.0.as_u16());
    }
    (r.0, Json(r.1)).into_response()
}

async fn health(state: &State) -> (StatusCode, Value) {
    let database = state.admin.ping().await;
    let mut body = json!({ "ok": false, "database": "reachable" });
    if let Err(e) = &database {
        body["database"] = json!("unreachable");
        body["reason"] = json!(format!(
            "database unreachable: {}",
            harmonydb::redact(&e.to_string())
        ));
        return (StatusCode::SERVICE_UNAVAILABLE, body);
    }
    if let Some(engine) = &state.engine {
        let id = engine.machine_id();
        body["machine"] = json!({ "id": id });
        if engine.is_stopped() {
            body["reason"] = json!(format!("the engine of machine {id} has stopped"));
            return (StatusCode::SERVICE_UNAVAILABLE, body);
        }
        match state.admin.machine_registered(id).await {
            Ok(true) => {}
            Ok(false) => {
                body["reason"] = json!(format!(
                    "machine {id} is not registered (its row was removed: it stopped, or the cluster declared it dead)"
                ));
                return (StatusCode::SERVICE_UNAVAILABLE, body);
            }
            Err(e) => {
                body["reason"] = json!(format!(
                    "cannot read the machine row: {}",
                    harmonydb::redact(&e.to_string())
                ));
                return (StatusCode::SERVICE_UNAVAILABLE, body);
            }
        }
    }
    body["ok"] = json!(true);
    (StatusCode::OK, body)
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), the Prometheus text format
/// 0.0.4 otherwise.
pub async fn metrics(AxState(state): Shared, headers: HeaderMap) -> Response {
    let text = crate::scrape::render(&state).await;
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::scrape::to_prometheus_text(&text),
        )
            .into_response()
    }
}

// ---- reads ----

pub async fn machines(AxState(state): Shared) -> ApiResult<Json<Value>> {
    let machines: Vec<MachineRow> = state.admin.machines().await?;
    Ok(Json(json!({ "machines": machines })))
}

/// `GET /api/v1/tasks` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TasksParams {
    #[serde(rename = "type")]
    name: Option<String>,
    state: Option<QueueState>,
    limit: Option<usize>,
    offset: Option<usize>,
}

fn page_limit(limit: Option<usize>) -> ApiResult<usize> {
    match limit.unwrap_or(PAGE_LIMIT_DEFAULT) {
        0 => Err(ApiError::bad_request("limit must be at least 1")),
        n if n > PAGE_LIMIT_MAX => Err(ApiError::bad_request(format!(
            "limit {n} is over the maximum of {PAGE_LIMIT_MAX}"
        ))),
        n => Ok(n),
    }
}

fn type_filter(name: Option<String>) -> ApiResult<Option<String>> {
    match name {
        None => Ok(None),
        Some(n) if n.is_empty() => Ok(None),
        Some(n) => harmonytask::validate_name(&n)
            .map(|()| Some(n))
            .map_err(|e| ApiError::bad_request(format!("type: {e}"))),
    }
}

pub async fn tasks(AxState(state): Shared, Q(p): Q<TasksParams>) -> ApiResult<Json<Value>> {
    let limit = page_limit(p.limit)?;
    let offset = p.offset.unwrap_or(0);
    let name = type_filter(p.name)?;
    // One more row than asked tells whether another page follows.
    let mut rows: Vec<TaskRow> = state
        .admin
        .task_page(&TaskPageQuery {
            name,
            state: p.state,
            limit: limit + 1,
            offset,
        })
        .await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let tasks: Vec<Value> = rows.iter().map(task_json).collect();
    Ok(Json(json!({
        "tasks": tasks,
        "limit": limit,
        "offset": offset,
        "next_offset": more.then_some(offset + limit),
    })))
}

fn task_json(t: &TaskRow) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or(Value::Null);
    v["state"] = json!(if t.owner_id.is_some() {
        "running"
    } else {
        "waiting"
    });
    v
}

pub async fn task(AxState(state): Shared, P(id): P<i64>) -> ApiResult<Json<Value>> {
    let id = TaskId(id);
    let row = state.admin.task(id).await?;
    let attempts: Vec<HistoryRow> = state.admin.task_attempts(id, TASK_ATTEMPTS_MAX).await?;
    let (state_word, task) = match (&row, attempts.last()) {
        (Some(t), _) => (
            if t.owner_id.is_some() {
                "running"
            } else {
                "waiting"
            },
            task_json(t),
        ),
        (None, Some(last)) => (
            if last.result { "succeeded" } else { "failed" },
            Value::Null,
        ),
        (None, None) => {
            return Err(ApiError::not_found(format!(
                "no task {id}: it is not waiting, not running and not in the history (it may have been pruned)"
            )));
        }
    };
    let args = state.admin.task_args(id).await?;
    Ok(Json(json!({
        "id": id,
        "state": state_word,
        "task": task,
        "args": args.into_iter().collect::<BTreeMap<_, _>>(),
        "attempts": attempts,
    })))
}

/// `GET /api/v1/history` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    #[serde(rename = "type")]
    name: Option<String>,
    failures: Option<bool>,
    limit: Option<usize>,
    before: Option<i64>,
}

pub async fn history(AxState(state): Shared, Q(p): Q<HistoryParams>) -> ApiResult<Json<Value>> {
    let limit = page_limit(p.limit)?;
    let name = type_filter(p.name)?;
    let mut rows = state
        .admin
        .history_page(&HistoryPageQuery {
            name,
            failures_only: p.failures.unwrap_or(false),
            before: p.before,
            limit: limit + 1,
        })
        .await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(
        json!({ "history": rows, "limit": limit, "next_before": next }),
    ))
}

/// One type in `GET /api/v1/types`.
#[derive(Debug, Default, Serialize)]
struct TypeEntry {
    name: String,
    /// Waiting tasks, counted up to `waiting_cap`.
    waiting: i64,
    /// True when `waiting` reached the cap (there may be more).
    waiting_capped: bool,
    running: i64,
    succeeded_24h: i64,
    failed_24h: i64,
    singleton: bool,
    /// Machines that register it.
    machines: Vec<MachineId>,
}

pub async fn types(AxState(state): Shared) -> ApiResult<Json<Value>> {
    let counts = state.counts().await.map_err(ApiError::unavailable)?;
    let recent = state
        .history_counts()
        .await
        .map_err(ApiError::unavailable)?;
    let machines = state.admin.machines().await?;
    let singletons = state.admin.singleton_names().await?;
    let mut by_name: BTreeMap<String, TypeEntry> = BTreeMap::new();
    fn entry<'a>(by_name: &'a mut BTreeMap<String, TypeEntry>, name: &str) -> &'a mut TypeEntry {
        by_name.entry(name.to_owned()).or_insert_with(|| TypeEntry {
            name: name.to_owned(),
            ..TypeEntry::default()
        })
    }
    for (name, n) in &counts.waiting {
        let e = entry(&mut by_name, name);
        e.waiting = *n;
        e.waiting_capped = usize::try_from(*n).is_ok_and(|n| n >= QUEUE_DEPTH_CAP);
    }
    for (name, n) in &counts.running {
        entry(&mut by_name, name).running = *n;
    }
    for c in recent.iter() {
        let e = entry(&mut by_name, &c.name);
        e.succeeded_24h = c.succeeded;
        e.failed_24h = c.failed;
    }
    for s in &singletons {
        entry(&mut by_name, s).singleton = true;
    }
    for m in &machines {
        for t in m.tasks.split(',').filter(|t| !t.is_empty()) {
            entry(&mut by_name, t).machines.push(m.id);
        }
    }
    let types: Vec<TypeEntry> = by_name.into_values().collect();
    Ok(Json(
        json!({ "types": types, "waiting_cap": QUEUE_DEPTH_CAP }),
    ))
}

// ---- writes ----

pub async fn cordon(
    AxState(state): Shared,
    P(id): P<i64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    state.admin.cordon(MachineId(id)).await?;
    tracing::info!(machine = id, "cordoned through the web API");
    Ok(ok_action("cordon", json!({ "machine": id })))
}

pub async fn uncordon(
    AxState(state): Shared,
    P(id): P<i64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    state.admin.uncordon(MachineId(id)).await?;
    tracing::info!(machine = id, "uncordoned through the web API");
    Ok(ok_action("uncordon", json!({ "machine": id })))
}

pub async fn restart_machine(
    AxState(state): Shared,
    P(id): P<i64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    state.admin.request_restart(MachineId(id)).await?;
    tracing::info!(machine = id, "restart requested through the web API");
    Ok(ok_action("restart", json!({ "machine": id })))
}

pub async fn run_now(
    AxState(state): Shared,
    P(name): P<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    check_type(&name)?;
    state.admin.run_now(&name).await?;
    tracing::info!(task_type = %name, "run-now requested through the web API");
    Ok(ok_action("run-now", json!({ "type": name })))
}

pub async fn restart_task(
    AxState(state): Shared,
    P(id): P<i64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    state.admin.restart_task(TaskId(id)).await?;
    tracing::info!(task = id, "task restarted through the web API");
    Ok(ok_action("restart-task", json!({ "task": id })))
}

// ---- why, cancel, pause ----

/// A node's heartbeat older than this makes its reasons stale (the engine's default).
pub(crate) fn dead_after() -> std::time::Duration {
    harmonytask::EngineConfig::default().dead_after
}

/// Who an API write is recorded as (history `completed_by`, `paused_by`).
const API_OPERATOR: &str = "web api";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhyParams {
    #[serde(rename = "type")]
    name: String,
}

/// `GET /api/v1/why?type=NAME`: why the type's waiting tasks do (not) run, per live node.
pub async fn why_type(AxState(state): Shared, Q(p): Q<WhyParams>) -> ApiResult {
    check_type(&p.name)?;
    let w = state.admin.why_type(&p.name, dead_after()).await?;
    Ok(Json(w).into_response())
}

/// `GET /api/v1/tasks/{id}/why`: why one task is (not) running.
pub async fn why_task(AxState(state): Shared, P(id): P<i64>) -> ApiResult {
    let w = state.admin.why_task(TaskId(id), dead_after()).await?;
    if w.state == harmonytask::TaskState::Unknown {
        return Err(ApiError::not_found(w.summary));
    }
    Ok(Json(w).into_response())
}

/// `POST /api/v1/tasks/{id}/cancel`.
pub async fn cancel(
    AxState(state): Shared,
    P(id): P<i64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    let c = state.admin.cancel(TaskId(id), API_OPERATOR).await?;
    tracing::info!(task = id, task_type = %c.name, "task cancelled through the web API");
    Ok(ok_action(
        "cancel",
        json!({ "task": id, "type": c.name, "owner": c.owner }),
    ))
}

/// `POST /api/v1/types/{name}/cancel-waiting`.
pub async fn cancel_waiting(
    AxState(state): Shared,
    P(name): P<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    check_type(&name)?;
    let n = state.admin.cancel_waiting(&name, API_OPERATOR).await?;
    tracing::info!(task_type = %name, cancelled = n, "waiting tasks cancelled through the web API");
    Ok(ok_action(
        "cancel-waiting",
        json!({ "type": name, "cancelled": n }),
    ))
}

/// `POST /api/v1/types/{name}/pause`.
pub async fn pause(
    AxState(state): Shared,
    P(name): P<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    check_type(&name)?;
    let changed = state.admin.pause(&name, API_OPERATOR).await?;
    tracing::info!(task_type = %name, "type paused through the web API");
    Ok(ok_action(
        "pause",
        json!({ "type": name, "changed": changed }),
    ))
}

/// `POST /api/v1/types/{name}/resume`.
pub async fn resume(
    AxState(state): Shared,
    P(name): P<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    precheck_write(&state, &headers, &body)?;
    check_type(&name)?;
    let changed = state.admin.resume(&name).await?;
    tracing::info!(task_type = %name, "type resumed through the web API");
    Ok(ok_action(
        "resume",
        json!({ "type": name, "changed": changed }),
    ))
}

// ---- fallbacks ----

pub async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no endpoint {method} {}; see /api/v1/ in the harmony-web docs",
        uri.path()
    ))
}

pub async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        kind: "method_not_allowed",
        message: format!("{} does not accept {method}", uri.path()),
    }
}
