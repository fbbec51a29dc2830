//! The embedded SQLite backend.
//!
//! One file, WAL mode, foreign keys on, a busy timeout. All SQLite calls block, so they run on
//! dedicated OS threads and never on the async runtime:
//!
//! * **one writer thread** owns the only read-write connection. Every write, and every
//!   transaction from `BEGIN IMMEDIATE` to `COMMIT`, runs there, so writes inside this process
//!   never contend with each other; other processes on the same file are serialised by SQLite's
//!   lock and the busy timeout.
//! * **a pool of reader threads**, each with a read-only connection, serves queries. WAL lets
//!   them read while the writer writes. A statement sent to a reader that turns out not to be
//!   read-only (`INSERT … RETURNING` through `select`, say) is forwarded to the writer.
//!
//! **Inline fast path.** Handing a statement to another thread and back costs more than a
//! cheap statement itself, so a call first tries to run on the calling thread: it takes a free
//! connection (`try_lock`, never waiting), and runs in *inline mode*, where the busy handler
//! does not wait for other processes' locks and a progress handler interrupts the statement
//! after a small budget of virtual-machine steps. A statement that would wait or runs long is
//! thereby aborted before it did anything lasting (SQLite rolls back an interrupted statement)
//! and re-run on the dedicated threads. Async callers are blocked for microseconds at most.
//!
//! A transaction runs inline too when the writer is free: `BEGIN IMMEDIATE` inline (falling
//! back to the writer thread if another process holds the lock) takes a *lease* on the writer
//! connection; until COMMIT or ROLLBACK only that transaction's statements run on it, each on
//! the caller's thread, and everyone else queues for the writer thread, which waits for the
//! lease to end. A dropped transaction rolls back and ends the lease. Streams always use the
//! reader threads.
//!
//! Requests travel over crossbeam channels and answers come back on tokio oneshots.
//! Parameters are written `$1…$n` as in Postgres; SQLite treats `$1` as a named parameter, so
//! binding goes by the number in each parameter's name, never by position of first use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel as cb;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use crate::config::{SqliteConfig, Synchronous};
use crate::error::{Error, ErrorKind, Result};
use crate::value::{Columns, Row, Value};
use crate::{Output, Want};

/// A statement to run with its parameters and where to send the answer.
pub(crate) struct Job {
    pub sql: &'static str,
    pub params: Vec<Value>,
    pub want: Want,
    pub reply: oneshot::Sender<Result<Output>>,
}

/// A read-only query whose rows are streamed back one by one.
pub(crate) struct StreamJob {
    pub sql: &'static str,
    pub params: Vec<Value>,
    pub rows: mpsc::Sender<Result<Row>>,
}

