//! The PostgreSQL backend: `tokio-postgres` connections in a `deadpool` pool.
//!
//! **Failover.** The pool's manager opens every new connection by trying the configured hosts
//! in order and keeping the first that accepts a read-write session. When the host in use dies,
//! its pooled connections fail their recycle check and are dropped, so the next connections go
//! to the next healthy host without a restart; the `host_index` gauge and `failovers` counter
//! record the move. After a move, new connections try the host in use first, so a handle
//! never goes back to an old primary that came back (see `connect_first`). A statement in
//! flight when the host dies fails with [`ErrorKind::Connection`]; it is not re-sent, because
//! a write may or may not have committed.
//!
//! **Statements** are prepared once per connection and cached by the address of their
//! `&'static str` text. Parameters are bound with the server-inferred types; [`Value`] converts
//! itself to whatever integer width, float or timestamp type the server asks for.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, Pool, PoolError, RecycleError, RecycleResult};
use futures_util::{StreamExt, pin_mut};
use tokio::sync::{Mutex, mpsc};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, NoTls, Statement};

use crate::batch::Elements;
use crate::config::{PostgresConfig, TlsMode};
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::DbMetrics;
use crate::value::{Columns, Row, Timestamp, Value};
use crate::{Output, Want};

/// One pooled connection with its statement cache.
pub(crate) struct PgConn {
    client: Client,
    statements: HashMap<(usize, usize), (Statement, Columns)>,
    metrics: DbMetrics,
}

impl Drop for PgConn {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

impl PgConn {
    async fn prepared(&mut self, sql: &'static str) -> Result<(Statement, Columns)> {
        let key = (sql.as_ptr() as usize, sql.len());
        if let Some(hit) = self.statements.get(&key) {
            return Ok(hit.clone());
        }
        let stmt = self.client.prepare(sql).await.map_err(map_error)?;
        let columns: Columns = stmt
            .columns()
            .iter()
            .map(|c| Box::from(c.name()))
            .collect::<Vec<_>>()
            .into();
        self.statements
            .insert(key, (stmt.clone(), Arc::clone(&columns)));
        Ok((stmt, columns))
    }

    pub(crate) async fn run(
        &mut self,
        sql: &'static str,
        params: &[Value],
        want: Want,
    ) -> Result<Output> {
        let (stmt, columns) = self.prepared(sql).await?;
        check_param_count(&stmt, params)?;
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        match want {
            Want::Exec => {
                let n = self.client.execute(&stmt, &refs).await.map_err(map_error)?;
                Ok(Output::Affected(n))
            }
            Want::Rows => {
                let rows = self.client.query(&stmt, &refs).await.map_err(map_error)?;
                let mut out = Vec::with_capacity(rows.len());
                for r in &rows {
                    out.push(decode_row(r, &columns)?);
                }
                Ok(Output::Rows(out))
            }
        }
    }

