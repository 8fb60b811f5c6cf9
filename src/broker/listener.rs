//! Accept loops. Each accepted stream gets its own task running the connection driver; a
//! failing `accept` (e.g. out of file descriptors) backs off instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{connection, Broker};
use crate::config::{ListenerConfig, ListenerKind};

/// Binds one listener and spawns its accept loop; returns the bound address.
pub async fn spawn(
    broker: &Arc<Broker>,
    config: &ListenerConfig,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    match config.kind {
        ListenerKind::Tcp => {
            let listener = TcpListener::bind(config.bind)
                .await
                .with_context(|| format!("cannot bind the tcp listener to {}", config.bind))?;
            let addr = listener.local_addr()?;
            tracing::info!(kind = "tcp", %addr, "listening for MQTT");
            let broker = Arc::clone(broker);
            let task_tracker = tracker.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(accept_tcp(listener, broker, task_tracker, shutdown));
            Ok(addr)
        }
    }
}

async fn accept_tcp(
    listener: TcpListener,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                // Small MQTT packets must not wait for Nagle's algorithm.
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, %err, "cannot set TCP_NODELAY");
                }
                let broker = Arc::clone(&broker);
                let shutdown = shutdown.clone();
                tracker.spawn(connection::serve(broker, stream, peer, "tcp", shutdown));
            }
            Err(err) => {
                tracing::warn!(%err, "accept failed; backing off {backoff:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
