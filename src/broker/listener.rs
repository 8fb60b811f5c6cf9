//! Accept loops. Each accepted socket gets its own task, which runs the transport's handshake
//! (TLS, WebSocket upgrade) under the listener's `handshake_timeout` and then the connection
//! driver; a stalled handshake therefore never holds up the accept loop. A failing `accept`
//! (e.g. out of file descriptors) backs off instead of spinning. Past the listener's
//! `max_conn_rate` the loop pauses until the rate allows the next accept (see `Pacer`).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::permits::{ConnRate, ListenerSlots, Permit};
use super::{connection, Broker};
use crate::transport::tls::{TlsAcceptor, TlsSettings};
use crate::transport::ws::WsAcceptor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    Tcp,
    Tls,
    Ws,
    Wss,
    /// MQTT over QUIC (UDP), EMQX-compatible.
    Quic,
}

impl ListenerKind {
    /// Every kind, in the order the default configuration starts them.
    pub const ALL: [ListenerKind; 5] = [Self::Tcp, Self::Tls, Self::Ws, Self::Wss, Self::Quic];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Ws => "ws",
            Self::Wss => "wss",
            Self::Quic => "quic",
        }
    }

    /// The conventional port for the kind, on every interface (as EMQX).
    pub fn default_bind(self) -> SocketAddr {
        let port = match self {
            Self::Tcp => 1883,
            Self::Tls => 8883,
            Self::Ws => 8083,
            Self::Wss => 8084,
            Self::Quic => 14567,
        };
        SocketAddr::from(([0, 0, 0, 0], port))
    }

    /// Whether the transport runs over TLS (and so reads `cert` and `key`).
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Tls | Self::Wss | Self::Quic)
    }

    /// Whether the transport frames MQTT in WebSocket messages (and so reads `path`).
    pub fn uses_websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }
}

impl std::fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The WebSocket path served when none is configured.
pub const DEFAULT_WS_PATH: &str = "/mqtt";
/// How long a TLS handshake or WebSocket upgrade may take when not configured.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once per listener, and broker-wide, when not configured (EMQX's
/// listener default).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1_024_000;
/// New connections per second per listener when not configured. EMQX's default is
/// `infinity`; ours is finite, a backstop that bounds one listener's accept work in a flood,
/// but generous: above the TLS (about 3,000/s) and QUIC (about 1,400/s) handshake rates a
/// 2-core machine sustains (docs/benchmarks.md), so it never slows a storm those absorb, and
/// half the plain-TCP rate (about 10,000/s). A reconnect storm of 10,000 TCP clients takes
/// about a second longer. Operators who want pacing below their handshake capacity lower it.
pub const DEFAULT_MAX_CONN_RATE: NonZeroU32 = match NonZeroU32::new(5000) {
    Some(rate) => rate,
    None => panic!("not zero"),
};

/// TCP keepalive on accepted sockets (EMQX's `tcp_options.keepalive`, "Idle,Interval,Probes"
/// in seconds): reaps half-open connections that MQTT's keep-alive does not (before CONNECT,
/// or with a long keep-alive), without waking clients that are talking anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpKeepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    pub interval: Duration,
    /// Unanswered probes before the kernel drops the connection.
    pub probes: u32,
}

impl TcpKeepalive {
    /// The default: "240,30,5" (EMQX's example), a dead peer found after about 6.5 minutes
    /// of silence.
    pub const DEFAULT: &'static str = "240,30,5";

    /// Parses "Idle,Interval,Probes" (seconds, seconds, count), or "none" (off).
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        if s.trim() == "none" {
            return Ok(None);
        }
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        let number = |p: &str| {
            p.parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("expected \"Idle,Interval,Probes\" or \"none\", got {s:?}"))
        };
        let [idle, interval, probes] = parts.as_slice() else {
            return Err(format!(
                "expected \"Idle,Interval,Probes\" (e.g. \"{}\") or \"none\", got {s:?}",
                Self::DEFAULT
            ));
        };
        Ok(Some(Self {
            idle: Duration::from_secs(u64::from(number(idle)?)),
            interval: Duration::from_secs(u64::from(number(interval)?)),
            probes: number(probes)?,
        }))
    }

    /// Switches keepalive on for `stream` (Linux; elsewhere nothing is set).
    fn apply(&self, stream: &TcpStream) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(self.idle)
                .with_interval(self.interval)
                .with_retries(self.probes);
            socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = stream;
            Ok(())
        }
    }
}

