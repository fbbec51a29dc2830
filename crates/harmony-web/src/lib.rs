//! Harmony's HTTP server (axum): health, Prometheus metrics, the JSON operator API and the
//! web dashboard ([`dashboard`]).
//!
//! Every `harmony run` node serves it on its `--listen` address (the address it registers
//! as); `harmony web` serves it without running tasks. It reads the cluster through
//! [`harmonytask::Admin`] (this crate holds no SQL) and, on a node, the running
//! [`harmonytask::Engine`] for the node's own status.
//!
//! # Endpoints
//!
//! | | |
//! |---|---|
//! | `GET /`, `/tasks`, `/tasks/{id}`, `/history`, `/types/{name}`, `/machines/{id}` | the dashboard's HTML pages (see [`dashboard`]) |
//! | `GET /events?view=PAGE` | server-sent events: the page's fragment after each shared refresh |
//! | `GET /assets/dashboard.js`, `/assets/dashboard.css` | the dashboard's vendored script and style |
//! | `GET /healthz` | 200 `{"ok":true,…}` when the database answers and (on a node) the machine row is registered; 503 with `reason` otherwise |
//! | `GET /metrics` | Prometheus text format 0.0.4, or OpenMetrics when the scraper asks for it (`Accept: application/openmetrics-text`): engine counters and histograms per type, queue depth and running per type, budget and reserved per resource, blocked types, database metrics, notification health |
//! | `GET /api/v1/machines` | every registered machine |
//! | `GET /api/v1/tasks?type=&state=waiting\|running&limit=&offset=` | pending and running tasks in id order; `next_offset` is null on the last page |
//! | `GET /api/v1/tasks/{id}` | one task (`waiting`, `running`, `succeeded`, `failed`), its arguments and every attempt |
//! | `GET /api/v1/history?type=&failures=true&limit=&before=` | attempts, newest first; pass `next_before` as `before` for the next page |
//! | `GET /api/v1/types` | per type: waiting (bounded count), running, 24 h succeeded / failed, singleton, machines |
//! | `POST /api/v1/machines/{id}/cordon`, `/uncordon`, `/restart` | operator writes on a machine |
//! | `POST /api/v1/types/{name}/run-now` | run a singleton type now |
//! | `POST /api/v1/tasks/{id}/restart` | re-queue a permanently failed task |
//! | `GET /api/v1/why?type=NAME` | why the type's waiting tasks do (not) run: per live node its reason, one line, `never_runs` |
//! | `GET /api/v1/tasks/{id}/why` | why one task is (not) running (404 for an unknown id) |
//! | `POST /api/v1/tasks/{id}/cancel` | cancel a waiting or running task (404 when it is neither) |
//! | `POST /api/v1/types/{name}/cancel-waiting` | cancel every waiting task of the type |
//! | `POST /api/v1/types/{name}/pause`, `/resume` | pause or resume the type on every node |
//!
//! Limits: `limit` is at most [`PAGE_LIMIT_MAX`] (default [`PAGE_LIMIT_DEFAULT`]); request
//! bodies at most [`BODY_LIMIT_BYTES`] (413 beyond). Write bodies are empty or `{}`.
//!
//! # Errors
//!
//! Every error is JSON: `{"error": "<what was wrong>", "kind": "<word>", "status": <code>}`:
//! 400 bad query, path or body; 401 missing token; 403 wrong token or read-only server; 404
//! unknown id, type or route; 409 a restart of a task that is not failed; 413 body too large;
//! 503 database unavailable. A request that errs has changed nothing.
//!
//! # Write access
//!
//! See [`auth`]: with a token configured (`--api-token`, `HARMONY_API_TOKEN`) every write
//! needs `Authorization: Bearer <token>`; without one, a loopback listener allows writes and
//! any other listener is read-only (and says so in the log at start-up).
//!
//! # Cost of a scrape
//!
//! `/metrics` and `/api/v1/types` read cluster counts with bounded statements and reuse them
//! for a second across all requests ([`cluster`]), so a scrape stays cheap under a million
//! waiting tasks.
//!
//! # Other routes on the same address
//!
//! With `--notify http` the node also serves `POST /api/v1/peer/hints` (HTTP peering,
//! `harmony-peer`, added with [`WebServerBuilder::merge`]); it has its own HMAC check, and the
//! token rule does not apply to it.

mod api;
pub mod auth;
pub mod cluster;
pub mod dashboard;
mod error;
mod scrape;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use futures_util::FutureExt;
use harmonydb::Db;
use harmonytask::{Admin, Engine, HistoryCounts};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::{ApiToken, WriteDecision, WriteMode, write_access};
pub use error::{Error, Result};

use cluster::{COUNTS_TTL, Cached, ClusterCounts, HISTORY_COUNTS_TTL};

