//! The engine's one seam to the database: named operations, each taking a params struct.
//!
//! All task SQL of the engine lives here (and nowhere else outside `harmonydb`). Where the two
//! dialects need different SQL the statement is written twice and picked with
//! [`Dialect::pick`]; everything else is shared. Batched statements pass arrays: Postgres
//! binds real arrays (`= ANY($1)`, `unnest`), SQLite binds JSON text read with `json_each`.
//! Both are written once for both dialects: a list of ids with `harmonydb::id_list_sql!`,
//! rows of several columns with `harmonydb::batch_sql!`, which declares the columns once.
//!
//! Timestamps of task rows come from the engine's injected clock (bound parameters); machine
//! liveness (`last_contact`, the reaper's cutoff) uses the database server's clock, so that
//! nodes with skewed clocks cannot declare each other dead.

//!
//! The operations are grouped by noun, one submodule and one trait each: [`TaskStore`] (the
//! hot path: poll, claim, record, release), [`MachineStore`] (registration, heartbeat, the
//! reaper), [`FollowStore`], [`SingletonStore`], [`PreemptStore`]. The traits are crate-private,
//! so no other crate can claim a task or record an outcome past the engine's fencing; callers
//! inside the crate import them through [`prelude`]. Operations that run inside a caller's
//! transaction (`task_insert`, `follow_take`, `singleton_take`, …) take the `Tx` and stay
//! associated functions of [`Store`]. Operator reads and writes are in `admin` (public through
//! [`crate::Admin`]). Benchmark-only reads and the built-ins' attempt log are not here: they are
//! `harmony-bench`'s own.

use std::time::Duration;

use harmonydb::{Db, Dialect, Executor, Tx};

use crate::error::Result;
use crate::hint;

mod admin;
mod config;
mod follow;
mod machine;
mod ops;
mod preempt;
mod retention;
mod singleton;
mod storage;
mod task;
#[cfg(test)]
mod tests;

pub(crate) use follow::FollowStore;
pub(crate) use machine::{MachineRegister, MachineStore};
pub(crate) use ops::{BlockedChange, WHY_COUNT_MAX};
pub(crate) use preempt::PreemptStore;
pub(crate) use singleton::SingletonStore;
pub use storage::{Reserved, StorageAttach};
pub(crate) use task::{NewTask, RecordBatch, TaskClaim, TaskStore};

/// The store's traits, for `use crate::store::prelude::*` where the engine calls them.
pub(crate) mod prelude {
    pub(crate) use super::{FollowStore, MachineStore, PreemptStore, SingletonStore, TaskStore};
}

/// Handle over the database with the engine's operations.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
}

impl Store {
    /// Wraps a database handle.
    pub fn new(db: Db) -> Self {
        Store { db }
    }

    fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// Sends a wake-up hint with `tx` (delivered on commit): `pg_notify` in the transaction on
    /// Postgres, through the relay after the commit when the handle has one
    /// (`Db::with_relay`), and a no-op on SQLite without a relay, where other processes see
    /// the commit through `PRAGMA data_version`.
    pub(crate) async fn notify_in(tx: &Tx, payload: &str) -> harmonydb::Result<()> {
        tx.notify(hint::CHANNEL, payload).await
    }

    /// Sends a wake-up hint on its own (as [`Store::notify_in`] does).
    pub(crate) async fn notify(&self, payload: &str) -> Result<()> {
        Ok(self.db.notify(hint::CHANNEL, payload).await?)
    }
}

/// On Postgres, makes the rest of `tx` read "the oldest N" through the ordered index, never
/// as a bitmap scan of every matching row followed by a sort. Postgres picks the bitmap
/// plan when its statistics predate a bulk insert (until autovacuum analyzes the table):
/// a poll of 1,000,000 fresh rows then took 500 ms instead of 0.5 ms.
pub(super) async fn prefer_index_order(tx: &Tx) -> harmonydb::Result<()> {
    if tx.dialect() == Dialect::Postgres {
        tx.exec("SET LOCAL enable_bitmapscan = off", &[]).await?;
    }
    Ok(())
}

/// The machine registered at `host_and_port` and the seconds since its last heartbeat
/// (server clock), if there is one.
pub(super) async fn machine_at<E: Executor>(
    ex: &E,
    dialect: Dialect,
    host_and_port: &str,
) -> harmonydb::Result<Option<(i64, f64)>> {
    let sql = dialect.pick(
        "SELECT id, (julianday('now') - julianday(last_contact)) * 86400.0 FROM harmony_machines WHERE host_and_port = $1",
        "SELECT id, EXTRACT(EPOCH FROM now() - last_contact)::float8 FROM harmony_machines WHERE host_and_port = $1",
    );
    ex.query_opt(sql, &[&host_and_port]).await
}

/// A SQLite `strftime` modifier for `age` ago: `-30.000 seconds`.
pub(super) fn sqlite_age_modifier(age: Duration) -> String {
    format!("-{:.3} seconds", age.as_secs_f64())
}

/// Whole milliseconds of `d`, saturating, for Postgres interval arithmetic.
pub(super) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
