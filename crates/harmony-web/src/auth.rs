//! Who may write: the bearer-token rule of write actions, as a pure function.
//!
//! The rule (DESIGN §11): a listener reachable beyond loopback needs a token for every write;
//! without one configured it serves reads only. A loopback listener without a token allows
//! writes (anyone who can reach it can already run `harmony` on that host). Once a token is
//! configured, it is required on every listener. Tokens are compared in constant time and
//! never appear in logs or `Debug` output.

use subtle::ConstantTimeEq;

/// A configured API token. Its `Debug` output never shows the value.
#[derive(Clone)]
pub struct ApiToken(String);

impl ApiToken {
    /// A token; `None` when `value` is empty (an empty `HARMONY_API_TOKEN` means none).
    pub fn new(value: impl Into<String>) -> Option<ApiToken> {
        let value = value.into();
        (!value.is_empty()).then_some(ApiToken(value))
    }

    /// Whether `presented` is this token, in time independent of where they differ.
    fn matches(&self, presented: &str) -> bool {
        // `ct_eq` on slices of different lengths returns false at once; only the length can
        // leak, which the token's owner chose.
        bool::from(self.0.as_bytes().ct_eq(presented.as_bytes()))
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// What the server does with writes, decided once at start-up from the listener and the
/// configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// Writes need the configured bearer token.
    TokenRequired,
    /// Loopback listener without a token: writes are allowed to anyone who can connect.
    OpenOnLoopback,
    /// Beyond loopback without a token: reads only.
    ReadOnly,
}

impl WriteMode {
    /// The mode for a listener (`loopback`: bound to a loopback address only) and whether a
    /// token is configured.
    pub fn for_listener(loopback: bool, token_configured: bool) -> WriteMode {
        match (token_configured, loopback) {
            (true, _) => WriteMode::TokenRequired,
            (false, true) => WriteMode::OpenOnLoopback,
            (false, false) => WriteMode::ReadOnly,
        }
    }
}

/// The answer to one write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteDecision {
    /// Go ahead.
    Allow,
    /// The server is read-only (403).
    ReadOnly,
    /// No `Authorization: Bearer …` header, or a malformed one (401).
    MissingToken,
    /// A bearer token that is not the configured one (403).
    WrongToken,
}

/// Decides a write request: `mode` from [`WriteMode::for_listener`], `token` the configured
/// one (if any), `authorization` the request's `Authorization` header value (if any).
pub fn write_access(
    mode: WriteMode,
    token: Option<&ApiToken>,
    authorization: Option<&str>,
) -> WriteDecision {
    match (mode, token) {
        (WriteMode::ReadOnly, _) => WriteDecision::ReadOnly,
        (WriteMode::OpenOnLoopback, None) => WriteDecision::Allow,
        // A token configured always wins, whatever mode was passed in.
        (_, Some(token)) => match authorization.and_then(bearer) {
            None => WriteDecision::MissingToken,
            Some(presented) if token.matches(presented) => WriteDecision::Allow,
            Some(_) => WriteDecision::WrongToken,
        },
        // Token required but none configured: refuse rather than allow.
        (WriteMode::TokenRequired, None) => WriteDecision::ReadOnly,
    }
}

/// The credentials of an `Authorization: Bearer <token>` value (scheme case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(s: &str) -> ApiToken {
        ApiToken::new(s).unwrap()
    }

    #[test]
    fn modes() {
        assert_eq!(
            WriteMode::for_listener(true, false),
            WriteMode::OpenOnLoopback
        );
        assert_eq!(WriteMode::for_listener(false, false), WriteMode::ReadOnly);
        assert_eq!(
            WriteMode::for_listener(true, true),
            WriteMode::TokenRequired
        );
        assert_eq!(
            WriteMode::for_listener(false, true),
            WriteMode::TokenRequired
        );
    }

    #[test]
    fn loopback_without_token_allows_writes() {
        let mode = WriteMode::for_listener(true, false);
        assert_eq!(write_access(mode, None, None), WriteDecision::Allow);
        assert_eq!(
            write_access(mode, None, Some("Bearer whatever")),
            WriteDecision::Allow
        );
    }

    #[test]
    fn beyond_loopback_without_token_is_read_only() {
        let mode = WriteMode::for_listener(false, false);
        assert_eq!(write_access(mode, None, None), WriteDecision::ReadOnly);
        assert_eq!(
            write_access(mode, None, Some("Bearer s3cret")),
            WriteDecision::ReadOnly
        );
    }

    #[test]
    fn a_configured_token_is_required_everywhere() {
        let t = tok("s3cret");
        for loopback in [true, false] {
            let mode = WriteMode::for_listener(loopback, true);
            assert_eq!(
                write_access(mode, Some(&t), None),
                WriteDecision::MissingToken
            );
            assert_eq!(
                write_access(mode, Some(&t), Some("Basic czNjcmV0")),
                WriteDecision::MissingToken
            );
            assert_eq!(
                write_access(mode, Some(&t), Some("Bearer ")),
                WriteDecision::MissingToken
            );
            assert_eq!(
                write_access(mode, Some(&t), Some("Bearer s3cre")),
                WriteDecision::WrongToken
            );
            assert_eq!(
                write_access(mode, Some(&t), Some("Bearer s3cret2")),
                WriteDecision::WrongToken
            );
            assert_eq!(
                write_access(mode, Some(&t), Some("Bearer S3CRET")),
                WriteDecision::WrongToken
            );
            assert_eq!(
                write_access(mode, Some(&t), Some("Bearer s3cret")),
                WriteDecision::Allow
            );
            assert_eq!(
                write_access(mode, Some(&t), Some("bearer  s3cret ")),
                WriteDecision::Allow
            );
        }
    }

    #[test]
    fn token_required_without_a_token_refuses() {
        assert_eq!(
            write_access(WriteMode::TokenRequired, None, Some("Bearer x")),
            WriteDecision::ReadOnly
        );
    }

    #[test]
    fn tokens_are_never_shown() {
        assert!(ApiToken::new("").is_none());
        let t = tok("hunter2");
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
