//! The client's side of every transport: a [`ServerConnection`] is one connection to a server, whichever
//! URL scheme chose it, as a set of routes (streams) with a writer task and a reader task
//! each.
//!
//! - `mqtt`, `mqtts`, `ws`, `wss`: one byte stream (TCP, TLS over TCP, WebSocket over either),
//!   so every route is the control route.
//! - `quic`: the first bidirectional stream is the control stream; a data-stream slot's stream
//!   is opened the first time a packet is sent on it (with its group's priority). The
//!   endpoint lives in the [`TransportContext`] for the client's lifetime, so rustls' session
//!   cache keeps the server's tickets and a reconnect can send CONNECT in 0-RTT; `rebind`
//!   moves it to a new UDP socket (connection migration).
//!
//! Readers decode packets with the codec into one bounded queue (a full queue stops reading,
//! which is the back-pressure towards the server); writers take encoded bytes, so a stalled
//! stream never blocks another. No protocol decisions are made here.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt as _;
use quinn::{Endpoint, RecvStream, SendStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::options::{ClientOptions, ServerUrl, TlsOptions, Transport};
use super::streams::{Route, StreamMap};
use super::{ClientError, Stats};
use crate::codec::{encode, Codec, ConnAck, DecodeError, Packet, ProtocolVersion};
use crate::transport::reader::PacketReader;
use crate::transport::{certs, datagram, quic, quic_endpoints, tls, ws};

/// Decoded packets queued from all readers before they stop reading.
const INBOUND_QUEUE: usize = 64;

/// What the readers tell the driver.
#[derive(Debug)]
pub enum Inbound {
    Packet(Route, Packet),
    Invalid(Route, DecodeError),
    /// The stream ended (cleanly or not).
    Ended(Route),
}

/// TLS and QUIC client configurations built once (trust anchors parsed once, one certificate
/// verifier) and a pool of QUIC endpoints, handed to many clients with
/// [`ClientOptions::shared_transport`](super::ClientOptions::shared_transport).
///
/// For a process that holds many connections (a load generator, a gateway): without it each
/// client parses its CA file, builds its own rustls configuration and binds its own UDP socket
/// with its own quinn endpoint (and endpoint task). With it, a client takes the next endpoint
/// of the pool (made on first use, at most `endpoints` per address family) and keeps it for its
/// lifetime, reconnects included; each endpoint's socket asks for the listener's larger
/// buffers (`transport::quic_endpoints::SOCKET_BUFFER`). Per client, as without sharing: its TLS session cache (so
/// its 0-RTT tickets are its own: a client never resumes with a ticket another client got),
/// its QUIC address-validation tokens, its server name, local address and datagram request.
///
/// Shared: the TLS and QUIC settings of the options the pool was built from (`tls`, `quic`,
/// and whether datagrams are offered at all); the client's own `tls` and `quic` options are
/// not used. A client on a shared endpoint cannot [`rebind`](super::Client::rebind): moving
/// the endpoint would migrate every connection on it, so `rebind` fails with
/// [`ClientError::Config`] and nothing moves.
pub struct SharedTransport {
    configs: Configs,
    endpoints: usize,
    /// Per address family (`true`: IPv6): the endpoints made so far, and the next to hand out.
    pool: Mutex<HashMap<bool, (Vec<Endpoint>, usize)>>,
}

impl std::fmt::Debug for SharedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pool = self.pool.lock().expect("never poisoned");
        f.debug_struct("SharedTransport")
            .field("endpoints", &self.endpoints)
            .field("bound", &pool.values().map(|(e, _)| e.len()).sum::<usize>())
            .finish_non_exhaustive()
    }
}

impl SharedTransport {
    /// Builds the configurations for `options`' URLs, TLS and QUIC settings, with at most
    /// `endpoints` QUIC endpoints (UDP sockets) per address family (at least one). Endpoints
    /// are bound on first use, so this needs no runtime; a client's endpoint is bound inside
    /// the runtime it runs on.
    pub fn new(options: &ClientOptions, endpoints: usize) -> Result<Self, ClientError> {
        Ok(Self {
            configs: Configs::new(options)?,
            endpoints: endpoints.max(1),
            pool: Mutex::new(HashMap::new()),
        })
    }

