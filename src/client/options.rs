//! What a client is told before it connects: the server URLs (one transport per URL scheme),
//! the MQTT session parameters, TLS trust, QUIC stream policy, reconnect backoff and the
//! offline buffer. Plain data with builder methods; nothing here touches the network.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::auth::AuthMethod;
use super::race::Overlap;
use super::streams::QuicStreams;
use super::transport::SharedTransport;
use super::{ClientError, Message};
use crate::codec::{Properties, ProtocolVersion};
use crate::transport::quic::QuicSettings;

/// The transport a URL scheme selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// `mqtt://host[:1883]`
    Tcp,
    /// `mqtts://host[:8883]`
    Tls,
    /// `ws://host[:8083][/mqtt]`
    Ws,
    /// `wss://host[:8084][/mqtt]`
    Wss,
    /// `quic://host[:14567]` (MQTT over QUIC, EMQX mapping, ALPN `mqtt`)
    Quic,
}

impl Transport {
    pub fn scheme(self) -> &'static str {
        match self {
            Self::Tcp => "mqtt",
            Self::Tls => "mqtts",
            Self::Ws => "ws",
            Self::Wss => "wss",
            Self::Quic => "quic",
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Tcp => 1883,
            Self::Tls => 8883,
            Self::Ws => 8083,
            Self::Wss => 8084,
            Self::Quic => 14567,
        }
    }

    /// Whether the transport runs TLS (and so needs trust anchors).
    pub fn is_secure(self) -> bool {
        matches!(self, Self::Tls | Self::Wss | Self::Quic)
    }
}

/// A parsed server URL: `scheme://host[:port][/path]`, with optional `user:password@`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    pub transport: Transport,
    /// Host name or IP address (without IPv6 brackets); also the TLS server name.
    pub host: String,
    pub port: u16,
    /// The HTTP path for WebSocket (default `/mqtt`); `/` otherwise.
    pub path: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl ServerUrl {
    pub fn parse(text: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| ClientError::InvalidUrl(format!("{text}: {why}"));
        let url = url::Url::parse(text).map_err(|e| bad(&e.to_string()))?;
        let transport = match url.scheme() {
            "mqtt" | "tcp" => Transport::Tcp,
            "mqtts" | "ssl" | "tls" => Transport::Tls,
            "ws" => Transport::Ws,
            "wss" => Transport::Wss,
            "quic" => Transport::Quic,
            other => return Err(bad(&format!("unknown scheme `{other}`"))),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err(bad("no host")),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port().unwrap_or(transport.default_port());
        let path = match (transport, url.path()) {
            (Transport::Ws | Transport::Wss, "" | "/") => "/mqtt".to_owned(),
            (_, "") => "/".to_owned(),
            (_, path) => path.to_owned(),
        };
        let username = Some(url.username())
            .filter(|u| !u.is_empty())
            .map(str::to_owned);
        Ok(Self {
            transport,
            host,
            port,
            path,
            username,
            password: url.password().map(str::to_owned),
        })
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// A literal socket address when the host is an IP address (no resolver needed).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.ip().map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = match self.ip() {
            Some(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => self.host.clone(),
        };
        write!(f, "{}://{host}:{}", self.transport.scheme(), self.port)?;
        if matches!(self.transport, Transport::Ws | Transport::Wss) {
            f.write_str(&self.path)?;
        }
        Ok(())
    }
}

/// TLS settings shared by `mqtts`, `wss` and `quic`.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// PEM file of trusted CA certificates.
    pub ca_file: Option<PathBuf>,
    /// Also trust the operating system's store (rustls-native-certs).
    pub native_roots: bool,
    /// PEM certificate chain and private key for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Skip server certificate verification entirely. For tests against self-signed brokers
    /// only: anyone on the path can impersonate the server.
    pub insecure: bool,
    /// The name to verify instead of the URL's host.
    pub server_name: Option<String>,
}