enum WriterMsg {
    Job(Job),
    Script(&'static str, oneshot::Sender<Result<()>>),
    Begin(oneshot::Sender<Result<cb::Sender<TxMsg>>>),
}

enum ReaderMsg {
    Job(Job),
    Stream(StreamJob),
}

/// Messages inside an open transaction on the writer thread.
pub(crate) enum TxMsg {
    Job(Job),
    Script(&'static str, oneshot::Sender<Result<()>>),
    Finish {
        commit: bool,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Handle to the writer and reader threads. Dropping the last handle lets the threads finish
/// their queued work, close their connections and exit.
pub(crate) struct SqliteBackend {
    writer: cb::Sender<WriterMsg>,
    readers: cb::Sender<ReaderMsg>,
    writer_conn: Arc<Mutex<Conn>>,
    /// Dropped with the backend, which ends the checkpoint thread.
    _stop_checkpoints: cb::Sender<()>,
    lease: Arc<Lease>,
    reader_conns: Vec<Arc<Mutex<Conn>>>,
    /// Writes may run inline only when a commit does not wait for fsync.
    inline_writes: bool,
    path: PathBuf,
}

/// A connection with its statement-side state, shared by its thread and inline callers.
struct Conn {
    conn: Connection,
    columns: ColumnCache,
    /// Whether each statement (by its `&'static str` address) only reads.
    readonly: HashMap<(usize, usize), bool>,
    gate: Arc<InlineGate>,
}

/// Inline mode of one connection, read by its busy and progress handlers.
#[derive(Default)]
struct InlineGate {
    active: AtomicBool,
    ticks: AtomicU32,
}

/// An inline transaction's exclusive claim on the writer connection between its statements.
/// Only changed while holding the writer connection's mutex.
#[derive(Default)]
struct Lease {
    active: AtomicBool,
    released: Mutex<()>,
    cv: Condvar,
}

impl Lease {
    fn release(&self) {
        let _g = self.released.lock().unwrap_or_else(|p| p.into_inner());
        self.active.store(false, Ordering::Release);
        self.cv.notify_all();
    }

    /// Locks the writer once no inline transaction holds the lease (the writer thread).
    fn lock_free<'a>(&self, writer: &'a Mutex<Conn>) -> std::sync::MutexGuard<'a, Conn> {
        loop {
            let guard = writer.lock().unwrap_or_else(|p| p.into_inner());
            if !self.active.load(Ordering::Acquire) {
                return guard;
            }
            drop(guard);
            let mut g = self.released.lock().unwrap_or_else(|p| p.into_inner());
            while self.active.load(Ordering::Acquire) {
                g = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }
}

/// A transaction running on the caller's thread under the writer lease.
pub(crate) struct InlineTx {
    writer: Arc<Mutex<Conn>>,
    lease: Arc<Lease>,
    done: AtomicBool,
}

impl InlineTx {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Conn>> {
        if self.done.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Misuse,
                "the transaction has already finished",
            ));
        }
        Ok(self.writer.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn run(&self, sql: &'static str, params: &[Value], want: Want) -> Result<Output> {
        let mut guard = self.lock()?;
        let Conn { conn, columns, .. } = &mut *guard;
        run_job(conn, columns, sql, params, want)
    }

    pub(crate) fn script(&self, sql: &'static str) -> Result<()> {
        self.lock()?.conn.execute_batch(sql).map_err(map_error)
    }

    pub(crate) fn finish(&self, commit: bool) -> Result<()> {
        let guard = self.lock()?;
        let out = guard
            .conn
            .execute_batch(if commit { "COMMIT" } else { "ROLLBACK" })
            .map_err(map_error);
        if !guard.conn.is_autocommit() {
            let _ = guard.conn.execute_batch("ROLLBACK");
        }
        self.done.store(true, Ordering::Release);
        self.lease.release();
        out
    }
}

impl Drop for InlineTx {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Acquire) {
            let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            if !guard.conn.is_autocommit() {
                let _ = guard.conn.execute_batch("ROLLBACK");
            }
            self.lease.release();
        }
    }
}

/// A started transaction: on the caller's thread, or served by the writer thread.
pub(crate) enum Begun {
    Inline(InlineTx),
    Thread(cb::Sender<TxMsg>),
}

/// Virtual-machine steps between progress-handler calls.
const INLINE_CHECK_OPS: i32 = 1_000;
/// Progress-handler calls an inline statement may use before it is moved to a thread
/// (about 50,000 steps: tens of microseconds).
const INLINE_TICKS_MAX: u32 = 50;

impl Conn {
    fn new(conn: Connection, gate: Arc<InlineGate>) -> Self {
        Conn {
            conn,
            columns: ColumnCache::default(),
            readonly: HashMap::new(),
            gate,
        }
    }

    /// Whether `sql` only reads, remembered per statement.
    fn is_readonly(&mut self, sql: &'static str) -> Result<bool> {
        let key = (sql.as_ptr() as usize, sql.len());
        if let Some(r) = self.readonly.get(&key) {
            return Ok(*r);
        }
        let r = self.conn.prepare_cached(sql).map_err(map_error)?.readonly();
        self.readonly.insert(key, r);
        Ok(r)
    }

    /// Runs a statement in inline mode. `None`: it would have waited for a lock or ran past
    /// its budget, was aborted with no effect, and belongs on a thread.
    fn run_inline(
        &mut self,
        sql: &'static str,
        params: &[Value],
        want: Want,
    ) -> Option<Result<Output>> {
        self.gate.ticks.store(0, Ordering::Relaxed);
        self.gate.active.store(true, Ordering::Release);
        let out = run_job(&self.conn, &mut self.columns, sql, params, want);
        self.gate.active.store(false, Ordering::Release);
        match out {
            Err(e) if is_inline_abort(&e) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                None
            }
            other => Some(other),
        }
    }
}