    /// The next endpoint of the pool for `v6`: a new one while fewer than `endpoints` exist,
    /// then each in turn.
    fn endpoint(&self, v6: bool) -> Result<Endpoint, ClientError> {
        let mut pool = self.pool.lock().expect("never poisoned");
        let (endpoints, next) = pool.entry(v6).or_default();
        if endpoints.len() < self.endpoints {
            // One socket carries many clients' handshakes: the listener's larger buffers.
            let socket = quic_endpoints::udp_socket(unspecified(v6), false).map_err(io)?;
            let runtime = quinn::default_runtime()
                .ok_or_else(|| ClientError::Io("QUIC endpoints need a tokio runtime".into()))?;
            let endpoint = Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
                .map_err(io)?;
            endpoints.push(endpoint.clone());
            return Ok(endpoint);
        }
        let endpoint = endpoints[*next % endpoints.len()].clone();
        *next = next.wrapping_add(1);
        Ok(endpoint)
    }

    /// QUIC endpoints bound so far (every address family).
    pub fn endpoints_bound(&self) -> usize {
        let pool = self.pool.lock().expect("never poisoned");
        pool.values().map(|(e, _)| e.len()).sum()
    }
}

/// The TLS configurations (TCP and QUIC) and the QUIC transport configuration of a client,
/// or of a [`SharedTransport`]'s clients.
struct Configs {
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The rustls configuration for QUIC (TLS 1.3, ALPN `mqtt`, early data).
    quic_tls: Option<Arc<rustls::ClientConfig>>,
    quic_transport: Option<Arc<quinn::TransportConfig>>,
}

impl Configs {
    fn new(options: &ClientOptions) -> Result<Self, ClientError> {
        let secure = options.urls.iter().any(|u| u.transport.is_secure());
        let tls = if secure {
            Some(Arc::new(rustls_config(
                &options.tls,
                tls::provider(),
                false,
            )?))
        } else {
            None
        };
        let (quic_tls, quic_transport) =
            if options.urls.iter().any(|u| u.transport == Transport::Quic) {
                let mut crypto = rustls_config(&options.tls, quic::provider(), true)?;
                crypto.alpn_protocols = vec![quic::ALPN.to_vec()];
                crypto.enable_early_data = true;
                let mut transport = quic::transport_config(&options.quic)
                    .map_err(|e| ClientError::Config(e.to_string()))?;
                // The server never opens streams (EMQX mapping).
                transport.max_concurrent_bidi_streams(0u32.into());
                if options.datagram_copies == 0 {
                    // Not asking for the datagram class: not offering datagrams either.
                    transport.datagram_receive_buffer_size(None);
                }
                (Some(Arc::new(crypto)), Some(Arc::new(transport)))
            } else {
                (None, None)
            };
        Ok(Self {
            tls,
            quic_tls,
            quic_transport,
        })
    }

    /// The quinn client configuration of one client. Each gets its own TLS session cache
    /// (sized for its own servers) and its own QUIC token store; the rest is shared.
    fn quic_client(
        &self,
        own_sessions: Option<usize>,
    ) -> Result<Option<quinn::ClientConfig>, ClientError> {
        let (Some(tls), Some(transport)) = (&self.quic_tls, &self.quic_transport) else {
            return Ok(None);
        };
        let tls = match own_sessions {
            None => Arc::clone(tls),
            Some(servers) => {
                let mut own = rustls::ClientConfig::clone(tls);
                own.resumption = rustls::client::Resumption::in_memory_sessions(servers.max(1));
                Arc::new(own)
            }
        };
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Config(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::clone(transport));
        Ok(Some(config))
    }

    /// The TLS-over-TCP configuration of one client, with its own session cache when shared.
    fn tls_client(&self, own_sessions: Option<usize>) -> Option<Arc<rustls::ClientConfig>> {
        let tls = self.tls.as_ref()?;
        Some(match own_sessions {
            None => Arc::clone(tls),
            Some(servers) => {
                let mut own = rustls::ClientConfig::clone(tls);
                own.resumption = rustls::client::Resumption::in_memory_sessions(servers.max(1));
                Arc::new(own)
            }
        })
    }
}

