//! Command-line definitions (clap derive). Only this module and `main` know about flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use harmonytask::ByteSize;

/// Harmony: a distributed, resource-aware task engine on SQL.
#[derive(Debug, Parser)]
#[command(name = "harmony", version, about, long_about = None)]
pub struct Cli {
    /// Database URL: sqlite://PATH or postgres://USER[:PASSWORD]@HOST[:PORT][,HOST2…]/DB[?schema=…]
    #[arg(long, global = true, env = "HARMONY_DB", default_value = harmonydb::DEFAULT_URL)]
    pub db: String,

    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// Log filter (also HARMONY_LOG), e.g. `info` or `harmonytask=debug` (default: `info` for
    /// `run`, `warn` otherwise).
    #[arg(long = "log", global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Wake-up notifications between nodes: on, off, or http where LISTEN/NOTIFY does not work
    /// (details: `harmony run --help`).
    #[arg(
        long,
        global = true,
        env = "HARMONY_NOTIFY",
        default_value = "on",
        value_name = "on|off|http"
    )]
    pub notify: NotifyMode,

    /// With --notify http: the secret every node of the cluster shares (at least 16 bytes),
    /// which signs the hints nodes send each other. Prefer the environment variable: a flag is
    /// visible to other users of the machine.
    #[arg(
        long,
        global = true,
        env = "HARMONY_CLUSTER_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub cluster_secret: Option<Secret>,

    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Database schema: apply migrations, show status.
    #[command(subcommand)]
    Db(DbCommand),
    /// Run a node: claim and run tasks until SIGINT/SIGTERM.
    // Boxed: its many flags would make every other variant as large.
    Run(Box<RunArgs>),
    /// Tasks: add, ls, show, why, history, restart, cancel, pause, resume, run-now, prune.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Machines (nodes) of the cluster.
    #[command(subcommand)]
    Machine(MachineCommand),
    /// A self-contained tour: a fresh ./harmony-demo.db, one node, a small pipeline.
    Demo(DemoArgs),
    /// Benchmarks: throughput, latency, backlog, cluster, packing, memory, db, recovery, prune, api.
    Bench(BenchArgs),
    /// Serve the HTTP API (health, metrics, JSON) without running tasks.
    Web(WebArgs),
    /// Configuration layers: TOML documents in the database that nodes read with --layers.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Storage paths of this machine, which tasks reserve space on.
    #[command(subcommand)]
    Storage(StorageCommand),
}

/// `harmony config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// The layers, with size and last change.
    List,
    /// Prints a layer's TOML.
    Get {
        /// The layer's title.
        name: String,
    },
    /// Writes a layer from FILE (or stdin for `-`), after checking it; nodes running it pick
    /// the change up within seconds.
    Set {
        /// The layer's title (`base` is read by every node).
        name: String,
        /// The TOML file, or `-` for stdin.
        file: String,
    },
    /// Edits a layer in $EDITOR; the result is checked before it is saved.
    Edit {
        /// The layer's title.
        name: String,
    },
    /// The versions of a layer.
    History {
        /// The layer's title.
        name: String,
    },
    /// What changed: VERSION (default: the one before the last) against the current text.
    Diff {
        /// The layer's title.
        name: String,
        /// A version number from `config history`.
        version: Option<i64>,
    },
    /// Removes a layer (its history stays).
    Rm {
        /// The layer's title.
        name: String,
    },
    /// The merged settings of `base` and the layers given, with where each value came from.
    Resolved {
        /// The layers, in order, read after `base`.
        #[arg(long, value_delimiter = ',', value_name = "A,B")]
        layers: Vec<String>,
    },
}

/// `harmony storage …`.
#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Attaches a directory of this machine as a storage path.
    Attach {
        /// The directory.
        path: PathBuf,
        /// Preference among paths with room (higher first).
        #[arg(long, default_value_t = 10)]
        weight: i64,
        /// Tasks that seal may reserve space here.
        #[arg(long)]
        can_seal: bool,
        /// Tasks that store may reserve space here.
        #[arg(long)]
        can_store: bool,
        /// Use at most this much of the file system (default: all of it).
        #[arg(long, value_parser = parse_size, value_name = "SIZE")]
        capacity: Option<ByteSize>,
        /// The node the path belongs to (its --listen address).
        #[arg(long, default_value = LISTEN_DEFAULT, value_name = "HOST:PORT")]
        listen: String,
    },
    /// The storage paths of every machine: capacity, available, reserved, health.
    List,
    /// Detaches a storage path of this machine (reservations on it go).
    Detach {
        /// The directory.
        path: PathBuf,
        /// The node the path belongs to (its --listen address).
        #[arg(long, default_value = LISTEN_DEFAULT, value_name = "HOST:PORT")]
        listen: String,
    },
}

