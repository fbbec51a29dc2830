//! HarmonyDB: a small, safe SQL layer over embedded SQLite and PostgreSQL.
//!
//! One [`Db`] handle hides the backend. The API is built so that the safe thing is the only
//! thing: SQL text is `&'static str` (a value cannot be formatted into it), every value is a
//! bind parameter written `$1…$n` in both dialects, and errors carry an [`ErrorKind`] so that
//! callers never parse messages.
//!
//! ```no_run
//! # async fn demo() -> harmonydb::Result<()> {
//! use harmonydb::{Db, DbConfig, Executor};
//!
//! let db = Db::open(DbConfig::from_url("sqlite://./harmony.db")?).await?;
//! let n: i64 = db.scalar("SELECT count(*) FROM harmony_task WHERE name = $1", &[&"SDR"]).await?;
//! db.transaction(|tx| async move {
//!     tx.exec("DELETE FROM harmony_task WHERE name = $1", &[&"SDR"]).await?;
//!     Ok(true) // commit
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! What this crate owns: connections (a writer thread plus reader threads for SQLite, a
//! failover-aware pool for Postgres), migrations, transactions with retry, error kinds and
//! DB metrics. What it must not know: anything about tasks; the engine's store module holds
//! the task SQL.

extern crate self as harmonydb;

mod batch;
mod config;
mod error;
mod metrics;
mod migrate;
mod notify;
mod postgres;
mod relay;
mod sqlite;
mod value;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel as cb;
use futures_util::Stream;
use tokio::sync::{mpsc, oneshot};

pub use batch::{BatchColumn, BatchRows, BatchType, RowWriter};
pub use config::{
    BackendConfig, DEFAULT_SCHEMA, DEFAULT_URL, DbConfig, PgHost, PostgresConfig, SqliteConfig,
    Synchronous, TlsMode,
};
pub use error::{Error, ErrorKind, Result, redact};
pub use harmonydb_derive::FromRow;
#[doc(hidden)]
pub use harmonydb_derive::batch_sql as __batch_sql;
pub use metrics::DbMetrics;
pub use migrate::{MigrationInfo, MigrationStatus};
pub use notify::{NOTIFY_BUFFER_MAX, Notification, NotifyListener};
pub use relay::{Inbound, Relay};
pub use value::{
    Columns, FromRow, FromValue, Params, Row, SQLITE_TIMESTAMP_FORMAT, Scalar, Timestamp, ToValue,
    Value,
};

use crate::postgres::{PgBackend, PgTx};
use crate::relay::Outbox;
use crate::sqlite::{SqliteBackend, TxMsg};

/// What a statement should give back.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Exec,
    Rows,
}

/// What a statement gave back.
#[doc(hidden)]
#[derive(Debug)]
pub enum Output {
    Affected(u64),
    Rows(Vec<Row>),
}

/// The SQL dialect behind a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// Embedded SQLite.
    Sqlite,
    /// PostgreSQL (and Postgres-compatible distributed SQL).
    Postgres,
}

impl Dialect {
    /// Picks the statement written for this dialect. For the few statements whose SQL must
    /// differ (arrays, `SKIP LOCKED`, upserts with dialect-specific functions).
    pub fn pick(self, sqlite: &'static str, postgres: &'static str) -> &'static str {
        match self {
            Dialect::Sqlite => sqlite,
            Dialect::Postgres => postgres,
        }
    }

    /// `sqlite` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }
}

/// One statement written for both dialects, as [`id_list_sql!`] and [`batch_sql!`] build it;
/// pick the text with [`PerDialect::get`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerDialect {
    /// The SQLite text.
    pub sqlite: &'static str,
    /// The Postgres text.
    pub postgres: &'static str,
}

impl PerDialect {
    /// The text for `dialect`.
    pub const fn get(self, dialect: Dialect) -> &'static str {
        match dialect {
            Dialect::Sqlite => self.sqlite,
            Dialect::Postgres => self.postgres,
        }
    }
}