/// Built once per client and kept across reconnects: TLS configurations and QUIC endpoints
/// (the client's own, or taken from a [`SharedTransport`]).
pub struct TransportContext {
    tls: Option<Arc<rustls::ClientConfig>>,
    quic: Option<quinn::ClientConfig>,
    /// One endpoint per address family, made (or taken from `shared`) on first use.
    endpoints: Mutex<HashMap<bool, Endpoint>>,
    shared: Option<Arc<SharedTransport>>,
    server_name: Option<String>,
    local_addr: Option<IpAddr>,
    /// The datagram class asked for (copies, 0: not asked), and the copies' spacing.
    datagram_copies: u8,
    datagram_spacing: Duration,
}

impl TransportContext {
    pub fn new(options: &ClientOptions) -> Result<Self, ClientError> {
        let shared = options.shared_transport.clone();
        let (tls, quic) = match &shared {
            None => {
                let configs = Configs::new(options)?;
                (configs.tls_client(None), configs.quic_client(None)?)
            }
            Some(shared) => {
                // Its own session cache, as an unshared client's (which holds 256 servers).
                let servers = Some(options.urls.len());
                (
                    shared.configs.tls_client(servers),
                    shared.configs.quic_client(servers)?,
                )
            }
        };
        Ok(Self {
            tls,
            quic,
            endpoints: Mutex::new(HashMap::new()),
            shared,
            server_name: options.tls.server_name.clone(),
            local_addr: options.local_addr,
            datagram_copies: options.datagram_copies,
            datagram_spacing: options.quic.datagram_spacing,
        })
    }

    fn endpoint(&self, v6: bool) -> Result<Endpoint, ClientError> {
        let mut endpoints = self.endpoints.lock().expect("never poisoned");
        if let Some(endpoint) = endpoints.get(&v6) {
            return Ok(endpoint.clone());
        }
        if self.quic.is_none() {
            return Err(ClientError::NotQuic);
        }
        let endpoint = match &self.shared {
            Some(shared) => shared.endpoint(v6)?,
            None => Endpoint::client(unspecified(v6)).map_err(io)?,
        };
        endpoints.insert(v6, endpoint.clone());
        Ok(endpoint)
    }

    /// Moves the QUIC endpoint of `remote`'s family to a fresh UDP socket (new local port):
    /// connections on it migrate. Returns the new local address. Refused for an endpoint of
    /// a [`SharedTransport`] (it would move every client on it).
    pub fn rebind(&self, remote: SocketAddr) -> Result<SocketAddr, ClientError> {
        if self.shared.is_some() {
            return Err(ClientError::Config(
                "rebind needs the client's own QUIC endpoint; this client shares one \
                 (ClientOptions::shared_transport)"
                    .into(),
            ));
        }
        let endpoint = self.endpoint(remote.is_ipv6())?;
        let socket = std::net::UdpSocket::bind(unspecified(remote.is_ipv6())).map_err(io)?;
        endpoint.rebind(socket).map_err(io)?;
        endpoint.local_addr().map_err(io)
    }
}

fn unspecified(v6: bool) -> SocketAddr {
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    };
    SocketAddr::new(ip, 0)
}

fn io(err: std::io::Error) -> ClientError {
    ClientError::Io(err.to_string())
}

/// rustls client configuration from the options: trust anchors (CA file, optionally the
/// system store) or no verification at all (`insecure`), and a client certificate.
fn rustls_config(
    options: &TlsOptions,
    provider: Arc<CryptoProvider>,
    tls13_only: bool,
) -> Result<rustls::ClientConfig, ClientError> {
    let config_err = |e: rustls::Error| ClientError::Config(format!("TLS: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider));
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(config_err)?;
    let builder = if options.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = RootCertStore::empty();
        if let Some(ca) = &options.ca_file {
            for cert in certs::load_certs(ca).map_err(|e| ClientError::Config(e.to_string()))? {
                roots.add(cert).map_err(config_err)?;
            }
        }
        if options.native_roots {
            let native = rustls_native_certs::load_native_certs()
                .map_err(|e| ClientError::Config(format!("system trust store: {e}")))?;
            roots.add_parsable_certificates(native);
        }
        if roots.is_empty() {
            return Err(ClientError::Config(
                "TLS needs trust anchors: set ca_file or native_roots (or insecure for tests)"
                    .into(),
            ));
        }
        builder.with_root_certificates(roots)
    };
    match &options.client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = certs::load_certs(cert).map_err(|e| ClientError::Config(e.to_string()))?;
            let key = certs::load_key(key).map_err(|e| ClientError::Config(e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(config_err)
        }
    }
}

/// Accepts any server certificate, still checking that the handshake is signed by it.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// A connection

/// Any byte stream a `mqtt`/`mqtts`/`ws`/`wss` connection runs over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Writer {
    tx: mpsc::UnboundedSender<Bytes>,
    backlog: Arc<AtomicUsize>,
}