/// `harmony bench`
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure: throughput, latency, backlog, cluster, packing, memory, db, recovery, prune (--tasks: old history rows), api (--tasks waiting, --history rows), or all.
    #[arg(value_name = "WORKLOAD")]
    pub workload: String,
    /// Node processes (cluster: only this count instead of 1, 2, 4, 8).
    #[arg(long, value_name = "N")]
    pub nodes: Option<usize>,
    /// Tasks to measure (each workload has a default).
    #[arg(long, value_name = "N")]
    pub tasks: Option<usize>,
    /// Latency: add from this process, run on a separate `harmony run` process. With
    /// `--notify http`, hints travel over HTTP peering instead of NOTIFY.
    #[arg(long)]
    pub cross_node: bool,
    /// api: history rows to fill (default 1,000,000).
    #[arg(long, value_name = "N")]
    pub history: Option<usize>,
    /// throughput, backlog, cluster: at most N attempts at once per node (runs `bench_read`,
    /// which logs no attempts, instead of `bench_noop`).
    #[arg(long, value_name = "N")]
    pub max: Option<usize>,
    /// throughput, backlog, cluster: each task carries a 64-byte input that it reads when it
    /// runs (`bench_read`).
    #[arg(long)]
    pub read_input: bool,
    /// cluster: each task sleeps this many milliseconds (`bench_sleep`).
    #[arg(long, value_name = "MS")]
    pub task_ms: Option<u64>,
}

/// The `--notify` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NotifyMode {
    /// Send and receive wake-up notifications.
    On,
    /// Rely on polling alone.
    Off,
    /// Send the notifications over HTTP to the other nodes, signed with --cluster-secret.
    Http,
}

impl NotifyMode {
    /// Whether notifications are sent at all (`on` or `http`).
    pub fn enabled(self) -> bool {
        self != NotifyMode::Off
    }
}

/// A secret flag value; its `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(redacted)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl Command {
    /// Whether the command runs until stopped, so SIGINT/SIGTERM should shut it down
    /// gracefully instead of killing it.
    pub fn is_long_running(&self) -> bool {
        matches!(self, Command::Run(_) | Command::Demo(_) | Command::Web(_))
    }
}

/// What `--notify` does, shown once, under `harmony run --help`.
const NOTIFY_HELP: &str = "Notifications (--notify on|off|http): `on` sends and listens for \
wake-ups (Postgres LISTEN/NOTIFY; SQLite change checks), so other nodes start new work within \
milliseconds. `http` is for YugabyteDB, CockroachDB or PgBouncer in transaction mode: nodes send \
the same wake-ups to each other's --listen address (POST /api/v1/peer/hints), signed with \
--cluster-secret (HARMONY_CLUSTER_SECRET), and each node serves that route on its --listen \
address. `off` relies on polling alone: nodes find work every --poll-interval-unhealthy. Either \
way everything stays correct; hints only make work start sooner.";

