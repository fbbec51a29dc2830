//! `harmony run`: one node. Every flag and the tasks file are checked before the database is
//! opened, so bad input never leaves a machine row behind.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use harmonytask::{Admin, Engine, EngineConfig, Error as EngineError, Resource, Resources, Task};
use tokio_util::sync::CancellationToken;

use crate::catalog;
use crate::cli::RunArgs;
use crate::commands::peering::Peering;
use crate::commands::{
    EXIT_FENCED, EXIT_OK, EXIT_RESTART, UsageError, check_type_name, open_migrated,
};
use crate::layers::{self, Resolved};
use crate::taskfile;

/// How often a node re-reads its config layers (a notification makes it sooner on Postgres).
const LAYER_POLL: Duration = Duration::from_secs(1);

/// Time allowed, beyond the longest kill grace, for a SIGKILLed command to be reaped and its
/// attempt to return.
const KILL_REAP_MARGIN: Duration = Duration::from_secs(1);

/// Starts a node and runs it until a signal (exit 0), fencing (exit 4) or a restart request
/// (exit 100). `notify` says how wake-up notifications travel (`--notify on|off|http`).
pub async fn run(
    db_url: &str,
    args: RunArgs,
    notify: &Peering,
    shutdown: CancellationToken,
) -> anyhow::Result<u8> {
    // `main` has replaced the default action of SIGINT/SIGTERM (exit) with cancelling
    // `shutdown`, so start-up must watch it too, or a signal that arrives while the tasks file
    // is read or the database is being reached would be ignored. Nothing is written before the
    // engine starts, so stopping here leaves nothing behind.
    let prepared = tokio::select! {
        p = prepare(db_url, &args, notify) => p?,
        () = shutdown.cancelled() => {
            tracing::info!("signal received during start-up; stopping before the node registers");
            return Ok(EXIT_OK);
        }
    };
    let Prepared {
        file_specs,
        resolved,
        db,
        peers,
    } = prepared;
    let peer_stop = CancellationToken::new();
    let peer_loops = tokio_util::task::TaskTracker::new();
    let (db, relay) = match peers {
        Some(p) => {
            peer_loops.spawn(p.sender.run(peer_stop.clone()));
            let relay = Arc::clone(&p.relay);
            (
                db.with_relay(p.relay as Arc<dyn harmonydb::Relay>),
                Some(relay),
            )
        }
        None => (db, None),
    };
    peer_loops.close();
    let out = run_engine(
        db,
        &args,
        file_specs,
        resolved,
        Wakeups {
            notify: notify.enabled(),
            relay: relay.as_ref(),
        },
        shutdown,
    )
    .await;
    // After the engine stopped, so that its last hints (released tasks) are still sent.
    peer_stop.cancel();
    let _ = tokio::time::timeout(
        harmony_peer::DRAIN_WAIT + Duration::from_secs(1),
        peer_loops.wait(),
    )
    .await;
    out
}

/// How the node's wake-ups travel: `notify` is off for `--notify off`; `relay` is the HTTP
/// peering of `--notify http`, whose endpoint the node's web server serves.
struct Wakeups<'a> {
    notify: bool,
    relay: Option<&'a Arc<harmony_peer::HttpRelay>>,
}