/// One connection to a server: its routes, their tasks, and the inbound queue.
pub struct ServerConnection {
    /// Signalled by the writers each time they have written something: wakes a driver that
    /// stopped taking publishes while the backlog was high.
    pub written: Arc<tokio::sync::Notify>,
    pub url: ServerUrl,
    pub remote: Option<SocketAddr>,
    /// The CONNECT went out in 0-RTT and the server accepted it.
    pub zero_rtt: bool,
    quic: Option<quinn::Connection>,
    early: Option<quinn::ZeroRttAccepted>,
    writers: HashMap<Route, Writer>,
    control_writer: Option<tokio::task::JoinHandle<()>>,
    inbound_tx: mpsc::Sender<Inbound>,
    inbound: mpsc::Receiver<Inbound>,
    tasks: JoinSet<()>,
    version: ProtocolVersion,
    max_packet_size: u32,
    stats: Arc<Stats>,
    /// The QoS 0 datagram class, when the server confirmed it.
    datagram: Option<datagram::Sender>,
}

/// What one connect attempt has heard from the server so far: read by the reconnect race,
/// which never drops an attempt the server answered for a newer one.
#[derive(Debug, Default)]
pub struct Progress {
    answered: std::sync::atomic::AtomicBool,
    quic: Mutex<Option<quinn::Connection>>,
}

impl Progress {
    /// A TCP connection stands (or was refused), or a QUIC packet came back.
    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
            || self
                .quic
                .lock()
                .expect("never poisoned")
                .as_ref()
                .is_some_and(|c| c.stats().udp_rx.datagrams > 0)
    }
}

/// Why one connect attempt failed; `ZeroRttRejected` is retried at once without early data.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("{0}")]
    Failed(String),
    #[error("the server refused the connection: {0:?}")]
    Refused(crate::codec::ReasonCode),
    #[error("0-RTT rejected")]
    ZeroRttRejected,
}

impl From<std::io::Error> for AttemptError {
    fn from(err: std::io::Error) -> Self {
        Self::Failed(err.to_string())
    }
}

impl ServerConnection {
    /// Opens the transport of `url` and runs CONNECT → CONNACK on it. The caller bounds the
    /// time this may take.
    pub async fn open(
        ctx: &TransportContext,
        url: &ServerUrl,
        connect: &Packet,
        max_packet_size: u32,
        stats: Arc<Stats>,
        login: Option<(&str, &[u8])>,
        progress: &Progress,
    ) -> Result<(Self, ConnAck), AttemptError> {
        let Packet::Connect(c) = connect else {
            return Err(AttemptError::Failed("not a CONNECT".into()));
        };
        let version = c.protocol;
        let mut allow_early = true;
        loop {
            let mut link = Self::transport(
                ctx,
                url,
                version,
                max_packet_size,
                Arc::clone(&stats),
                allow_early,
                progress,
            )
            .await?;
            let asking = link.asks_datagrams(ctx);
            let with_ask;
            let connect = match connect {
                Packet::Connect(c) if asking => {
                    let mut c = c.clone();
                    c.properties.user_properties.push((
                        datagram::USER_PROPERTY.into(),
                        ctx.datagram_copies.to_string(),
                    ));
                    with_ask = Packet::Connect(c);
                    &with_ask
                }
                _ => connect,
            };
            match link.handshake(connect, login).await {
                Err(AttemptError::ZeroRttRejected) if allow_early => {
                    link.abort();
                    allow_early = false;
                }
                Err(err) => {
                    link.abort();
                    return Err(err);
                }
                Ok(connack) => {
                    if asking {
                        link.start_datagrams(ctx, &connack);
                    }
                    return Ok((link, connack));
                }
            }
        }
    }

