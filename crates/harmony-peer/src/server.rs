//! The receiving side: an `axum::Router` with `POST /api/v1/peer/hints`.
//!
//! A request is checked in this order, and refused at the first failure with a JSON error
//! (`{"error": REASON, "message": …}`) and a count under that reason: the body is at most
//! [`BODY_BYTES_MAX`] (413 `too_large`); the timestamp header is there and a number (400
//! `malformed`) and within the skew (401 `stale`); the signature verifies (401
//! `bad_signature`); it was not accepted before (409 `replay`); the body is a hint body of at
//! most `HINTS_PER_REQUEST_MAX` hints (400 `malformed`). Then every hint goes to the relay's
//! inbound side, that is to the engine's listener, and the answer is 204.
//!
//! The router has its own state and no path outside `/api/v1/peer/`, so it merges into any
//! server (`harmony-web`'s, or the small one the binary starts for `--notify http`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use harmonydb::Relay;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::relay::{HINTS_PER_REQUEST_MAX, HintBody, HttpRelay, now_millis};
use crate::signature::{Refusal, SIGNATURE_HEADER, TIMESTAMP_HEADER, Verifier};

/// Where peers post hints.
pub const HINTS_PATH: &str = "/api/v1/peer/hints";
/// The largest request body accepted, bytes.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// What the router needs: the relay to deliver to, and the verifier with its replay memory.
#[derive(Clone, Debug)]
pub struct PeerState {
    relay: Arc<HttpRelay>,
    verifier: Arc<Verifier>,
    /// When a refusal was last logged as a warning (Unix ms), for [`WARN_INTERVAL_MS`].
    warned_ms: Arc<AtomicI64>,
}

/// Refusals are warned about at most this often; every one is counted.
const WARN_INTERVAL_MS: i64 = 60_000;

impl PeerState {
    /// The state for `relay`'s node, checking with the relay's cluster secret.
    pub fn new(relay: &Arc<HttpRelay>) -> Self {
        PeerState {
            relay: Arc::clone(relay),
            verifier: Arc::new(Verifier::new(relay.secret().clone())),
            warned_ms: Arc::new(AtomicI64::new(i64::MIN)),
        }
    }
}

/// The peering routes (`POST /api/v1/peer/hints`), ready to serve or to merge.
pub fn router(state: PeerState) -> Router {
    Router::new()
        .route(HINTS_PATH, post(receive))
        // The handler enforces its own limit, so that an oversized body is counted.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

async fn receive(State(s): State<PeerState>, headers: HeaderMap, body: Body) -> Response {
    match check(&s, &headers, body).await {
        Ok(delivered) => {
            s.relay.metrics().accepted();
            tracing::trace!(delivered, "hints accepted from a peer");
            StatusCode::NO_CONTENT.into_response()
        }
        Err((reason, message)) => {
            s.relay.metrics().refused(reason);
            let now = now_millis();
            let last = s.warned_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= WARN_INTERVAL_MS
                && s.warned_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                // A wrong secret or a skewed clock on one node refuses all its hints: say so,
                // once a minute (the counter has every refusal).
                tracing::warn!(
                    reason = reason.as_str(),
                    %message,
                    "hint request from a peer refused; do all nodes share --cluster-secret, with clocks in sync? (warned once a minute)"
                );
            } else {
                tracing::debug!(reason = reason.as_str(), %message, "hint request refused");
            }
            let status = match reason {
                Refusal::BadSignature | Refusal::Stale => StatusCode::UNAUTHORIZED,
                Refusal::Replay => StatusCode::CONFLICT,
                Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                Refusal::Malformed => StatusCode::BAD_REQUEST,
            };
            let body = serde_json::json!({ "error": reason.as_str(), "message": message });
            (status, axum::Json(body)).into_response()
        }
    }
}

async fn check(s: &PeerState, headers: &HeaderMap, body: Body) -> Result<usize, (Refusal, String)> {
    let too_large = || {
        (
            Refusal::TooLarge,
            format!("the body is larger than {BODY_BYTES_MAX} bytes"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_BYTES_MAX as u64) {
        return Err(too_large());
    }
    let bytes = match Limited::new(body, BODY_BYTES_MAX).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => return Err((Refusal::Malformed, format!("cannot read the body: {e}"))),
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    s.verifier
        .check(
            header(TIMESTAMP_HEADER),
            header(SIGNATURE_HEADER),
            &bytes,
            now_millis(),
        )
        .map_err(|r| {
            let message = match r {
                Refusal::Malformed => format!("{TIMESTAMP_HEADER} must be Unix milliseconds"),
                Refusal::Stale => format!(
                    "{TIMESTAMP_HEADER} is more than {:?} from this node's clock",
                    crate::signature::SKEW_MAX
                ),
                Refusal::BadSignature => {
                    format!("{SIGNATURE_HEADER} does not verify with the cluster secret")
                }
                Refusal::Replay => "this request was already received".to_owned(),
                Refusal::TooLarge => String::new(),
            };
            (r, message)
        })?;
    let body: HintBody = serde_json::from_slice(&bytes)
        .map_err(|e| (Refusal::Malformed, format!("not a hint body: {e}")))?;
    if body.hints.len() > HINTS_PER_REQUEST_MAX {
        return Err((
            Refusal::Malformed,
            format!("more than {HINTS_PER_REQUEST_MAX} hints"),
        ));
    }
    let inbound = s.relay.inbound();
    for h in &body.hints {
        inbound.deliver(&h.channel, &h.payload);
    }
    Ok(body.hints.len())
}
