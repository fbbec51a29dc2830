//! The operator's view of a cluster: what waits, what runs, what ran, which machines are alive,
//! and the few writes an operator makes (cordon, restart requests, run-now, restarting a failed
//! task). The CLI's `task` and `machine` commands and the coming web server use it; nothing
//! here claims a task or records an outcome, so it cannot break the engine's fencing.

use std::collections::HashMap;
use std::sync::Arc;

use harmonydb::{Db, Timestamp};

use crate::client::Client;
use crate::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::model::{
    BlockedRow, Cancelled, ConfigLayer, ConfigLayerRow, ConfigVersion, HistoryQuery, HistoryRow,
    MachineId, MachineRow, PausedRow, SingletonRow, TaskId, TaskRow, TypeSummary,
};
use crate::store::Store;

/// Read-mostly access to a cluster's database for operators.
#[derive(Clone)]
pub struct Admin {
    store: Store,
    client: Client,
    clock: Arc<dyn Clock>,
    notify: bool,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("notify", &self.notify)
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// Operator access to `db`, using the system clock; writes wake the nodes (Postgres).
    pub fn new(db: Db) -> Self {
        Admin {
            store: Store::new(db.clone()),
            client: Client::new(db),
            clock: Arc::new(SystemClock),
            notify: true,
        }
    }

