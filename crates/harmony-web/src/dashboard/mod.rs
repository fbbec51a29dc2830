//! The dashboard: server-rendered HTML pages (askama templates), a little vendored script,
//! and live updates over server-sent events.
//!
//! Pages, each with a stable URL: `/` (overview), `/tasks` (active tasks), `/tasks/{id}`,
//! `/history`, `/types/{name}`, `/machines/{id}`. Every page is a layout around one `<main>`
//! fragment; `/events?view=<page URL>` streams that fragment again (event `fragment`)
//! whenever the shared refresh ([`live`]) has read something new, and the script swaps it in.
//! No browser makes the server query the database: the refresh is one loop per node, and
//! page fragments are rendered once per view and refresh ([`live::ViewCache`]).
//!
//! Write buttons post to the JSON operator API (`/api/v1/...`), so the token rule applies;
//! when the server answers 401 the script asks for the token, keeps it in the tab's
//! `sessionStorage` and retries with `Authorization: Bearer`.
//!
//! Invariant: this module holds no SQL; it reads through [`harmonytask::Admin`] and the
//! shared snapshot.

pub mod chart;
pub mod live;
mod pages;
pub mod units;

use std::convert::Infallible;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use askama::Template;
use axum::extract::State as AxState;
use axum::http::{StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures_util::FutureExt;
use serde::Deserialize;

use crate::State;
use crate::api::Q;
use live::{Rendered, Snapshot};

const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

/// One page of the dashboard, parsed from its URL.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum View {
    Overview,
    Tasks(pages::TasksFilter),
    Task(i64),
    History(pages::HistoryFilter),
    Type(String),
    Machine(i64),
}

impl View {
    /// The view of a page URL (path and query); a [`Rendered`] error page when there is none.
    fn from_uri(uri: &Uri) -> Result<View, Rendered> {
        let path = uri.path().trim_end_matches('/');
        let parts: Vec<&str> = path.split('/').skip(1).collect();
        let query = |uri: &Uri| uri.query().unwrap_or("").to_owned();
        match parts.as_slice() {
            [] | [""] => Ok(View::Overview),
            ["tasks"] => pages::TasksFilter::parse(&query(uri)).map(View::Tasks),
            ["history"] => pages::HistoryFilter::parse(&query(uri)).map(View::History),
            ["tasks", id] => id
                .parse()
                .map(View::Task)
                .map_err(|_| pages::error_page(StatusCode::NOT_FOUND, "No such task", "")),
            ["machines", id] => id
                .parse()
                .map(View::Machine)
                .map_err(|_| pages::error_page(StatusCode::NOT_FOUND, "No such machine", "")),
            ["types", name] => {
                let name = percent_decode(name);
                harmonytask::validate_name(&name)
                    .map(|()| View::Type(name))
                    .map_err(|e| {
                        pages::error_page(StatusCode::NOT_FOUND, "No such type", &e.to_string())
                    })
            }
            _ => Err(pages::error_page(
                StatusCode::NOT_FOUND,
                "No such page",
                "The dashboard has /, /tasks, /history, /types/NAME, /tasks/ID and /machines/ID.",
            )),
        }
    }

    /// The cache key: equal views render alike.
    fn key(&self) -> String {
        format!("{self:?}")
    }
}

/// `%XX` escapes of a path segment decoded (type names are ASCII; anything else is kept
/// and then refused by the name rule).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let Some(b) = escaped {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Renders `view` for snapshot `snap`, once per view and refresh.
async fn render(state: &Arc<State>, view: &View, snap: &Arc<Snapshot>) -> Arc<Rendered> {
    let (st, v, s) = (Arc::clone(state), view.clone(), Arc::clone(snap));
    state
        .views
        .get(&view.key(), snap.generation, move || {
            async move { Arc::new(pages::render(&st, &v, &s).await) }.boxed()
        })
        .await
}

#[derive(Template)]
#[template(path = "layout.html")]
struct Layout<'a> {
    title: &'a str,
    view: &'a str,
    body: &'a str,
}

fn full_page(view: &str, r: &Rendered) -> Response {
    let page = Layout {
        title: &r.title,
        view,
        body: &r.html,
    }
    .render()
    .unwrap_or_else(|e| format!("template error: {e}"));
    (r.status, [(header::CACHE_CONTROL, "no-store")], Html(page)).into_response()
}

/// Every dashboard page.
pub(crate) async fn page(AxState(state): AxState<Arc<State>>, uri: Uri) -> Response {
    let target = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    match View::from_uri(&uri) {
        Ok(view) => {
            let snap = state.live.fresh(state.live_interval).await;
            let r = render(&state, &view, &snap).await;
            full_page(&target, &r)
        }
        Err(r) => full_page("", &r),
    }
}

/// `GET /events` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsParams {
    /// The page URL whose fragment to stream.
    view: String,
}

/// `GET /events?view=URL`: the page's fragment each time it changes.
pub(crate) async fn events(AxState(state): AxState<Arc<State>>, Q(p): Q<EventsParams>) -> Response {
    let view = match p.view.parse::<Uri>().ok().map(|u| View::from_uri(&u)) {
        Some(Ok(v)) => v,
        _ => {
            return (StatusCode::NOT_FOUND, "no such dashboard page").into_response();
        }
    };
    let (rx, subscription) = state.live.subscribe();
    let stop = state.stop.clone();
    let stream = futures_util::stream::unfold(
        (state, view, rx, None::<u64>, subscription, stop),
        |(state, view, mut rx, mut last, sub, stop)| async move {
            loop {
                let snap = rx.borrow_and_update().clone();
                if snap.generation > 0 {
                    let r = render(&state, &view, &snap).await;
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    r.html.hash(&mut h);
                    let h = h.finish();
                    if last != Some(h) {
                        let event = Event::default()
                            .event("fragment")
                            .id(snap.generation.to_string())
                            .data(r.html.as_str());
                        return Some((
                            Ok::<Event, Infallible>(event),
                            (state, view, rx, Some(h), sub, stop),
                        ));
                    }
                    last = Some(h);
                }
                tokio::select! {
                    () = stop.cancelled() => return None,
                    changed = rx.changed() => if changed.is_err() { return None },
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The vendored script.
pub(crate) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        SCRIPT,
    )
        .into_response()
}

/// The style sheet.
pub(crate) async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        STYLE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(s: &str) -> Result<View, StatusCode> {
        View::from_uri(&s.parse().unwrap()).map_err(|r| r.status)
    }

    #[test]
    fn page_urls() {
        assert_eq!(view("/"), Ok(View::Overview));
        assert_eq!(view("/tasks/12"), Ok(View::Task(12)));
        assert_eq!(view("/machines/3"), Ok(View::Machine(3)));
        assert_eq!(view("/types/a%3Ab"), Ok(View::Type("a:b".into())));
        assert_eq!(view("/tasks/x"), Err(StatusCode::NOT_FOUND));
        assert_eq!(view("/types/a%20b"), Err(StatusCode::NOT_FOUND));
        assert_eq!(view("/nope"), Err(StatusCode::NOT_FOUND));
        assert!(matches!(
            view("/tasks?type=a&state=running"),
            Ok(View::Tasks(_))
        ));
        assert_eq!(view("/tasks?type=a%20b"), Err(StatusCode::BAD_REQUEST));
        assert_eq!(percent_decode("a%3Ab%"), "a:b%");
    }
}
