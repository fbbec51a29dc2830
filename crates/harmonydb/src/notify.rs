//! `LISTEN/NOTIFY` on a dedicated Postgres connection.
//!
//! Notifications are hints for the engine (new work, released work, run-now requests); the
//! database stays the authority. The listener's buffer is bounded: when it overflows the
//! newest notifications are dropped and counted, and the engine reacts to a non-zero
//! [`NotifyListener::dropped`] by polling the database. When the connection breaks,
//! [`NotifyListener::recv`] returns `None`; the caller reconnects with `Db::listen`.
//!
//! A handle with a [`Relay`](crate::Relay) (`Db::with_relay`) listens to the relay's
//! [`Inbound`](crate::Inbound) instead: the same listener type, fed by whatever transport the
//! relay uses (HTTP between nodes, for backends without a working `LISTEN`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::error::{Error, ErrorKind, Result};
use crate::postgres::PgBackend;

/// Buffered notifications per listener before new ones are dropped.
pub const NOTIFY_BUFFER_MAX: usize = 4096;

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The channel it was sent on.
    pub channel: String,
    /// Its payload (may be empty).
    pub payload: String,
}

/// Where a connection's driver puts notifications.
#[derive(Clone)]
pub(crate) struct NotifySink {
    tx: mpsc::Sender<Notification>,
    dropped: Arc<AtomicU64>,
}

impl NotifySink {
    /// Whether the listener is gone.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn deliver(&self, channel: &str, payload: &str) {
        let n = Notification {
            channel: channel.to_owned(),
            payload: payload.to_owned(),
        };
        if self.tx.try_send(n).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A live `LISTEN` connection, or a subscription to a relay's inbound side.
pub struct NotifyListener {
    // Kept so the connection stays open; dropping the listener closes it. `None` for a relay
    // subscription, which is closed when its inbound side drops the sender.
    client: Option<Client>,
    rx: mpsc::Receiver<Notification>,
    dropped: Arc<AtomicU64>,
}

impl NotifyListener {
    /// The next notification; `None` once the connection has closed (the connection's
    /// driver task ends then, dropping the only sender).
    pub async fn recv(&mut self) -> Option<Notification> {
        self.rx.recv().await
    }

    /// The next notification if one is waiting now.
    pub fn try_recv(&mut self) -> Option<Notification> {
        self.rx.try_recv().ok()
    }

    /// Notifications dropped because the buffer was full, since the listener opened.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        match &self.client {
            Some(c) => c.is_closed(),
            None => self.rx.is_closed(),
        }
    }

    /// A listener fed by `sink`'s other end (a relay subscription).
    pub(crate) fn relayed(buffer: usize) -> (NotifySink, NotifyListener) {
        let (tx, rx) = mpsc::channel(buffer);
        let dropped = Arc::new(AtomicU64::new(0));
        let sink = NotifySink {
            tx,
            dropped: Arc::clone(&dropped),
        };
        (
            sink,
            NotifyListener {
                client: None,
                rx,
                dropped,
            },
        )
    }
}

/// Checks that a channel name is a plain identifier (it is formatted into `LISTEN`).
pub(crate) fn check_channel(channel: &str) -> Result<()> {
    if channel.is_empty()
        || !channel
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(Error::new(
            ErrorKind::Misuse,
            format!("invalid notification channel name {channel:?}"),
        ));
    }
    Ok(())
}

pub(crate) async fn listen(
    backend: &PgBackend,
    channels: &[&'static str],
) -> Result<NotifyListener> {
    let (tx, rx) = mpsc::channel(NOTIFY_BUFFER_MAX);
    let dropped = Arc::new(AtomicU64::new(0));
    let sink = NotifySink {
        tx,
        dropped: Arc::clone(&dropped),
    };
    let client = backend.listen_connection(sink).await?;
    for channel in channels {
        // LISTEN takes an identifier, which cannot be a bind parameter; channel names are
        // `&'static str` constants of this workspace, checked here to be plain identifiers.
        check_channel(channel)?;
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(crate::postgres::map_error)?;
    }
    Ok(NotifyListener {
        client: Some(client),
        rx,
        dropped,
    })
}