/// Starts the engine on `db` and runs it until it stops. When the node's config layers change
/// (and the merged result checks), the engine is drained and started again in this process
/// with the new settings and types: the process, its address and its web server stay.
async fn run_engine(
    db: harmonydb::Db,
    args: &RunArgs,
    file_specs: Vec<taskfile::TaskSpec>,
    mut resolved: Resolved,
    wakeups: Wakeups<'_>,
    shutdown: CancellationToken,
) -> anyhow::Result<u8> {
    let Wakeups { notify, relay } = wakeups;
    let mut watch = LayerWatch::new(db.clone(), args.layers.clone(), &resolved, notify).await;
    'engines: loop {
        let node = NodeSetup::new(args, notify, &file_specs, &resolved)?;
        let host = node.config.host_and_port.clone();
        let settings = format!(
            "poll_interval={:?} poll_interval_unhealthy={:?} heartbeat_interval={:?} dead_after={:?} reaper_interval={:?} shutdown_grace={:?} claim_batch_max={}",
            node.config.poll_interval,
            node.config.poll_interval_unhealthy,
            node.config.heartbeat_interval,
            node.config.dead_after,
            node.config.reaper_interval,
            node.config.shutdown_grace,
            node.config.claim_batch_max,
        );
        let tasks: Vec<Arc<dyn Task>> = catalog::build(&db, &node.specs, args.builtin)
            .into_iter()
            .filter(|t| {
                node.selected
                    .as_ref()
                    .is_none_or(|s| s.contains(&t.type_details().name))
            })
            .collect();
        let mut builder = Engine::builder(db.clone()).config(node.config);
        for t in tasks {
            builder = builder.register_arc(t);
        }
        let engine = builder.start().await.map_err(|e| match e {
            EngineError::AddressInUse { .. } => UsageError(format!("--listen: {e}")).into(),
            e => anyhow::Error::new(e).context(format!("starting node {host}")),
        })?;
        watch.machine = Some(engine.machine_id());
        // Measures this node's storage paths while this engine runs.
        let storage_stop = CancellationToken::new();
        let _storage_guard = storage_stop.clone().drop_guard();
        tokio::spawn(crate::commands::storage::refresh_loop(
            Admin::new(db.clone()),
            host.clone(),
            storage_stop,
        ));
        // The HTTP API on the address the node registered as. Bound once the registration has
        // succeeded, so that a second node given a live node's address gets the registration's
        // message (naming the live machine); a port that cannot be bound stops the node again.
        let web = match crate::commands::web::start(
            engine.db().clone(),
            Some(engine.clone()),
            &host,
            args.api_token.clone(),
            notify,
            relay,
        )
        .await
        {
            Ok(web) => web,
            Err(e) => {
                if let Err(stop) = engine.shutdown().await {
                    tracing::warn!(error = %stop, "stopping the node after the HTTP API failed to start");
                }
                return Err(e);
            }
        };
        if engine.task_types().is_empty() {
            tracing::warn!(
                "this node runs no task types: give it --tasks FILE, --layers with [[task]] entries (or --builtin for the test types)"
            );
        }
        tracing::info!(
            machine = %engine.machine_id(),
            host = %host,
            budget = %engine.budget(),
            types = %engine.task_types().join(","),
            layers = %resolved.titles.join(","),
            notify,
            // Flags, then environment, then layers, then defaults.
            settings = %settings,
            "node running; SIGINT or SIGTERM stops it gracefully"
        );

        let stopped = loop {
            let next = tokio::select! {
                r = engine.wait() => break r,
                () = shutdown.cancelled() => break engine.shutdown().await,
                next = watch.changed() => next,
            };
            // The whole node must check with the new layers (the --types selection too)
            // before the running engine is stopped for them.
            if let Err(e) = NodeSetup::new(args, notify, &file_specs, &next) {
                let shown = format!("{e:#}");
                tracing::warn!(error = %shown, "config layers changed but this node cannot run them; keeping what it runs");
                watch
                    .note(&format!("{} (not applied: {shown})", next.titles.join(",")))
                    .await;
                continue;
            }
            tracing::info!(
                layers = %next.titles.join(","),
                "config layers changed; draining the engine and starting it again with them"
            );
            let r = engine.shutdown().await;
            web.stop().await;
            if let Err(e) = r {
                return Err(anyhow::Error::new(e).context(format!("reconfiguring node {host}")));
            }
            resolved = next;
            continue 'engines;
        };
        web.stop().await;
        return match stopped {
            Ok(()) => {
                tracing::info!("node stopped");
                Ok(EXIT_OK)
            }
            Err(EngineError::Fenced(id)) => {
                errln!(
                    "error: node {host} (machine {id}) was declared dead by the cluster — it missed heartbeats for longer than dead-after — and stopped; its tasks run elsewhere, results it finished late were discarded"
                );
                Ok(EXIT_FENCED)
            }
            Err(EngineError::RestartRequested) => {
                tracing::info!("restart requested by an operator; drained, exiting with code 100");
                Ok(EXIT_RESTART)
            }
            Err(e) => Err(anyhow::Error::new(e).context(format!("running node {host}"))),
        };
    }
}

