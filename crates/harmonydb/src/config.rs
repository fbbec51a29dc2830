//! Where the database is and how to talk to it.
//!
//! A [`DbConfig`] is built in code or parsed from a URL:
//!
//! * `sqlite://PATH` — `sqlite://./harmony.db`, `sqlite:///var/lib/harmony.db`; options
//!   `busy_timeout_ms`, `readers`, `synchronous=normal|full`.
//! * `postgres://USER:PASSWORD@HOST1[:PORT],HOST2[:PORT]/DATABASE?schema=curio` (also
//!   `postgresql://`); options `schema`, `sslmode=disable|prefer|require|verify-full`,
//!   `pool_size`, `connect_timeout` (seconds), `application_name`.
//! * common options: `migrate=false` skips applying migrations on open.
//!
//! Unknown options are errors, so a typo never silently falls back to a default.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::error::{Error, ErrorKind, Result};

/// The default database URL: an embedded SQLite file in the working directory.
pub const DEFAULT_URL: &str = "sqlite://./harmony.db";

/// The default Postgres schema.
pub const DEFAULT_SCHEMA: &str = "curio";

/// A complete database configuration.
#[derive(Clone, PartialEq)]
pub struct DbConfig {
    /// Which backend and where.
    pub backend: BackendConfig,
    /// Apply pending migrations when the database is opened (default true).
    pub migrate_on_open: bool,
}

/// Backend-specific settings.
#[derive(Clone, PartialEq)]
pub enum BackendConfig {
    /// An embedded SQLite file.
    Sqlite(SqliteConfig),
    /// A PostgreSQL server or cluster (also YugabyteDB / CockroachDB through their Postgres
    /// protocol).
    Postgres(PostgresConfig),
}

/// SQLite durability setting (`PRAGMA synchronous`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Durable against process crashes; the last commits may be lost on power loss. The
    /// default, and SQLite's recommendation for WAL.
    Normal,
    /// Durable against power loss too; every commit waits for fsync.
    Full,
}

/// Settings of the embedded SQLite backend.
#[derive(Debug, Clone, PartialEq)]
pub struct SqliteConfig {
    /// The database file (created when missing; its directory must exist).
    pub path: PathBuf,
    /// How long to wait on another process's lock before failing with BUSY.
    pub busy_timeout: Duration,
    /// Number of read-only connections (each on its own thread).
    pub readers: usize,
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// Create the file when it does not exist (default true). Read-only commands turn this
    /// off so that a typo in a path never leaves an empty database behind.
    pub create_if_missing: bool,
}

/// TLS mode for Postgres connections, with libpq's meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without certificate checks; plain otherwise.
    Prefer,
    /// TLS always, without certificate checks (protects against passive eavesdropping).
    Require,
    /// TLS always; the server certificate must chain to a public root and match the host.
    VerifyFull,
}

impl FromStr for TlsMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "disable" => Ok(TlsMode::Disable),
            "prefer" => Ok(TlsMode::Prefer),
            "require" => Ok(TlsMode::Require),
            "verify-full" => Ok(TlsMode::VerifyFull),
            other => Err(config_error(format!(
                "unknown sslmode {other:?}: use disable, prefer, require or verify-full"
            ))),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyFull => "verify-full",
        })
    }
}

/// One Postgres host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgHost {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl fmt::Display for PgHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Settings of the Postgres backend.
#[derive(Clone, PartialEq)]
pub struct PostgresConfig {
    /// Hosts in priority order: connections go to the first one that accepts writes (once a
    /// handle has moved to a later host, starting from that one).
    pub hosts: Vec<PgHost>,
    /// User name.
    pub user: String,
    /// Password (never displayed).
    pub password: Option<String>,
    /// Database name.
    pub database: String,
    /// Schema holding every table; created when missing and put on `search_path`.
    pub schema: String,
    /// TLS mode.
    pub tls: TlsMode,
    /// Maximum pooled connections per process.
    pub pool_size: usize,
    /// Limit on establishing one connection to one host.
    pub connect_timeout: Duration,
    /// `application_name` reported to the server.
    pub application_name: String,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for PostgresConfig {
    /// The URL form, with the password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hosts: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
        let pw = if self.password.is_some() { ":***" } else { "" };
        write!(
            f,
            "postgres://{}{pw}@{}/{}?schema={}",
            self.user,
            hosts.join(","),
            self.database,
            self.schema
        )
    }
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for DbConfig {
    /// A redacted URL naming the database.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            BackendConfig::Sqlite(s) => write!(f, "sqlite://{}", s.path.display()),
            BackendConfig::Postgres(p) => write!(f, "{p}"),
        }
    }
}

