//! HTTP peering: wake-up hints between nodes for backends without a working `LISTEN/NOTIFY`
//! (YugabyteDB, CockroachDB, PgBouncer in transaction mode), `harmony run --notify http`.
//!
//! Hints are the same short payloads the engine sends with `NOTIFY` (`harmonytask`'s hint
//! format: added, released, run-now, cancel, machines). Nothing here knows them: this crate
//! moves opaque notifications, and the database stays the authority. A lost, refused or late
//! hint costs latency (the node's safety-net poll finds the work), never correctness.
//!
//! * [`HttpRelay`] is the `harmonydb::Relay` of a node's handle (`Db::with_relay`): the
//!   engine's store code is unchanged, and `harmonydb` publishes a transaction's notifications
//!   to the relay after its commit. [`PeerSender`] is the loop that posts them, signed, to
//!   every live peer's `host_and_port` (module `relay`).
//! * [`router`] serves `POST /api/v1/peer/hints`, which checks the signature, the timestamp
//!   and replays, and hands the hints to the relay's inbound side, which feeds the engine's
//!   listener (module `server`).
//! * Requests are signed with the shared [`ClusterSecret`]: hex HMAC-SHA256 of
//!   `timestamp + "\n" + body` (module `signature`).
//! * [`PeerMetrics`] counts accepted and refused (by reason) requests, sent and failed ones.
//!
//! What it must not know: task rows, SQL (the peer list is `harmonytask::Admin`'s read), the
//! web server that mounts the router.

mod error;
mod metrics;
mod relay;
mod server;
mod signature;

pub use error::{Error, Result};
pub use metrics::PeerMetrics;
pub use relay::{
    DRAIN_WAIT, HINTS_PER_REQUEST_MAX, HttpRelay, PEERS_MAX, PeerConfig, PeerSender, QUEUE_MAX,
    SENDS_IN_FLIGHT_MAX,
};
pub use server::{BODY_BYTES_MAX, HINTS_PATH, PeerState, router};
pub use signature::{
    ClusterSecret, REPLAY_MEMORY_MAX, Refusal, SECRET_BYTES_MIN, SIGNATURE_HEADER, SKEW_MAX,
    TIMESTAMP_HEADER, Verifier,
};
