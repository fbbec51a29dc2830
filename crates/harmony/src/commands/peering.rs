//! `--notify http` for the commands: the cluster secret, the HTTP relay of one-shot commands
//! (`task add`, `task cancel`, `task run-now`, `machine cordon`, …) and the small server a
//! node starts for the peering routes.
//!
//! A one-shot command's hints go to the live nodes' `host_and_port` like a node's do: the
//! command's handle gets an [`HttpRelay`], its sender loop runs while the command does, and
//! [`Peering::finish`] sends what is still queued before the process exits (bounded by
//! `harmony_peer::DRAIN_WAIT`).

use std::sync::{Arc, Mutex};

use harmony_peer::{ClusterSecret, HttpRelay, PeerConfig, PeerState};
use harmonydb::Db;
use harmonytask::Admin;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::NotifyMode;
use crate::commands::UsageError;

/// How this process sends and receives hints (`--notify`, `--cluster-secret`).
pub struct Peering {
    mode: NotifyMode,
    secret: Option<ClusterSecret>,
    started: Mutex<Option<OneShot>>,
}

/// A one-shot command's relay and its sender loop.
struct OneShot {
    relay: Arc<HttpRelay>,
    stop: CancellationToken,
    sender: JoinHandle<()>,
}

impl Peering {
    /// Checks the flags: `http` needs a secret of at least `SECRET_BYTES_MIN` bytes. The
    /// secret is never printed, the error only says how long it is.
    pub fn new(mode: NotifyMode, secret: Option<&str>) -> anyhow::Result<Peering> {
        let secret = match (mode, secret) {
            (NotifyMode::Http, None) => {
                return Err(UsageError(format!(
                    "--notify http needs --cluster-secret (or HARMONY_CLUSTER_SECRET): the secret all nodes share, at least {} bytes",
                    harmony_peer::SECRET_BYTES_MIN
                ))
                .into());
            }
            (NotifyMode::Http, Some(s)) => Some(
                ClusterSecret::new(s.as_bytes())
                    .map_err(|e| UsageError(format!("--cluster-secret: {e}")))?,
            ),
            _ => None,
        };
        Ok(Peering {
            mode,
            secret,
            started: Mutex::new(None),
        })
    }

    /// Whether hints are sent at all (`on` or `http`).
    pub fn enabled(&self) -> bool {
        self.mode != NotifyMode::Off
    }

    /// The node's peering settings with `--notify http`, for `host_and_port`.
    pub fn node_config(&self, host_and_port: &str) -> Option<PeerConfig> {
        self.secret
            .clone()
            .map(|s| PeerConfig::new(s, host_and_port))
    }

    /// For a one-shot command: `db` with the HTTP relay when `--notify http`, else `db`. The
    /// relay and its sender start on the first call.
    pub fn attach(&self, db: Db) -> Db {
        let Some(secret) = &self.secret else {
            return db;
        };
        let mut started = self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let one = started.get_or_insert_with(|| {
            // No address: a command sends to every live node.
            let (relay, sender) =
                HttpRelay::new(PeerConfig::new(secret.clone(), ""), Admin::new(db.clone()));
            let stop = CancellationToken::new();
            let sender = tokio::spawn(sender.run(stop.clone()));
            OneShot {
                relay,
                stop,
                sender,
            }
        });
        db.with_relay(Arc::clone(&one.relay) as Arc<dyn harmonydb::Relay>)
    }

    /// Sends what a one-shot command queued, then stops its sender (bounded).
    pub async fn finish(&self) {
        let one = self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(one) = one {
            one.stop.cancel();
            let _ = one.sender.await;
        }
    }
}

/// The peering routes for a node's relay: the one call a web server needs to mount them.
pub fn peer_routes(relay: &Arc<HttpRelay>) -> axum::Router {
    harmony_peer::router(PeerState::new(relay))
}