/// `harmony run`
#[derive(Debug, Args)]
#[command(after_long_help = NOTIFY_HELP)]
pub struct RunArgs {
    /// CPUs this node offers (default: detected logical CPUs).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub cpu: Option<f64>,
    /// RAM this node offers, e.g. 64GiB (default: detected total RAM).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub ram: Option<ByteSize>,
    /// GPUs this node offers, fractional allowed (default: detected through NVML, else 0).
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    pub gpu: Option<f64>,
    /// This node's address and identity (HOST:PORT); two live nodes must not share it.
    #[arg(long, default_value = LISTEN_DEFAULT, value_name = "HOST:PORT")]
    pub listen: String,
    /// Display name (default: the host part of --listen).
    #[arg(long)]
    pub name: Option<String>,
    /// TOML file of command task types.
    #[arg(long, value_name = "FILE")]
    pub tasks: Option<PathBuf>,
    /// Also run the built-in test and benchmark types (bench_noop, bench_sleep, bench_fail).
    /// Off by default: they write an attempt log that production nodes have no use for.
    #[arg(long)]
    pub builtin: bool,
    /// Run only these types (comma-separated; default: every tasks-file type, and the
    /// built-ins with --builtin).
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub types: Option<Vec<String>>,
    /// Config layers to read after `base`, in order (later ones win); changes to them are
    /// applied while the node runs.
    #[arg(long, value_delimiter = ',', value_name = "A,B")]
    pub layers: Vec<String>,
    /// Safety-net database poll interval while notifications work, e.g. 30s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub poll_interval: Option<Duration>,
    /// Database poll interval while notifications are down or --notify is off, e.g. 3s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub poll_interval_unhealthy: Option<Duration>,
    /// SQLite: how often to check whether another process wrote to the file, e.g. 2ms.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub change_check_interval: Option<Duration>,
    /// Shortest time between two IAmBored calls (singleton checks) of one type, e.g. 1s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub iambored_interval: Option<Duration>,
    /// Heartbeat interval, e.g. 5s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub heartbeat_interval: Option<Duration>,
    /// A node silent this long is declared dead, e.g. 30s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub dead_after: Option<Duration>,
    /// How often this node looks for dead nodes, e.g. 5s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub reaper_interval: Option<Duration>,
    /// How long running tasks get to finish at shutdown before they are cancelled, e.g. 30s.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub shutdown_grace: Option<Duration>,
    /// Delete task history (and the arguments of finished tasks) older than this, e.g. 30d,
    /// or `off` to keep it forever (default 30d). One node at a time prunes.
    #[arg(long, value_parser = parse_keep, value_name = "DURATION|off")]
    pub history_keep: Option<Keep>,
    /// Also keep only the newest N history rows of each type.
    #[arg(long, value_name = "N")]
    pub history_keep_per_type: Option<u64>,
    /// How often this node tries to prune history, e.g. 1h.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub prune_interval: Option<Duration>,
    /// Bearer token for the HTTP API's write actions (served on --listen). Without one, a
    /// loopback --listen allows writes and any other is read-only.
    #[arg(long, env = "HARMONY_API_TOKEN", hide_env_values = true, value_parser = parse_token, value_name = "TOKEN")]
    pub api_token: Option<harmony_web::ApiToken>,
}

/// `harmony web`
#[derive(Debug, Args)]
pub struct WebArgs {
    /// Address to serve the HTTP API on (HOST:PORT).
    #[arg(long, default_value = LISTEN_DEFAULT, value_name = "HOST:PORT")]
    pub listen: String,
    /// Bearer token for write actions. Without one, a loopback --listen allows writes and any
    /// other is read-only.
    #[arg(long, env = "HARMONY_API_TOKEN", hide_env_values = true, value_parser = parse_token, value_name = "TOKEN")]
    pub api_token: Option<harmony_web::ApiToken>,
}

/// `--api-token`: any non-empty string (its value never appears in output or logs).
fn parse_token(s: &str) -> Result<harmony_web::ApiToken, String> {
    harmony_web::ApiToken::new(s).ok_or_else(|| "must not be empty".to_owned())
}

/// `--history-keep`: a duration, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep(pub Option<Duration>);

fn parse_keep(s: &str) -> Result<Keep, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(Keep(None));
    }
    let d = parse_duration(s).map_err(|e| format!("{e}, or off"))?;
    if d.is_zero() {
        return Err("must be positive; use off to keep history forever".into());
    }
    Ok(Keep(Some(d)))
}