/// One listener, validated: keys that do not apply to its kind were refused when parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub kind: ListenerKind,
    pub bind: SocketAddr,
    /// Used by `tls` and `wss`.
    pub tls: TlsSettings,
    /// The HTTP path of the WebSocket upgrade (`ws` and `wss`).
    pub path: String,
    /// A TLS handshake or WebSocket upgrade still unfinished after this long is closed.
    pub handshake_timeout: Duration,
    /// Connections open at once on this listener (Mosquitto's and EMQX's `max_connections`).
    pub max_connections: usize,
    /// New connections accepted per second (EMQX's `max_conn_rate`; `None`: `"infinity"`).
    pub max_conn_rate: Option<NonZeroU32>,
}

impl ListenerConfig {
    /// A listener of `kind` on `bind` with every other setting at its default.
    pub fn new(kind: ListenerKind, bind: SocketAddr) -> Self {
        Self {
            kind,
            bind,
            tls: TlsSettings::default(),
            path: DEFAULT_WS_PATH.to_owned(),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_conn_rate: Some(DEFAULT_MAX_CONN_RATE),
        }
    }
}

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
        pacer: Pacer::new(kind, addr, config.max_conn_rate),
        slots: ListenerSlots::new(config.max_connections),
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
    let endpoints =
        crate::transport::quic_endpoints::bind(server, config.bind, settings.endpoint_count())
            .with_context(|| format!("cannot bind the quic listener to udp {}", config.bind))?;
    let addr = endpoints[0].local_addr()?;
    let count = endpoints.len();
    tracing::info!(kind = "quic", %addr, alpn = "mqtt", endpoints = count, "listening for MQTT");
    // Each endpoint paces its own accepts: its share of the listener's rate.
    let share = config.max_conn_rate.map(|r| {
        NonZeroU32::new(r.get().div_ceil(u32::try_from(count).unwrap_or(u32::MAX))).unwrap_or(r)
    });
    let pacer = move || Pacer::new(ListenerKind::Quic, addr, share);
    let listening = super::quic::Listening {
        slots: ListenerSlots::new(config.max_connections),
        pacer: pacer(),
        retry: super::permits::RetryPolicy::new(settings.retry, settings.retry_threshold),
        peer_cert_as_username: tls.peer_cert_as_username,
        handshake_timeout: config.handshake_timeout,
        handshakes: Default::default(),
    };
    super::quic::accept_all(endpoints, broker, listening, pacer, tracker, shutdown);
    Ok(addr)
}

/// Paces a listener's accepts to its `max_conn_rate`: before each accept, a token, or a
/// pause until there is one. Pauses are counted (`connections.rate_limited`), logged at debug,
/// and at info at most once a minute.
pub struct Pacer {
    kind: ListenerKind,
    addr: SocketAddr,
    rate: Option<ConnRate>,
    /// Pauses are logged at info once a minute at most.
    told: super::LogEvery,
}

impl Pacer {
    pub fn new(kind: ListenerKind, addr: SocketAddr, max_conn_rate: Option<NonZeroU32>) -> Self {
        Self {
            kind,
            addr,
            rate: max_conn_rate.map(|r| ConnRate::new(r, super::clock::now())),
            told: Default::default(),
        }
    }