/// One engine's settings and types: the tasks file's types and the layers' (the file wins
/// on a name both declare), and the engine settings (flags > environment > layers > defaults).
struct NodeSetup {
    specs: Vec<taskfile::TaskSpec>,
    selected: Option<BTreeSet<String>>,
    config: EngineConfig,
}

impl NodeSetup {
    fn new(
        args: &RunArgs,
        notify: bool,
        file_specs: &[taskfile::TaskSpec],
        resolved: &Resolved,
    ) -> anyhow::Result<Self> {
        let mut specs = file_specs.to_vec();
        for s in &resolved.tasks {
            if specs.iter().any(|f| f.name() == s.name()) {
                tracing::warn!(
                    task_type = s.name(),
                    "declared in the tasks file and in a layer; the file's declaration is used"
                );
            } else {
                specs.push(s.clone());
            }
        }
        let known = catalog::known_names(&specs, args.builtin);
        let selected = selected_types(args.types.as_deref(), &known)?;
        let mut config = engine_config(args, notify, resolved)?;
        config.layers = resolved.titles.clone();
        // At shutdown the engine waits `cancel_wait` for cancelled attempts; a command must
        // get its whole kill grace in it, or it would be killed at exit before the SIGKILL was
        // due.
        let kill_grace_max = specs
            .iter()
            .filter(|s| matches!(s.kind, taskfile::TaskKind::Command(_)))
            .filter(|s| selected.as_ref().is_none_or(|sel| sel.contains(s.name())))
            .map(|s| s.kill_grace)
            .max();
        if let Some(grace) = kill_grace_max {
            config.cancel_wait = config.cancel_wait.max(grace + KILL_REAP_MARGIN);
        }
        Ok(NodeSetup {
            specs,
            selected,
            config,
        })
    }
}

/// Watches a node's layers: a notification on `CONFIG_CHANNEL` (Postgres) or the poll every
/// `LAYER_POLL` makes it re-read them. A new merged text that checks is returned; one that
/// does not is logged once and noted in the machine's details (`machine ls`), and the node
/// keeps what it runs.
struct LayerWatch {
    admin: Admin,
    named: Vec<String>,
    applied: String,
    refused: Option<String>,
    listener: Option<harmonydb::NotifyListener>,
    machine: Option<harmonytask::MachineId>,
}

impl LayerWatch {
    async fn new(db: harmonydb::Db, named: Vec<String>, applied: &Resolved, notify: bool) -> Self {
        // With --notify off nothing listens (backends without LISTEN); the poll suffices.
        let listener = if notify {
            match db.listen(&[harmonytask::CONFIG_CHANNEL]).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "no notifications for config layers; polling them");
                    None
                }
            }
        } else {
            None
        };
        LayerWatch {
            admin: Admin::new(db),
            named,
            applied: applied.text.clone(),
            refused: None,
            listener,
            machine: None,
        }
    }

    /// Waits for a change of the layers that checks.
    async fn changed(&mut self) -> Resolved {
        loop {
            match self.listener.as_mut() {
                Some(l) => {
                    tokio::select! {
                        n = l.recv() => if n.is_none() { self.listener = None },
                        () = tokio::time::sleep(LAYER_POLL) => {}
                    }
                }
                None => tokio::time::sleep(LAYER_POLL).await,
            }
            match crate::commands::config::read_resolved(&self.admin, &self.named).await {
                Ok(r) if r.text == self.applied => {
                    if self.refused.take().is_some() {
                        self.note(&r.titles.join(",")).await;
                    }
                }
                Ok(r) => {
                    self.applied = r.text.clone();
                    self.refused = None;
                    return r;
                }
                Err(e) => {
                    let shown = e.to_string();
                    if self.refused.as_deref() != Some(shown.as_str()) {
                        tracing::warn!(error = %shown, "config layers changed but do not check; keeping the settings and types the node runs");
                        let titles = layers::titles(&self.named, true).join(",");
                        self.note(&format!("{titles} (not applied: {shown})")).await;
                        self.refused = Some(shown);
                    }
                }
            }
        }
    }

    async fn note(&self, text: &str) {
        if let Some(m) = self.machine
            && let Err(e) = self.admin.machine_layers_set(m, text).await
        {
            tracing::debug!(error = %e, "could not note the layers in the machine details");
        }
    }
}

