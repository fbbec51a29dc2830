//! Writes why this node does not start waiting work, for `harmony task why`, the API and the
//! dashboard.
//!
//! Once a second the loop asks the scheduler for its status and writes, for every type with
//! waiting tasks that the scheduler is not starting, the reason it holds (`Blocked`) into
//! `harmony_task_blocked` — only what changed since the last write, in one transaction, so an
//! idle or healthy node writes nothing. A type that runs again has its row deleted; all rows of
//! the node go with its machine row (shutdown or reaping).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::metrics::EngineMetrics;
use crate::model::MachineId;
use crate::scheduler::inbox::{Inbox, Msg};
use crate::status::EngineStatus;
use crate::store::{BlockedChange, Store};

/// How often the reasons are compared and, when changed, written.
pub(crate) const BLOCKED_REFRESH: Duration = Duration::from_secs(1);

/// Reason kind and text per type, as last written.
type Reasons = BTreeMap<String, (String, String)>;

/// The loop, with only what it uses.
pub(crate) struct BlockedReporter {
    pub store: Store,
    pub machine: MachineId,
    pub inbox: Arc<Inbox>,
    pub clock: Arc<dyn Clock>,
    /// Its `tasks_blocked` gauges follow the same reasons.
    pub metrics: EngineMetrics,
}

impl BlockedReporter {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        let mut written = Reasons::new();
        let mut tick = tokio::time::interval(BLOCKED_REFRESH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (tx, rx) = oneshot::channel();
            if self.inbox.send_now(Msg::Status(tx)).await.is_err() {
                return;
            }
            let Ok(status) = rx.await else { return };
            let now = reasons(&status);
            self.gauges(&status, &written, &now);
            let changes = changes(&written, &now);
            if changes.is_empty() {
                continue;
            }
            match self
                .store
                .blocked_write(self.machine, &changes, self.clock.now())
                .await
            {
                Ok(()) => written = now,
                Err(e) => tracing::debug!(error = %e, "writing blocked reasons failed; will retry"),
            }
        }
    }
}

impl BlockedReporter {
    /// Moves the `tasks_blocked` gauges from the reasons `old` to `new`.
    fn gauges(&self, status: &EngineStatus, old: &Reasons, new: &Reasons) {
        for (name, (kind, _)) in old {
            if new.get(name).is_none_or(|(k, _)| k != kind) {
                self.metrics.clear_blocked(name, kind);
            }
        }
        for t in &status.types {
            if let Some((kind, _)) = new.get(&t.name) {
                let waiting = i64::try_from(t.waiting_known).unwrap_or(i64::MAX);
                self.metrics.set_blocked(&t.name, kind, waiting);
            }
        }
    }
}

/// The reasons a status gives, for the types with waiting tasks.
fn reasons(status: &EngineStatus) -> Reasons {
    status
        .types
        .iter()
        .filter(|t| t.waiting_known > 0 || t.more_waiting)
        .filter_map(|t| {
            let b = t.blocked.as_ref()?;
            Some((t.name.clone(), (b.kind().to_owned(), b.to_string())))
        })
        .collect()
}

/// What to write to go from `old` to `new`.
fn changes(old: &Reasons, new: &Reasons) -> Vec<BlockedChange> {
    let mut out: Vec<BlockedChange> = new
        .iter()
        .filter(|(name, r)| old.get(*name) != Some(r))
        .map(|(name, r)| (name.clone(), Some(r.clone())))
        .collect();
    out.extend(
        old.keys()
            .filter(|name| !new.contains_key(*name))
            .map(|name| (name.clone(), None)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(entries: &[(&str, &str, &str)]) -> Reasons {
        entries
            .iter()
            .map(|(n, k, d)| (n.to_string(), (k.to_string(), d.to_string())))
            .collect()
    }

    #[test]
    fn only_what_changed_is_written() {
        let old = r(&[
            ("a", "at_max", "at max (2 running)"),
            ("b", "cordoned", "x"),
        ]);
        assert!(changes(&old, &old).is_empty());
        let new = r(&[("a", "at_max", "at max (3 running)"), ("c", "refused", "y")]);
        let mut got = changes(&old, &new);
        got.sort();
        assert_eq!(
            got,
            vec![
                (
                    "a".to_owned(),
                    Some(("at_max".to_owned(), "at max (3 running)".to_owned()))
                ),
                ("b".to_owned(), None),
                ("c".to_owned(), Some(("refused".to_owned(), "y".to_owned()))),
            ]
        );
    }
}
