//! History retention: `harmony_task_history` and the `harmony_task_args` of finished tasks
//! are deleted once they are older than the retention setting (and, per type, beyond the
//! newest N rows), so that they do not grow forever.
//!
//! One node at a time prunes: a prune round first takes the `history_prune` lease
//! (`harmony_lease`, a row with an expiry on the database clock — not an advisory lock, which
//! YugabyteDB and CockroachDB lack) and renews it before every batch; a node that cannot take
//! it skips the round, one that loses it stops. Each batch deletes at most `prune_batch_max`
//! history rows in its own short transaction, so claims and records are never held up by more
//! than one batch, whatever the size of the backlog; after each batch the round rests as long
//! as the batch took, leaving the database at least half its time for them. A round walks the
//! primary key in ranges of `prune_batch_max` ids, from the oldest row up to the newest row
//! older than the cutoff (rows recorded out of order past that bound are left to the next
//! round). Nothing of a task still pending or running is deleted: its history stays, and so do
//! its arguments.
//!
//! The loop ([`Pruner`]) wakes every `prune_interval`; `harmony task prune` runs one round
//! through [`prune`] with the same lease.

use std::sync::Arc;
use std::time::{Duration, Instant};

use harmonydb::Timestamp;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::error::Result;
use crate::model::PruneCounts;
use crate::store::Store;

/// The lease that lets one node at a time prune.
pub const PRUNE_LEASE: &str = "history_prune";

/// How long a prune lease lasts without renewal; renewed before every batch, so a node that
/// dies mid-round frees it this long after its last batch.
pub const PRUNE_LEASE_TTL: Duration = Duration::from_secs(60);

/// How long a prune rests after each batch, as a multiple of the time the batch took.
pub const PRUNE_REST_PER_BATCH: f64 = 1.0;

/// What to delete.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneRule {
    /// Delete rows that ended longer ago than this.
    pub older_than: Option<Duration>,
    /// Of each type, delete all but the newest this many rows (≥ 1).
    pub keep_per_type: Option<u64>,
    /// Only this type (both rules); `None`: every type.
    pub name: Option<String>,
}

/// What a prune round did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PruneReport {
    /// Rows deleted.
    pub deleted: PruneCounts,
    /// Batches (transactions) run.
    pub batches: u64,
    /// The longest batch, in milliseconds.
    pub longest_batch_ms: f64,
    /// Whether the round stopped before it was done (shutdown, or the lease was lost).
    pub interrupted: bool,
}

/// How a prune round ended.
#[derive(Debug, Clone, PartialEq)]
pub enum PruneOutcome {
    /// The round ran (perhaps interrupted; see the report).
    Ran(PruneReport),
    /// Another holder has the lease: nothing was deleted.
    Busy {
        /// Who holds it.
        holder: String,
    },
}

/// One prune round: takes the lease as `holder`, deletes in batches of at most `batch_max`
/// history rows, and gives the lease back. `now` is the time the ages are counted from (the
/// engine's clock, which wrote `work_end`). Stops between batches when `stop` fires. Public
/// through [`crate::Admin::prune_history`].
pub(crate) async fn prune(
    store: &Store,
    holder: &str,
    rule: &PruneRule,
    now: Timestamp,
    batch_max: usize,
    stop: &CancellationToken,
) -> Result<PruneOutcome> {
    if !store
        .lease_acquire(PRUNE_LEASE, holder, PRUNE_LEASE_TTL)
        .await?
    {
        let holder = store
            .lease_holder(PRUNE_LEASE)
            .await?
            // It expired between the two reads; the next round will take it.
            .unwrap_or_else(|| "another holder, just now".to_owned());
        return Ok(PruneOutcome::Busy { holder });
    }
    let result = prune_held(store, holder, rule, now, batch_max.max(1), stop).await;
    // Handing it back lets the next round (any node's) start at once instead of after the
    // TTL; if this fails, the lease simply expires.
    if let Err(e) = store.lease_release(PRUNE_LEASE, holder).await {
        tracing::debug!(error = %e, "could not release the prune lease; it will expire");
    }
    result.map(PruneOutcome::Ran)
}