/// Reconnect timing: the n-th consecutive failure waits `initial * 2^n`, capped at `max`,
/// scaled by a random factor in `[1 - jitter, 1]` so that a fleet does not reconnect in step.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// 0.0 (none) ..= 1.0
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// The delay before attempt `failures + 1`, given a random `unit` in `[0, 1)`.
    pub fn delay(&self, failures: u32, unit: f64) -> Duration {
        let exp = self
            .initial
            .saturating_mul(1u32.checked_shl(failures.min(20)).unwrap_or(u32::MAX));
        let capped = exp.min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        capped.mul_f64(1.0 - jitter * unit.clamp(0.0, 1.0))
    }
}

/// Everything [`super::Client::connect`] needs. Built with `ClientOptions::new(url)` and the
/// builder methods; every default is named on its method.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Tried in order on every (re)connect: e.g. QUIC first, TLS when UDP is blocked.
    pub urls: Vec<ServerUrl>,
    pub client_id: String,
    pub version: ProtocolVersion,
    pub keep_alive: Duration,
    /// Clean Start on the first connect. Reconnects resume the session whenever it can
    /// outlive the connection (v5: session expiry > 0; v3: `clean_start == false`).
    pub clean_start: bool,
    /// v5 Session Expiry Interval in seconds (0: the session ends with the connection).
    pub session_expiry: u32,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    /// MQTT 5 enhanced authentication with `username` and `password` (none: the password
    /// goes in CONNECT, if any).
    pub auth_method: Option<AuthMethod>,
    pub will: Option<Message>,
    /// Extra v5 CONNECT properties (user properties, receive maximum, ...).
    pub connect_properties: Properties,
    pub tls: TlsOptions,
    pub quic: QuicSettings,
    pub streams: QuicStreams,
    /// Bound on one connect attempt to one URL (transport, TLS, CONNECT/CONNACK), and on
    /// one round of overlapping reconnect attempts.
    pub connect_timeout: Duration,
    /// `None`: a lost connection ends the client. The delay between reconnect rounds.
    pub reconnect: Option<Backoff>,
    /// How reconnect attempts overlap within a round (a fresh attempt while older ones wait
    /// out their transport's retransmission backoff).
    pub overlap: Overlap,
    /// Publishes accepted while disconnected, beyond which `publish` fails with
    /// [`ClientError::OfflineBufferFull`]; also the queue depth behind a full send window.
    pub offline_buffer: usize,
    /// Events buffered for the application before the client stops reading the network.
    pub event_capacity: usize,
    /// The largest packet we accept (v5: announced as Maximum Packet Size).
    pub max_packet_size: u32,
    /// The local address TCP-based connections (TCP, TLS, WS, WSS) are made from; `None`:
    /// the system's choice. A load generator spreads many connections over several
    /// addresses, as one address has only so many ephemeral ports.
    pub local_addr: Option<std::net::IpAddr>,
    /// Copies of each QoS 0 message in the datagram class (docs/datagram.md); 0: not asked.
    pub datagram_copies: u8,
    /// TLS and QUIC configurations and QUIC endpoints shared with other clients (see
    /// [`SharedTransport`]); `None` (default): the client builds its own.
    pub shared_transport: Option<Arc<SharedTransport>>,
}

impl ClientOptions {
    /// Options for one server URL (`mqtt://`, `mqtts://`, `ws://`, `wss://`, `quic://`).
    pub fn new(url: &str) -> Result<Self, ClientError> {
        Self::with_urls(&[url])
    }

