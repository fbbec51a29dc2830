//! Prometheus series of peering: hints received (accepted, refused by reason) and sent.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::signature::Refusal;

type ReasonLabel = [(&'static str, &'static str); 1];

/// The peering counters. Cheap to clone; clones share the counts.
#[derive(Clone, Debug, Default)]
pub struct PeerMetrics {
    accepted: Counter,
    refused: Family<ReasonLabel, Counter>,
    sent: Counter,
    send_failed: Counter,
    dropped: Counter,
}

impl PeerMetrics {
    /// Zeroed counters, every refusal reason present.
    pub fn new() -> Self {
        let m = PeerMetrics::default();
        for r in Refusal::ALL {
            let _ = m.refused.get_or_create(&[("reason", r.as_str())]);
        }
        m
    }

    /// Adds the series to `registry` under `harmony_peer_…`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("harmony_peer");
        r.register(
            "hint_requests_accepted",
            "Hint requests from peers that were verified and delivered",
            self.accepted.clone(),
        );
        r.register(
            "hint_requests_refused",
            "Hint requests from peers that were refused, by reason",
            self.refused.clone(),
        );
        r.register(
            "hint_requests_sent",
            "Hint requests sent to a peer and answered with success",
            self.sent.clone(),
        );
        r.register(
            "hint_requests_send_failed",
            "Hint requests to a peer that failed or timed out (the peer polls instead)",
            self.send_failed.clone(),
        );
        r.register(
            "hints_dropped",
            "Hints not sent because the outgoing queue was full",
            self.dropped.clone(),
        );
    }

    pub(crate) fn accepted(&self) {
        self.accepted.inc();
    }

    pub(crate) fn refused(&self, reason: Refusal) {
        self.refused
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    pub(crate) fn sent(&self) {
        self.sent.inc();
    }

    pub(crate) fn send_failed(&self) {
        self.send_failed.inc();
    }

    pub(crate) fn dropped(&self) {
        self.dropped.inc();
    }

    /// Accepted requests so far.
    pub fn accepted_count(&self) -> u64 {
        self.accepted.get()
    }

    /// Refused requests so far, for one reason.
    pub fn refused_count(&self, reason: Refusal) -> u64 {
        self.refused
            .get_or_create(&[("reason", reason.as_str())])
            .get()
    }

    /// Requests sent with success so far.
    pub fn sent_count(&self) -> u64 {
        self.sent.get()
    }

    /// Requests that failed so far.
    pub fn send_failed_count(&self) -> u64 {
        self.send_failed.get()
    }
}