    pub(crate) async fn script(&mut self, sql: &'static str) -> Result<()> {
        self.client.batch_execute(sql).await.map_err(map_error)
    }
}

fn check_param_count(stmt: &Statement, params: &[Value]) -> Result<()> {
    if stmt.params().len() != params.len() {
        return Err(Error::new(
            ErrorKind::Misuse,
            format!(
                "statement has {} parameters but {} were given",
                stmt.params().len(),
                params.len()
            ),
        ));
    }
    Ok(())
}

/// Opens connections, host by host, for the pool.
pub(crate) struct PgManager {
    cfg: PostgresConfig,
    tls: Tls,
    metrics: DbMetrics,
    /// Host index of the newest connection; `usize::MAX` before the first.
    current: Arc<AtomicUsize>,
}

#[derive(Clone)]
enum Tls {
    None,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl PgManager {
    /// Connects to host `index`. The connection's driver task forwards server notifications
    /// to `notifications` when given (the LISTEN connection) and drops them otherwise.
    pub(crate) async fn connect_host(
        &self,
        index: usize,
        notifications: Option<crate::notify::NotifySink>,
    ) -> Result<Client> {
        let host = &self.cfg.hosts[index];
        let mut c = tokio_postgres::Config::new();
        c.host(&host.host)
            .port(host.port)
            .user(&self.cfg.user)
            .dbname(&self.cfg.database)
            .application_name(&self.cfg.application_name)
            .connect_timeout(self.cfg.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(Duration::from_secs(15));
        if let Some(pw) = &self.cfg.password {
            c.password(pw);
        }
        if self.cfg.hosts.len() > 1 {
            // With several hosts, only a writable one will do: a standby that is still in
            // recovery is skipped, like libpq's target_session_attrs=read-write.
            c.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        c.ssl_mode(match self.cfg.tls {
            TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        });
        let client = match &self.tls {
            Tls::None => {
                let (client, conn) = c.connect(NoTls).await.map_err(map_error)?;
                tokio::spawn(drive(conn, notifications));
                client
            }
            Tls::Rustls(tls) => {
                let (client, conn) = c.connect(tls.clone()).await.map_err(map_error)?;
                tokio::spawn(drive(conn, notifications));
                client
            }
        };
        // The schema goes on the search path through a bound parameter, never into SQL text.
        client
            .execute(
                "SELECT set_config('search_path', $1, false)",
                &[&self.cfg.schema],
            )
            .await
            .map_err(map_error)?;
        Ok(client)
    }

    /// Connects to the first writable host, in configured order starting from the host in
    /// use; returns the client and the host's index. Records failovers.
    pub(crate) async fn connect_first(
        &self,
        notifications: Option<crate::notify::NotifySink>,
    ) -> Result<(Client, usize)> {
        let mut failures = Vec::new();
        // Once this handle has moved to a later host, new connections try that host first:
        // an old primary that comes back writable is a stale copy, and going back to it
        // would split this handle's writes across two diverging servers. Only when the host
        // in use refuses do the others get tried, in list order from there, wrapping around.
        let n = self.cfg.hosts.len();
        let from = match self.current.load(Ordering::SeqCst) {
            usize::MAX => 0,
            i => i.min(n - 1),
        };
        for index in (from..n).chain(0..from) {
            match self.connect_host(index, notifications.clone()).await {
                Ok(client) => {
                    let previous = self.current.swap(index, Ordering::SeqCst);
                    if previous != usize::MAX && previous != index {
                        self.metrics.failed_over();
                        tracing::warn!(
                            from = %self.cfg.hosts[previous.min(self.cfg.hosts.len() - 1)],
                            to = %self.cfg.hosts[index],
                            "database connections moved to another host"
                        );
                    }
                    self.metrics.set_host_index(index);
                    return Ok((client, index));
                }
                Err(e) => {
                    // Credentials and a missing database are the same on every host; stop.
                    if matches!(
                        e.kind(),
                        ErrorKind::Authentication | ErrorKind::Refused | ErrorKind::Config
                    ) {
                        return Err(e.context(format!("connecting to {}", self.cfg.hosts[index])));
                    }
                    failures.push(format!("{}: {}", self.cfg.hosts[index], e.message()));
                }
            }
        }
        Err(Error::new(
            ErrorKind::Connection,
            format!("cannot reach any Postgres host ({})", failures.join("; ")),
        ))
    }
}

/// Drives a connection until it closes, forwarding notifications when asked to.
async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notifications: Option<crate::notify::NotifySink>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    pin_mut!(messages);
    while let Some(Ok(message)) = messages.next().await {
        if let (tokio_postgres::AsyncMessage::Notification(n), Some(sink)) =
            (message, &notifications)
        {
            sink.deliver(n.channel(), n.payload());
        }
    }
}

impl managed::Manager for PgManager {
    type Type = PgConn;
    type Error = Error;

    async fn create(&self) -> Result<PgConn> {
        let (client, _index) = self.connect_first(None).await?;
        self.metrics.connection_opened();
        Ok(PgConn {
            client,
            statements: HashMap::new(),
            metrics: self.metrics.clone(),
        })
    }

    async fn recycle(&self, conn: &mut PgConn, _: &Metrics) -> RecycleResult<Error> {
        if conn.client.is_closed() {
            return Err(RecycleError::message("connection closed"));
        }
        // After a failover, connections still on a lower-priority host are kept: moving them
        // back while the old primary may be a stale copy would split writes across servers.
        Ok(())
    }
}

/// The pool and what it needs to report which host it is on.
pub(crate) struct PgBackend {
    pool: Pool<PgManager>,
    cfg: PostgresConfig,
    current: Arc<AtomicUsize>,
}

impl PgBackend {
    /// Opens a dedicated (unpooled) connection whose notifications arrive on the returned
    /// channel, for `LISTEN`.
    pub(crate) async fn listen_connection(
        &self,
        sink: crate::notify::NotifySink,
    ) -> Result<Client> {
        let (client, _) = self.pool.manager().connect_first(Some(sink)).await?;
        Ok(client)
    }
}

impl PgBackend {
    pub(crate) async fn open(cfg: &PostgresConfig, metrics: &DbMetrics) -> Result<Self> {
        crate::config::validate_schema(&cfg.schema)?;
        if cfg.hosts.is_empty() {
            return Err(Error::new(ErrorKind::Config, "no Postgres host configured"));
        }
        let tls = match cfg.tls {
            TlsMode::Disable => Tls::None,
            TlsMode::Prefer | TlsMode::Require => Tls::Rustls(
                tokio_postgres_rustls::MakeRustlsConnect::new(tls::unverified()?),
            ),
            TlsMode::VerifyFull => Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
                tls::verified()?,
            )),
        };
        let current = Arc::new(AtomicUsize::new(usize::MAX));
        let manager = PgManager {
            cfg: cfg.clone(),
            tls,
            metrics: metrics.clone(),
            current: Arc::clone(&current),
        };
        let hosts = u32::try_from(cfg.hosts.len()).unwrap_or(u32::MAX);
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(deadpool::Runtime::Tokio1)
            .create_timeout(Some(cfg.connect_timeout * hosts.saturating_add(1)))
            .wait_timeout(Some(Duration::from_secs(60)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| Error::new(ErrorKind::Config, format!("building connection pool: {e}")))?;
        let backend = PgBackend {
            pool,
            cfg: cfg.clone(),
            current,
        };
        backend.create_schema().await?;
        Ok(backend)
    }

    async fn create_schema(&self) -> Result<()> {
        let conn = self.get().await?;
        let exists: bool = conn
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&self.cfg.schema],
            )
            .await
            .map_err(map_error)?
            .get(0);
        if exists {
            return Ok(());
        }
        // CREATE SCHEMA takes an identifier, which cannot be a bind parameter. The name was
        // validated as [a-z_][a-z0-9_]* (config::validate_schema), so quoting it is exact.
        let ddl = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", self.cfg.schema);
        match conn.client.batch_execute(&ddl).await.map_err(map_error) {
            Ok(()) => Ok(()),
            // Two processes creating it at once: the loser sees a duplicate; that is fine.
            Err(e) if e.kind() == ErrorKind::UniqueViolation => Ok(()),
            Err(e) => Err(e.context(format!("creating schema {}", self.cfg.schema))),
        }
    }