/// BUSY, LOCKED or INTERRUPT: the statement did nothing and can run again on a thread.
fn is_inline_abort(e: &Error) -> bool {
    let primary = e
        .code()
        .and_then(|c| c.parse::<i32>().ok())
        .map(|c| c & 0xff);
    matches!(
        primary,
        Some(
            rusqlite::ffi::SQLITE_BUSY
                | rusqlite::ffi::SQLITE_LOCKED
                | rusqlite::ffi::SQLITE_INTERRUPT
        )
    )
}

impl SqliteBackend {
    /// Opens (creating if needed) the database file and starts the threads.
    pub(crate) async fn open(cfg: &SqliteConfig) -> Result<Self> {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || Self::open_blocking(&cfg))
            .await
            .map_err(|e| Error::new(ErrorKind::Other, format!("SQLite open task failed: {e}")))?
    }

    fn open_blocking(cfg: &SqliteConfig) -> Result<Self> {
        if !cfg.create_if_missing && !cfg.path.exists() {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "no SQLite database at {}; create it with `harmony db migrate --db sqlite://{}`",
                    cfg.path.display(),
                    cfg.path.display()
                ),
            ));
        }
        check_directory(&cfg.path)?;
        let writer_gate = Arc::new(InlineGate::default());
        let writer_conn = open_connection(cfg, false, &writer_gate)?;
        // WAL must be set before readers open, and it needs the write lock once.
        let mode: String = writer_conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| open_error(&cfg.path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "SQLite database {} refused WAL mode (got {mode}); is it on a network filesystem?",
                    cfg.path.display()
                ),
            ));
        }
        // Checkpoints run on a thread of their own (below), never inside a commit: an automatic
        // checkpoint would make some commit wait for copying pages and fsync.
        writer_conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| open_error(&cfg.path, e))?;
        let checkpointer = open_connection(cfg, false, &Arc::new(InlineGate::default()))?;
        let mut reader_conns = Vec::with_capacity(cfg.readers);
        for _ in 0..cfg.readers.max(1) {
            let gate = Arc::new(InlineGate::default());
            let conn = open_connection(cfg, true, &gate)?;
            reader_conns.push(Arc::new(Mutex::new(Conn::new(conn, gate))));
        }
        let writer_conn = Arc::new(Mutex::new(Conn::new(writer_conn, writer_gate)));

        let (writer_tx, writer_rx) = cb::bounded::<WriterMsg>(1024);
        let w = Arc::clone(&writer_conn);
        let lease = Arc::new(Lease::default());
        let l = Arc::clone(&lease);
        std::thread::Builder::new()
            .name("harmonydb-sqlite-writer".into())
            .spawn(move || writer_loop(&w, &l, writer_rx))
            .map_err(|e| Error::new(ErrorKind::Other, format!("spawning SQLite writer: {e}")))?;

        let (stop_checkpoints, checkpoint_rx) = cb::bounded::<()>(0);
        std::thread::Builder::new()
            .name("harmonydb-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&checkpointer, &checkpoint_rx))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Other,
                    format!("spawning SQLite checkpointer: {e}"),
                )
            })?;

        let (reader_tx, reader_rx) = cb::bounded::<ReaderMsg>(1024);
        for (i, conn) in reader_conns.iter().enumerate() {
            let rx = reader_rx.clone();
            let writer = writer_tx.clone();
            let conn = Arc::clone(conn);
            std::thread::Builder::new()
                .name(format!("harmonydb-sqlite-reader-{i}"))
                .spawn(move || reader_loop(&conn, rx, writer))
                .map_err(|e| {
                    Error::new(ErrorKind::Other, format!("spawning SQLite reader: {e}"))
                })?;
        }
        Ok(SqliteBackend {
            writer: writer_tx,
            readers: reader_tx,
            writer_conn,
            _stop_checkpoints: stop_checkpoints,
            lease,
            reader_conns,
            inline_writes: cfg.synchronous == Synchronous::Normal,
            path: cfg.path.clone(),
        })
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Runs one statement outside any transaction.
    pub(crate) async fn run(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        want: Want,
    ) -> Result<Output> {
        if let Some(out) = self.try_inline(sql, &params, want) {
            return out;
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            sql,
            params,
            want,
            reply,
        };
        // Statements that only return rows go to the readers; the reader forwards anything
        // that is not read-only. `Exec` goes straight to the writer.
        let sent = match want {
            Want::Rows => self.readers.send(ReaderMsg::Job(job)).is_ok(),
            Want::Exec => self.writer.send(WriterMsg::Job(job)).is_ok(),
        };
        if !sent {
            return Err(closed());
        }
        rx.await.map_err(|_| closed())?
    }

    /// Runs a statement on the calling thread if a connection is free and the statement is
    /// cheap (see the module docs); `None` when it must go to a thread.
    fn try_inline(
        &self,
        sql: &'static str,
        params: &[Value],
        want: Want,
    ) -> Option<Result<Output>> {
        if want == Want::Rows {
            // A free reader, if any; a statement that turns out to write goes to the writer.
            let mut reader = self.reader_conns.iter().find_map(|r| r.try_lock().ok())?;
            match reader.is_readonly(sql) {
                Ok(true) => return reader.run_inline(sql, params, want),
                Ok(false) => {}
                Err(e) => return Some(Err(e)),
            }
        }
        if !self.inline_writes {
            return None;
        }
        let mut writer = self.writer_conn.try_lock().ok()?;
        if self.lease.active.load(Ordering::Acquire) {
            // Someone else's transaction: queue for the writer thread.
            return None;
        }
        writer.run_inline(sql, params, want)
    }

    /// `PRAGMA data_version` on the writer connection. It changes only when *another*
    /// connection commits, so this process's own writes never look like outside changes.
    pub(crate) async fn data_version(&self) -> Result<i64> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            sql: "PRAGMA data_version",
            params: Vec::new(),
            want: Want::Rows,
            reply,
        };
        self.writer
            .send(WriterMsg::Job(job))
            .map_err(|_| closed())?;
        match rx.await.map_err(|_| closed())?? {
            Output::Rows(rows) => rows
                .first()
                .ok_or_else(|| {
                    Error::new(ErrorKind::Other, "PRAGMA data_version returned nothing")
                })?
                .get_idx(0),
            Output::Affected(_) => Err(Error::new(
                ErrorKind::Other,
                "PRAGMA data_version returned nothing",
            )),
        }
    }

    /// Runs a multi-statement script (no parameters) on the writer.
    pub(crate) async fn script(&self, sql: &'static str) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Script(sql, reply))
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Streams the rows of a read-only query.
    pub(crate) fn stream(
        &self,
        sql: &'static str,
        params: Vec<Value>,
        rows: mpsc::Sender<Result<Row>>,
    ) {
        if let Err(cb::SendError(ReaderMsg::Stream(job))) = self
            .readers
            .send(ReaderMsg::Stream(StreamJob { sql, params, rows }))
        {
            let _ = job.rows.try_send(Err(closed()));
        }
    }

    /// Starts a transaction: `BEGIN IMMEDIATE` on the writer, which then serves only this
    /// transaction until it finishes.
    pub(crate) async fn begin(&self) -> Result<Begun> {
        if let Some(tx) = self.try_begin_inline()? {
            return Ok(Begun::Inline(tx));
        }
        let (reply, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Begin(reply))
            .map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?.map(Begun::Thread)
    }

    /// `BEGIN IMMEDIATE` on the caller's thread when the writer is free and no other process
    /// holds the lock; the transaction then holds the lease.
    fn try_begin_inline(&self) -> Result<Option<InlineTx>> {
        if !self.inline_writes {
            return Ok(None);
        }
        let Ok(guard) = self.writer_conn.try_lock() else {
            return Ok(None);
        };
        if self.lease.active.load(Ordering::Acquire) {
            return Ok(None);
        }
        guard.gate.active.store(true, Ordering::Release);
        let begun = guard
            .conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(map_error);
        guard.gate.active.store(false, Ordering::Release);
        match begun {
            Ok(()) => {
                self.lease.active.store(true, Ordering::Release);
                Ok(Some(InlineTx {
                    writer: Arc::clone(&self.writer_conn),
                    lease: Arc::clone(&self.lease),
                    done: AtomicBool::new(false),
                }))
            }
            Err(e) if is_inline_abort(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn closed() -> Error {
    Error::new(
        ErrorKind::Connection,
        "the SQLite worker threads have stopped",
    )
}

fn check_directory(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "cannot open SQLite database {}: {} is not a directory",
                    path.display(),
                    dir.display()
                ),
            ));
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "cannot open SQLite database {}: directory {} does not exist; create it or choose another path",
                    path.display(),
                    dir.display()
                ),
            ));
        }
    }
    if !path.exists() {
        // Creating the file needs a writable directory; say so plainly instead of SQLite's
        // "unable to open database file".
        let probe = tempfile_probe(dir);
        if let Err(e) = probe {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "cannot create SQLite database {}: directory {} is not writable ({e})",
                    path.display(),
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    // `access(2)` would be enough, but std has no portable wrapper: create and remove a file.
    let probe = dir.join(format!(
        ".harmony-probe-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)?;
    std::fs::remove_file(&probe)
}

fn open_error(path: &Path, e: rusqlite::Error) -> Error {
    let err = map_error(e);
    let kind = match err.kind() {
        ErrorKind::Other => ErrorKind::Config,
        k => k,
    };
    Error::new(
        kind,
        format!(
            "cannot open SQLite database {}: {}",
            path.display(),
            err.message()
        ),
    )
}

fn open_connection(
    cfg: &SqliteConfig,
    read_only: bool,
    gate: &Arc<InlineGate>,
) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI
    };
    let mut conn =
        Connection::open_with_flags(&cfg.path, flags).map_err(|e| open_error(&cfg.path, e))?;
    conn.busy_handler(Some(busy_handler(cfg.busy_timeout, Arc::clone(gate))))
        .map_err(|e| open_error(&cfg.path, e))?;
    let g = Arc::clone(gate);
    conn.progress_handler(
        INLINE_CHECK_OPS,
        Some(move || {
            // Only inline statements have a budget; on a thread a statement runs to the end.
            g.active.load(Ordering::Acquire)
                && g.ticks.fetch_add(1, Ordering::Relaxed) >= INLINE_TICKS_MAX
        }),
    )
    .map_err(|e| open_error(&cfg.path, e))?;
    conn.set_prepared_statement_cache_capacity(256);
    let sync = match cfg.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "foreign_keys", "ON")
        .and_then(|_| conn.pragma_update(None, "synchronous", sync))
        .and_then(|_| conn.pragma_update(None, "temp_store", "MEMORY"))
        .and_then(|_| conn.pragma_update(None, "cache_size", -16_000))
        .map_err(|e| open_error(&cfg.path, e))?;
    // A file that exists but is not a database fails here, not at first use.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(|e| open_error(&cfg.path, e))?;
    Ok(conn)
}

