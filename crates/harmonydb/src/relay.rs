//! Notifications carried by a relay instead of the database's own `NOTIFY`.
//!
//! Some Postgres-compatible backends have no working `LISTEN/NOTIFY` (YugabyteDB, CockroachDB,
//! PgBouncer in transaction mode). A handle made with [`Db::with_relay`](crate::Db::with_relay)
//! then sends notifications through a [`Relay`] and listens on the relay's [`Inbound`] side:
//!
//! * [`Tx::notify`](crate::Tx::notify) buffers the notification in the transaction, and the
//!   transaction function hands the buffer to [`Relay::publish`] **after** the commit
//!   succeeded. A rolled-back (or retried) attempt publishes nothing, so a listener is never
//!   told about a change it cannot see. That is the delivery rule `NOTIFY` has too.
//! * [`Db::notify`](crate::Db::notify) publishes at once.
//! * [`Db::listen`](crate::Db::listen) subscribes to [`Relay::inbound`]; whatever the relay
//!   receives (from other processes) it hands to [`Inbound::deliver`].
//!
//! What this module must not know: how the relay moves notifications (the HTTP relay is in
//! `harmony-peer`). Notifications stay hints: a relay may lose them, and the caller must not
//! depend on them for correctness. A handle without a relay pays nothing for this module:
//! no buffer is made, and `Tx::notify` runs `pg_notify` inside the transaction as before.

use std::sync::Mutex;

use crate::error::Result;
use crate::notify::{self, NOTIFY_BUFFER_MAX, NotifySink};
use crate::{Notification, NotifyListener};

/// Moves notifications between processes for backends without a working `NOTIFY`.
pub trait Relay: Send + Sync + 'static {
    /// Sends committed notifications to every listener of the cluster, this process's own
    /// included (as `NOTIFY` does). Called right after a commit, on the committing task: it
    /// must not block or wait; queue and return.
    fn publish(&self, notifications: Vec<Notification>);

    /// The side that received notifications arrive on; [`Db::listen`](crate::Db::listen)
    /// subscribes to it.
    fn inbound(&self) -> &Inbound;
}

/// The receiving side of a relay: hands each notification to every listener subscribed to its
/// channel. Each listener's buffer is bounded ([`NOTIFY_BUFFER_MAX`]); a full one drops and
/// counts, like a `LISTEN` connection's.
#[derive(Default)]
pub struct Inbound {
    // Held only to copy or prune the list, never across an await.
    subscribers: Mutex<Vec<Subscriber>>,
}

struct Subscriber {
    channels: Vec<&'static str>,
    sink: NotifySink,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Inbound({} listeners)", self.listeners())
    }
}

impl Inbound {
    /// An inbound side with no listeners yet.
    pub fn new() -> Self {
        Inbound::default()
    }

    /// Hands one notification to every live listener of `channel`. Listeners that closed are
    /// forgotten here.
    pub fn deliver(&self, channel: &str, payload: &str) {
        let mut subs = self
            .subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        subs.retain(|s| !s.sink.is_closed());
        for s in subs.iter().filter(|s| s.channels.contains(&channel)) {
            s.sink.deliver(channel, payload);
        }
    }

    /// Listeners still open.
    pub fn listeners(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|s| !s.sink.is_closed())
            .count()
    }

    pub(crate) fn subscribe(&self, channels: &[&'static str]) -> Result<NotifyListener> {
        for c in channels {
            notify::check_channel(c)?;
        }
        let (sink, listener) = NotifyListener::relayed(NOTIFY_BUFFER_MAX);
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Subscriber {
                channels: channels.to_vec(),
                sink,
            });
        Ok(listener)
    }
}

/// The notifications a transaction sent, published after its commit.
#[derive(Default)]
pub(crate) struct Outbox {
    notes: Mutex<Vec<Notification>>,
}

impl Outbox {
    pub(crate) fn push(&self, channel: &str, payload: &str) {
        self.notes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Notification {
                channel: channel.to_owned(),
                payload: payload.to_owned(),
            });
    }

    pub(crate) fn take(&self) -> Vec<Notification> {
        std::mem::take(
            &mut *self
                .notes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}