impl DbConfig {
    /// A SQLite configuration with default settings for the file at `path`.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        DbConfig {
            backend: BackendConfig::Sqlite(SqliteConfig {
                path: path.into(),
                busy_timeout: crate::sqlite::DEFAULT_BUSY_TIMEOUT,
                readers: 4,
                synchronous: Synchronous::Normal,
                create_if_missing: true,
            }),
            migrate_on_open: true,
        }
    }

    /// Parses a database URL (see the module docs for the forms and options).
    pub fn from_url(url: &str) -> Result<Self> {
        let url = url.trim();
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            config_error(format!(
                // Quoted, so that a control character in it cannot break the line.
                "malformed database URL {:?}: expected sqlite://PATH or postgres://HOST[:PORT]/DATABASE",
                crate::error::redact(url)
            ))
        })?;
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => parse_sqlite(rest),
            "postgres" | "postgresql" => parse_postgres(rest),
            other => Err(config_error(format!(
                "unknown database URL scheme {other:?}: use sqlite://PATH or postgres://HOST[:PORT]/DATABASE"
            ))),
        }
    }

    /// Short name of the backend: `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            BackendConfig::Sqlite(_) => "sqlite",
            BackendConfig::Postgres(_) => "postgres",
        }
    }
}

impl FromStr for DbConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DbConfig::from_url(s)
    }
}

fn config_error(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, msg)
}

fn decode(part: &str, what: &str) -> Result<String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            config_error(format!(
                "database URL: {what} is not valid UTF-8 after %-decoding"
            ))
        })
}

/// Splits `?k=v&k2=v2` into decoded pairs.
fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            config_error(format!(
                "database URL option {pair:?} has no value (expected key=value)"
            ))
        })?;
        out.push((decode(k, "an option name")?, decode(v, "an option value")?));
    }
    Ok(out)
}

fn parse_number<T: FromStr>(key: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| {
        config_error(format!(
            "database URL option {key}={value:?} is not a valid number"
        ))
    })
}

fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(config_error(format!(
            "database URL option {key}={value:?} must be true or false"
        ))),
    }
}

fn parse_sqlite(rest: &str) -> Result<DbConfig> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(config_error(
            "database URL sqlite:// has no path: use sqlite://./harmony.db",
        ));
    }
    let path = decode(path, "the SQLite path")?;
    let mut cfg = DbConfig::sqlite(PathBuf::from(path));
    let BackendConfig::Sqlite(s) = &mut cfg.backend else {
        unreachable!("DbConfig::sqlite builds a SQLite config")
    };
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "busy_timeout_ms" => s.busy_timeout = Duration::from_millis(parse_number(&k, &v)?),
            "readers" => {
                s.readers = parse_number(&k, &v)?;
                if s.readers == 0 || s.readers > 64 {
                    return Err(config_error("database URL option readers must be 1…64"));
                }
            }
            "synchronous" => {
                s.synchronous = match v.to_ascii_lowercase().as_str() {
                    "normal" => Synchronous::Normal,
                    "full" => Synchronous::Full,
                    _ => {
                        return Err(config_error(format!(
                            "database URL option synchronous={v:?}: use normal or full"
                        )));
                    }
                }
            }
            "migrate" => cfg.migrate_on_open = parse_bool(&k, &v)?,
            other => {
                return Err(config_error(format!(
                    "unknown SQLite URL option {other:?} (known: busy_timeout_ms, readers, synchronous, migrate)"
                )));
            }
        }
    }
    Ok(cfg)
}