/// A statement that tests a column against a list of ids bound as **one** parameter (a
/// `Vec<i64>`, which binds as a JSON array on SQLite and as `INT8[]` on Postgres), written once
/// for both dialects: `COLUMN IN (SELECT value FROM json_each($N))` on SQLite,
/// `COLUMN = ANY($N::bigint[])` on Postgres. The text stays `&'static str` (built with
/// `concat!`); nothing is formatted at run time.
///
/// ```
/// let sql = harmonydb::id_list_sql!(
///     "DELETE FROM harmony_task WHERE owner_id = $1 AND ", "id", 2, " RETURNING id"
/// );
/// assert_eq!(
///     sql.get(harmonydb::Dialect::Sqlite),
///     "DELETE FROM harmony_task WHERE owner_id = $1 AND id IN (SELECT value FROM json_each($2)) RETURNING id"
/// );
/// assert_eq!(
///     sql.get(harmonydb::Dialect::Postgres),
///     "DELETE FROM harmony_task WHERE owner_id = $1 AND id = ANY($2::bigint[]) RETURNING id"
/// );
/// ```
#[macro_export]
macro_rules! id_list_sql {
    ($before:literal, $column:literal, $param:literal, $after:literal $(,)?) => {
        $crate::PerDialect {
            sqlite: concat!(
                $before,
                $column,
                " IN (SELECT value FROM json_each($",
                $param,
                "))",
                $after
            ),
            postgres: concat!($before, $column, " = ANY($", $param, "::bigint[])", $after),
        }
    };
}

/// A statement over a batch of rows — many rows inserted, updated or matched by one
/// statement — written once for both dialects, with the type that holds and binds its rows.
///
/// The rows are a row source named `alias` whose columns are declared once, with their SQL
/// types; the statement reads them as `alias.column`, and `alias.ord` is each row's position
/// in the batch (from 1), for statements that keep the batch's order. The macro writes the
/// source for each dialect:
///
/// * SQLite: `(SELECT key + 1 AS ord, value ->> 0 AS c0, … FROM json_each($N)) AS alias`,
///   reading **one** parameter, a JSON array of row arrays;
/// * Postgres: `unnest($N::type0[], $N+1::type1[], …) WITH ORDINALITY AS alias(c0, …, ord)`,
///   reading **one array per column**.
///
/// The batch's parameters come last (the macro refuses a placeholder at or after `$N` in the
/// text), so the statement's other placeholders have the same numbers in both dialects.
/// Column types are `bigint` (`i64`), `text` (`&str`), `boolean` (`bool`) and `timestamptz`
/// ([`Timestamp`]); `Option<type>` allows NULL. Like every statement of this crate the text
/// is `&'static str`, assembled at compile time from the literals and the declared names;
/// values are only ever bound.
///
/// The macro declares a type (`struct NAME;`, with the attributes and visibility given) with
/// `NAME::SQL` (the [`PerDialect`] text), `NAME::new(dialect, capacity)`, `push(…)` taking
/// one argument per column in order, `sql()` (the text for the batch's dialect) and
/// `params(lead)` (the parameters: `lead` for `$1…$N-1`, then the batch). The rows are held
/// as the dialect binds them ([`BatchRows`]): written straight into one JSON buffer on SQLite,
/// appended to per-column arrays on Postgres, so a row costs no allocation of its own.
///
/// ```
/// use harmonydb::{Dialect, Timestamp};
///
/// harmonydb::batch_sql! {
///     /// History rows, in outcome order, all recorded by one host.
///     struct HistoryRows;
///     "INSERT INTO harmony_task_history (task_id, name, work_end, result, err, completed_by_host_and_port)
///      SELECT h.task_id, h.name, h.work_end, h.result, h.err, $1 FROM "
///     rows($2) as h {
///         task_id: bigint,
///         name: text,
///         work_end: timestamptz,
///         result: boolean,
///         err: Option<text>,
///     }
///     " ORDER BY h.ord RETURNING id"
/// }
///
/// assert_eq!(
///     HistoryRows::SQL.get(Dialect::Sqlite),
///     "INSERT INTO harmony_task_history (task_id, name, work_end, result, err, completed_by_host_and_port)
///      SELECT h.task_id, h.name, h.work_end, h.result, h.err, $1 FROM \
///      (SELECT key + 1 AS ord, value ->> 0 AS task_id, value ->> 1 AS name, value ->> 2 AS work_end, \
///      value ->> 3 AS result, value ->> 4 AS err FROM json_each($2)) AS h ORDER BY h.ord RETURNING id"
/// );
/// assert_eq!(
///     HistoryRows::SQL.get(Dialect::Postgres),
///     "INSERT INTO harmony_task_history (task_id, name, work_end, result, err, completed_by_host_and_port)
///      SELECT h.task_id, h.name, h.work_end, h.result, h.err, $1 FROM \
///      unnest($2::bigint[], $3::text[], $4::timestamptz[], $5::boolean[], $6::text[]) \
///      WITH ORDINALITY AS h(task_id, name, work_end, result, err, ord) ORDER BY h.ord RETURNING id"
/// );
///
/// let mut rows = HistoryRows::new(Dialect::Sqlite, 2);
/// rows.push(7, "SDR", Timestamp::from_millis(1_000), true, None);
/// rows.push(8, "it's \"quoted\"", Timestamp::from_millis(2_000), false, Some("boom"));
/// let params = rows.params(&[&"host:1234"]);
/// assert_eq!(params.len(), 2); // $1 and the one JSON parameter; on Postgres, 1 + 5 arrays
/// assert_eq!(
///     params[1].to_value(),
///     harmonydb::Value::Text(
///         r#"[[7,"SDR","1970-01-01 00:00:01.000",1,null],[8,"it's \"quoted\"","1970-01-01 00:00:02.000",0,"boom"]]"#
///             .into()
///     )
/// );
/// # async fn run(tx: &harmonydb::Tx, rows: &HistoryRows) -> harmonydb::Result<()> {
/// # use harmonydb::Executor;
/// let ids: Vec<(i64,)> = tx.select(rows.sql(), &rows.params(&[&"host:1234"])).await?;
/// # Ok(()) }
/// ```
///
/// A placeholder after the batch would be numbered differently in each dialect, so it does
/// not compile:
///
/// ```compile_fail
/// harmonydb::batch_sql! {
///     struct Ends;
///     "UPDATE harmony_test_attempt SET ended = e.ended FROM "
///     rows($1) as e { id: bigint, ended: timestamptz }
///     " WHERE harmony_test_attempt.id = e.id AND machine_id = $2"
/// }
/// ```
///
/// Neither does a column type outside the four:
///
/// ```compile_fail
/// harmonydb::batch_sql! {
///     struct Scores;
///     "INSERT INTO score (v) SELECT s.v FROM " rows($1) as s { v: real }
/// }
/// ```
#[macro_export]
macro_rules! batch_sql {
    ($($body:tt)*) => {
        $crate::__batch_sql! { $crate; $($body)* }
    };
}