/// Largest request body accepted, bytes.
pub const BODY_LIMIT_BYTES: usize = 64 * 1024;
/// Largest page (`limit`) of the list endpoints.
pub const PAGE_LIMIT_MAX: usize = 500;
/// Page size when `limit` is not given.
pub const PAGE_LIMIT_DEFAULT: usize = 50;

/// What the handlers share.
pub(crate) struct State {
    admin: Admin,
    engine: Option<Engine>,
    token: Option<ApiToken>,
    write_mode: WriteMode,
    registry: Registry,
    counts: Cached<ClusterCounts>,
    history_counts: Cached<Vec<HistoryCounts>>,
    /// The dashboard's shared refresh.
    live: Arc<dashboard::live::Live>,
    /// The dashboard's renders, per view and refresh.
    views: dashboard::live::ViewCache,
    /// Fires when the server stops: ends the event streams and the refresh loop.
    stop: CancellationToken,
    /// How often the dashboard refreshes while watched.
    live_interval: std::time::Duration,
}

impl State {
    /// The cluster counts, at most [`COUNTS_TTL`] old.
    async fn counts(&self) -> std::result::Result<Arc<ClusterCounts>, String> {
        let admin = self.admin.clone();
        self.counts
            .get(move || {
                async move {
                    cluster::load_counts(admin)
                        .await
                        .map_err(|e| harmonydb::redact(&e.to_string()))
                }
                .boxed()
            })
            .await
    }

    /// The last day's history counts, at most [`HISTORY_COUNTS_TTL`] old.
    async fn history_counts(&self) -> std::result::Result<Arc<Vec<HistoryCounts>>, String> {
        let admin = self.admin.clone();
        self.history_counts
            .get(move || {
                async move {
                    cluster::load_history_counts(admin)
                        .await
                        .map_err(|e| harmonydb::redact(&e.to_string()))
                }
                .boxed()
            })
            .await
    }
}

/// Adds series to the `/metrics` registry (another component's own counters).
pub type RegisterMetrics = Box<dyn FnOnce(&mut Registry) + Send>;

/// Builds a [`WebServer`].
pub struct WebServerBuilder {
    db: Db,
    engine: Option<Engine>,
    token: Option<ApiToken>,
    notify: bool,
    /// Routes of other components served on the same address (HTTP peering), with their own
    /// state, limits and authentication.
    extra_routes: Vec<Router>,
    extra_metrics: Vec<RegisterMetrics>,
    live_interval: std::time::Duration,
}

impl WebServerBuilder {
    /// How often the dashboard's shared refresh runs while a browser watches (default
    /// [`dashboard::live::LIVE_INTERVAL`]); it is also the shortest time between two refreshes.
    pub fn live_interval(mut self, interval: std::time::Duration) -> Self {
        self.live_interval = interval.max(std::time::Duration::from_millis(10));
        self
    }

    /// Serve this node's status and metrics too.
    pub fn engine(mut self, engine: Engine) -> Self {
        self.engine = Some(engine);
        self
    }

    /// The API token writes need (see [`auth`]).
    pub fn token(mut self, token: Option<ApiToken>) -> Self {
        self.token = token;
        self
    }

    /// Whether writes send wake-up notifications (Postgres); on by default. Match the node's
    /// `--notify`.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Also serves `routes` (complete, with their state applied), e.g. the HTTP peering
    /// endpoint of `--notify http`. They bring their own limits and checks: the API's token
    /// rule and body limit do not apply to them.
    pub fn merge(mut self, routes: Router) -> Self {
        self.extra_routes.push(routes);
        self
    }

    /// Also exposes the series `register` adds on `/metrics`.
    pub fn metrics(mut self, register: RegisterMetrics) -> Self {
        self.extra_metrics.push(register);
        self
    }

