//! Typed database errors.
//!
//! Every failure that leaves this crate is an [`Error`] with an [`ErrorKind`], so callers branch
//! on the kind (`UniqueViolation`, `Serialization`, …) and never on message text. Messages are
//! redacted when the error is built: a password or URL credentials never reach a log line.

use std::fmt;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, as far as a caller needs to know to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A unique or primary-key constraint rejected the write (Postgres 23505, SQLite
    /// `SQLITE_CONSTRAINT_UNIQUE` / `_PRIMARYKEY`).
    UniqueViolation,
    /// A foreign-key constraint rejected the write (Postgres 23503, SQLite
    /// `SQLITE_CONSTRAINT_FOREIGNKEY`).
    ForeignKey,
    /// Another constraint (NOT NULL, CHECK) rejected the write.
    Constraint,
    /// The transaction lost a race and may succeed if run again: Postgres 40001 / 40P01
    /// (including YugabyteDB's "restart read required"), SQLite `BUSY` / `LOCKED`.
    Serialization,
    /// A query that must return a row returned none.
    NotFound,
    /// The database could not be reached, or the connection broke.
    Connection,
    /// The server refused our credentials.
    Authentication,
    /// The server refused the connection for a reason other than our credentials: the
    /// database named does not exist (Postgres 3D000). Like a refused password, it is the same
    /// on every host and does not go away by retrying.
    Refused,
    /// A statement or connection attempt ran out of time.
    Timeout,
    /// The configuration (URL, flags, paths) is invalid; the message says which part.
    Config,
    /// Applying or checking migrations failed.
    Migration,
    /// A value could not be converted between Rust and SQL (wrong type, NULL into a non-Option,
    /// a missing column).
    Decode,
    /// The API was used in a way it forbids, such as a non-transaction call made from inside a
    /// transaction closure.
    Misuse,
    /// An error returned by caller code inside a transaction closure.
    External,
    /// Anything else the database reported (syntax errors, permission errors, …).
    Other,
}

impl ErrorKind {
    /// Whether re-running the whole transaction may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Serialization)
    }

    /// Whether the failure says nothing about the work itself: the database could not be
    /// reached, ran out of time, or the transaction lost a race. The same work may succeed
    /// once the database is back, so a task attempt that failed this way is not the task's
    /// fault.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::Connection | ErrorKind::Timeout | ErrorKind::Serialization
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::UniqueViolation => "unique violation",
            ErrorKind::ForeignKey => "foreign key violation",
            ErrorKind::Constraint => "constraint violation",
            ErrorKind::Serialization => "serialization failure",
            ErrorKind::NotFound => "not found",
            ErrorKind::Connection => "connection error",
            ErrorKind::Authentication => "authentication failed",
            ErrorKind::Refused => "connection refused by the server",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Migration => "migration error",
            ErrorKind::Decode => "decode error",
            ErrorKind::Misuse => "API misuse",
            ErrorKind::External => "error in transaction closure",
            ErrorKind::Other => "database error",
        };
        f.write_str(s)
    }
}

/// A database error: a kind, a redacted human message and, where there is one, the source.
pub struct Error {
    kind: ErrorKind,
    message: String,
    code: Option<String>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// Builds an error of `kind` with a message. The message is redacted.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: redact(&message.into()),
            code: None,
            source: None,
        }
    }

    /// Wraps an error from caller code (for example inside a transaction closure) so that it
    /// can travel through this crate's `Result`.
    pub fn external(err: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        let source = err.into();
        Error {
            kind: ErrorKind::External,
            message: redact(&source.to_string()),
            code: None,
            source: Some(source),
        }
    }

    pub(crate) fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The database's own error code where it gave one (a Postgres SQLSTATE, or the SQLite
    /// extended result code as text).
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// The redacted message, without the kind prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The caller's error, when this error wraps one ([`ErrorKind::External`]).
    pub fn external_source(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        match self.kind {
            ErrorKind::External => self.source.as_deref(),
            _ => None,
        }
    }

    /// Shorthand for `kind() == UniqueViolation`.
    pub fn is_unique_violation(&self) -> bool {
        self.kind == ErrorKind::UniqueViolation
    }

    /// Shorthand for `kind() == NotFound`.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// Prefixes the message with what was being done.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = redact(&format!("{what}: {}", self.message));
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("code", &self.code)
            .field("message", &self.message)
            .finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The source of a driver error is already folded, redacted, into `message`; only a
        // caller's own error is exposed, so that `{:#}` chains never print unredacted text.
        self.external_source()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Removes credentials from a message: the user-info part of any URL (`scheme://user:pass@`)
/// and the value of any `password=` key.
pub fn redact(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        // The authority ends at the first '/', '?', '#' or whitespace; credentials end at the
        // last '@' inside it.
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                // Keep the user name (useful in errors), hide the password.
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _password)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    redact_key_values(&out)
}

fn redact_key_values(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    let mut out = String::with_capacity(message.len());
    let mut i = 0;
    for (start, _) in lower.match_indices("password=") {
        if start < i {
            continue;
        }
        let value_start = start + "password=".len();
        out.push_str(&message[i..value_start]);
        out.push_str("***");
        let end = message[value_start..]
            .find(|c: char| c.is_whitespace() || c == '&' || c == ',' || c == ';')
            .map_or(message.len(), |e| value_start + e);
        i = end;
    }
    out.push_str(&message[i..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_url_credentials() {
        let m = redact("cannot reach postgres://bob:s3cret@db1:5432,db2/harmony?sslmode=require");
        assert!(!m.contains("s3cret"), "{m}");
        assert!(m.contains("bob:***@db1"), "{m}");
        assert_eq!(redact("postgres://bob@h/db"), "postgres://bob@h/db");
        assert!(m.contains("db1:5432,db2/harmony"), "{m}");
    }

    #[test]
    fn redacts_password_key() {
        let m = redact("host=a user=b password=hunter2 dbname=c");
        assert_eq!(m, "host=a user=b password=*** dbname=c");
        let m = redact("PASSWORD=x&y=1");
        assert_eq!(m, "PASSWORD=***&y=1");
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        let m = redact("relation \"support_import\" does not exist");
        assert_eq!(m, "relation \"support_import\" does not exist");
    }

    #[test]
    fn transient_kinds() {
        for k in [
            ErrorKind::Connection,
            ErrorKind::Timeout,
            ErrorKind::Serialization,
        ] {
            assert!(k.is_transient(), "{k}");
        }
        for k in [
            ErrorKind::UniqueViolation,
            ErrorKind::NotFound,
            ErrorKind::Authentication,
            ErrorKind::Refused,
            ErrorKind::Decode,
            ErrorKind::Other,
        ] {
            assert!(!k.is_transient(), "{k}");
        }
    }

    #[test]
    fn new_and_context_redact() {
        let e =
            Error::new(ErrorKind::Connection, "postgres://u:pw@h/db refused").context("opening");
        assert!(!e.to_string().contains("pw@"));
        assert_eq!(e.kind(), ErrorKind::Connection);
    }
}