/// Waits for another process's lock in short, jittered steps until `timeout`.
///
/// SQLite's default handler sleeps in growing steps (up to 100 ms), so under steady contention
/// from other writers a waiter can miss every window and starve for the whole timeout — long
/// enough for a node's heartbeat to look dead. Sub-millisecond polling hands the lock over
/// fairly at the cost of a few wake-ups.
fn busy_handler(
    timeout: Duration,
    gate: Arc<InlineGate>,
) -> impl FnMut(i32) -> bool + Send + 'static {
    let mut started = std::time::Instant::now();
    move |attempt: i32| {
        if gate.active.load(Ordering::Acquire) {
            // Inline statements never wait: they go to a thread instead.
            return false;
        }
        if attempt == 0 {
            started = std::time::Instant::now();
        }
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100 + fastrand::u64(..400)));
        true
    }
}

/// Per-connection cache of result column names, keyed by the SQL text's address (SQL is
/// `&'static str`, so the address identifies the statement).
#[derive(Default)]
struct ColumnCache(HashMap<(usize, usize), Columns>);

impl ColumnCache {
    fn get(&mut self, sql: &'static str, stmt: &rusqlite::Statement<'_>) -> Columns {
        self.0
            .entry((sql.as_ptr() as usize, sql.len()))
            .or_insert_with(|| {
                stmt.column_names()
                    .map(Box::from)
                    .collect::<Vec<_>>()
                    .into()
            })
            .clone()
    }
}