tokio::task_local! {
    /// Set while a transaction closure runs, so that a non-transaction call made from inside
    /// it (which would deadlock on SQLite's single writer, or escape the transaction on
    /// Postgres) fails at once instead.
    static IN_TRANSACTION: ();
}

fn in_transaction() -> bool {
    IN_TRANSACTION.try_with(|_| ()).is_ok()
}

fn misuse_in_transaction() -> Error {
    Error::new(
        ErrorKind::Misuse,
        "a non-transaction database call was made inside a transaction closure; use the Tx handle the closure received",
    )
}

mod private {
    use super::{BoxFuture, Output, Result, Value, Want};

    /// Implemented by [`Db`](super::Db) and [`Tx`](super::Tx) only.
    pub trait Sealed {
        fn run_stmt(
            &self,
            sql: &'static str,
            params: Vec<Value>,
            want: Want,
        ) -> BoxFuture<'_, Result<Output>>;
        fn run_script(&self, sql: &'static str) -> BoxFuture<'_, Result<()>>;
        fn dialect_of(&self) -> super::Dialect;
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The query API shared by [`Db`] (each call on its own) and [`Tx`] (inside a transaction).
///
/// SQL is `&'static str` and uses `$1…$n` placeholders in both dialects; parameters are
/// `&[&dyn ToValue]`, for example `&[&id, &"name"]`.
pub trait Executor: private::Sealed + Sync {
    /// The dialect, for the rare statement that must differ.
    fn dialect(&self) -> Dialect {
        self.dialect_of()
    }

    /// Runs a statement; returns the number of rows it changed (or returned, for a query).
    fn exec(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<u64>> + Send {
        let fut = self.run_stmt(sql, value::to_values(params), Want::Exec);
        async move {
            match fut.await? {
                Output::Affected(n) => Ok(n),
                Output::Rows(rows) => Ok(rows.len() as u64),
            }
        }
    }

    /// Runs a query and converts every row.
    fn select<T: FromRow>(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Vec<T>>> + Send {
        let fut = self.run_stmt(sql, value::to_values(params), Want::Rows);
        async move { rows(fut.await?)?.iter().map(T::from_row).collect() }
    }

    /// Runs a query that must return at least one row; returns the first. No row is an
    /// [`ErrorKind::NotFound`] error.
    fn query_row<T: FromRow>(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<T>> + Send {
        let fut = self.query_opt::<T>(sql, params);
        async move {
            fut.await?
                .ok_or_else(|| Error::new(ErrorKind::NotFound, "query returned no rows"))
        }
    }

    /// Runs a query; returns its first row, if any.
    fn query_opt<T: FromRow>(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        let fut = self.run_stmt(sql, value::to_values(params), Want::Rows);
        async move { rows(fut.await?)?.first().map(T::from_row).transpose() }
    }

    /// Runs a query returning one column of one row.
    fn scalar<T: FromValue>(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<T>> + Send {
        let fut = self.query_row::<Scalar<T>>(sql, params);
        async move { fut.await.map(|s| s.0) }
    }

    /// Runs a query returning one column of at most one row.
    fn scalar_opt<T: FromValue>(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = Result<Option<T>>> + Send {
        let fut = self.query_opt::<Scalar<T>>(sql, params);
        async move { fut.await.map(|s| s.map(|s| s.0)) }
    }

    /// Runs several statements separated by `;`, without parameters (schema scripts).
    fn exec_script(&self, sql: &'static str) -> impl Future<Output = Result<()>> + Send {
        self.run_script(sql)
    }
}

fn rows(out: Output) -> Result<Vec<Row>> {
    match out {
        Output::Rows(r) => Ok(r),
        Output::Affected(_) => Err(Error::new(ErrorKind::Other, "statement returned no rows")),
    }
}

enum Backend {
    Sqlite(SqliteBackend),
    Postgres(PgBackend),
}

struct Inner {
    backend: Backend,
    config: DbConfig,
    metrics: DbMetrics,
}

/// A handle to the database. Cheap to clone; all clones share the connections.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
    /// Where notifications go instead of `NOTIFY` (see [`Db::with_relay`]).
    relay: Option<Arc<dyn Relay>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Db({})", self.inner.config)?;
        if self.relay.is_some() {
            write!(f, " with relay")?;
        }
        Ok(())
    }
}

/// Bounded, capped exponential backoff for transactions that lose a race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub max_attempts: u32,
    /// Wait after the first failure.
    pub initial_backoff: Duration,
    /// Largest wait between attempts.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt + 1` (attempt counts from 1), with ±25 % jitter so
    /// that processes that collided once do not collide again in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.initial_backoff.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1))
                .unwrap_or(u32::MAX),
        );
        let capped = exp.min(self.max_backoff);
        capped.mul_f64(0.75 + fastrand::f64() * 0.5)
    }
}

/// Options of one transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxOptions {
    /// Re-run the whole closure on [`ErrorKind::Serialization`] (Postgres 40001/40P01,
    /// YugabyteDB restart-read, SQLite BUSY), with this policy. `None`: fail at once.
    pub retry: Option<RetryPolicy>,
}

impl TxOptions {
    /// Retry serialization failures with the default policy.
    pub fn retry() -> Self {
        TxOptions {
            retry: Some(RetryPolicy::default()),
        }
    }
}

/// What a transaction closure returns: whether to commit, and the value handed back.
pub trait Commit {
    /// True to commit, false to roll back.
    fn should_commit(&self) -> bool;
}

impl Commit for bool {
    fn should_commit(&self) -> bool {
        *self
    }
}

impl<T> Commit for Option<T> {
    /// `Some` commits and hands the value back; `None` rolls back.
    fn should_commit(&self) -> bool {
        self.is_some()
    }
}

/// Where a database lives and what state its schema is in (`harmony db status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DbStatus {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// The redacted URL.
    pub url: String,
    /// Postgres: the host new connections go to; SQLite: the file.
    pub location: String,
    /// Postgres: index of that host in the configured list.
    pub host_index: Option<usize>,
    /// Postgres schema.
    pub schema: Option<String>,
    /// Migration state.
    pub migrations: MigrationStatus,
}

impl Db {
    /// Opens the database described by `config`, and applies pending migrations unless
    /// `config.migrate_on_open` is false.
    pub async fn open(config: DbConfig) -> Result<Db> {
        let metrics = DbMetrics::new(config.backend_name());
        let backend = match &config.backend {
            BackendConfig::Sqlite(s) => Backend::Sqlite(SqliteBackend::open(s).await?),
            BackendConfig::Postgres(p) => Backend::Postgres(PgBackend::open(p, &metrics).await?),
        };
        let db = Db {
            inner: Arc::new(Inner {
                backend,
                config,
                metrics,
            }),
            relay: None,
        };
        if db.inner.config.migrate_on_open {
            db.migrate().await?;
        }
        Ok(db)
    }