    async fn transport(
        ctx: &TransportContext,
        url: &ServerUrl,
        version: ProtocolVersion,
        max_packet_size: u32,
        stats: Arc<Stats>,
        allow_early: bool,
        progress: &Progress,
    ) -> Result<Self, AttemptError> {
        let (inbound_tx, inbound) = mpsc::channel(INBOUND_QUEUE);
        let mut link = Self {
            written: Arc::new(tokio::sync::Notify::new()),
            url: url.clone(),
            remote: None,
            zero_rtt: false,
            quic: None,
            early: None,
            writers: HashMap::new(),
            control_writer: None,
            inbound_tx,
            inbound,
            tasks: JoinSet::new(),
            version,
            max_packet_size,
            stats,
            datagram: None,
        };
        if url.transport == Transport::Quic {
            let addr = resolve(url).await?;
            link.remote = Some(addr);
            let endpoint = ctx
                .endpoint(addr.is_ipv6())
                .map_err(|e| AttemptError::Failed(e.to_string()))?;
            let name = server_name(ctx, url);
            let config = ctx
                .quic
                .clone()
                .ok_or(AttemptError::Failed("no QUIC".into()))?;
            let connecting = endpoint
                .connect_with(config, addr, &name)
                .map_err(|e| AttemptError::Failed(e.to_string()))?;
            let conn = match connecting.into_0rtt() {
                Ok((conn, accepted)) => {
                    // Handshake under way: answered once a packet comes back.
                    *progress.quic.lock().expect("never poisoned") = Some(conn.clone());
                    if allow_early {
                        link.early = Some(accepted);
                    }
                    conn
                }
                Err(connecting) => {
                    let conn = connecting
                        .await
                        .map_err(|e| AttemptError::Failed(e.to_string()))?;
                    progress.answered.store(true, Ordering::Relaxed);
                    conn
                }
            };
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| AttemptError::Failed(e.to_string()))?;
            link.quic = Some(conn);
            link.add_quic_stream(Route::Control, send, recv);
            return Ok(link);
        }

