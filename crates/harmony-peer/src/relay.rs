//! The sending side: [`HttpRelay`] (the `harmonydb::Relay` a node's handle publishes to) and
//! [`PeerSender`], the loop that posts queued hints to every live peer.
//!
//! `publish` runs right after a commit, so it only queues: it hands each hint to this
//! process's own listeners (as `NOTIFY` would) and puts it on a bounded queue
//! ([`QUEUE_MAX`]; a full queue drops and counts). The sender loop takes what is queued, up to
//! [`HINTS_PER_REQUEST_MAX`] hints, signs one body, and posts it to each peer on its own task,
//! with at most [`SENDS_IN_FLIGHT_MAX`] requests in flight and each bounded by
//! `PeerConfig::send_timeout`. So a slow or dead peer delays no other peer and never the
//! committing caller. The peers are the machines of `harmony_machines` heard from recently,
//! re-read every `PeerConfig::refresh_interval` through [`Admin::machine_addresses`], less
//! this node's own address. A failed request is logged and counted, nothing more: a peer that
//! missed a hint finds the work at its next poll.
//!
//! At shutdown the loop sends what is still queued (a stopping node's release hints), then
//! waits at most [`DRAIN_WAIT`] for the requests in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use harmonydb::{Inbound, Notification, Relay};
use harmonytask::Admin;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::PeerMetrics;
use crate::server::HINTS_PATH;
use crate::signature::{ClusterSecret, SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// Hints queued for sending before new ones are dropped.
pub const QUEUE_MAX: usize = 4096;
/// Hints in one request, at most.
pub const HINTS_PER_REQUEST_MAX: usize = 256;
/// Requests in flight to all peers together, at most.
pub const SENDS_IN_FLIGHT_MAX: usize = 64;
/// Peers read from the machine table, at most.
pub const PEERS_MAX: usize = 1024;
/// How long shutdown waits for requests in flight.
pub const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// Failed requests are warned about at most this often; every one is counted.
const WARN_INTERVAL_MS: i64 = 60_000;

/// How a node sends and checks hints.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The shared cluster secret.
    pub secret: ClusterSecret,
    /// This node's `host_and_port`, which is skipped; empty for a one-shot command, which has
    /// no address and sends to every node.
    pub host_and_port: String,
    /// How often the peer list is re-read.
    pub refresh_interval: Duration,
    /// Only machines heard from within this are peers.
    pub alive_within: Duration,
    /// Each request's time limit.
    pub send_timeout: Duration,
}

impl PeerConfig {
    /// The defaults for `secret` and this node's address: refresh every 2 s, peers heard from
    /// within 30 s, 1 s per request.
    pub fn new(secret: ClusterSecret, host_and_port: impl Into<String>) -> Self {
        PeerConfig {
            secret,
            host_and_port: host_and_port.into(),
            refresh_interval: Duration::from_secs(2),
            alive_within: Duration::from_secs(30),
            send_timeout: Duration::from_secs(1),
        }
    }
}

/// One request's body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HintBody {
    /// The sender's address (for logs; the hints name their sending machine themselves).
    pub from: String,
    /// Random, so that two requests with the same hints have different signatures.
    pub nonce: u64,
    pub hints: Vec<WireHint>,
}

/// One notification on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireHint {
    pub channel: String,
    pub payload: String,
}

/// The relay a node's `Db` publishes to (`Db::with_relay`), and whose inbound side the HTTP
/// router feeds.
pub struct HttpRelay {
    inbound: Inbound,
    queue: mpsc::Sender<Notification>,
    secret: ClusterSecret,
    metrics: PeerMetrics,
}

impl std::fmt::Debug for HttpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpRelay")
            .field("inbound", &self.inbound)
            .finish_non_exhaustive()
    }
}

impl HttpRelay {
    /// A relay and the loop that sends what it queues. `admin` reads the peers; give it a
    /// handle without this relay.
    pub fn new(config: PeerConfig, admin: Admin) -> (Arc<HttpRelay>, PeerSender) {
        let (queue, rx) = mpsc::channel(QUEUE_MAX);
        let metrics = PeerMetrics::new();
        let relay = Arc::new(HttpRelay {
            inbound: Inbound::new(),
            queue,
            secret: config.secret.clone(),
            metrics: metrics.clone(),
        });
        let client = Client::builder(TokioExecutor::new()).build_http();
        let sender = PeerSender {
            rx,
            admin,
            config,
            client,
            metrics,
            permits: Arc::new(Semaphore::new(SENDS_IN_FLIGHT_MAX)),
            tracker: TaskTracker::new(),
            warned_ms: Arc::new(AtomicI64::new(i64::MIN)),
        };
        (relay, sender)
    }

    /// The counters, for `/metrics`.
    pub fn metrics(&self) -> &PeerMetrics {
        &self.metrics
    }

    pub(crate) fn secret(&self) -> &ClusterSecret {
        &self.secret
    }
}

