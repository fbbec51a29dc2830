//! Database metrics, kept per [`Db`](crate::Db) handle (no global registry).
//!
//! The web crate renders them: call [`DbMetrics::register`] with its Prometheus registry.
//! Every series carries a `backend` label (`sqlite` or `postgres`).

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorKind;

type KindLabel = [(&'static str, &'static str); 1];

/// Counters and histograms of one database handle. Cheap to clone (shared).
#[derive(Clone)]
pub struct DbMetrics {
    backend: &'static str,
    queries: Counter,
    errors: Family<KindLabel, Counter>,
    latency: Histogram,
    tx_retries: Counter,
    transactions: Counter,
    open_connections: Gauge<i64, AtomicI64>,
    host_index: Gauge<i64, AtomicI64>,
    failovers: Counter<u64, AtomicU64>,
}

impl DbMetrics {
    pub(crate) fn new(backend: &'static str) -> Self {
        DbMetrics {
            backend,
            queries: Counter::default(),
            errors: Family::default(),
            // 50 µs … ~6.5 s
            latency: Histogram::new(exponential_buckets(0.000_05, 2.5, 14)),
            tx_retries: Counter::default(),
            transactions: Counter::default(),
            open_connections: Gauge::default(),
            host_index: Gauge::default(),
            failovers: Counter::default(),
        }
    }

    /// Adds these metrics to `registry` under the `harmonydb_` prefix with a `backend` label.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry
            .sub_registry_with_prefix("harmonydb")
            .sub_registry_with_label(("backend".into(), self.backend.into()));
        sub.register("queries", "Statements executed", self.queries.clone());
        sub.register(
            "query_errors",
            "Statements that failed, by error kind",
            self.errors.clone(),
        );
        sub.register(
            "query_duration_seconds",
            "Statement latency, from submission to result",
            self.latency.clone(),
        );
        sub.register(
            "transactions",
            "Transactions started",
            self.transactions.clone(),
        );
        sub.register(
            "transaction_retries",
            "Transactions re-run after a serialization failure or busy database",
            self.tx_retries.clone(),
        );
        sub.register(
            "open_connections",
            "Open database connections",
            self.open_connections.clone(),
        );
        sub.register(
            "host_index",
            "Index, in the configured host list, of the host new connections go to",
            self.host_index.clone(),
        );
        sub.register(
            "failovers",
            "Times new connections moved to a different host",
            self.failovers.clone(),
        );
    }

    pub(crate) fn observe(&self, elapsed: Duration, error: Option<ErrorKind>) {
        self.queries.inc();
        self.latency.observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.errors
                .get_or_create(&[("kind", kind_label(kind))])
                .inc();
        }
    }

    pub(crate) fn transaction_started(&self) {
        self.transactions.inc();
    }

    pub(crate) fn retried(&self) {
        self.tx_retries.inc();
    }

    pub(crate) fn connection_opened(&self) {
        self.open_connections.inc();
    }

    pub(crate) fn connection_closed(&self) {
        self.open_connections.dec();
    }

    pub(crate) fn set_host_index(&self, index: usize) {
        self.host_index
            .set(i64::try_from(index).unwrap_or(i64::MAX));
    }

    pub(crate) fn failed_over(&self) {
        self.failovers.inc();
    }

    /// Statements executed so far.
    pub fn queries(&self) -> u64 {
        self.queries.get()
    }

    /// Transactions re-run so far.
    pub fn retries(&self) -> u64 {
        self.tx_retries.get()
    }

    /// Host switches so far.
    pub fn failovers(&self) -> u64 {
        self.failovers.get()
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> i64 {
        self.open_connections.get()
    }
}

fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::UniqueViolation => "unique_violation",
        ErrorKind::ForeignKey => "foreign_key",
        ErrorKind::Constraint => "constraint",
        ErrorKind::Serialization => "serialization",
        ErrorKind::NotFound => "not_found",
        ErrorKind::Connection => "connection",
        ErrorKind::Authentication => "authentication",
        ErrorKind::Refused => "refused",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Config => "config",
        ErrorKind::Migration => "migration",
        ErrorKind::Decode => "decode",
        ErrorKind::Misuse => "misuse",
        ErrorKind::External => "external",
        ErrorKind::Other => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_backend_label() {
        let m = DbMetrics::new("sqlite");
        m.observe(Duration::from_millis(2), None);
        m.observe(Duration::from_millis(2), Some(ErrorKind::UniqueViolation));
        let mut reg = Registry::default();
        m.register(&mut reg);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        assert!(
            out.contains("harmonydb_queries_total{backend=\"sqlite\"} 2"),
            "{out}"
        );
        assert!(
            out.contains(
                "harmonydb_query_errors_total{kind=\"unique_violation\",backend=\"sqlite\"} 1"
            ) || out.contains(
                "harmonydb_query_errors_total{backend=\"sqlite\",kind=\"unique_violation\"} 1"
            ),
            "{out}"
        );
    }
}