/// How often the checkpoint thread copies the WAL back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Passive checkpoints (they never block readers or the writer) until the backend is dropped.
fn checkpoint_loop(conn: &Connection, stop: &cb::Receiver<()>) {
    while let Err(cb::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
    // A last full pass while closing, so the file is compact when the process ends.
    let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
}

fn writer_loop(shared: &Mutex<Conn>, lease: &Lease, rx: cb::Receiver<WriterMsg>) {
    while let Ok(msg) = rx.recv() {
        // Held for one job, or for a whole transaction: inline callers then use the queue.
        let mut guard = lease.lock_free(shared);
        let Conn { conn, columns, .. } = &mut *guard;
        match msg {
            WriterMsg::Job(job) => {
                let out = run_job(conn, columns, job.sql, &job.params, job.want);
                let _ = job.reply.send(out);
            }
            WriterMsg::Script(sql, reply) => {
                let _ = reply.send(conn.execute_batch(sql).map_err(map_error));
            }
            WriterMsg::Begin(reply) => {
                if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
                    let _ = reply.send(Err(map_error(e)));
                    continue;
                }
                let (tx, tx_rx) = cb::bounded::<TxMsg>(16);
                if reply.send(Ok(tx)).is_err() {
                    let _ = conn.execute_batch("ROLLBACK");
                    continue;
                }
                serve_transaction(conn, columns, &tx_rx);
            }
        }
    }
}