impl Relay for HttpRelay {
    fn publish(&self, notifications: Vec<Notification>) {
        for n in notifications {
            self.inbound.deliver(&n.channel, &n.payload);
            if self.queue.try_send(n).is_err() {
                self.metrics.dropped();
            }
        }
    }

    fn inbound(&self) -> &Inbound {
        &self.inbound
    }
}

/// Sends queued hints to the peers (see the module doc).
pub struct PeerSender {
    rx: mpsc::Receiver<Notification>,
    admin: Admin,
    config: PeerConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    metrics: PeerMetrics,
    permits: Arc<Semaphore>,
    tracker: TaskTracker,
    /// When a failure was last logged as a warning (Unix ms).
    warned_ms: Arc<AtomicI64>,
}

impl std::fmt::Debug for PeerSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSender")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PeerSender {
    /// Sends until `shutdown`, then sends what is still queued and waits (bounded) for it.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut peers = self.refresh(Vec::new()).await;
        let mut tick = tokio::time::interval(self.config.refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                _ = tick.tick() => peers = self.refresh(peers).await,
                n = self.rx.recv() => match n {
                    Some(first) => {
                        let batch = self.batch(first);
                        self.send(batch, &peers).await;
                    }
                    None => break,
                },
            }
        }
        while let Ok(first) = self.rx.try_recv() {
            let batch = self.batch(first);
            self.send(batch, &peers).await;
        }
        self.tracker.close();
        if tokio::time::timeout(DRAIN_WAIT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::debug!("hint requests still in flight at shutdown were abandoned");
        }
    }

    /// `first` and whatever else is queued, up to a request's worth.
    fn batch(&mut self, first: Notification) -> Vec<Notification> {
        let mut batch = vec![first];
        while batch.len() < HINTS_PER_REQUEST_MAX {
            match self.rx.try_recv() {
                Ok(n) => batch.push(n),
                Err(_) => break,
            }
        }
        batch
    }

    /// The peers now; the previous list when the read fails.
    async fn refresh(&self, previous: Vec<String>) -> Vec<String> {
        match self
            .admin
            .machine_addresses(self.config.alive_within, PEERS_MAX)
            .await
        {
            Ok(rows) => {
                let peers: Vec<String> = rows
                    .into_iter()
                    .map(|(_, addr)| addr)
                    .filter(|a| *a != self.config.host_and_port)
                    .collect();
                if peers != previous {
                    tracing::info!(peers = peers.len(), "hint peer list changed");
                }
                peers
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the peer list; keeping the last one");
                previous
            }
        }
    }

    async fn send(&self, batch: Vec<Notification>, peers: &[String]) {
        if peers.is_empty() {
            return;
        }
        let body = HintBody {
            from: self.config.host_and_port.clone(),
            nonce: fastrand::u64(..),
            hints: batch
                .into_iter()
                .map(|n| WireHint {
                    channel: n.channel,
                    payload: n.payload,
                })
                .collect(),
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::debug!(error = %e, "cannot encode hints");
                return;
            }
        };
        let timestamp = now_millis().to_string();
        let signature = self.config.secret.sign(&timestamp, &body);
        for peer in peers {
            let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
                return;
            };
            let request = hyper::Request::post(format!("http://{peer}{HINTS_PATH}"))
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(TIMESTAMP_HEADER, &timestamp)
                .header(SIGNATURE_HEADER, &signature)
                .body(Full::new(body.clone()));
            let request = match request {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(peer = %peer, error = %e, "cannot build a hint request");
                    self.metrics.send_failed();
                    continue;
                }
            };
            let client = self.client.clone();
            let metrics = self.metrics.clone();
            let limit = self.config.send_timeout;
            let peer = peer.clone();
            let warned_ms = Arc::clone(&self.warned_ms);
            self.tracker.spawn(async move {
                let _permit = permit;
                let sent = tokio::time::timeout(limit, async {
                    let response = client.request(request).await.map_err(|e| e.to_string())?;
                    let status = response.status();
                    // Read the (small) answer so that the connection can be reused.
                    let _ = response.into_body().collect().await;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(format!("answered {status}"))
                    }
                })
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
                match sent {
                    Ok(()) => metrics.sent(),
                    Err(e) => {
                        metrics.send_failed();
                        let now = now_millis();
                        let last = warned_ms.load(Ordering::Relaxed);
                        if now.saturating_sub(last) >= WARN_INTERVAL_MS
                            && warned_ms
                                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                                .is_ok()
                        {
                            tracing::warn!(peer = %peer, error = %e, "hint request to a peer failed; it finds the work by polling (warned once a minute, every failure is counted)");
                        } else {
                            tracing::debug!(peer = %peer, error = %e, "hint request failed; the peer finds the work by polling");
                        }
                    }
                }
            });
        }
    }
}

/// The wall clock in Unix milliseconds (request timestamps compare clocks across nodes).
pub(crate) fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