    /// A handle on the same connections whose notifications go through `relay` instead of
    /// the database's `NOTIFY` (see the `relay` module): [`Tx::notify`] publishes after the
    /// commit, [`Db::notify`] at once, and [`Db::listen`] listens to the relay's inbound side.
    /// This handle itself is unchanged.
    pub fn with_relay(&self, relay: Arc<dyn Relay>) -> Db {
        Db {
            inner: Arc::clone(&self.inner),
            relay: Some(relay),
        }
    }

    /// The relay this handle's notifications go through, if any.
    pub fn relay(&self) -> Option<&Arc<dyn Relay>> {
        self.relay.as_ref()
    }

    /// Sends one notification on its own: through the relay when the handle has one, else
    /// `pg_notify` on Postgres; a no-op on SQLite without a relay (other processes see commits
    /// through [`Db::data_version`]).
    pub async fn notify(&self, channel: &'static str, payload: &str) -> Result<()> {
        if let Some(relay) = &self.relay {
            relay.publish(vec![Notification {
                channel: channel.to_owned(),
                payload: payload.to_owned(),
            }]);
            return Ok(());
        }
        if self.dialect() == Dialect::Postgres {
            self.exec("SELECT pg_notify($1, $2)", &[&channel, &payload])
                .await?;
        }
        Ok(())
    }