/// What a node needs before its engine starts.
struct Prepared {
    file_specs: Vec<taskfile::TaskSpec>,
    resolved: Resolved,
    db: harmonydb::Db,
    /// With `--notify http`.
    peers: Option<NodePeers>,
}

/// A node's HTTP peering, made before the engine starts; its endpoint is served by the
/// node's web server on `--listen`.
struct NodePeers {
    relay: Arc<harmony_peer::HttpRelay>,
    sender: harmony_peer::PeerSender,
}

/// Reads and checks the input, then opens (and migrates) the database and reads the layers.
async fn prepare(db_url: &str, args: &RunArgs, notify: &Peering) -> anyhow::Result<Prepared> {
    let specs = match args.tasks.clone() {
        // On a blocking thread, so that a read that hangs (a network file system) cannot keep
        // the start-up from seeing a signal.
        Some(path) => tokio::task::spawn_blocking(move || taskfile::load(&path)).await??,
        None => Vec::new(),
    };
    for l in &args.layers {
        layers::check_title(l).map_err(|e| UsageError(format!("--layers: {e}")))?;
    }
    // The flags are checked before the database is opened (the layers need it).
    engine_config(args, notify.enabled(), &Resolved::empty())?;
    let db = open_migrated(db_url).await?;
    let resolved = crate::commands::config::read_resolved(&Admin::new(db.clone()), &args.layers)
        .await
        .map_err(|e| UsageError(format!("--layers: {e}")))?;
    // The whole node is checked now, so that bad input stops it before it registers.
    NodeSetup::new(args, notify.enabled(), &specs, &resolved)?;
    let peers = match notify.node_config(&args.listen) {
        Some(peer_config) => {
            // The relay reads the peer list through a handle without itself.
            let (relay, sender) =
                harmony_peer::HttpRelay::new(peer_config, harmonytask::Admin::new(db.clone()));
            Some(NodePeers { relay, sender })
        }
        None => None,
    };
    Ok(Prepared {
        file_specs: specs,
        resolved,
        db,
        peers,
    })
}

/// The `--types` selection: every name must be one this node can run.
fn selected_types(
    types: Option<&[String]>,
    known: &[String],
) -> anyhow::Result<Option<BTreeSet<String>>> {
    let Some(types) = types else { return Ok(None) };
    let mut set = BTreeSet::new();
    for t in types.iter().map(|t| t.trim()) {
        check_type_name("--types", t)?;
        if !known.iter().any(|k| k == t) {
            return Err(UsageError(format!(
                "--types: unknown task type {t:?}; this node can run: {} (add types with --tasks FILE; the built-ins {} need --builtin)",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                },
                harmony_bench::builtin::BUILTIN_TYPES.join(", ")
            ))
            .into());
        }
        set.insert(t.to_owned());
    }
    Ok(Some(set))
}

