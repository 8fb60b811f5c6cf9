//! Accept loops. Each accepted socket gets its own task, which runs the transport's handshake
//! (TLS, WebSocket upgrade) under the listener's `handshake_timeout` and then the connection
//! driver; a stalled handshake therefore never holds up the accept loop. A failing `accept`
//! (e.g. out of file descriptors) backs off instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{connection, Broker};
use crate::config::{ListenerConfig, ListenerKind};
use crate::transport::tls::TlsAcceptor;
use crate::transport::ws::WsAcceptor;

/// What a listener does to an accepted socket before MQTT starts.
#[derive(Clone)]
enum Handshake {
    None,
    Tls(TlsAcceptor),
    Ws(WsAcceptor),
    Wss(TlsAcceptor, WsAcceptor),
}

/// Binds one listener and spawns its accept loop; returns the bound address. TLS listeners
/// must have `cert` and `key` filled in by now.
pub async fn spawn(
    broker: &Arc<Broker>,
    config: &ListenerConfig,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let kind = config.kind;
    if kind == ListenerKind::Quic {
        return spawn_quic(broker, config, tracker, shutdown);
    }
    let ws = || WsAcceptor::new(&config.path, broker.limits().max_packet_size);
    let tls = || {
        TlsAcceptor::new(&config.tls)
            .with_context(|| format!("cannot set up the {kind} listener on {}", config.bind))
    };
    let handshake = match kind {
        ListenerKind::Tcp => Handshake::None,
        ListenerKind::Tls => Handshake::Tls(tls()?),
        ListenerKind::Ws => Handshake::Ws(ws()),
        ListenerKind::Wss => Handshake::Wss(tls()?, ws()),
        ListenerKind::Quic => unreachable!("QUIC returned above"),
    };
    let listener = TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot bind the {kind} listener to {}", config.bind))?;
    let addr = listener.local_addr()?;
    match kind {
        ListenerKind::Ws | ListenerKind::Wss => {
            tracing::info!(%kind, %addr, path = %config.path, "listening for MQTT")
        }
        _ => tracing::info!(%kind, %addr, "listening for MQTT"),
    }
    let accept = Accept {
        kind,
        handshake,
        handshake_timeout: config.handshake_timeout,
        broker: Arc::clone(broker),
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
    };
    tracker.spawn(accept.run(listener));
    Ok(addr)
}

/// Binds a UDP endpoint for MQTT over QUIC and spawns its accept loop.
fn spawn_quic(
    broker: &Arc<Broker>,
    config: &ListenerConfig,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let (Some(cert), Some(key)) = (&config.tls.cert, &config.tls.key) else {
        anyhow::bail!(
            "the quic listener on {} needs `cert` and `key`",
            config.bind
        );
    };
    let settings = &broker.settings().quic;
    let tls = &config.tls;
    let server = crate::transport::quic::server_config(
        cert,
        key,
        tls.verify,
        tls.client_ca.as_deref(),
        settings,
    )
    .with_context(|| format!("cannot set up the quic listener on {}", config.bind))?;
    let endpoint = quinn::Endpoint::server(server, config.bind)
        .with_context(|| format!("cannot bind the quic listener to udp {}", config.bind))?;
    let addr = endpoint.local_addr()?;
    tracing::info!(kind = "quic", %addr, alpn = "mqtt", "listening for MQTT");
    tracker.spawn(super::quic::accept(
        endpoint,
        Arc::clone(broker),
        settings.retry,
        tls.peer_cert_as_username,
        config.handshake_timeout,
        tracker.clone(),
        shutdown.clone(),
    ));
    Ok(addr)
}

struct Accept {
    kind: ListenerKind,
    handshake: Handshake,
    handshake_timeout: Duration,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Accept {
    async fn run(self, listener: TcpListener) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff = Duration::from_millis(5);
                    // Small MQTT packets must not wait for Nagle's algorithm.
                    if let Err(err) = stream.set_nodelay(true) {
                        tracing::debug!(%peer, %err, "cannot set TCP_NODELAY");
                    }
                    self.serve(stream, peer);
                }
                Err(err) => {
                    tracing::warn!(kind = %self.kind, %err, "accept failed; backing off {backoff:?}");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Spawns one connection: handshake within the timeout, then MQTT. Each kind
    /// is a task of its own type, and the handshake is boxed: it is freed once done, and a
    /// connection's task holds only the driver for its own stream (one future type for all
    /// kinds would size every TLS connection's task for the WSS handshake).
    fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        let handshake = self.handshake.clone();
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        let broker = Arc::clone(&self.broker);
        let shutdown = self.shutdown.clone();
        let transport = self.kind.as_str();
        let guard = Guard {
            deadline,
            shutdown: shutdown.clone(),
            transport,
            peer,
        };
        match handshake {
            Handshake::None => {
                self.tracker.spawn(connection::serve(
                    broker, stream, peer, transport, None, shutdown,
                ));
            }
            Handshake::Tls(tls) => {
                self.tracker.spawn(async move {
                    let step = Box::pin(guard.run(tls.accept(stream)));
                    let Some((stream, username)) = step.await else {
                        return;
                    };
                    connection::serve(broker, stream, peer, transport, username, shutdown).await
                });
            }
            Handshake::Ws(ws) => {
                self.tracker.spawn(async move {
                    let step = Box::pin(guard.run(ws.accept(stream)));
                    let Some(stream) = step.await else {
                        return;
                    };
                    connection::serve(broker, stream, peer, transport, None, shutdown).await
                });
            }
            Handshake::Wss(tls, ws) => {
                self.tracker.spawn(async move {
                    // One deadline covers both steps.
                    let steps = Box::pin(async move {
                        let (stream, username) = guard.clone().run(tls.accept(stream)).await?;
                        let stream = guard.run(ws.accept(stream)).await?;
                        Some((stream, username))
                    });
                    let Some((stream, username)) = steps.await else {
                        return;
                    };
                    connection::serve(broker, stream, peer, transport, username, shutdown).await
                });
            }
        }
    }
}

/// Runs handshake steps until a shared deadline or shutdown. A failure is the peer's doing
/// (or the network's), so it is logged at debug only.
#[derive(Clone)]
struct Guard {
    deadline: tokio::time::Instant,
    shutdown: CancellationToken,
    transport: &'static str,
    peer: SocketAddr,
}

impl Guard {
    async fn run<T, E: std::fmt::Display>(
        self,
        step: impl std::future::Future<Output = Result<T, E>>,
    ) -> Option<T> {
        let (transport, peer) = (self.transport, self.peer);
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            done = tokio::time::timeout_at(self.deadline, step) => match done {
                Ok(Ok(value)) => Some(value),
                Ok(Err(err)) => {
                    tracing::debug!(transport, %peer, %err, "handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(transport, %peer, "handshake timed out");
                    None
                }
            },
        }
    }
}