    /// Binds `addr` (HOST:PORT) and logs the write mode. Fails with [`Error::Bind`] naming the
    /// address when it cannot be bound.
    pub async fn bind(self, addr: &str) -> Result<WebServer> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind {
                addr: addr.to_owned(),
                source,
            })?;
        self.with_listener(listener, addr)
    }

    /// Serves on an already bound listener (`addr` is what it was bound as, for messages).
    pub fn with_listener(self, listener: TcpListener, addr: &str) -> Result<WebServer> {
        let local = listener.local_addr().map_err(|source| Error::Bind {
            addr: addr.to_owned(),
            source,
        })?;
        let loopback = local.ip().to_canonical().is_loopback();
        let write_mode = WriteMode::for_listener(loopback, self.token.is_some());
        match write_mode {
            WriteMode::ReadOnly => tracing::warn!(
                %local,
                "web API is read-only: it listens beyond loopback and no API token is configured (set --api-token or HARMONY_API_TOKEN to allow writes)"
            ),
            WriteMode::OpenOnLoopback => tracing::info!(
                %local,
                "web API listening on loopback; writes allowed without a token"
            ),
            WriteMode::TokenRequired => tracing::info!(
                %local,
                "web API listening; writes need the API token"
            ),
        }
        let mut registry = scrape::static_registry(&self.db, self.engine.as_ref());
        for register in self.extra_metrics {
            register(&mut registry);
        }
        let state = Arc::new(State {
            admin: Admin::new(self.db).with_notify(self.notify),
            engine: self.engine,
            token: self.token,
            write_mode,
            registry,
            counts: Cached::new(COUNTS_TTL),
            history_counts: Cached::new(HISTORY_COUNTS_TTL),
            live: Arc::default(),
            views: dashboard::live::ViewCache::default(),
            stop: CancellationToken::new(),
            live_interval: self.live_interval,
        });
        let router = self
            .extra_routes
            .into_iter()
            .fold(router(Arc::clone(&state)), |r, extra| r.merge(extra));
        Ok(WebServer {
            listener,
            local,
            write_mode,
            router,
            state,
        })
    }
}

/// The HTTP server, bound and ready to [`run`](WebServer::run).
pub struct WebServer {
    listener: TcpListener,
    local: SocketAddr,
    write_mode: WriteMode,
    router: Router,
    state: Arc<State>,
}

impl WebServer {
    /// Starts building a server over `db`.
    pub fn builder(db: Db) -> WebServerBuilder {
        WebServerBuilder {
            db,
            engine: None,
            token: None,
            notify: true,
            extra_routes: Vec::new(),
            extra_metrics: Vec::new(),
            live_interval: dashboard::live::LIVE_INTERVAL,
        }
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// What the server does with writes.
    pub fn write_mode(&self) -> WriteMode {
        self.write_mode
    }

    /// The dashboard's shared refresh (for its subscriber and refresh counts).
    pub fn live(&self) -> Arc<dashboard::live::Live> {
        Arc::clone(&self.state.live)
    }

    /// Serves until `shutdown` fires, then stops accepting, ends the dashboard's event
    /// streams and lets requests in flight finish. The dashboard's refresh loop runs alongside.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let stop = self.state.stop.clone();
        let refresh = tokio::spawn(dashboard::live::run(Arc::clone(&self.state), stop.clone()));
        let on_stop = stop.clone();
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                on_stop.cancel();
            })
            .await
            .map_err(Error::Serve);
        stop.cancel();
        if let Err(e) = refresh.await {
            tracing::warn!(error = %e, "the dashboard refresh task failed");
        }
        served
    }
}

/// After a successful operator write, the dashboard's next refresh reads everything again
/// (and runs at once), so the page that made the change shows it without waiting for the slow
/// reads' interval.
async fn mark_written(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let write = request.method() == axum::http::Method::POST;
    let response = next.run(request).await;
    if write && response.status().is_success() {
        state.live.written();
    }
    response
}

fn router(state: Arc<State>) -> Router {
    let api = Router::new()
        .route("/machines", get(api::machines))
        .route("/machines/{id}/cordon", post(api::cordon))
        .route("/machines/{id}/uncordon", post(api::uncordon))
        .route("/machines/{id}/restart", post(api::restart_machine))
        .route("/tasks", get(api::tasks))
        .route("/tasks/{id}", get(api::task))
        .route("/tasks/{id}/restart", post(api::restart_task))
        .route("/tasks/{id}/why", get(api::why_task))
        .route("/tasks/{id}/cancel", post(api::cancel))
        .route("/why", get(api::why_type))
        .route("/types/{name}/pause", post(api::pause))
        .route("/types/{name}/resume", post(api::resume))
        .route("/types/{name}/cancel-waiting", post(api::cancel_waiting))
        .route("/history", get(api::history))
        .route("/types", get(api::types))
        .route("/types/{name}/run-now", post(api::run_now))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            mark_written,
        ));
    Router::new()
        .route("/", get(dashboard::page))
        .route("/tasks", get(dashboard::page))
        .route("/tasks/{id}", get(dashboard::page))
        .route("/history", get(dashboard::page))
        .route("/types/{name}", get(dashboard::page))
        .route("/machines/{id}", get(dashboard::page))
        .route("/events", get(dashboard::events))
        .route("/assets/dashboard.js", get(dashboard::script))
        .route("/assets/dashboard.css", get(dashboard::style))
        .route("/healthz", get(api::healthz))
        .route("/metrics", get(api::metrics))
        .nest("/api/v1", api)
        .fallback(api::no_route)
        .method_not_allowed_fallback(api::wrong_method)
        .layer(DefaultBodyLimit::max(BODY_LIMIT_BYTES))
        .with_state(state)
}