/// The engine settings: flags, then the environment and layers (`resolved`), then defaults;
/// detection only fills the budget components none of them give.
fn engine_config(
    args: &RunArgs,
    notify: bool,
    resolved: &Resolved,
) -> anyhow::Result<EngineConfig> {
    check_listen(&args.listen)?;
    let values: std::collections::BTreeMap<&'static str, layers::EngineValue> =
        resolved.engine.iter().map(|(k, (v, _))| (*k, *v)).collect();
    let (l_cpu, l_ram, l_gpu) = layers::budget_parts(&values);
    let cpu = args.cpu.or(l_cpu);
    let ram = args.ram.map(|r| r.0).or(l_ram);
    let gpu = args.gpu.or(l_gpu);
    let budget = match (cpu, ram, gpu) {
        (Some(cpu), Some(ram), Some(gpu)) => Resources::new(cpu, ram, gpu),
        (cpu, ram, gpu) => {
            let detected = harmonytask::resources::detect();
            Resources::new(
                cpu.unwrap_or(detected.cpu),
                ram.unwrap_or(detected.ram),
                gpu.unwrap_or(detected.gpu),
            )
        }
    };
    let mut config = EngineConfig {
        host_and_port: args.listen.clone(),
        machine_name: args.name.clone().unwrap_or_default(),
        budget: Some(budget),
        notify,
        ..EngineConfig::default()
    };
    layers::apply_engine(&mut config, &values);
    if let Some(d) = args.poll_interval {
        config.poll_interval = d;
    }
    if let Some(d) = args.poll_interval_unhealthy {
        config.poll_interval_unhealthy = d;
    }
    if let Some(d) = args.change_check_interval {
        config.change_check_interval = d;
    }
    if let Some(d) = args.iambored_interval {
        config.iambored_interval = d;
    }
    if let Some(d) = args.heartbeat_interval {
        config.heartbeat_interval = d;
    }
    if let Some(d) = args.dead_after {
        config.dead_after = d;
    }
    if let Some(d) = args.reaper_interval {
        config.reaper_interval = d;
    }
    if let Some(d) = args.shutdown_grace {
        config.shutdown_grace = d;
    }
    if let Some(keep) = args.history_keep {
        config.history_keep = keep.0;
    }
    if args.history_keep_per_type.is_some() {
        config.history_keep_per_type = args.history_keep_per_type;
    }
    if let Some(d) = args.prune_interval {
        config.prune_interval = d;
    }
    config.validate().map_err(config_usage_error)?;
    Ok(config)
}

/// A usage error naming the flag behind the `EngineConfig` field that is out of range.
fn config_usage_error(e: harmonytask::ConfigError) -> UsageError {
    // The budget is checked by the engine's rules only; the flag is the amount's.
    if let Some(cost) = &e.cost {
        let flag = match cost.resource {
            Resource::Cpu => "--cpu",
            Resource::Ram => "--ram",
            Resource::Gpu => "--gpu",
            _ => return UsageError(format!("budget: {cost}")),
        };
        return UsageError(format!("{flag}: {}", cost.problem));
    }
    let flag = match e.field {
        "dead_after" => "dead-after",
        "heartbeat_interval" => "heartbeat-interval",
        "poll_interval" => "poll-interval",
        "poll_interval_unhealthy" => "poll-interval-unhealthy",
        "change_check_interval" => "change-check-interval",
        "iambored_interval" => "iambored-interval",
        "reaper_interval" => "reaper-interval",
        "host_and_port" => "listen",
        "history_keep" => "history-keep",
        "history_keep_per_type" => "history-keep-per-type",
        "prune_interval" => "prune-interval",
        _ => "the run flags",
    };
    UsageError(format!("{e} (set with --{flag})"))
}

/// Checks a HOST:PORT address (`--listen`).
pub fn check_listen(listen: &str) -> anyhow::Result<()> {
    let ok = listen.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.chars().any(char::is_whitespace)
            && port.parse::<u16>().is_ok_and(|p| p > 0)
    });
    if ok && listen.len() <= 300 {
        Ok(())
    } else {
        Err(UsageError(format!(
            "--listen: {listen:?} is not HOST:PORT (for example 127.0.0.1:4701)"
        ))
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert!(check_listen("127.0.0.1:4701").is_ok());
        assert!(check_listen("[::1]:4701").is_ok());
        assert!(check_listen("node-a.example:80").is_ok());
        assert!(check_listen("4701").is_err());
        assert!(check_listen("host:0").is_err());
        assert!(check_listen(":4701").is_err());
        assert!(check_listen("a b:1").is_err());
    }

    #[test]
    fn types_must_be_known() {
        let known = vec!["bench_noop".to_owned(), "mine".to_owned()];
        let s = selected_types(Some(&["mine".to_owned()]), &known)
            .unwrap()
            .unwrap();
        assert!(s.contains("mine"));
        let e = selected_types(Some(&["other".to_owned()]), &known).unwrap_err();
        assert!(e.to_string().contains("bench_noop, mine"), "{e}");
        assert!(selected_types(Some(&["x;y".to_owned()]), &known).is_err());
        assert!(selected_types(None, &known).unwrap().is_none());
    }
}
