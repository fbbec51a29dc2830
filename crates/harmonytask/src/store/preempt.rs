//! Bids to preempt work for a time-sensitive task (the cheapest bid wins).

use harmonydb::Executor;

use super::Store;
use crate::error::Result;
use crate::model::{MachineId, TaskId};

/// Operations on preemption bids.
pub(crate) trait PreemptStore {
    /// Records (or updates) this machine's bid to preempt work for time-sensitive task `task`:
    /// `cost_ms` is the total runtime of the victims it would cancel.
    async fn preempt_bid(&self, task: TaskId, machine: MachineId, cost_ms: i64) -> Result<()>;

    /// The winning bid for `task`: the lowest cost, ties to the lower machine id.
    async fn preempt_winner(&self, task: TaskId) -> Result<Option<MachineId>>;

    /// Forgets the bids for `task`.
    async fn preempt_clear(&self, task: TaskId) -> Result<()>;
}

impl PreemptStore for Store {
    async fn preempt_bid(&self, task: TaskId, machine: MachineId, cost_ms: i64) -> Result<()> {
        self.db
            .exec(
                "INSERT INTO harmony_task_preempt_bid (task_id, machine_id, cost_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (task_id, machine_id) DO UPDATE SET cost_ms = excluded.cost_ms",
                &[&task, &machine, &cost_ms],
            )
            .await?;
        Ok(())
    }

    async fn preempt_winner(&self, task: TaskId) -> Result<Option<MachineId>> {
        let row: Option<(i64,)> = self
            .db
            .query_opt(
                "SELECT machine_id FROM harmony_task_preempt_bid WHERE task_id = $1 ORDER BY cost_ms, machine_id LIMIT 1",
                &[&task],
            )
            .await?;
        Ok(row.map(|r| MachineId(r.0)))
    }

    async fn preempt_clear(&self, task: TaskId) -> Result<()> {
        self.db
            .exec(
                "DELETE FROM harmony_task_preempt_bid WHERE task_id = $1",
                &[&task],
            )
            .await?;
        Ok(())
    }
}