/// `harmony task …`
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Add tasks of a type (all in one transaction).
    Add(TaskAddArgs),
    /// Pending and running tasks, oldest first.
    Ls {
        /// Only this type.
        #[arg(long = "type", value_name = "TYPE")]
        type_name: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One task: state, arguments and every attempt.
    Show {
        /// Task id.
        id: i64,
    },
    /// Finished attempts, newest first.
    History {
        /// Only this type.
        #[arg(long = "type", value_name = "TYPE")]
        type_name: Option<String>,
        /// Only failed attempts.
        #[arg(long)]
        failed: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Re-queue a task that failed for good, keeping its id.
    Restart {
        /// Task id.
        id: i64,
    },
    /// Delete finished attempts older than --older-than (and the arguments of finished tasks
    /// with no history left); never anything of a pending or running task.
    Prune {
        /// Age of the attempts to delete, e.g. 7d.
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        older_than: Duration,
        /// Only this type.
        #[arg(long = "type", value_name = "TYPE")]
        type_name: Option<String>,
        /// Count what would be deleted, and delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ask a singleton type to run now instead of waiting for its interval; the nodes that
    /// run it are woken at once.
    RunNow {
        /// The singleton task type.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Why a task (or every waiting task of a type) is not running: per live node, the reason
    /// its scheduler gives, and one line that says it.
    #[command(group(ArgGroup::new("what").required(true).args(["id", "type_name"])))]
    Why {
        /// Task id.
        id: Option<i64>,
        /// A task type instead of one task.
        #[arg(long = "type", value_name = "TYPE")]
        type_name: Option<String>,
    },
    /// Cancel tasks: a waiting one is removed, a running one's attempt is stopped and its
    /// result discarded; each gets a history row with err = "cancelled".
    #[command(group(ArgGroup::new("which").required(true).args(["ids", "all_waiting"])))]
    Cancel {
        /// Task ids.
        ids: Vec<i64>,
        /// With --type: every waiting task of the type (running ones go on).
        #[arg(long, requires = "type_name")]
        all_waiting: bool,
        /// The type, with --all-waiting.
        #[arg(long = "type", value_name = "TYPE", requires = "all_waiting")]
        type_name: Option<String>,
    },
    /// Pause a task type on every node: nothing of it is claimed until `resume`; running
    /// tasks finish.
    Pause {
        /// The task type.
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Resume a paused task type.
    Resume {
        /// The task type.
        #[arg(value_name = "NAME")]
        name: String,
    },
}

/// `harmony task add`
#[derive(Debug, Args)]
pub struct TaskAddArgs {
    /// The task type.
    #[arg(value_name = "TYPE")]
    pub type_name: String,
    /// How many tasks to add.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// An argument of every added task, KEY=VALUE (repeatable).
    #[arg(long = "arg", value_parser = parse_key_value, value_name = "KEY=VALUE")]
    pub args: Vec<(String, String)>,
    /// A tasks file whose types count as known.
    #[arg(long, value_name = "FILE")]
    pub tasks: Option<PathBuf>,
    /// Add even if no node runs the type (yet).
    #[arg(long)]
    pub force: bool,
}

/// `harmony machine …`
#[derive(Debug, Subcommand)]
pub enum MachineCommand {
    /// Registered machines: budget, last contact, running tasks.
    Ls,
    /// Stop a machine from claiming new tasks; running tasks finish, `can_yield` ones give way.
    Cordon(MachineTarget),
    /// Let a cordoned machine claim tasks again.
    Uncordon(MachineTarget),
    /// Ask a machine to drain: it claims nothing new and exits with code 100 once its running
    /// tasks have finished (a supervisor then restarts it).
    Restart(MachineTarget),
}

/// Which machine a `machine cordon|uncordon|restart` acts on: an id, or `--self`.
#[derive(Debug, Args)]
#[group(skip)]
#[command(group(ArgGroup::new("target").required(true).args(["id", "this"])))]
pub struct MachineTarget {
    /// Machine id (see `harmony machine ls`).
    #[arg(value_name = "ID")]
    pub id: Option<i64>,
    /// The machine registered with --listen on this host.
    #[arg(long = "self")]
    pub this: bool,
    /// With --self: the HOST:PORT the node was started with (`harmony run --listen`; default
    /// 127.0.0.1:4701).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
}

impl MachineTarget {
    /// The address `--self` looks for.
    pub fn self_listen(&self) -> &str {
        self.listen.as_deref().unwrap_or(LISTEN_DEFAULT)
    }
}

/// The default node address and identity (`harmony run --listen`).
pub const LISTEN_DEFAULT: &str = "127.0.0.1:4701";

/// `harmony demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Multiplies every simulated duration (0.01 runs a hundred times faster).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// How many items go through the pipeline.
    #[arg(long, default_value_t = crate::demo::ITEMS_DEFAULT)]
    pub items: usize,
    /// Where the demo node serves the dashboard and the API (HOST:PORT); the default is that of
    /// `harmony run`, so stop a local node first, or choose another address.
    #[arg(long, default_value = LISTEN_DEFAULT, value_name = "HOST:PORT")]
    pub listen: String,
    /// Keep the node and its dashboard up after the pipeline is done, until Ctrl-C.
    #[arg(long)]
    pub keep_open: bool,
}

fn parse_size(s: &str) -> Result<ByteSize, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; write a duration such as 500ms, 30s or 5m"))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `harmony db …`
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Apply pending migrations (a second run reports the schema is up to date).
    Migrate,
    /// Show backend, host in use, schema version and pending migrations.
    Status,
}

/// Shared flags for commands that only read.
#[derive(Debug, Args)]
pub struct ReadOnly {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("harmony").chain(args.iter().copied()))
    }

    #[test]
    fn notify_is_on_unless_turned_off() {
        // HARMONY_NOTIFY may be set in the environment running the tests; an explicit flag wins.
        let cli = parse(&["--notify", "off", "task", "ls"]).unwrap();
        assert!(!cli.notify.enabled());
        let cli = parse(&["task", "ls", "--notify", "on"]).unwrap();
        assert!(cli.notify.enabled());
        assert!(parse(&["--notify", "maybe", "task", "ls"]).is_err());
    }

    #[test]
    fn machine_targets() {
        let Command::Machine(MachineCommand::Cordon(t)) =
            parse(&["machine", "cordon", "7"]).unwrap().command
        else {
            panic!("not a cordon");
        };
        assert_eq!((t.id, t.this), (Some(7), false));
        let Command::Machine(MachineCommand::Restart(t)) =
            parse(&["machine", "restart", "--self", "--listen", "10.0.0.1:80"])
                .unwrap()
                .command
        else {
            panic!("not a restart");
        };
        assert!(t.this && t.id.is_none());
        assert_eq!(t.self_listen(), "10.0.0.1:80");
        let Command::Machine(MachineCommand::Uncordon(t)) =
            parse(&["machine", "uncordon", "--self"]).unwrap().command
        else {
            panic!("not an uncordon");
        };
        assert_eq!(t.self_listen(), LISTEN_DEFAULT);
        assert!(parse(&["machine", "cordon"]).is_err());
        assert!(parse(&["machine", "cordon", "7", "--self"]).is_err());
    }

    #[test]
    fn run_tuning_flags() {
        let Command::Run(r) = parse(&[
            "run",
            "--poll-interval-unhealthy",
            "1s",
            "--iambored-interval",
            "20ms",
            "--change-check-interval",
            "5ms",
        ])
        .unwrap()
        .command
        else {
            panic!("not run");
        };
        assert_eq!(r.poll_interval_unhealthy, Some(Duration::from_secs(1)));
        assert_eq!(r.iambored_interval, Some(Duration::from_millis(20)));
        assert_eq!(r.change_check_interval, Some(Duration::from_millis(5)));
    }

    #[test]
    fn history_keep_flags() {
        let keep = |v: &str| match parse(&["run", "--history-keep", v]).map(|c| c.command) {
            Ok(Command::Run(r)) => Ok(r.history_keep),
            Ok(_) => panic!("not run"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            keep("30d"),
            Ok(Some(Keep(Some(Duration::from_secs(30 * 86_400)))))
        );
        assert_eq!(keep("off"), Ok(Some(Keep(None))));
        assert_eq!(keep("OFF"), Ok(Some(Keep(None))));
        assert!(keep("0s").unwrap_err().contains("use off"));
        assert!(keep("forever").unwrap_err().contains("or off"));
        let Command::Task(TaskCommand::Prune {
            older_than,
            dry_run,
            ..
        }) = parse(&["task", "prune", "--older-than", "7d", "--dry-run"])
            .unwrap()
            .command
        else {
            panic!("not prune");
        };
        assert_eq!(older_than, Duration::from_secs(7 * 86_400));
        assert!(dry_run);
        assert!(
            parse(&["task", "prune"]).is_err(),
            "--older-than is required"
        );
    }
}