    /// The configuration this handle was opened with.
    pub fn config(&self) -> &DbConfig {
        &self.inner.config
    }

    /// This handle's metrics.
    pub fn metrics(&self) -> &DbMetrics {
        &self.inner.metrics
    }

    /// Applies pending migrations; returns the ones applied by this call (empty when the
    /// schema was already current).
    pub async fn migrate(&self) -> Result<Vec<MigrationInfo>> {
        migrate::apply(self).await
    }

    /// The schema's migration state.
    pub async fn migration_status(&self) -> Result<MigrationStatus> {
        migrate::status(self).await
    }

    /// Backend, location and migration state.
    pub async fn status(&self) -> Result<DbStatus> {
        let migrations = self.migration_status().await?;
        let (location, host_index, schema) = match &self.inner.backend {
            Backend::Sqlite(s) => (s.path().display().to_string(), None, None),
            Backend::Postgres(p) => {
                let (idx, host) = p
                    .current_host()
                    .map_or((None, "(not connected)".to_owned()), |(i, h)| (Some(i), h));
                (host, idx, Some(p.config().schema.clone()))
            }
        };
        Ok(DbStatus {
            backend: self.inner.config.backend_name(),
            url: self.inner.config.to_string(),
            location,
            host_index,
            schema,
            migrations,
        })
    }

    /// Runs `f` in a transaction without retry. See [`Db::transaction_with`].
    pub async fn transaction<F, Fut, R>(&self, f: F) -> Result<R>
    where
        F: FnMut(Tx) -> Fut,
        Fut: Future<Output = Result<R>> + Send,
        R: Commit,
    {
        self.transaction_with(TxOptions::default(), f).await
    }