    /// Whether writes send wake-up notifications (Postgres); on by default. Turn off for
    /// backends without `NOTIFY`: nodes then see the change at their next heartbeat or poll.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self.client = self.client.with_notify(notify);
        self
    }

    /// The store, for the operator modules of the crate (`why`).
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Cancels a task, waiting or running: its row is deleted and a history row with
    /// `err = "cancelled"` written in one transaction; a running attempt's owner sees
    /// `still_owned() == false` at once, stops the attempt when the hint (Postgres) or its
    /// next heartbeat tells it, and its late result is discarded. `by` is recorded as who
    /// cancelled. [`Error::TaskNotFound`] when the task is not waiting or running.
    pub async fn cancel(&self, id: TaskId, by: &str) -> Result<Cancelled> {
        self.store
            .task_cancel(id, by, self.clock.now(), self.notify)
            .await
    }

    /// Cancels every waiting task of `name` (running ones go on); returns how many.
    pub async fn cancel_waiting(&self, name: &str, by: &str) -> Result<u64> {
        crate::name::validate_name(name)?;
        self.store
            .task_cancel_waiting(name, by, self.clock.now())
            .await
    }

    /// Pauses a type cluster-wide: no node polls or claims its tasks from the commit on;
    /// running ones finish. `false` when it was already paused (the first pause stays).
    pub async fn pause(&self, name: &str, by: &str) -> Result<bool> {
        crate::name::validate_name(name)?;
        self.store.type_pause(name, by, self.clock.now()).await
    }

    /// Resumes a paused type; `false` when it was not paused.
    pub async fn resume(&self, name: &str) -> Result<bool> {
        crate::name::validate_name(name)?;
        self.store.type_resume(name, self.notify).await
    }

    /// Sets the layers note of a machine's details row (`machine ls`): the layers it runs,
    /// and what it could not apply.
    pub async fn machine_layers_set(&self, id: MachineId, layers: &str) -> Result<()> {
        self.store.machine_layers_set(id, layers).await
    }

    /// Attaches a storage path to a machine address (or updates it); returns its id.
    pub async fn storage_attach(&self, p: &crate::store::StorageAttach<'_>) -> Result<i64> {
        self.store.storage_attach(p).await
    }

    /// Detaches a storage path; `false` when there was none.
    pub async fn storage_detach(&self, host_and_port: &str, local_path: &str) -> Result<bool> {
        self.store.storage_detach(host_and_port, local_path).await
    }

    /// The storage paths (of one machine address, if given) with their live reservations.
    pub async fn storage_list(
        &self,
        host_and_port: Option<&str>,
    ) -> Result<Vec<crate::model::StoragePathRow>> {
        self.store.storage_list(host_and_port).await
    }

    /// Records a new measurement of a storage path (its node does this periodically).
    pub async fn storage_refresh(&self, id: i64, capacity: u64, available: u64) -> Result<()> {
        self.store.storage_refresh(id, capacity, available).await
    }

    /// The configuration layers, by title.
    pub async fn config_list(&self) -> Result<Vec<ConfigLayerRow>> {
        self.store.config_list().await
    }

    /// One configuration layer, if it exists.
    pub async fn config_get(&self, title: &str) -> Result<Option<ConfigLayer>> {
        self.store.config_get(title).await
    }

    /// The layers named that exist, in the order asked.
    pub async fn config_get_many(&self, titles: &[String]) -> Result<Vec<ConfigLayer>> {
        self.store.config_get_many(titles).await
    }

    /// Writes a layer (and a history row with the time) and tells the nodes on
    /// [`CONFIG_CHANNEL`](crate::CONFIG_CHANNEL). The text is stored as given: check it first
    /// (the CLI refuses a layer that does not parse). `false` when nothing changed.
    pub async fn config_set(&self, title: &str, config: &str) -> Result<bool> {
        self.store.config_set(title, config, self.clock.now()).await
    }

    /// Removes a layer; its history stays. `false` when there was none.
    pub async fn config_remove(&self, title: &str) -> Result<bool> {
        self.store.config_remove(title).await
    }

    /// Every version of a layer, oldest first, numbered from 1.
    pub async fn config_history(&self, title: &str) -> Result<Vec<ConfigVersion>> {
        self.store.config_history(title).await
    }

    /// The paused types.
    pub async fn paused(&self) -> Result<Vec<PausedRow>> {
        self.store.paused().await
    }

    /// The blocked reasons live nodes report (of one type, or all), ignoring machines whose
    /// heartbeat is older than `dead_after`.
    pub async fn blocked(
        &self,
        name: Option<&str>,
        dead_after: std::time::Duration,
    ) -> Result<Vec<BlockedRow>> {
        self.store.blocked_list(name, dead_after).await
    }

    /// Pending and running tasks (of one type, if given), oldest first, at most `limit`.
    pub async fn tasks(&self, name: Option<&str>, limit: usize) -> Result<Vec<TaskRow>> {
        self.store.task_list(name, limit).await
    }

    /// One task, if it is pending or running.
    pub async fn task(&self, id: TaskId) -> Result<Option<TaskRow>> {
        self.store.task_get(id).await
    }

    /// A task's arguments (empty when it has none or no longer exists).
    pub async fn task_args(&self, id: TaskId) -> Result<HashMap<String, String>> {
        self.store.task_args(id).await
    }

    /// Pending (unowned) and running (owned) tasks per type: `(type, pending, running)`.
    pub async fn task_counts(&self) -> Result<Vec<(String, i64, i64)>> {
        self.store.task_counts().await
    }

    /// Attempts, newest first.
    pub async fn history(&self, q: &HistoryQuery) -> Result<Vec<HistoryRow>> {
        self.store.history(q).await
    }

    /// Per-type attempt statistics over all history.
    pub async fn type_summaries(&self) -> Result<Vec<TypeSummary>> {
        self.store.type_summaries().await
    }

    /// Every registered machine with its details and owned-task count.
    pub async fn machines(&self) -> Result<Vec<MachineRow>> {
        self.store.machine_list().await
    }

    /// The addresses (`host_and_port`) of the machines heard from within `alive_within`, at
    /// most `limit`: one bounded read of the machine table, cheap enough to repeat every few
    /// seconds (the HTTP peers' directory).
    pub async fn machine_addresses(
        &self,
        alive_within: std::time::Duration,
        limit: usize,
    ) -> Result<Vec<(MachineId, String)>> {
        self.store.machine_addresses(alive_within, limit).await
    }

    /// Task type names that registered machines run.
    pub async fn types_in_cluster(&self) -> Result<Vec<String>> {
        self.store.types_in_cluster().await
    }

    /// Cordons a machine: it claims no new tasks. [`Error::MachineNotFound`] when it is not
    /// registered (it stopped, or was reaped).
    pub async fn cordon(&self, id: MachineId) -> Result<()> {
        self.set_cordon(id, true).await
    }

    /// Uncordons a machine. [`Error::MachineNotFound`] when it is not registered.
    pub async fn uncordon(&self, id: MachineId) -> Result<()> {
        self.set_cordon(id, false).await
    }

    async fn set_cordon(&self, id: MachineId, cordoned: bool) -> Result<()> {
        if self
            .store
            .machine_set_unschedulable(id, cordoned, self.notify)
            .await?
        {
            Ok(())
        } else {
            Err(Error::MachineNotFound(id))
        }
    }

    /// Asks a machine to drain and restart. [`Error::MachineNotFound`] when it is not
    /// registered.
    pub async fn request_restart(&self, id: MachineId) -> Result<()> {
        let now: Timestamp = self.clock.now();
        if self
            .store
            .machine_request_restart(id, now, self.notify)
            .await?
        {
            Ok(())
        } else {
            Err(Error::MachineNotFound(id))
        }
    }

    /// Asks a singleton type to run now ([`Client::run_now`]).
    pub async fn run_now(&self, name: &str) -> Result<()> {
        self.client.run_now(name).await
    }

    /// Re-queues a permanently failed task with its original id ([`Client::restart_task`]).
    pub async fn restart_task(&self, id: TaskId) -> Result<()> {
        self.client.restart_task(id).await
    }

    /// The names of every type registered as a singleton, sorted.
    pub async fn singleton_names(&self) -> Result<Vec<String>> {
        self.store.singleton_names().await
    }

    /// A singleton's row, if the type was ever registered as one.
    pub async fn singleton(&self, name: &str) -> Result<Option<SingletonRow>> {
        Ok(self.store.singleton_get(name).await?.map(
            |(task_id, last_run_time, run_now_request)| SingletonRow {
                task_id: task_id.map(TaskId),
                last_run_time,
                run_now_request,
            },
        ))
    }

    /// Follow-ups queued and not yet created, per pair: `(from type, to type, count)`.
    pub async fn follow_pending(&self) -> Result<Vec<(String, String, i64)>> {
        self.store.follow_pending().await
    }

    /// One history prune round under the cluster's prune lease (see [`crate::retention`]):
    /// `Busy` names the holder when another node or command is pruning.
    pub async fn prune_history(
        &self,
        holder: &str,
        rule: &crate::retention::PruneRule,
        now: Timestamp,
        batch_max: usize,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<crate::retention::PruneOutcome> {
        crate::retention::prune(&self.store, holder, rule, now, batch_max, stop).await
    }

    /// What a prune of history older than `older_than` (of `name`, or all) would delete.
    pub async fn prune_count(
        &self,
        older_than: std::time::Duration,
        name: Option<&str>,
        now: Timestamp,
    ) -> Result<crate::model::PruneCounts> {
        crate::retention::prune_count(&self.store, older_than, name, now).await
    }

    /// Who holds the lease `name` now (an expired lease is nobody's).
    pub async fn lease_holder(&self, name: &str) -> Result<Option<String>> {
        self.store.lease_holder(name).await
    }

    /// Takes (or renews) the lease `name` for `holder` for `ttl`; false while another
    /// holder's lease runs. Leases only keep cluster-wide chores (pruning) to one node.
    pub async fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> Result<bool> {
        self.store.lease_acquire(name, holder, ttl).await
    }

    /// Gives up the lease `name` if `holder` has it.
    pub async fn lease_release(&self, name: &str, holder: &str) -> Result<()> {
        self.store.lease_release(name, holder).await
    }

    /// Whether the database answers (one trivial round trip).
    pub async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    /// Whether machine `id` is registered (its row exists: it was not reaped or stopped).
    pub async fn machine_registered(&self, id: MachineId) -> Result<bool> {
        self.store.machine_exists(id).await
    }

    /// One page of pending and running tasks (`limit` and `offset` as given: the caller bounds
    /// them): in id order, or, with a type, in posting order (`posted_time`, then id). A
    /// type's waiting or running page reads an index; a type's page of both states reads that
    /// type's rows (no index covers owned rows by type).
    pub async fn task_page(&self, q: &crate::model::TaskPageQuery) -> Result<Vec<TaskRow>> {
        self.store.task_page(q).await
    }

    /// A task's attempts from the history, oldest first, at most `limit`.
    pub async fn task_attempts(&self, id: TaskId, limit: usize) -> Result<Vec<HistoryRow>> {
        self.store.task_attempts(id, limit).await
    }

    /// One page of history, newest first; the next page is `before` the last row's id.
    pub async fn history_page(
        &self,
        q: &crate::model::HistoryPageQuery,
    ) -> Result<Vec<HistoryRow>> {
        self.store.history_page(q).await
    }

    /// Types with waiting tasks, sorted, at most `limit`, found without scanning the tasks.
    pub async fn waiting_types(&self, limit: usize) -> Result<Vec<String>> {
        self.store.waiting_types(limit).await
    }

    /// Waiting tasks of `name`, counted up to `cap`: a result of `cap` means "at least".
    pub async fn waiting_count(&self, name: &str, cap: usize) -> Result<i64> {
        self.store.waiting_count(name, cap).await
    }

    /// Running (owned) tasks per type, cluster-wide.
    pub async fn running_counts(&self) -> Result<Vec<(String, i64)>> {
        self.store.running_counts().await
    }

    /// Attempts per type that ended within the last `window` (by this admin's clock).
    pub async fn history_counts_last(
        &self,
        window: std::time::Duration,
    ) -> Result<Vec<crate::model::HistoryCounts>> {
        let now = self.clock.now().as_millis();
        let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        let since = Timestamp::from_millis(now.saturating_sub(window));
        self.store.history_counts_since(since).await
    }

    /// The tasks machine `owner` runs now, in id order: at most `limit` after `offset`.
    pub async fn machine_tasks(
        &self,
        owner: MachineId,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<TaskRow>> {
        self.store.machine_tasks(owner, limit, offset).await
    }

    /// The attempts the machine at `host` ran among the cluster's newest `scan_max`
    /// attempts, newest first, at most `limit` (a bounded read: the history has no index by
    /// machine).
    pub async fn machine_history(
        &self,
        host: &str,
        limit: usize,
        scan_max: usize,
    ) -> Result<Vec<HistoryRow>> {
        self.store.machine_history(host, limit, scan_max).await
    }
}