        let tcp = match (ctx.local_addr, url.socket_addr()) {
            (None, Some(addr)) => TcpStream::connect(addr).await,
            (None, None) => TcpStream::connect((url.host.as_str(), url.port)).await,
            (Some(local), addr) => connect_from(local, addr, url).await,
        };
        // A connection, or a refusal (RST): either way the server's host answered.
        let refused = tcp.as_ref().is_err_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            )
        });
        if tcp.is_ok() || refused {
            progress.answered.store(true, Ordering::Relaxed);
        }
        let tcp = tcp?;
        tcp.set_nodelay(true)?;
        link.remote = tcp.peer_addr().ok();
        let stream: Box<dyn Io> = match url.transport {
            Transport::Tcp | Transport::Ws => Box::new(tcp),
            Transport::Tls | Transport::Wss => {
                let config = ctx
                    .tls
                    .clone()
                    .ok_or_else(|| AttemptError::Failed("no TLS".into()))?;
                let name = ServerName::try_from(server_name(ctx, url))
                    .map_err(|e| AttemptError::Failed(format!("server name: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                Box::new(tls)
            }
            Transport::Quic => unreachable!("handled above"),
        };
        let stream: Box<dyn Io> = match url.transport {
            Transport::Ws | Transport::Wss => {
                Box::new(websocket(url, stream, max_packet_size).await?)
            }
            _ => stream,
        };
        let (read, write) = tokio::io::split(stream);
        link.add_stream(read, write);
        Ok(link)
    }

    /// Sends CONNECT on the control route and waits for CONNACK; with a `login`, runs the
    /// SCRAM-SHA-256 exchange (AUTH packets) in between and checks the server's signature.
    async fn handshake(
        &mut self,
        connect: &Packet,
        login: Option<(&str, &[u8])>,
    ) -> Result<ConnAck, AttemptError> {
        let mut exchange = None;
        let enhanced;
        let connect = match (login, connect) {
            (Some((username, password)), Packet::Connect(c)) => {
                let (started, first) = super::auth::Exchange::start(username, password);
                exchange = Some(started);
                let mut c = c.clone();
                c.password = None;
                c.properties.authentication_method = Some(crate::auth::scram::METHOD.into());
                c.properties.authentication_data = Some(first);
                enhanced = Packet::Connect(c);
                &enhanced
            }
            _ => connect,
        };
        self.send(
            Route::Control,
            encoded(connect, self.version),
            &StreamMap::new(Default::default()),
        );
        // SCRAM takes one AUTH round trip; anything longer is the server's mistake.
        let mut rounds = 0;
        let connack = loop {
            match self.inbound.recv().await {
                Some(Inbound::Packet(Route::Control, Packet::ConnAck(connack))) => break connack,
                Some(Inbound::Packet(Route::Control, Packet::Auth(auth)))
                    if exchange.is_some() && rounds == 0 =>
                {
                    rounds += 1;
                    let reply = exchange
                        .as_mut()
                        .map(|e| e.answer(&auth))
                        .transpose()
                        .map_err(|why| AttemptError::Failed(format!("authentication: {why}")))?;
                    if let Some(reply) = reply {
                        self.send(
                            Route::Control,
                            encoded(&reply, self.version),
                            &StreamMap::new(Default::default()),
                        );
                    }
                }
                Some(Inbound::Packet(_, other)) => {
                    return Err(AttemptError::Failed(format!(
                        "packet type {} before CONNACK",
                        other.packet_type()
                    )))
                }
                Some(Inbound::Invalid(_, err)) => {
                    return Err(AttemptError::Failed(format!("malformed CONNACK: {err}")))
                }
                Some(Inbound::Ended(_)) | None => {
                    if let Some(early) = self.early.take() {
                        if !early.await {
                            return Err(AttemptError::ZeroRttRejected);
                        }
                    }
                    return Err(AttemptError::Failed("closed before CONNACK".into()));
                }
            }
        };
        if let Some(early) = self.early.take() {
            // The CONNACK answered a CONNECT sent in 0-RTT.
            self.zero_rtt = early.await;
        }
        if connack.code.is_failure() {
            return Err(AttemptError::Refused(connack.code));
        }
        if let Some(exchange) = &exchange {
            exchange.finish(&connack.properties).map_err(|why| {
                AttemptError::Failed(format!("authentication of the server: {why}"))
            })?;
        }
        Ok(connack)
    }

    pub fn is_quic(&self) -> bool {
        self.quic.is_some()
    }

    /// Whether to ask for the datagram class: configured, MQTT 5, and a QUIC connection whose
    /// server accepts datagrams.
    fn asks_datagrams(&self, ctx: &TransportContext) -> bool {
        ctx.datagram_copies > 0
            && self.version.is_v5()
            && self
                .quic
                .as_ref()
                .is_some_and(|c| c.max_datagram_size().is_some())
    }

    /// The server confirmed the datagram class in CONNACK: QoS 0 publishes go as datagrams,
    /// and the server's datagrams are read (each new PUBLISH as if on the control stream).
    fn start_datagrams(&mut self, ctx: &TransportContext, connack: &ConnAck) {
        let confirmed = connack
            .properties
            .user_properties
            .iter()
            .any(|(name, value)| {
                name == datagram::USER_PROPERTY && datagram::parse_copies(value).is_some()
            });
        let Some(conn) = self.quic.clone().filter(|_| confirmed) else {
            return;
        };
        let (sender, rx) = datagram::Sender::new();
        self.tasks.spawn(datagram::send_loop(
            conn.clone(),
            rx,
            ctx.datagram_copies,
            ctx.datagram_spacing,
            ClientCounters(Arc::clone(&self.stats)),
        ));
        let codec = Codec::with_version(self.version, self.max_packet_size);
        self.tasks.spawn(datagram::receive_loop(
            conn,
            codec,
            self.inbound_tx.clone(),
            |packet| Inbound::Packet(Route::Control, packet),
            ClientCounters(Arc::clone(&self.stats)),
        ));
        self.datagram = Some(sender);
    }

    /// Queues encoded bytes on `route`, opening a QUIC data stream for a new slot. Without a
    /// stream for it (byte streams, or no stream credit left) a route falls back to control.
    pub fn send(&mut self, route: Route, bytes: Bytes, streams: &StreamMap) {
        if let (Some(sender), Some(conn)) = (self.datagram.as_mut(), &self.quic) {
            let one_qos0_publish = datagram::is_qos0_publish(&bytes)
                && datagram::packet_len(&bytes) == Some(bytes.len());
            if one_qos0_publish
                && sender
                    .send(&bytes, conn.max_datagram_size(), &self.stats.datagrams)
                    .is_ok()
            {
                return;
            }
        }
        let route = match route {
            Route::Data(slot) if !self.writers.contains_key(&route) => {
                if self.open_data_stream(slot, streams.priority(slot)) {
                    route
                } else {
                    Route::Control
                }
            }
            route => route,
        };
        if let Some(writer) = self.writers.get(&route) {
            writer.backlog.fetch_add(bytes.len(), Ordering::Relaxed);
            let _ = writer.tx.send(bytes);
        }
    }

    fn open_data_stream(&mut self, slot: u16, priority: i32) -> bool {
        let Some(conn) = &self.quic else {
            return false;
        };
        // Streams open at once while the server's credit lasts; never wait for more.
        let Some(Ok((send, recv))) = conn.open_bi().now_or_never() else {
            return false;
        };
        let _ = send.set_priority(priority);
        self.stats
            .data_streams_opened
            .fetch_add(1, Ordering::Relaxed);
        self.add_quic_stream(Route::Data(slot), send, recv);
        true
    }

    /// A data stream ended: its slot opens a new stream the next time it is used.
    pub fn forget(&mut self, route: Route) {
        if route != Route::Control {
            self.writers.remove(&route);
        }
    }

    /// Bytes handed to writers and not yet written.
    pub fn backlog(&self) -> usize {
        self.writers
            .values()
            .map(|w| w.backlog.load(Ordering::Relaxed))
            .sum()
    }

    pub async fn recv(&mut self) -> Option<Inbound> {
        self.inbound.recv().await
    }

    /// Sends `last` (DISCONNECT) if given, lets the control stream flush for at most
    /// `linger`, then closes.
    pub async fn close(mut self, last: Option<&Packet>, linger: Duration) {
        if let Some(packet) = last {
            let bytes = encoded(packet, self.version);
            self.send(Route::Control, bytes, &StreamMap::new(Default::default()));
        }
        self.writers.clear(); // each writer ends after its queue
        if let Some(handle) = self.control_writer.take() {
            let _ = tokio::time::timeout(linger, handle).await;
        }
        self.abort();
    }

    fn abort(&mut self) {
        if let Some(conn) = &self.quic {
            conn.close(0u32.into(), b"");
        }
        if let Some(handle) = self.control_writer.take() {
            handle.abort();
        }
        self.tasks.abort_all();
    }

    fn add_quic_stream(&mut self, route: Route, send: SendStream, recv: RecvStream) {
        let backlog = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let task = write_quic(send, rx, Arc::clone(&backlog), Arc::clone(&self.written));
        if route == Route::Control {
            self.control_writer = Some(tokio::spawn(task));
        } else {
            self.tasks.spawn(task);
        }
        self.writers.insert(route, Writer { tx, backlog });
        self.spawn_reader(route, recv);
    }

    fn add_stream(
        &mut self,
        read: impl AsyncRead + Unpin + Send + 'static,
        write: impl AsyncWrite + Unpin + Send + 'static,
    ) {
        let backlog = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        self.control_writer = Some(tokio::spawn(write_stream(
            write,
            rx,
            Arc::clone(&backlog),
            Arc::clone(&self.written),
        )));
        self.writers.insert(Route::Control, Writer { tx, backlog });
        self.spawn_reader(Route::Control, read);
    }

    fn spawn_reader(&mut self, route: Route, read: impl AsyncRead + Unpin + Send + 'static) {
        let codec = Codec::with_version(self.version, self.max_packet_size);
        self.tasks
            .spawn(read_packets(route, read, codec, self.inbound_tx.clone()));
    }
}

impl Drop for ServerConnection {
    fn drop(&mut self) {
        self.abort();
    }
}

/// The client's datagram counters, for the datagram tasks.
struct ClientCounters(Arc<Stats>);

impl AsRef<datagram::Counters> for ClientCounters {
    fn as_ref(&self) -> &datagram::Counters {
        &self.0.datagrams
    }
}

pub fn encoded(packet: &Packet, version: ProtocolVersion) -> Bytes {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out);
    out.freeze()
}