    pub(crate) async fn drop_schema(&self) -> Result<()> {
        let conn = self.get().await?;
        // An identifier cannot be a bind parameter; the name was validated as
        // [a-z_][a-z0-9_]* (config::validate_schema), so quoting it is exact.
        let ddl = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.cfg.schema);
        conn.client.batch_execute(&ddl).await.map_err(map_error)?;
        self.pool.close();
        Ok(())
    }

    pub(crate) async fn get(&self) -> Result<Object<PgManager>> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => e,
            PoolError::Timeout(t) => Error::new(
                ErrorKind::Timeout,
                format!("timed out waiting for a database connection ({t:?})"),
            ),
            other => Error::new(ErrorKind::Connection, other.to_string()),
        })
    }

    pub(crate) async fn run(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        want: Want,
    ) -> Result<Output> {
        let mut conn = self.get().await?;
        conn.run(sql, &params, want).await
    }

    pub(crate) async fn script(&self, sql: &'static str) -> Result<()> {
        let mut conn = self.get().await?;
        conn.script(sql).await
    }

    pub(crate) async fn stream(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        tx: mpsc::Sender<Result<Row>>,
    ) {
        let result = async {
            let mut conn = self.get().await?;
            let (stmt, columns) = conn.prepared(sql).await?;
            check_param_count(&stmt, &params)?;
            let stream = conn
                .client
                .query_raw(&stmt, params.iter().map(|v| v as &(dyn ToSql + Sync)))
                .await
                .map_err(map_error)?;
            pin_mut!(stream);
            while let Some(row) = stream.next().await {
                let row = row
                    .map_err(map_error)
                    .and_then(|r| decode_row(&r, &columns))?;
                if tx.send(Ok(row)).await.is_err() {
                    break;
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        if let Err(e) = result {
            let _ = tx.send(Err(e)).await;
        }
    }

    pub(crate) async fn begin(&self) -> Result<PgTx> {
        let mut conn = self.get().await?;
        conn.script("BEGIN").await?;
        Ok(PgTx {
            conn: Mutex::new(Some(conn)),
        })
    }

    /// The host new connections go to, if one has been reached.
    pub(crate) fn current_host(&self) -> Option<(usize, String)> {
        let i = self.current.load(Ordering::SeqCst);
        self.cfg.hosts.get(i).map(|h| (i, h.to_string()))
    }

    pub(crate) fn config(&self) -> &PostgresConfig {
        &self.cfg
    }

    /// Drops idle connections (used by tests and after errors that suggest a dead host).
    pub(crate) fn drop_idle(&self) {
        self.pool.retain(|_, _| false);
    }
}

/// An open Postgres transaction holding its connection.
pub(crate) struct PgTx {
    conn: Mutex<Option<Object<PgManager>>>,
}

impl PgTx {
    pub(crate) async fn run(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        want: Want,
    ) -> Result<Output> {
        let mut guard = self.conn.lock().await;
        let conn = guard.as_mut().ok_or_else(finished)?;
        conn.run(sql, &params, want).await
    }

    pub(crate) async fn script(&self, sql: &'static str) -> Result<()> {
        let mut guard = self.conn.lock().await;
        let conn = guard.as_mut().ok_or_else(finished)?;
        conn.script(sql).await
    }

    pub(crate) async fn finish(&self, commit: bool) -> Result<()> {
        let mut guard = self.conn.lock().await;
        let mut conn = guard.take().ok_or_else(finished)?;
        let out = conn
            .script(if commit { "COMMIT" } else { "ROLLBACK" })
            .await;
        if out.is_err() {
            // The connection's state is unknown; never give it back to the pool.
            let _ = Object::take(conn);
        }
        out
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        // A transaction dropped before COMMIT/ROLLBACK (a cancelled or panicking closure):
        // closing its connection makes the server roll it back. Returning it to the pool would
        // leave the next user inside someone else's transaction.
        if let Some(conn) = self.conn.get_mut().take() {
            let _ = Object::take(conn);
        }
    }
}

fn finished() -> Error {
    Error::new(ErrorKind::Misuse, "the transaction has already finished")
}

fn decode_row(r: &tokio_postgres::Row, columns: &Columns) -> Result<Row> {
    let mut values = Vec::with_capacity(columns.len());
    for (i, col) in r.columns().iter().enumerate() {
        values.push(decode_value(r, i, col.type_(), col.name())?);
    }
    Ok(Row::new(Arc::clone(columns), values))
}

fn decode_value(r: &tokio_postgres::Row, i: usize, ty: &Type, name: &str) -> Result<Value> {
    fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
        r: &'a tokio_postgres::Row,
        i: usize,
        name: &str,
    ) -> Result<Option<T>> {
        r.try_get::<_, Option<T>>(i)
            .map_err(|e| Error::new(ErrorKind::Decode, format!("column {name:?}: {e}")))
    }
    let v = match *ty {
        Type::BOOL => get::<bool>(r, i, name)?.map(Value::Bool),
        Type::INT2 => get::<i16>(r, i, name)?.map(|v| Value::Int(v.into())),
        Type::INT4 => get::<i32>(r, i, name)?.map(|v| Value::Int(v.into())),
        Type::INT8 => get::<i64>(r, i, name)?.map(Value::Int),
        Type::OID => get::<u32>(r, i, name)?.map(|v| Value::Int(v.into())),
        Type::FLOAT4 => get::<f32>(r, i, name)?.map(|v| Value::Float(v.into())),
        Type::FLOAT8 => get::<f64>(r, i, name)?.map(Value::Float),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            get::<String>(r, i, name)?.map(Value::Text)
        }
        Type::BYTEA => get::<Vec<u8>>(r, i, name)?.map(Value::Bytes),
        Type::TIMESTAMPTZ => get::<chrono::DateTime<chrono::Utc>>(r, i, name)?
            .map(|t| Value::Timestamp(Timestamp::from_chrono(t))),
        Type::TIMESTAMP => get::<chrono::NaiveDateTime>(r, i, name)?
            .map(|t| Value::Timestamp(Timestamp::from_chrono(t.and_utc()))),
        Type::INT8_ARRAY => get::<Vec<i64>>(r, i, name)?.map(Value::IntArray),
        Type::INT4_ARRAY => get::<Vec<i32>>(r, i, name)?
            .map(|v| Value::IntArray(v.into_iter().map(i64::from).collect())),
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY => {
            get::<Vec<String>>(r, i, name)?.map(Value::TextArray)
        }
        ref other => {
            return Err(Error::new(
                ErrorKind::Decode,
                format!(
                    "column {name:?} has type {other} which harmonydb does not read; cast it in SQL (to bigint, double precision or text)"
                ),
            ));
        }
    };
    Ok(v.unwrap_or(Value::Null))
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

fn type_error(v: &Value, ty: &Type) -> BoxError {
    format!("cannot bind {v:?} to a parameter of type {ty}").into()
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, BoxError> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Bool(b) => match *ty {
                Type::BOOL => b.to_sql(ty, out),
                Type::INT2 | Type::INT4 | Type::INT8 => Value::Int(i64::from(*b)).to_sql(ty, out),
                _ => Err(type_error(self, ty)),
            },
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::OID => u32::try_from(*i)?.to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::FLOAT4 => (*i as f32).to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => Err(type_error(self, ty)),
            },
            Value::Float(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => Err(type_error(self, ty)),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Bytes(b) => b.as_slice().to_sql(ty, out),
            Value::Timestamp(t) => match *ty {
                Type::TIMESTAMPTZ => t.to_chrono().to_sql(ty, out),
                Type::TIMESTAMP => t.to_chrono().naive_utc().to_sql(ty, out),
                _ => Err(type_error(self, ty)),
            },
            Value::IntArray(v) => match *ty {
                Type::INT8_ARRAY => v.to_sql(ty, out),
                Type::INT4_ARRAY => v
                    .iter()
                    .map(|i| i32::try_from(*i))
                    .collect::<std::result::Result<Vec<_>, _>>()?
                    .to_sql(ty, out),
                _ => Err(type_error(self, ty)),
            },
            Value::TextArray(v) => v.to_sql(ty, out),
            Value::BoolArray(v) => v.to_sql(ty, out),
            Value::TimestampArray(v) => match *ty {
                Type::TIMESTAMPTZ_ARRAY => v
                    .iter()
                    .map(|t| t.to_chrono())
                    .collect::<Vec<_>>()
                    .to_sql(ty, out),
                _ => Err(type_error(self, ty)),
            },
            // The element types are checked here because the array encoders write each
            // element in the form of the element type they are given, whatever it is.
            Value::BatchColumn(c) => match &c.0 {
                Elements::Int(v) if *ty == Type::INT8_ARRAY => v.to_sql(ty, out),
                Elements::Text { .. } if *ty == Type::TEXT_ARRAY || *ty == Type::VARCHAR_ARRAY => {
                    c.texts().collect::<Vec<_>>().to_sql(ty, out)
                }
                Elements::Bool(v) if *ty == Type::BOOL_ARRAY => v.to_sql(ty, out),
                Elements::Timestamp(v) if *ty == Type::TIMESTAMPTZ_ARRAY => v
                    .iter()
                    .map(|t| t.map(Timestamp::to_chrono))
                    .collect::<Vec<_>>()
                    .to_sql(ty, out),
                _ => Err(type_error(self, ty)),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per variant in `to_sql`, which knows the value.
        true
    }

    to_sql_checked!();
}

pub(crate) fn map_error(e: tokio_postgres::Error) -> Error {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let kind = if *code == SqlState::UNIQUE_VIOLATION {
            ErrorKind::UniqueViolation
        } else if *code == SqlState::FOREIGN_KEY_VIOLATION {
            ErrorKind::ForeignKey
        } else if *code == SqlState::NOT_NULL_VIOLATION
            || *code == SqlState::CHECK_VIOLATION
            || *code == SqlState::EXCLUSION_VIOLATION
        {
            ErrorKind::Constraint
        } else if *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            ErrorKind::Serialization
        } else if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            ErrorKind::Authentication
        } else if *code == SqlState::INVALID_CATALOG_NAME {
            ErrorKind::Refused
        } else if *code == SqlState::QUERY_CANCELED || *code == SqlState::LOCK_NOT_AVAILABLE {
            ErrorKind::Timeout
        } else if code.code().starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
            || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        {
            ErrorKind::Connection
        } else {
            ErrorKind::Other
        };
        let mut msg = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            msg.push_str(" (");
            msg.push_str(detail);
            msg.push(')');
        }
        if kind == ErrorKind::Refused {
            // Harmony creates schemas, never databases: say what the operator can do.
            msg.push_str("; create it (CREATE DATABASE) or name an existing one in the URL");
        }
        return Error::new(kind, msg).with_code(code.code());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    let kind = if text.contains("timed out") || text.contains("timeout") {
        ErrorKind::Timeout
    } else if e.is_closed()
        || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
    {
        ErrorKind::Connection
    } else if text.contains("error serializing parameter") {
        ErrorKind::Decode
    } else if text.contains("error connecting") || text.contains("connection") {
        ErrorKind::Connection
    } else {
        ErrorKind::Other
    };
    Error::new(kind, text)
}

mod tls {
    //! rustls client configurations for `sslmode`.
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

    use crate::error::{Error, ErrorKind, Result};

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>> {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::new(ErrorKind::Config, format!("TLS setup: {e}")))
    }

    /// `sslmode=verify-full`: the public web roots, host name checked.
    pub(super) fn verified() -> Result<ClientConfig> {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        Ok(builder()?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    /// `sslmode=require|prefer`: encrypted, certificate not checked (libpq's meaning).
    pub(super) fn unverified() -> Result<ClientConfig> {
        Ok(builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider())))
            .with_no_client_auth())
    }

    #[derive(Debug)]
    struct AcceptAnyCert(Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyCert {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
