//! Test support shared by the workspace's integration tests: a fresh database per test on
//! either backend, the Postgres availability policy, throw-away Postgres servers, and waiting
//! with a deadline instead of sleeping.
//!
//! Policy for Postgres: tests read the server URL from `HARMONY_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432/test`). When it is unreachable a test prints a loud
//! `SKIPPED (no postgres)` line and returns — unless `HARMONY_REQUIRE_PG=1` (set by `.ci/run`),
//! in which case it fails.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harmonydb::{BackendConfig, Db, DbConfig, Executor};

/// Runs each named `async fn(&TestDb)` twice, as `sqlite::NAME` on a fresh SQLite file and as
/// `postgres::NAME` on a fresh Postgres schema (skipped, loudly, when Postgres is unavailable
/// and not required). The calling crate needs `tokio` with its test macro.
#[macro_export]
macro_rules! both_backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let t = $crate::TestDb::sqlite().await;
                    super::$case(&t).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(t) = $crate::TestDb::postgres(stringify!($case)).await else { return };
                    super::$case(&t).await;
                }
            )*
        }
    };
}

/// Default URL of the shared test server.
pub const DEFAULT_TEST_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The shared Postgres server's URL.
pub fn pg_base_url() -> String {
    std::env::var("HARMONY_TEST_PG").unwrap_or_else(|_| DEFAULT_TEST_PG.to_owned())
}

