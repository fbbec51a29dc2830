//! The scheduler's inbox: what every other part of the engine holds to tell the scheduler
//! something. It knows the local types by name (to turn hints into events) and nothing else
//! of the engine, so the loops and the client can hold it without importing the driver.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{Notify, mpsc, oneshot};

use super::state::Event;
use crate::metrics::EngineMetrics;
use crate::model::Candidate;
use crate::status::EngineStatus;

/// A message to the scheduler actor.
pub(crate) enum Msg {
    /// An event for the decisions.
    Event(Event),
    /// Status request.
    Status(oneshot::Sender<EngineStatus>),
    /// The heartbeat changed the cordon flag: the actor reads it and tells the state.
    CordonChanged,
}

impl From<Event> for Msg {
    fn from(ev: Event) -> Self {
        Msg::Event(ev)
    }
}

/// A local type as the inbox knows it.
pub(crate) struct InboxType {
    /// Whether it has an IAmBored callback (run-now requests are for those).
    pub bored: bool,
    /// Its `tasks added` counter.
    pub added: Counter,
}

pub(crate) struct Inbox {
    events: mpsc::Sender<Msg>,
    nudged: Notify,
    poll_requested: AtomicBool,
    /// Type name → index, for the local types.
    index: HashMap<String, usize>,
    types: Vec<InboxType>,
    metrics: EngineMetrics,
}

impl Inbox {
    /// An inbox for the local `types` (in registry order, named as in `index`).
    pub(crate) fn new(
        events: mpsc::Sender<Msg>,
        index: HashMap<String, usize>,
        types: Vec<InboxType>,
        metrics: EngineMetrics,
    ) -> Self {
        Inbox {
            events,
            nudged: Notify::new(),
            poll_requested: AtomicBool::new(false),
            index,
            types,
            metrics,
        }
    }

    /// The index of a local type.
    pub(crate) fn type_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Sends a message, waiting for room; a stopped scheduler is ignored.
    pub(crate) async fn send(&self, msg: impl Into<Msg>) {
        let _ = self.events.send(msg.into()).await;
    }

    /// Sends a message, waiting for room; an error when the scheduler has stopped.
    pub(crate) async fn send_now(&self, msg: Msg) -> Result<(), ()> {
        self.events.send(msg).await.map_err(|_| ())
    }

    /// Wakes the scheduler for a pass.
    pub(crate) fn nudge(&self) {
        self.nudged.notify_one();
    }

    /// Waits for a nudge; whether a poll of every type was asked for since the last one.
    pub(crate) async fn nudged(&self) -> bool {
        self.nudged.notified().await;
        self.poll_requested.swap(false, Ordering::AcqRel)
    }

    /// Asks the scheduler to poll every type soon.
    pub(crate) fn request_poll(&self) {
        self.poll_requested.store(true, Ordering::Release);
        self.nudge();
    }

    /// Sends without waiting; when the channel is full, a poll finds what the event said.
    pub(crate) fn offer(&self, ev: Event) {
        if self.events.try_send(ev.into()).is_err() {
            self.request_poll();
        }
    }

    /// A hint about new or released work of `name`: poll it if it runs here.
    pub(crate) fn wake_type(&self, name: &str) {
        if let Some(ty) = self.type_index(name) {
            self.offer(Event::Wake { ty });
        }
    }

    /// A run-now request for `name`: call its IAmBored at once if it runs here.
    pub(crate) fn run_now(&self, name: &str) {
        if let Some(ty) = self.type_index(name)
            && self.types[ty].bored
        {
            let _ = self.events.try_send(Event::RunNow { ty }.into());
        }
    }

    /// Tasks added by this process (or announced by a hint). Counted as added here when the
    /// type runs here, else as added for another node.
    pub(crate) fn added(&self, name: &str, tasks: Vec<Candidate>) {
        let Some(ty) = self.type_index(name) else {
            self.metrics.added_other(name, tasks.len() as u64);
            return;
        };
        self.types[ty].added.inc_by(tasks.len() as u64);
        self.offer(Event::Added { ty, tasks });
    }
}