    /// Options for an ordered list of URLs, tried in turn on every (re)connect.
    pub fn with_urls(urls: &[&str]) -> Result<Self, ClientError> {
        let urls = urls
            .iter()
            .map(|u| ServerUrl::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        if urls.is_empty() {
            return Err(ClientError::InvalidUrl("no URL given".into()));
        }
        let (username, password) = (
            urls[0].username.clone(),
            urls[0].password.clone().map(Bytes::from),
        );
        Ok(Self {
            urls,
            client_id: String::new(),
            version: ProtocolVersion::V5,
            keep_alive: Duration::from_secs(30),
            clean_start: true,
            session_expiry: 0,
            username,
            password,
            auth_method: None,
            will: None,
            connect_properties: Properties::default(),
            tls: TlsOptions::default(),
            quic: QuicSettings::default(),
            streams: QuicStreams::default(),
            connect_timeout: Duration::from_secs(10),
            reconnect: Some(Backoff::default()),
            overlap: Overlap::default(),
            offline_buffer: 1000,
            event_capacity: 1024,
            max_packet_size: 1024 * 1024,
            local_addr: None,
            datagram_copies: 0,
            shared_transport: None,
        })
    }

    /// Empty (default): the server assigns one (v5) or requires one (v3.1.1).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// Default: MQTT 5.0.
    pub fn version(mut self, version: ProtocolVersion) -> Self {
        self.version = version;
        self
    }

    /// Default: 30 s. Zero turns keep-alive off.
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Default: true.
    pub fn clean_start(mut self, clean: bool) -> Self {
        self.clean_start = clean;
        self
    }

    /// Default: 0 (v5 only).
    pub fn session_expiry(mut self, seconds: u32) -> Self {
        self.session_expiry = seconds;
        self
    }

    /// A persistent session: v3 `clean_session = 0`; v5 Clean Start 0 with `expiry` seconds.
    pub fn persistent(self, expiry: u32) -> Self {
        self.clean_start(false).session_expiry(expiry)
    }

    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<Bytes>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// Authenticate with an MQTT 5 Authentication Method (SCRAM-SHA-256) using the
    /// username and password instead of sending the password in CONNECT. Default: none.
    /// Needs MQTT 5, a username and a password.
    pub fn auth_method(mut self, method: AuthMethod) -> Self {
        self.auth_method = Some(method);
        self
    }

    /// Whether the auth method (if any) has what it needs (MQTT 5, username, password).
    pub fn scram_login_check(&self) -> Result<(), ClientError> {
        self.scram_login().map(|_| ())
    }

    /// The SCRAM login (username, password) when an auth method is set.
    pub(super) fn scram_login(&self) -> Result<Option<(&str, &[u8])>, ClientError> {
        let Some(method) = self.auth_method else {
            return Ok(None);
        };
        match (&self.username, &self.password) {
            _ if !self.version.is_v5() => Err(ClientError::Config(format!(
                "{} needs MQTT 5",
                method.name()
            ))),
            (Some(username), Some(password)) => Ok(Some((username, password))),
            _ => Err(ClientError::Config(format!(
                "{} needs a username and a password",
                method.name()
            ))),
        }
    }

    /// The will message (its properties are the v5 will properties, e.g. will delay).
    pub fn will(mut self, will: Message) -> Self {
        self.will = Some(will);
        self
    }

    pub fn user_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.connect_properties
            .user_properties
            .push((key.into(), value.into()));
        self
    }