    /// Runs `f` in a transaction. The closure gets the [`Tx`] to run statements with and
    /// returns whether to commit: `Ok(true)` / `Ok(Some(v))` commits, `Ok(false)` / `Ok(None)`
    /// or an error rolls back, and so does a panic or dropping the returned future. With
    /// `opts.retry`, a serialization failure (from any statement or from COMMIT) re-runs the
    /// whole closure after a backoff, up to the policy's attempt limit.
    ///
    /// Inside the closure, calls on a `Db` handle fail with [`ErrorKind::Misuse`]: every
    /// statement of the transaction must go through the `Tx`.
    pub async fn transaction_with<F, Fut, R>(&self, opts: TxOptions, mut f: F) -> Result<R>
    where
        F: FnMut(Tx) -> Fut,
        Fut: Future<Output = Result<R>> + Send,
        R: Commit,
    {
        if in_transaction() {
            return Err(misuse_in_transaction());
        }
        let mut attempt = 1u32;
        loop {
            match self.transaction_once(&mut f).await {
                Err(e) if e.kind().is_retryable() => match opts.retry {
                    Some(policy) if attempt < policy.max_attempts => {
                        self.inner.metrics.retried();
                        tracing::debug!(attempt, error = %e, "retrying transaction");
                        tokio::time::sleep(policy.backoff(attempt)).await;
                        attempt += 1;
                    }
                    _ => return Err(e),
                },
                other => return other,
            }
        }
    }

    async fn transaction_once<F, Fut, R>(&self, f: &mut F) -> Result<R>
    where
        F: FnMut(Tx) -> Fut,
        Fut: Future<Output = Result<R>> + Send,
        R: Commit,
    {
        self.inner.metrics.transaction_started();
        let started = Instant::now();
        // Only a handle with a relay buffers notifications; without one `Tx::notify` runs
        // `pg_notify` in the transaction and nothing here costs anything.
        let outbox = self.relay.as_ref().map(|_| Arc::new(Outbox::default()));
        let (tx, finisher) = match &self.inner.backend {
            Backend::Sqlite(s) => {
                let begun = s.begin().await;
                self.inner
                    .metrics
                    .observe(started.elapsed(), begun.as_ref().err().map(Error::kind));
                match begun? {
                    sqlite::Begun::Thread(sender) => (
                        Tx {
                            inner: TxInner::Sqlite(sender.clone()),
                            metrics: self.inner.metrics.clone(),
                            outbox: outbox.clone(),
                        },
                        Finisher::Sqlite(sender),
                    ),
                    sqlite::Begun::Inline(inline) => {
                        let inline = Arc::new(inline);
                        (
                            Tx {
                                inner: TxInner::SqliteInline(Arc::clone(&inline)),
                                metrics: self.inner.metrics.clone(),
                                outbox: outbox.clone(),
                            },
                            Finisher::SqliteInline(inline),
                        )
                    }
                }
            }
            Backend::Postgres(p) => {
                let pg = Arc::new(p.begin().await?);
                (
                    Tx {
                        inner: TxInner::Postgres(Arc::clone(&pg)),
                        metrics: self.inner.metrics.clone(),
                        outbox: outbox.clone(),
                    },
                    Finisher::Postgres(pg),
                )
            }
        };
        let out = IN_TRANSACTION.scope((), f(tx)).await;
        match out {
            Ok(r) => {
                let commit = r.should_commit();
                finisher.finish(commit, &self.inner.metrics).await?;
                // After the commit, and only for it: a rollback (or an attempt that is
                // retried) publishes nothing.
                if commit && let (Some(relay), Some(outbox)) = (&self.relay, &outbox) {
                    let notes = outbox.take();
                    if !notes.is_empty() {
                        relay.publish(notes);
                    }
                }
                Ok(r)
            }
            Err(e) => {
                if let Err(rollback) = finisher.finish(false, &self.inner.metrics).await {
                    tracing::debug!(error = %rollback, "rollback after failed closure also failed");
                }
                Err(e)
            }
        }
    }