async fn prune_held(
    store: &Store,
    holder: &str,
    rule: &PruneRule,
    now: Timestamp,
    batch_max: usize,
    stop: &CancellationToken,
) -> Result<PruneReport> {
    let mut report = PruneReport::default();
    // Each step: (cutoff, type). Age first, over every type at once.
    let mut steps: Vec<(Timestamp, Option<String>)> = Vec::new();
    if let Some(age) = rule.older_than {
        steps.push((cutoff(now, age), rule.name.clone()));
    }
    if let Some(keep) = rule.keep_per_type {
        let names = match &rule.name {
            Some(n) => vec![n.clone()],
            None => store.history_type_names().await?,
        };
        for name in names {
            if let Some(end) = store.history_nth_newest_end(&name, keep.max(1)).await? {
                steps.push((end, Some(name)));
            }
        }
    }
    let span = i64::try_from(batch_max).unwrap_or(i64::MAX);
    for (cutoff, name) in steps {
        let Some(bound) = store.history_prune_bound(cutoff, name.as_deref()).await? else {
            continue;
        };
        let Some(mut after) = store.history_prune_start(name.as_deref()).await? else {
            continue;
        };
        while after < bound {
            if stop.is_cancelled() {
                report.interrupted = true;
                return Ok(report);
            }
            // Renewed before every batch: a holder that lost it (paused past the TTL, another
            // node took over) stops rather than prune alongside the new holder.
            if report.batches > 0
                && !store
                    .lease_acquire(PRUNE_LEASE, holder, PRUNE_LEASE_TTL)
                    .await?
            {
                tracing::warn!("lost the prune lease to another node; stopping this round");
                report.interrupted = true;
                return Ok(report);
            }
            let upto = after.saturating_add(span).min(bound);
            let started = Instant::now();
            let deleted = store
                .history_prune_batch(cutoff, name.as_deref(), after, upto)
                .await?;
            let took = started.elapsed();
            report.batches += 1;
            report.longest_batch_ms = report.longest_batch_ms.max(took.as_secs_f64() * 1000.0);
            report.deleted += deleted;
            after = upto;
            // Rest as long as the batch took, so that a prune has at most about half of the
            // database's time (on SQLite, of its one writer): back to back, batches left
            // claims and records an eighth of their rate there (docs/benchmarks.md, prune).
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(took.mul_f64(PRUNE_REST_PER_BATCH)) => {}
            }
        }
    }
    Ok(report)
}

/// What [`prune`] would delete under the age rule (a dry run; per-type counts are not
/// estimated). Public through [`crate::Admin::prune_count`].
pub(crate) async fn prune_count(
    store: &Store,
    older_than: Duration,
    name: Option<&str>,
    now: Timestamp,
) -> Result<PruneCounts> {
    store
        .history_prune_count(cutoff(now, older_than), name)
        .await
}

fn cutoff(now: Timestamp, age: Duration) -> Timestamp {
    let ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    Timestamp::from_millis(now.as_millis().saturating_sub(ms))
}

/// The engine's pruning loop: a prune round every `interval`, the first right after start,
/// when the engine has a retention setting. It gets only the handles it uses.
pub(crate) struct Pruner {
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub rule: PruneRule,
    /// Unique per process (a new machine id per start), readable for operators.
    pub holder: String,
    pub interval: Duration,
    pub batch_max: usize,
}

impl Pruner {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
        if self.rule.older_than.is_none() && self.rule.keep_per_type.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = self.clock.now();
            match prune(
                &self.store,
                &self.holder,
                &self.rule,
                now,
                self.batch_max,
                &shutdown,
            )
            .await
            {
                Ok(PruneOutcome::Ran(r)) if r.deleted.history > 0 || r.deleted.args > 0 => {
                    tracing::info!(
                        history = r.deleted.history,
                        args = r.deleted.args,
                        batches = r.batches,
                        longest_batch_ms = r.longest_batch_ms,
                        interrupted = r.interrupted,
                        "pruned task history"
                    );
                }
                Ok(PruneOutcome::Ran(_)) => {}
                Ok(PruneOutcome::Busy { holder }) => {
                    tracing::debug!(%holder, "another node is pruning history; skipping this round");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning history failed; will retry next round")
                }
            }
        }
    }
}