/// Connects from a given local address (port chosen by the system) to the URL's address of
/// the same family.
async fn connect_from(
    local: IpAddr,
    addr: Option<SocketAddr>,
    url: &ServerUrl,
) -> std::io::Result<TcpStream> {
    let addr = match addr {
        Some(addr) => addr,
        None => tokio::net::lookup_host((url.host.as_str(), url.port))
            .await?
            .find(|a| a.is_ipv4() == local.is_ipv4())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::AddrNotAvailable,
                    format!("{} has no address of the local address's family", url.host),
                )
            })?,
    };
    let socket = if local.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(addr).await
}

fn server_name(ctx: &TransportContext, url: &ServerUrl) -> String {
    ctx.server_name.clone().unwrap_or_else(|| url.host.clone())
}

async fn resolve(url: &ServerUrl) -> Result<SocketAddr, AttemptError> {
    if let Some(addr) = url.socket_addr() {
        return Ok(addr);
    }
    tokio::net::lookup_host((url.host.as_str(), url.port))
        .await?
        .next()
        .ok_or_else(|| AttemptError::Failed(format!("{} has no address", url.host)))
}

async fn websocket(
    url: &ServerUrl,
    stream: Box<dyn Io>,
    max_packet_size: u32,
) -> Result<ws::WsStream<Box<dyn Io>>, AttemptError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

    let scheme = if url.transport == Transport::Wss {
        "wss"
    } else {
        "ws"
    };
    let host = match url.ip() {
        Some(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => url.host.clone(),
    };
    let mut request = format!("{scheme}://{host}:{}{}", url.port, url.path)
        .into_client_request()
        .map_err(|e| AttemptError::Failed(format!("WebSocket request: {e}")))?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let max = usize::try_from(max_packet_size).unwrap_or(usize::MAX);
    let config = WebSocketConfig {
        max_message_size: Some(max),
        max_frame_size: Some(max),
        ..WebSocketConfig::default()
    };
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| AttemptError::Failed(format!("WebSocket upgrade: {e}")))?;
    Ok(ws::WsStream::new(ws))
}