/// Serves one transaction until it commits, rolls back, or every handle to it is dropped
/// (a cancelled or panicking closure), which rolls back.
fn serve_transaction(conn: &Connection, columns: &mut ColumnCache, rx: &cb::Receiver<TxMsg>) {
    loop {
        match rx.recv() {
            Ok(TxMsg::Job(job)) => {
                let out = run_job(conn, columns, job.sql, &job.params, job.want);
                let _ = job.reply.send(out);
            }
            Ok(TxMsg::Script(sql, reply)) => {
                let _ = reply.send(conn.execute_batch(sql).map_err(map_error));
            }
            Ok(TxMsg::Finish { commit, reply }) => {
                let out = if commit {
                    conn.execute_batch("COMMIT").map_err(map_error)
                } else {
                    conn.execute_batch("ROLLBACK").map_err(map_error)
                };
                if out.is_err() && !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                let _ = reply.send(out);
                return;
            }
            Err(_) => {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                return;
            }
        }
    }
}

fn reader_loop(shared: &Mutex<Conn>, rx: cb::Receiver<ReaderMsg>, writer: cb::Sender<WriterMsg>) {
    while let Ok(msg) = rx.recv() {
        let mut guard = shared.lock().unwrap_or_else(|p| p.into_inner());
        let Conn { conn, columns, .. } = &mut *guard;
        match msg {
            ReaderMsg::Job(job) => {
                let readonly = match conn.prepare_cached(job.sql) {
                    Ok(stmt) => stmt.readonly(),
                    Err(e) => {
                        let _ = job.reply.send(Err(map_error(e)));
                        continue;
                    }
                };
                if !readonly {
                    if let Err(cb::SendError(WriterMsg::Job(job))) =
                        writer.send(WriterMsg::Job(job))
                    {
                        let _ = job.reply.send(Err(closed()));
                    }
                    continue;
                }
                let out = run_job(conn, columns, job.sql, &job.params, job.want);
                let _ = job.reply.send(out);
            }
            ReaderMsg::Stream(job) => stream_job(conn, columns, job),
        }
    }
}