    /// Streams the rows of a read-only query without loading them all into memory.
    pub fn stream<T: FromRow + Send + 'static>(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> RowStream<T> {
        let (tx, rx) = mpsc::channel::<Result<Row>>(256);
        if in_transaction() {
            let _ = tx.try_send(Err(misuse_in_transaction()));
        } else {
            let params = value::to_values(params);
            match &self.inner.backend {
                Backend::Sqlite(s) => s.stream(sql, params, tx),
                Backend::Postgres(_) => {
                    let db = self.clone();
                    tokio::spawn(async move {
                        if let Backend::Postgres(p) = &db.inner.backend {
                            p.stream(sql, params, tx).await;
                        }
                    });
                }
            }
        }
        RowStream {
            rx,
            _row: std::marker::PhantomData,
        }
    }

    /// Opens a dedicated listening connection for `LISTEN/NOTIFY` (Postgres only; `None` on
    /// SQLite, where cross-process changes are found with [`Db::data_version`]). With a relay
    /// ([`Db::with_relay`]), on either backend, a listener on the relay's inbound side.
    pub async fn listen(&self, channels: &[&'static str]) -> Result<Option<NotifyListener>> {
        if let Some(relay) = &self.relay {
            return relay.inbound().subscribe(channels).map(Some);
        }
        match &self.inner.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(p) => notify::listen(p, channels).await.map(Some),
        }
    }

    /// SQLite: `PRAGMA data_version` of the writer connection — a number that changes whenever
    /// another connection (another process) commits. A cheap change check for other processes on the same file.
    /// `None` on Postgres.
    pub async fn data_version(&self) -> Result<Option<i64>> {
        match &self.inner.backend {
            Backend::Sqlite(s) => s.data_version().await.map(Some),
            Backend::Postgres(_) => Ok(None),
        }
    }

    /// Postgres: drops this handle's own schema with everything in it (`DROP SCHEMA … CASCADE`)
    /// and closes the handle. For throw-away benchmark and test databases; SQLite: a no-op (delete
    /// the file instead).
    pub async fn drop_own_schema(self) -> Result<()> {
        if let Backend::Postgres(p) = &self.inner.backend {
            p.drop_schema().await?;
        }
        Ok(())
    }

    /// Postgres: closes idle pooled connections so the next ones are opened afresh (after a
    /// suspected host failure). No-op on SQLite.
    pub fn reset_idle_connections(&self) {
        if let Backend::Postgres(p) = &self.inner.backend {
            p.drop_idle();
        }
    }
}

/// The rows of [`Db::stream`], converted as they arrive. Backed by a bounded channel, so a
/// slow consumer slows the producer instead of buffering the whole result.
pub struct RowStream<T> {
    rx: mpsc::Receiver<Result<Row>>,
    _row: std::marker::PhantomData<fn() -> T>,
}

impl<T: FromRow> Stream for RowStream<T> {
    type Item = Result<T>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<T>>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|r| r.and_then(|row| T::from_row(&row))))
    }
}

impl private::Sealed for Db {
    fn run_stmt(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        want: Want,
    ) -> BoxFuture<'_, Result<Output>> {
        Box::pin(async move {
            if in_transaction() {
                return Err(misuse_in_transaction());
            }
            let started = Instant::now();
            let out = match &self.inner.backend {
                Backend::Sqlite(s) => s.run(sql, params, want).await,
                Backend::Postgres(p) => p.run(sql, params, want).await,
            };
            self.inner
                .metrics
                .observe(started.elapsed(), out.as_ref().err().map(Error::kind));
            out
        })
    }

    fn run_script(&self, sql: &'static str) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if in_transaction() {
                return Err(misuse_in_transaction());
            }
            match &self.inner.backend {
                Backend::Sqlite(s) => s.script(sql).await,
                Backend::Postgres(p) => p.script(sql).await,
            }
        })
    }

    fn dialect_of(&self) -> Dialect {
        match self.inner.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }
}

impl Executor for Db {}

enum TxInner {
    Sqlite(cb::Sender<TxMsg>),
    SqliteInline(Arc<sqlite::InlineTx>),
    Postgres(Arc<PgTx>),
}

/// The handle a transaction closure runs its statements through. It is only valid while the
/// closure runs; after the transaction ends every call fails with [`ErrorKind::Misuse`].
pub struct Tx {
    inner: TxInner,
    metrics: DbMetrics,
    /// With a relay: the notifications to publish after the commit.
    outbox: Option<Arc<Outbox>>,
}

