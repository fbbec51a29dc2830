//! `harmony web`: the HTTP API (health, metrics, JSON) over the cluster's database, without
//! running tasks; and the start of the same server on a `harmony run` node.

use std::time::Duration;

use harmonydb::Db;
use harmonytask::Engine;
use tokio_util::sync::CancellationToken;

use crate::cli::WebArgs;
use crate::commands::{EXIT_OK, UsageError, open_existing};

/// How long requests in flight get to finish once the server is told to stop.
const WEB_STOP_WAIT: Duration = Duration::from_secs(5);

/// Serves until a signal (exit 0).
pub async fn run(
    db_url: &str,
    args: WebArgs,
    notify: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<u8> {
    super::run::check_listen(&args.listen)?;
    let db = open_existing(db_url).await?;
    let server = start(db, None, &args.listen, args.api_token, notify, None).await?;
    tracing::info!(listen = %args.listen, "serving the HTTP API; SIGINT or SIGTERM stops it");
    shutdown.cancelled().await;
    server.stop().await;
    Ok(EXIT_OK)
}

/// A started server, stopped with [`Running::stop`].
pub struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<harmony_web::Result<()>>,
}

impl Running {
    /// Stops accepting, and waits (at most [`WEB_STOP_WAIT`]) for requests in flight.
    pub async fn stop(self) {
        self.stop.cancel();
        match tokio::time::timeout(WEB_STOP_WAIT, self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the HTTP server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the HTTP server task failed"),
            Err(_) => tracing::warn!(
                "the HTTP server still had requests in flight {WEB_STOP_WAIT:?} after the stop; leaving them"
            ),
        }
    }
}

/// Binds `listen` and serves the API there, with the peering endpoint and its counters when
/// `peer` is given (`--notify http`); a port that cannot be bound is a usage error naming the
/// address.
pub async fn start(
    db: Db,
    engine: Option<Engine>,
    listen: &str,
    token: Option<harmony_web::ApiToken>,
    notify: bool,
    peer: Option<&std::sync::Arc<harmony_peer::HttpRelay>>,
) -> anyhow::Result<Running> {
    let mut builder = harmony_web::WebServer::builder(db)
        .token(token)
        .notify(notify);
    if let Some(engine) = engine {
        builder = builder.engine(engine);
    }
    if let Some(relay) = peer {
        let metrics = relay.metrics().clone();
        builder = builder
            .merge(super::peering::peer_routes(relay))
            .metrics(Box::new(move |r| metrics.register(r)));
    }
    let server = builder.bind(listen).await.map_err(|e| {
        UsageError(format!(
            "--listen: {e}; the HTTP API is served on this address: stop whatever holds it, or choose another --listen"
        ))
    })?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(stop.clone()));
    Ok(Running { stop, task })
}