fn stream_job(conn: &Connection, columns: &mut ColumnCache, job: StreamJob) {
    let result = (|| -> Result<()> {
        let mut stmt = conn.prepare_cached(job.sql).map_err(map_error)?;
        if !stmt.readonly() {
            return Err(Error::new(
                ErrorKind::Misuse,
                "stream() is for read-only queries; use exec or select for writes",
            ));
        }
        bind(&mut stmt, &job.params)?;
        let cols = columns.get(job.sql, &stmt);
        let mut rows = stmt.raw_query();
        while let Some(r) = rows.next().map_err(map_error)? {
            let row = read_row(r, &cols)?;
            if job.rows.blocking_send(Ok(row)).is_err() {
                // The consumer went away; stop reading.
                return Ok(());
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = job.rows.blocking_send(Err(e));
    }
}

fn run_job(
    conn: &Connection,
    columns: &mut ColumnCache,
    sql: &'static str,
    params: &[Value],
    want: Want,
) -> Result<Output> {
    let mut stmt = conn.prepare_cached(sql).map_err(map_error)?;
    bind(&mut stmt, params)?;
    match want {
        Want::Exec if stmt.column_count() == 0 => {
            let n = stmt.raw_execute().map_err(map_error)?;
            Ok(Output::Affected(n as u64))
        }
        Want::Exec => {
            // `INSERT … RETURNING` or a SELECT through exec: step to the end; report rows
            // changed for writes and rows returned for reads, as Postgres does.
            let readonly = stmt.readonly();
            let mut returned = 0u64;
            {
                let mut rows = stmt.raw_query();
                while rows.next().map_err(map_error)?.is_some() {
                    returned += 1;
                }
            }
            Ok(Output::Affected(if readonly {
                returned
            } else {
                conn.changes()
            }))
        }
        Want::Rows => {
            let cols = columns.get(sql, &stmt);
            let mut out = Vec::new();
            let mut rows = stmt.raw_query();
            while let Some(r) = rows.next().map_err(map_error)? {
                out.push(read_row(r, &cols)?);
            }
            Ok(Output::Rows(out))
        }
    }
}

fn bind(stmt: &mut rusqlite::Statement<'_>, params: &[Value]) -> Result<()> {
    let count = stmt.parameter_count();
    let mut seen = 0usize;
    for idx in 1..=count {
        let n = stmt
            .parameter_name(idx)
            .and_then(|name| name.strip_prefix('$'))
            .and_then(|digits| digits.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Misuse,
                    "SQL must use $1…$n placeholders (found ?, :name or @name)",
                )
            })?;
        let value = params.get(n.wrapping_sub(1)).ok_or_else(|| {
            Error::new(
                ErrorKind::Misuse,
                format!(
                    "statement uses ${n} but only {} parameters were given",
                    params.len()
                ),
            )
        })?;
        stmt.raw_bind_parameter(idx, SqlValue(value))
            .map_err(map_error)?;
        seen += 1;
    }
    if seen != params.len() {
        return Err(Error::new(
            ErrorKind::Misuse,
            format!(
                "statement has {seen} distinct parameters but {} were given",
                params.len()
            ),
        ));
    }
    Ok(())
}

fn read_row(r: &rusqlite::Row<'_>, cols: &Columns) -> Result<Row> {
    let mut values = Vec::with_capacity(cols.len());
    for i in 0..cols.len() {
        let v = match r.get_ref(i).map_err(map_error)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Int(i),
            ValueRef::Real(f) => Value::Float(f),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Bytes(b.to_vec()),
        };
        values.push(v);
    }
    Ok(Row::new(Arc::clone(cols), values))
}

struct SqlValue<'a>(&'a Value);

impl rusqlite::ToSql for SqlValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Float(f) => ToSqlOutput::Borrowed(ValueRef::Real(*f)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Bytes(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
            Value::Timestamp(t) => ToSqlOutput::from(t.to_sqlite_text()),
            Value::IntArray(v) => ToSqlOutput::from(serde_json::to_string(v).unwrap_or_default()),
            Value::TextArray(v) => ToSqlOutput::from(serde_json::to_string(v).unwrap_or_default()),
            Value::BoolArray(v) => {
                let ints: Vec<i64> = v.iter().map(|b| i64::from(*b)).collect();
                ToSqlOutput::from(serde_json::to_string(&ints).unwrap_or_default())
            }
            Value::TimestampArray(v) => {
                let texts: Vec<String> = v.iter().map(|t| t.to_sqlite_text()).collect();
                ToSqlOutput::from(serde_json::to_string(&texts).unwrap_or_default())
            }
            Value::BatchColumn(c) => ToSqlOutput::from(c.to_json()),
        })
    }
}

pub(crate) fn map_error(e: rusqlite::Error) -> Error {
    use rusqlite::ffi::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, msg) => {
            let text = msg.clone().unwrap_or_else(|| f.to_string());
            let kind = match f.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => ErrorKind::UniqueViolation,
                rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKey,
                _ => match f.code {
                    ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => ErrorKind::Serialization,
                    ErrorCode::ConstraintViolation => ErrorKind::Constraint,
                    ErrorCode::CannotOpen | ErrorCode::NotADatabase | ErrorCode::ReadOnly => {
                        ErrorKind::Config
                    }
                    _ => ErrorKind::Other,
                },
            };
            Error::new(kind, text).with_code(f.extended_code.to_string())
        }
        rusqlite::Error::QueryReturnedNoRows => Error::new(ErrorKind::NotFound, "no rows returned"),
        rusqlite::Error::InvalidParameterCount(_, _) | rusqlite::Error::InvalidParameterName(_) => {
            Error::new(ErrorKind::Misuse, e.to_string())
        }
        _ => Error::new(ErrorKind::Other, e.to_string()),
    }
}

/// How long SQLite waits on another process's lock before reporting BUSY.
pub(crate) const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