impl Tx {
    /// Sends a notification with this transaction: delivered only if it commits, after the
    /// commit. Without a relay that is `pg_notify` inside the transaction on Postgres (and a
    /// no-op on SQLite, whose other processes see commits through [`Db::data_version`]); with
    /// a relay ([`Db::with_relay`]) the notification is buffered and published after the commit.
    pub async fn notify(&self, channel: &'static str, payload: &str) -> Result<()> {
        if let Some(outbox) = &self.outbox {
            outbox.push(channel, payload);
            return Ok(());
        }
        if self.dialect() == Dialect::Postgres {
            self.exec("SELECT pg_notify($1, $2)", &[&channel, &payload])
                .await?;
        }
        Ok(())
    }

    /// Whether notifications of this transaction go through a relay (so statements that send
    /// `pg_notify` inline must not be used).
    pub fn relayed(&self) -> bool {
        self.outbox.is_some()
    }
}

impl private::Sealed for Tx {
    fn run_stmt(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        want: Want,
    ) -> BoxFuture<'_, Result<Output>> {
        Box::pin(async move {
            let started = Instant::now();
            let out = match &self.inner {
                TxInner::Sqlite(sender) => {
                    let (reply, rx) = oneshot::channel();
                    let job = sqlite::Job {
                        sql,
                        params,
                        want,
                        reply,
                    };
                    match sender.send(TxMsg::Job(job)) {
                        Ok(()) => rx.await.unwrap_or_else(|_| Err(tx_finished())),
                        Err(_) => Err(tx_finished()),
                    }
                }
                TxInner::SqliteInline(inline) => inline.run(sql, &params, want),
                TxInner::Postgres(pg) => pg.run(sql, params, want).await,
            };
            self.metrics
                .observe(started.elapsed(), out.as_ref().err().map(Error::kind));
            out
        })
    }

    fn run_script(&self, sql: &'static str) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            match &self.inner {
                TxInner::Sqlite(sender) => {
                    let (reply, rx) = oneshot::channel();
                    match sender.send(TxMsg::Script(sql, reply)) {
                        Ok(()) => rx.await.unwrap_or_else(|_| Err(tx_finished())),
                        Err(_) => Err(tx_finished()),
                    }
                }
                TxInner::SqliteInline(inline) => inline.script(sql),
                TxInner::Postgres(pg) => pg.script(sql).await,
            }
        })
    }

    fn dialect_of(&self) -> Dialect {
        match self.inner {
            TxInner::Sqlite(_) | TxInner::SqliteInline(_) => Dialect::Sqlite,
            TxInner::Postgres(_) => Dialect::Postgres,
        }
    }
}

impl Executor for Tx {}

fn tx_finished() -> Error {
    Error::new(ErrorKind::Misuse, "the transaction has already finished")
}

/// The transaction function's own handle, used to send COMMIT or ROLLBACK.
enum Finisher {
    Sqlite(cb::Sender<TxMsg>),
    SqliteInline(Arc<sqlite::InlineTx>),
    Postgres(Arc<PgTx>),
}

impl Finisher {
    async fn finish(self, commit: bool, metrics: &DbMetrics) -> Result<()> {
        let started = Instant::now();
        let out = match self {
            Finisher::Sqlite(sender) => {
                let (reply, rx) = oneshot::channel();
                match sender.send(TxMsg::Finish { commit, reply }) {
                    Ok(()) => rx.await.unwrap_or_else(|_| Err(tx_finished())),
                    Err(_) => Err(tx_finished()),
                }
            }
            Finisher::SqliteInline(inline) => inline.finish(commit),
            Finisher::Postgres(pg) => pg.finish(commit).await,
        };
        metrics.observe(started.elapsed(), out.as_ref().err().map(Error::kind));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_grows() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        };
        assert!(p.backoff(1) <= Duration::from_millis(13));
        assert!(p.backoff(2) >= Duration::from_millis(15));
        for attempt in 1..40 {
            assert!(p.backoff(attempt) <= Duration::from_millis(125));
        }
    }
}