fn parse_postgres(rest: &str) -> Result<DbConfig> {
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, database) = match before_query.split_once('/') {
        Some((a, d)) => (a, Some(d)),
        None => (before_query, None),
    };
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((name, pw)) => (decode(name, "the user")?, Some(decode(pw, "the password")?)),
            None => (decode(u, "the user")?, None),
        },
        None => ("postgres".to_owned(), None),
    };
    if user.is_empty() {
        return Err(config_error("database URL has an empty user name"));
    }
    let hosts = parse_hosts(hostlist)?;
    let database = match database
        .map(|d| decode(d, "the database name"))
        .transpose()?
    {
        Some(d) if !d.is_empty() => d,
        _ => user.clone(),
    };
    let mut pg = PostgresConfig {
        hosts,
        user,
        password,
        database,
        schema: DEFAULT_SCHEMA.to_owned(),
        tls: TlsMode::Disable,
        pool_size: 10,
        connect_timeout: Duration::from_secs(5),
        application_name: "harmony".to_owned(),
    };
    let mut migrate_on_open = true;
    for (k, v) in query_pairs(query)? {
        match k.as_str() {
            "schema" => pg.schema = v,
            "sslmode" => pg.tls = v.parse()?,
            "pool_size" => {
                pg.pool_size = parse_number(&k, &v)?;
                if pg.pool_size == 0 || pg.pool_size > 1000 {
                    return Err(config_error("database URL option pool_size must be 1…1000"));
                }
            }
            "connect_timeout" => pg.connect_timeout = Duration::from_secs(parse_number(&k, &v)?),
            "application_name" => pg.application_name = v,
            "migrate" => migrate_on_open = parse_bool(&k, &v)?,
            other => {
                return Err(config_error(format!(
                    "unknown Postgres URL option {other:?} (known: schema, sslmode, pool_size, connect_timeout, application_name, migrate)"
                )));
            }
        }
    }
    validate_schema(&pg.schema)?;
    Ok(DbConfig {
        backend: BackendConfig::Postgres(pg),
        migrate_on_open,
    })
}

fn parse_hosts(list: &str) -> Result<Vec<PgHost>> {
    if list.is_empty() {
        return Err(config_error(
            "database URL has no host: use postgres://USER@HOST[:PORT]/DATABASE",
        ));
    }
    let mut hosts = Vec::new();
    for item in list.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(config_error("database URL host list has an empty entry"));
        }
        let (host, port) = if let Some(stripped) = item.strip_prefix('[') {
            // [ipv6]:port
            let (h, after) = stripped.split_once(']').ok_or_else(|| {
                config_error(format!("database URL host {item:?} has an unclosed '['"))
            })?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => {
                    return Err(config_error(format!(
                        "database URL host {item:?} is malformed"
                    )));
                }
            };
            (h.to_owned(), port)
        } else {
            match item.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (item.to_owned(), None),
            }
        };
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| {
                config_error(format!(
                    "database URL host {item:?} has an invalid port {p:?}"
                ))
            })?,
            None => 5432,
        };
        if host.is_empty() {
            return Err(config_error(format!(
                "database URL host {item:?} has no host name"
            )));
        }
        hosts.push(PgHost {
            host: decode(&host, "a host")?,
            port,
        });
    }
    Ok(hosts)
}

