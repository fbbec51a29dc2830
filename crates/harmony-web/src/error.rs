//! The crate's error (binding and serving) and the JSON error answer of a request.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// What can go wrong starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address could not be bound (in use, not an address of this host, no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Accepting or serving connections failed.
    #[error("serving HTTP: {0}")]
    Serve(std::io::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A request that failed: its status and a JSON body `{"error": "...", "kind": "..."}` that
/// names what was wrong. Nothing was changed when a request answers with one.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "not_found",
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "bad_request",
            message: message.into(),
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            kind: "conflict",
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "unavailable",
            message: message.into(),
        }
    }
}

impl From<harmonytask::Error> for ApiError {
    fn from(e: harmonytask::Error) -> Self {
        use harmonytask::Error as E;
        match &e {
            E::TaskNotFound(_) | E::MachineNotFound(_) | E::NotSingleton(_) => {
                ApiError::not_found(e.to_string())
            }
            E::UnknownType(_) => ApiError::not_found(e.to_string()),
            E::InvalidName(_) => ApiError::bad_request(e.to_string()),
            E::TaskActive { .. } | E::TaskSucceeded { .. } => ApiError::conflict(e.to_string()),
            E::Db(_) => {
                // Logged once here, where it is handled; the answer carries the (redacted)
                // reason too, for the operator at the other end.
                let message = harmonydb::redact(&e.to_string());
                tracing::warn!(error = %message, "web request failed on the database");
                ApiError::unavailable(format!("database: {message}"))
            }
            _ => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "internal",
                message: harmonydb::redact(&e.to_string()),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.message,
            "kind": self.kind,
            "status": self.status.as_u16(),
        });
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}