async fn read_packets(
    route: Route,
    read: impl AsyncRead + Unpin,
    codec: Codec,
    inbound: mpsc::Sender<Inbound>,
) {
    let mut reader = PacketReader::new(read, codec);
    while let Some(next) = reader.next().await {
        let input = match next {
            Ok(packet) => Inbound::Packet(route, packet),
            Err(err) => {
                let _ = inbound.send(Inbound::Invalid(route, err)).await;
                return;
            }
        };
        if inbound.send(input).await.is_err() {
            return;
        }
    }
    let _ = inbound.send(Inbound::Ended(route)).await;
}

async fn write_stream(
    mut write: impl AsyncWrite + Unpin,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    backlog: Arc<AtomicUsize>,
    written: Arc<tokio::sync::Notify>,
) {
    while let Some(bytes) = rx.recv().await {
        let n = bytes.len();
        if write.write_all(&bytes).await.is_err() {
            return;
        }
        // Everything queued meanwhile goes in the same flush (one WebSocket message).
        let mut more = n;
        while let Ok(bytes) = rx.try_recv() {
            more += bytes.len();
            if write.write_all(&bytes).await.is_err() {
                return;
            }
        }
        if write.flush().await.is_err() {
            return;
        }
        backlog.fetch_sub(more, Ordering::Relaxed);
        written.notify_one();
    }
    let _ = write.shutdown().await;
}

async fn write_quic(
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    backlog: Arc<AtomicUsize>,
    written: Arc<tokio::sync::Notify>,
) {
    while let Some(bytes) = rx.recv().await {
        let n = bytes.len();
        if send.write_chunk(bytes).await.is_err() {
            return;
        }
        backlog.fetch_sub(n, Ordering::Relaxed);
        written.notify_one();
    }
    let _ = send.finish();
    // Until the server has it all (or stops the stream); the caller bounds the wait.
    let _ = send.stopped().await;
}