fn pg_required() -> bool {
    std::env::var("HARMONY_REQUIRE_PG").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// A random lowercase identifier suffix.
pub fn unique_suffix() -> String {
    let mut s = String::with_capacity(12);
    for _ in 0..12 {
        s.push(fastrand::alphanumeric().to_ascii_lowercase());
    }
    s
}

/// Appends `key=value` to a URL's query string.
pub fn with_option(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

/// Environment variable naming a file where every Postgres test appends whether it ran or
/// was skipped and why; `scripts/test` sets it and prints one summary line from it, because
/// cargo hides what passing tests print.
pub const PG_TALLY_ENV: &str = "HARMONY_PG_TALLY";

/// Whether the shared Postgres server answers. When it does not: fails the test if
/// `HARMONY_REQUIRE_PG=1`, else prints the skip line and returns false. Either way the outcome
/// is appended to the file named by [`PG_TALLY_ENV`], when set.
pub async fn postgres_or_skip(test: &str) -> bool {
    let url = with_option(&pg_base_url(), "migrate", "false");
    let cfg = DbConfig::from_url(&url).expect("HARMONY_TEST_PG is a valid URL");
    let problem = match Db::open(cfg).await {
        Ok(db) => db
            .scalar::<i64>("SELECT 1", &[])
            .await
            .err()
            .map(|e| e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    if let Some(path) = std::env::var_os(PG_TALLY_ENV) {
        let why = problem.as_ref().map(|p| {
            format!(
                "Postgres at {} is unreachable: {p}",
                harmonydb::redact(&pg_base_url())
            )
        });
        append_pg_tally(Path::new(&path), test, why.as_deref());
    }
    let Some(problem) = problem else {
        return true;
    };
    if pg_required() {
        panic!(
            "{test}: Postgres at {} is unreachable and HARMONY_REQUIRE_PG=1: {problem}",
            harmonydb::redact(&pg_base_url())
        );
    }
    eprintln!("*** {test}: SKIPPED (no postgres) — set HARMONY_TEST_PG to run it ***");
    false
}

/// Appends one line to the tally file: `ran<TAB>TEST`, or `skipped<TAB>TEST<TAB>WHY` when
/// `skipped_because` is given. Tests run in many processes at once; each line is one
/// `O_APPEND` write, so lines never interleave.
pub fn append_pg_tally(path: &Path, test: &str, skipped_because: Option<&str>) {
    use std::io::Write as _;
    let one_line = |s: &str| s.replace(['\t', '\n', '\r'], " ");
    let line = match skipped_because {
        None => format!("ran\t{}\n", one_line(test)),
        Some(why) => format!("skipped\t{}\t{}\n", one_line(test), one_line(why)),
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!(
            "cannot append to {PG_TALLY_ENV} file {}: {e}",
            path.display()
        );
    }
}

/// Which backend a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A temporary SQLite file.
    Sqlite,
    /// A fresh schema on the shared Postgres server.
    Postgres,
}

/// A fresh, migrated database for one test, removed when dropped: a temporary SQLite file, or
/// a new schema on the shared Postgres server (`DROP SCHEMA … CASCADE` on drop).
pub struct TestDb {
    /// The open handle.
    pub db: Db,
    /// A URL that opens the same database (for child processes and second handles).
    pub url: String,
    backend: Backend,
    schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A fresh database on `backend`; `None` when Postgres is unavailable and not required.
    pub async fn new(backend: Backend, test: &str) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => Some(Self::sqlite().await),
            Backend::Postgres => Self::postgres(test).await,
        }
    }

    /// A migrated SQLite database in a new temporary directory.
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("harmony.db");
        let url = format!("sqlite://{}", path.display());
        let db = Db::open(DbConfig::from_url(&url).unwrap())
            .await
            .expect("open test SQLite database");
        TestDb {
            db,
            url,
            backend: Backend::Sqlite,
            schema: None,
            _dir: Some(dir),
        }
    }

    /// A migrated, newly created schema on the shared Postgres server.
    pub async fn postgres(test: &str) -> Option<TestDb> {
        if !postgres_or_skip(test).await {
            return None;
        }
        let schema = format!("t_{}", unique_suffix());
        let url = with_option(
            &with_option(&pg_base_url(), "schema", &schema),
            "pool_size",
            "6",
        );
        let db = Db::open(DbConfig::from_url(&url).unwrap())
            .await
            .expect("open test Postgres schema");
        Some(TestDb {
            db,
            url,
            backend: Backend::Postgres,
            schema: Some(schema),
            _dir: None,
        })
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A second, independent handle to the same database (its own connections).
    pub async fn open_another(&self) -> Db {
        let mut cfg = DbConfig::from_url(&self.url).unwrap();
        cfg.migrate_on_open = false;
        Db::open(cfg).await.expect("second handle")
    }

    /// The same database's URL with an extra option.
    pub fn url_with(&self, key: &str, value: &str) -> String {
        with_option(&self.url, key, value)
    }

    /// A handle on a database the test owns outright, such as one on a [`TempPg`] server that
    /// is thrown away with the test: migrated on open, nothing dropped at the end.
    pub async fn on_server(url: &str) -> TestDb {
        let cfg = DbConfig::from_url(url).expect("a valid database URL");
        let backend = match cfg.backend {
            BackendConfig::Sqlite(_) => Backend::Sqlite,
            BackendConfig::Postgres(_) => Backend::Postgres,
        };
        let db = Db::open(cfg).await.expect("open test database");
        TestDb {
            db,
            url: url.to_owned(),
            backend,
            schema: None,
            _dir: None,
        }
    }

    /// The SQLite file (None on Postgres).
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        match &DbConfig::from_url(&self.url).ok()?.backend {
            BackendConfig::Sqlite(s) => Some(s.path.clone()),
            BackendConfig::Postgres(_) => None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(schema) = self.schema.take() else {
            return;
        };
        // Drop runs inside the test's runtime, which cannot be blocked on; do the cleanup on a
        // thread of its own with a small runtime.
        let base = pg_base_url();
        let _ = std::thread::spawn(move || drop_schema(&base, &schema)).join();
    }
}

/// Drops a test schema (only `t_…` names, never anything else).
pub fn drop_schema(base_url: &str, schema: &str) {
    assert!(
        schema.starts_with("t_")
            && schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cleanup runtime");
    rt.block_on(async {
        let cfg = DbConfig::from_url(&with_option(base_url, "migrate", "false")).unwrap();
        let Ok(db) = Db::open(cfg).await else { return };
        drop_schema_via_do(&db, schema).await;
    });
}

async fn drop_schema_via_do(db: &Db, schema: &str) {
    // `DROP SCHEMA` needs an identifier; run it through a server-side helper that quotes it
    // with format('%I'). The helper lives in pg_temp, so it disappears with the session.
    let created = db
        .exec_script(
            "CREATE OR REPLACE FUNCTION pg_temp.harmony_drop_test_schema(s text) RETURNS void
             LANGUAGE plpgsql AS $$ BEGIN EXECUTE format('DROP SCHEMA IF EXISTS %I CASCADE', s); END $$",
        )
        .await;
    if created.is_ok() {
        let _ = db
            .exec("SELECT pg_temp.harmony_drop_test_schema($1)", &[&schema])
            .await;
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `deadline`. For waiting
/// on something another thread or process does, where no signal is available; never a fixed
/// sleep.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn pg_bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn is_root() -> bool {
    // `id -u` rather than libc's getuid, which would need unsafe code.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A throw-away PostgreSQL server in a temporary directory, for tests that must kill a
/// server (failover) or need password authentication. Dropping it stops the server
/// (`pg_ctl stop -m immediate`) and removes its directory, also when the test panics.
pub struct TempPg {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    /// Extra `-c NAME=VALUE` settings given to the server at every start.
    settings: Vec<&'static str>,
}

impl TempPg {
    /// `initdb` + `pg_ctl start`. Local connections use `trust`, except that user `secret`
    /// (password `right-password`) must authenticate with a password. Returns `None` (after
    /// printing why) when the Postgres binaries are not installed.
    pub fn start() -> Option<TempPg> {
        let Some(bin) = pg_bin_dir() else {
            eprintln!("*** TempPg: SKIPPED (no postgres binaries under /usr/lib/postgresql) ***");
            return None;
        };
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("harmony-temp-pg")
            .tempdir()
            .expect("temp dir");
        if as_postgres {
            // initdb refuses to run as root; the server runs as the postgres user.
            run_ok(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path()),
            );
        }
        let data = dir.path().join("data");
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, "unused-superuser-password\n").expect("pw file");
        if as_postgres {
            run_ok(
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(&pwfile),
            );
        }
        let mut initdb = pg_command(&bin, "initdb", as_postgres);
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=trust",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()));
        run_ok(&mut initdb);
        let hba = data.join("pg_hba.conf");
        let mut text = String::from(
            "host all secret 127.0.0.1/32 scram-sha-256\nhost all secret ::1/128 scram-sha-256\n",
        );
        text.push_str(&std::fs::read_to_string(&hba).expect("pg_hba.conf"));
        std::fs::write(&hba, text).expect("write pg_hba.conf");
        let port = free_port();
        let pg = TempPg {
            port,
            dir,
            bin,
            as_postgres,
            settings: Vec::new(),
        };
        pg.start_server();
        let create_user = Command::new(pg.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
            ])
            .arg("CREATE USER secret PASSWORD 'right-password' SUPERUSER")
            .args(["-c", "CREATE DATABASE harmony"])
            .output()
            .expect("psql");
        assert!(
            create_user.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&create_user.stderr)
        );
        Some(pg)
    }

    /// Stops the server (`pg_ctl stop -m fast`) until [`TempPg::start_again`].
    pub fn stop(&self) {
        let data = self.dir.path().join("data");
        let mut ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        ctl.arg("-D").arg(&data).args(["-m", "fast", "-w", "stop"]);
        run_ok(&mut ctl);
    }

    fn start_server(&self) {
        assert!(
            self.try_start_server(),
            "pg_ctl start failed: {}",
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    fn try_start_server(&self) -> bool {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let mut ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        ctl.arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-w")
            .arg("-o")
            .arg(self.server_options())
            .arg("start");
        ctl.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn server_options(&self) -> String {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        for s in &self.settings {
            opts.push_str(" -c ");
            opts.push_str(s);
        }
        opts
    }

    /// A primary and a streaming-replication standby, set up as an operator would: the
    /// standby is a `pg_basebackup -R` copy of the primary, and the primary commits
    /// synchronously (`synchronous_standby_names = '*'`), so that a commit it acknowledged is
    /// on both servers. `None` (after printing why) when the Postgres binaries are missing.
    pub fn replicated_pair() -> Option<(TempPg, TempPg)> {
        let primary = TempPg::start()?;
        let standby = primary.start_standby();
        wait_until(
            "the standby to stream from the primary",
            Duration::from_secs(60),
            || {
                primary.psql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                    == "1"
            },
        );
        // Set after the base backup, through ALTER SYSTEM (postgresql.auto.conf of the primary
        // only): a promoted standby that inherited it would wait forever for a standby of its
        // own on every commit.
        primary.psql("ALTER SYSTEM SET synchronous_standby_names = '*'");
        primary.psql("SELECT pg_reload_conf()");
        wait_until(
            "the standby to be synchronous",
            Duration::from_secs(60),
            || {
                primary.psql("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")
                    == "1"
            },
        );
        Some((primary, standby))
    }

    /// Starts a hot standby of this server: `pg_basebackup -R` into a new directory, streaming
    /// from this server, on a port of its own.
    pub fn start_standby(&self) -> TempPg {
        let dir = tempfile::Builder::new()
            .prefix("harmony-temp-pg-standby")
            .tempdir()
            .expect("temp dir");
        if self.as_postgres {
            run_ok(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir.path()),
            );
        }
        let data = dir.path().join("data");
        let mut backup = pg_command(&self.bin, "pg_basebackup", self.as_postgres);
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-c", "fast"]);
        run_ok(&mut backup);
        let standby = TempPg {
            port: free_port(),
            dir,
            bin: self.bin.clone(),
            as_postgres: self.as_postgres,
            // The default (5 s) is how long the standby waits before reconnecting to a
            // restarted primary; with synchronous commit, every commit waits that long too.
            settings: vec!["wal_retrieve_retry_interval=100ms"],
        };
        standby.start_server();
        standby
    }

    /// Promotes a standby to a primary (`pg_ctl promote`, waiting until it accepts writes).
    pub fn promote(&self) {
        let mut ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        ctl.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-t", "60", "promote"]);
        run_ok(&mut ctl);
    }

    /// Restarts the server in place, as an operator does for a configuration change or a
    /// minor upgrade: a fast shutdown (sessions are terminated, not the server killed), then a
    /// start on the same port and data.
    pub fn restart(&self) {
        let mut ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        ctl.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        run_ok(&mut ctl);
        self.start_server();
    }

    /// Starts the server again after [`TempPg::kill`] (crash recovery) or [`TempPg::stop`], on
    /// the same port and data.
    pub fn start_again(&self) {
        // The postmaster refuses to start while processes of the killed one are still
        // attached to its shared memory; they exit by themselves, soon after it.
        let start = Instant::now();
        while !self.try_start_server() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "temp postgres did not start again: {}",
                std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the server is a standby still in recovery (`pg_is_in_recovery()`).
    pub fn in_recovery(&self) -> bool {
        self.psql("SELECT pg_is_in_recovery()") == "t"
    }

    /// Runs one statement with psql as user `postgres` on database `harmony`; returns its
    /// output, unaligned and without headers. Panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "harmony", "-X", "-A", "-t"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql:?} on port {}: {}",
            self.port,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Creates a database (the name is quoted by psql's `:"var"` interpolation, never pasted
    /// into SQL text).
    pub fn create_database(&self, name: &str) {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
            ])
            .arg(format!("db={name}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("psql");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"CREATE DATABASE :\"db\";\n")
            .expect("write psql input");
        let out = child.wait_with_output().expect("psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A URL for user `postgres` (trusted) on database `harmony`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/harmony", self.port)
    }

    /// The server's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the postmaster with SIGKILL (a crash, not a shutdown), and waits until the port
    /// refuses connections.
    pub fn kill(&self) {
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.lines().next().map(str::to_owned))
            .expect("postmaster.pid");
        run_ok(Command::new("kill").args(["-9", pid.trim()]));
        // Children of a SIGKILLed postmaster exit on their own; the port closes with it.
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "temp postgres did not die"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TempPg {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let mut ctl = pg_command(&self.bin, "pg_ctl", self.as_postgres);
        ctl.arg("-D").arg(&data).args(["-m", "immediate", "stop"]);
        let _ = ctl.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// Polls `check` from a blocking context until it holds, or panics with `what` after
/// `deadline` (the synchronous twin of [`eventually`], for the server set-up above).
fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pg_command(bin: &Path, tool: &str, as_postgres: bool) -> Command {
    let path = bin.join(tool);
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tally_has_one_line_per_test() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tally");
        append_pg_tally(&path, "a", None);
        append_pg_tally(
            &path,
            "b",
            Some("Postgres at x is unreachable:\nconnection refused"),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "ran\ta\nskipped\tb\tPostgres at x is unreachable: connection refused\n"
        );
    }
}