    /// v5 Receive Maximum we announce (inbound QoS 1/2 in flight). Default: 65535.
    pub fn receive_maximum(mut self, max: u16) -> Self {
        self.connect_properties.receive_maximum = Some(max);
        self
    }

    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls.ca_file = Some(path.into());
        self
    }

    pub fn native_roots(mut self, on: bool) -> Self {
        self.tls.native_roots = on;
        self
    }

    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Skip server certificate verification (testing only).
    pub fn insecure(mut self, on: bool) -> Self {
        self.tls.insecure = on;
        self
    }

    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.tls.server_name = Some(name.into());
        self
    }

    /// QUIC stream mapping: single stream (default), per topic or per named group.
    pub fn streams(mut self, streams: QuicStreams) -> Self {
        self.streams = streams;
        self
    }

    /// QUIC transport tuning (windows, congestion control, ...): the broker's `[quic]` model.
    pub fn quic(mut self, settings: QuicSettings) -> Self {
        self.quic = settings;
        self
    }

    /// Makes TCP-based connections from this local address (see [`ClientOptions::local_addr`]).
    pub fn local_addr(mut self, addr: std::net::IpAddr) -> Self {
        self.local_addr = Some(addr);
        self
    }

    /// Default: 10 s. Bounds one attempt, and one reconnect round (attempts start during it).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Default: `Some(Backoff::default())`: 0.5 s doubling to 30 s, 50 % jitter, between
    /// reconnect rounds (the first round starts after the first delay).
    pub fn reconnect(mut self, backoff: Option<Backoff>) -> Self {
        self.reconnect = backoff;
        self
    }

    /// Default: `Overlap::default()`: during a reconnect round a fresh attempt every 0.1–0.2 s
    /// while none has answered, at most 3 pending (the oldest is dropped to make room, but
    /// not before it is 1.5 times as old as the last successful connect took, so that on a
    /// long path the server has had the time to answer it); while several are pending,
    /// answered ones are looked for every 10 ms (the others are dropped before they send a
    /// CONNECT). `max_pending: 1` reconnects one attempt at
    /// a time (each waits for the previous one to fail or time out).
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Default: 1000.
    pub fn offline_buffer(mut self, messages: usize) -> Self {
        self.offline_buffer = messages;
        self
    }

    /// Default: 1024.
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.event_capacity = events.max(1);
        self
    }

    /// Asks a QUIC server (MQTT 5) for the QoS 0 datagram class (docs/datagram.md): QoS 0
    /// messages both ways go as QUIC datagrams, each sent `copies` times (1 to 4), duplicates
    /// suppressed, no retransmission waited for; the order of QoS 0 messages is not kept. A
    /// server that does not confirm it in CONNACK is used as without. Default: 0 (off).
    pub fn datagrams(mut self, copies: u8) -> Self {
        self.datagram_copies = copies.min(crate::transport::datagram::MAX_COPIES);
        self
    }

    /// Shares TLS and QUIC configurations and a pool of QUIC endpoints with every other client
    /// given the same [`SharedTransport`] (for processes holding many connections: a load
    /// generator, a gateway). The client's own `tls` and `quic` settings are then not used
    /// (the shared transport's are); its session cache stays its own; `rebind` is refused.
    /// Default: none, the client builds its own (one UDP socket per client for QUIC).
    pub fn shared_transport(mut self, shared: Arc<SharedTransport>) -> Self {
        self.shared_transport = Some(shared);
        self
    }

    /// Default: 1 MiB.
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// Whether a session can outlive a connection, so reconnects should resume it.
    pub(super) fn session_persists(&self) -> bool {
        if self.version.is_v5() {
            self.session_expiry > 0
        } else {
            !self.clean_start
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_select_the_transport_and_default_ports() {
        let u = ServerUrl::parse("quic://127.0.0.1").unwrap();
        assert_eq!((u.transport, u.port), (Transport::Quic, 14567));
        let u = ServerUrl::parse("wss://broker.example:9443").unwrap();
        assert_eq!(
            (u.transport, u.host.as_str(), u.port, u.path.as_str()),
            (Transport::Wss, "broker.example", 9443, "/mqtt")
        );
        let u = ServerUrl::parse("ws://[::1]:8083/custom").unwrap();
        assert_eq!((u.host.as_str(), u.path.as_str()), ("::1", "/custom"));
        assert_eq!(u.to_string(), "ws://[::1]:8083/custom");
        let u = ServerUrl::parse("mqtt://alice:secret@localhost").unwrap();
        assert_eq!(
            (u.port, u.username.as_deref(), u.password.as_deref()),
            (1883, Some("alice"), Some("secret"))
        );
        assert!(ServerUrl::parse("http://x").is_err());
        assert!(ServerUrl::parse("nonsense").is_err());
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_jitter_only_shortens() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: 0.5,
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(800));
        assert_eq!(b.delay(10, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(100, 0.0), Duration::from_secs(1));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(50));
    }
}