    /// Returns once the rate allows one more connection, or `false` on shutdown.
    pub async fn ready(&mut self, broker: &Broker, shutdown: &CancellationToken) -> bool {
        let Some(rate) = &mut self.rate else {
            return true;
        };
        loop {
            let now = super::clock::now();
            let wait = match rate.take(now) {
                Ok(()) => return true,
                Err(wait) => wait,
            };
            broker
                .metrics
                .connections_rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (kind, addr) = (self.kind, self.addr);
            if self.told.due(now) {
                tracing::info!(%kind, %addr, "accepting paused: more new connections than listeners.max_conn_rate allows per second (raise it if this is expected)");
            } else {
                tracing::debug!(%kind, %addr, ?wait, "accepting paused: max_conn_rate");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

struct Accept {
    kind: ListenerKind,
    pacer: Pacer,
    /// This listener's share of the connection limits.
    slots: Arc<ListenerSlots>,
    handshake: Handshake,
    handshake_timeout: Duration,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Accept {
    async fn run(mut self, listener: TcpListener) {
        let mut backoff = Duration::from_millis(5);
        loop {
            if !self.pacer.ready(&self.broker, &self.shutdown).await {
                return;
            }
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
                    if let Some(keepalive) = &self.broker.settings().tcp_keepalive {
                        if let Err(err) = keepalive.apply(&stream) {
                            tracing::debug!(%peer, %err, "cannot set broker.tcp_keepalive");
                        }
                    }
                    let permit = match self.broker.permits.admit(&self.slots, peer.ip()) {
                        Ok(permit) => permit,
                        Err(full) => {
                            // Closed before any handshake work: a flood costs an accept.
                            tracing::debug!(kind = %self.kind, %peer, ?full, "connection refused: connection limit");
                            continue;
                        }
                    };
                    // Finds the connection's TCP_INFO for the operators' view.
                    let local = stream.local_addr().ok();
                    self.serve(stream, peer, local, permit);
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
    /// `permit` is held for the connection's life.
    fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        permit: Permit,
    ) {
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
                let serving =
                    connection::serve(broker, stream, peer, local, transport, None, shutdown);
                self.tracker.spawn(async move {
                    let _permit = permit;
                    serving.await
                });
            }
            Handshake::Tls(tls) => {
                self.tracker.spawn(async move {
                    let _permit = permit;
                    let step = Box::pin(guard.run(tls.accept(stream)));
                    let Some((stream, username)) = step.await else {
                        return;
                    };
                    connection::serve(broker, stream, peer, local, transport, username, shutdown)
                        .await
                });
            }
            Handshake::Ws(ws) => {
                self.tracker.spawn(async move {
                    let _permit = permit;
                    let step = Box::pin(guard.run(ws.accept(stream)));
                    let Some(stream) = step.await else {
                        return;
                    };
                    connection::serve(broker, stream, peer, local, transport, None, shutdown).await
                });
            }
            Handshake::Wss(tls, ws) => {
                self.tracker.spawn(async move {
                    let _permit = permit;
                    // One deadline covers both steps.
                    let steps = Box::pin(async move {
                        let (stream, username) = guard.clone().run(tls.accept(stream)).await?;
                        let stream = guard.run(ws.accept(stream)).await?;
                        Some((stream, username))
                    });
                    let Some((stream, username)) = steps.await else {
                        return;
                    };
                    connection::serve(broker, stream, peer, local, transport, username, shutdown)
                        .await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_keepalive_parses_emqx_form_and_none() {
        assert_eq!(
            TcpKeepalive::parse(TcpKeepalive::DEFAULT),
            Ok(Some(TcpKeepalive {
                idle: Duration::from_secs(240),
                interval: Duration::from_secs(30),
                probes: 5,
            }))
        );
        assert_eq!(TcpKeepalive::parse("none"), Ok(None));
        for bad in ["", "240,30", "240,30,5,1", "0,30,5", "a,b,c", "-1,30,5"] {
            assert!(TcpKeepalive::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// The option reaches the accepted socket.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn tcp_keepalive_is_set_on_an_accepted_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let keepalive = TcpKeepalive::parse("61,7,3").unwrap().unwrap();
        keepalive.apply(&accepted).unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(
            socket.tcp_keepalive_time().unwrap(),
            Duration::from_secs(61)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
    }
}