/// Schema names are identifiers that end up in `CREATE SCHEMA`; only plain ones are allowed.
pub(crate) fn validate_schema(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(config_error(format!(
            "invalid schema name {schema:?}: use 1–63 characters of a-z, 0-9 and _, not starting with a digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(url: &str) -> PostgresConfig {
        match DbConfig::from_url(url).unwrap().backend {
            BackendConfig::Postgres(p) => p,
            BackendConfig::Sqlite(_) => panic!("expected postgres"),
        }
    }

    #[test]
    fn sqlite_urls() {
        let c = DbConfig::from_url("sqlite://./harmony.db").unwrap();
        let BackendConfig::Sqlite(s) = c.backend else {
            panic!()
        };
        assert_eq!(s.path, PathBuf::from("./harmony.db"));
        let c =
            DbConfig::from_url("sqlite:///var/lib/h.db?readers=2&synchronous=full&migrate=false")
                .unwrap();
        assert!(!c.migrate_on_open);
        let BackendConfig::Sqlite(s) = c.backend else {
            panic!()
        };
        assert_eq!(s.path, PathBuf::from("/var/lib/h.db"));
        assert_eq!(s.readers, 2);
        assert_eq!(s.synchronous, Synchronous::Full);
    }

    #[test]
    fn postgres_urls() {
        let p = pg(
            "postgres://bob:p%40ss@db1:5433,db2,[::1]:6000/harmony?schema=prod&sslmode=require&pool_size=4",
        );
        assert_eq!(p.user, "bob");
        assert_eq!(p.password.as_deref(), Some("p@ss"));
        assert_eq!(
            p.hosts,
            vec![
                PgHost {
                    host: "db1".into(),
                    port: 5433
                },
                PgHost {
                    host: "db2".into(),
                    port: 5432
                },
                PgHost {
                    host: "::1".into(),
                    port: 6000
                },
            ]
        );
        assert_eq!(p.database, "harmony");
        assert_eq!(p.schema, "prod");
        assert_eq!(p.tls, TlsMode::Require);
        assert_eq!(p.pool_size, 4);
        let shown = p.to_string();
        assert!(!shown.contains("p@ss") && shown.contains("***"), "{shown}");

        let p = pg("postgresql://localhost");
        assert_eq!(p.user, "postgres");
        assert_eq!(p.database, "postgres");
        assert_eq!(p.schema, "curio");
    }

    #[test]
    fn bad_urls_are_clear() {
        let cases = [
            ("mysql://x", "unknown database URL scheme"),
            ("harmony.db", "malformed database URL"),
            ("sqlite://", "no path"),
            ("sqlite://a.db?readerz=1", "unknown SQLite URL option"),
            ("postgres://u:pw@/db", "no host"),
            ("postgres://u:pw@h:99999/db", "invalid port"),
            ("postgres://u@h/db?schema=Drop;Table", "invalid schema name"),
            ("postgres://u@h/db?sslmode=maybe", "unknown sslmode"),
            ("postgres://u@h/db?pool_size=x", "not a valid number"),
        ];
        for (url, want) in cases {
            let e = DbConfig::from_url(url).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Config, "{url}");
            assert!(e.to_string().contains(want), "{url}: {e}");
        }
        let e = DbConfig::from_url("postgres://u:secret@h:99999/db").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    /// Thousands of malformed URLs, generated from a fixed seed by mutating valid ones: each
    /// parses, or is refused with a one-line `Config` error. None panics, and a URL that
    /// parses never shows its password when displayed. A failing case prints its index and
    /// the URL; the same seed reproduces it.
    #[test]
    fn fuzzed_urls_get_a_clean_error() {
        const CASES: usize = 4000;
        const SEEDS: &[&str] = &[
            "sqlite://./harmony.db",
            "sqlite:///var/lib/h.db?readers=2&synchronous=full&migrate=false&busy_timeout_ms=10",
            "postgres://bob:pw9secret@db1:5433,db2,[::1]:6000/harmony?schema=prod&sslmode=require&pool_size=4",
            "postgres://u@h/db?connect_timeout=5&application_name=x&migrate=true",
        ];
        const PIECES: &[&str] = &[
            ":",
            "/",
            "//",
            "@",
            "?",
            "&",
            "=",
            ",",
            "[",
            "]",
            "#",
            "%",
            "%zz",
            "%ff",
            "%00",
            "%e9",
            "%",
            " ",
            "\n",
            "\0",
            "é",
            "🦀",
            "65536",
            "-1",
            "99999999999999999999",
            "0",
            "[::1",
            "::",
            "schema=",
            "sslmode=",
            "pool_size=0",
            "readers=",
            "migrate=maybe",
            "x;DROP",
            "postgres://",
            "sqlite://",
            "password=",
        ];
        let mut rng = fastrand::Rng::with_seed(0x14_0b5e);
        let (mut ok, mut refused) = (0, 0);
        for case in 0..CASES {
            let mut url: Vec<char> = SEEDS[rng.usize(..SEEDS.len())].chars().collect();
            for _ in 0..rng.usize(1..=3) {
                let at = rng.usize(..=url.len());
                match rng.u8(..4) {
                    0 => {
                        let end = (at + rng.usize(..=12)).min(url.len());
                        url.drain(at..end);
                    }
                    1 | 2 => {
                        let piece = PIECES[rng.usize(..PIECES.len())];
                        url.splice(at..at, piece.chars());
                    }
                    _ => {
                        let n = rng.usize(1..6);
                        let chars: Vec<char> = (0..n).map(|_| rng.char(..)).collect();
                        url.splice(at..at, chars);
                    }
                }
            }
            let url: String = url.into_iter().collect();
            match std::panic::catch_unwind(|| DbConfig::from_url(&url)) {
                Err(_) => panic!("case {case} panicked on {url:?}"),
                Ok(Ok(cfg)) => {
                    let shown = std::panic::catch_unwind(|| cfg.to_string())
                        .unwrap_or_else(|_| panic!("case {case}: displaying {url:?} panicked"));
                    assert!(!shown.contains("pw9secret"), "case {case}: {shown}");
                    ok += 1;
                }
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    assert_eq!(e.kind(), ErrorKind::Config, "case {case}: {url:?}: {msg}");
                    assert!(
                        !msg.is_empty() && !msg.contains('\n'),
                        "case {case}: {url:?}: {msg:?}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(
            refused > CASES / 4 && ok > CASES / 20,
            "ok {ok}, refused {refused}"
        );
    }
}
