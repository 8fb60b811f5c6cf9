//! MQTT over QUIC: the endpoint configuration (EMQX-compatible: ALPN `mqtt`, TLS 1.3 only)
//! tuned for messaging over lossy links.
//!
//! quinn's defaults suit bulk transfer: 1.25 MB stream windows let a per-topic stream buffer
//! seconds of data under loss. Petrel sizes windows for messages (256 KiB per stream, 1 MiB
//! per connection, see `QuicSettings`), grants a small number of bidirectional streams (the
//! control stream plus data streams) and no unidirectional ones, and lets the operator pick
//! the congestion controller. This module builds configuration only; the connection driver is
//! `broker::quic`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::{IdleTimeout, MtuDiscoveryConfig, ServerConfig, TransportConfig, VarInt};
use serde::Deserialize;

use super::tls::ClientVerify;
use super::{certs, datagram, tls, TransportError};
use crate::duration::deserialize as duration;

/// Tuning of every QUIC listener, sized for messaging over lossy links (see below). Defaults are documented in `petrel.example.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicSettings {
    /// Bytes one stream may have in flight towards the broker.
    pub stream_receive_window: u64,
    /// Bytes all streams of a connection may have in flight towards the broker.
    pub receive_window: u64,
    /// Bytes the broker keeps unacknowledged towards one client.
    pub send_window: u64,
    /// Bidirectional streams a client may have open (control plus data streams).
    pub max_streams: u32,
    #[serde(deserialize_with = "duration")]
    pub initial_rtt: Duration,
    /// QUIC PINGs from the broker, keeping NAT bindings open ("0s": none).
    #[serde(deserialize_with = "duration")]
    pub keep_alive_interval: Duration,
    /// A connection with no packet from the peer for this long is gone.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    pub congestion: Congestion,
    pub mtu_discovery: bool,
    /// Accept 0-RTT resumption (early data is read at once but acts only once the handshake
    /// completes, so a replayed flight is harmless).
    pub zero_rtt: bool,
    /// Validate every client's address with a Retry round trip before any handshake work.
    pub retry: bool,
    /// Otherwise, validate addresses while at least this many handshakes are in progress on
    /// a listener (a handshake flood); 0: never.
    pub retry_threshold: usize,
    /// quinn endpoints per QUIC listener, on one UDP port (`SO_REUSEPORT`, Linux): quinn does
    /// one endpoint's socket I/O in one task, so more endpoints use more cores. 0: one per
    /// core. See `transport::quic_endpoints`.
    pub endpoints: usize,
    /// Serve the QoS 0 datagram class (docs/datagram.md) to clients that ask for it; when
    /// false, datagrams are not even offered in the transport parameters.
    pub datagrams: bool,
    /// The most copies of each QoS 0 message the broker sends as datagrams (1 to 4): a
    /// client's wish is capped by it.
    pub datagram_copies: u8,
    /// The time between two copies of one message.
    #[serde(deserialize_with = "duration")]
    pub datagram_spacing: Duration,
}

/// `quic.retry_threshold` when not configured: above what a legitimate reconnect storm keeps
/// in progress on a usable link (the QUIC handshake rate a 2-core machine sustains, about
/// 1,400/s, times a 100 ms handshake is about 140), far below what costs memory (each
/// handshake holds tens of KiB until it completes or times out). A Retry costs a validated
/// client one round trip.
pub const DEFAULT_RETRY_THRESHOLD: usize = 256;

impl Default for QuicSettings {
    fn default() -> Self {
        Self {
            stream_receive_window: 256 * 1024,
            receive_window: 1024 * 1024,
            send_window: 1024 * 1024,
            max_streams: 10,
            initial_rtt: Duration::from_millis(333),
            keep_alive_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            congestion: Congestion::Bbr,
            mtu_discovery: true,
            zero_rtt: true,
            retry: false,
            retry_threshold: DEFAULT_RETRY_THRESHOLD,
            endpoints: 0,
            datagrams: true,
            datagram_copies: 2,
            datagram_spacing: super::datagram::DEFAULT_SPACING,
        }
    }
}

impl QuicSettings {
    /// The number of endpoints a listener binds: `endpoints`, or one per core when 0.
    pub fn endpoint_count(&self) -> usize {
        match self.endpoints {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

/// The QUIC congestion controller: BBR by default (the figures that chose it are in
/// docs/lossy-links.md and docs/benchmarks.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    NewReno,
    Bbr,
}

/// The ALPN protocol id EMQX and its clients use for MQTT over QUIC.
pub const ALPN: &[u8] = b"mqtt";

/// The crypto provider of QUIC connections, server and Petrel's client: ring's, with
/// TLS_AES_128_GCM_SHA256 first (ring's order puts AES-256-GCM-SHA384 first). Every QUIC
/// stack must implement it (RFC 9001 §5.3 builds the Initial keys on it; RFC 8446 §9.1 makes
/// it mandatory), its key schedule hashes with SHA-256 rather than SHA-384 (SHA-512's block
/// function was 5–7 % of the broker's and the bench's CPU in a connection storm profile) and
/// AES-128 encrypts faster; the security margin is the one TLS 1.3 requires everywhere. (The
/// storm's CPU per connection did not change measurably: docs/benchmarks.md.)
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
    ];
    Arc::new(provider)
}

/// Builds the quinn server configuration from a certificate chain, its key and the tuning.
pub fn server_config(
    cert: &Path,
    key: &Path,
    verify: ClientVerify,
    client_ca: Option<&Path>,
    settings: &QuicSettings,
) -> Result<ServerConfig, TransportError> {
    let chain = certs::load_certs(cert)?;
    let key = certs::load_key(key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Config(e.to_string()))?;
    let verifier = tls::client_verifier(verify, client_ca)?;
    let client_auth = verifier.is_some();
    let builder = match verifier {
        None => builder.with_no_client_auth(),
        Some(verifier) => builder.with_client_cert_verifier(verifier),
    };
    let mut crypto = builder
        .with_single_cert(chain, key)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    // Our suite order (see `provider`), whatever the client prefers.
    crypto.ignore_client_order = true;
    // One ticket per connection (rustls' default is 2): an MQTT client holds one connection,
    // and resumes (0-RTT) once per reconnect; each ticket costs a key derivation, a write
    // and a slot in the session cache.
    crypto.send_tls13_tickets = 1;
    // 0-RTT: rustls requires exactly u32::MAX for QUIC; what early data may do is decided by
    // the connection driver (nothing that is not replay-safe takes effect before the
    // handshake completes). With client certificates there is no 0-RTT: the certificate is
    // the identity, and a CONNECT must not act before it has been verified.
    crypto.max_early_data_size = if settings.zero_rtt && !client_auth {
        u32::MAX
    } else {
        0
    };
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
        .map_err(|e| TransportError::Config(format!("QUIC needs a TLS 1.3 cipher suite: {e}")))?;
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(settings)?));
    config.migration(true);
    Ok(config)
}

/// Transport parameters shared by the server and Petrel's own QUIC clients.
pub fn transport_config(settings: &QuicSettings) -> Result<TransportConfig, TransportError> {
    let var = |n: u64, what: &str| {
        VarInt::from_u64(n).map_err(|_| TransportError::Config(format!("quic.{what} is too large")))
    };
    let mut t = TransportConfig::default();
    t.stream_receive_window(var(
        settings.stream_receive_window,
        "stream_receive_window",
    )?);
    t.receive_window(var(settings.receive_window, "receive_window")?);
    t.send_window(settings.send_window);
    t.max_concurrent_bidi_streams(var(u64::from(settings.max_streams), "max_streams")?);
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.initial_rtt(settings.initial_rtt);
    t.keep_alive_interval(Some(settings.keep_alive_interval).filter(|d| !d.is_zero()));
    let idle = IdleTimeout::try_from(settings.idle_timeout)
        .map_err(|_| TransportError::Config("quic.idle_timeout is too large".into()))?;
    t.max_idle_timeout(Some(idle));
    t.mtu_discovery_config(settings.mtu_discovery.then(MtuDiscoveryConfig::default));
    match settings.congestion {
        Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
        Congestion::NewReno => t.congestion_controller_factory(Arc::new(NewRenoConfig::default())),
        Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
    };
    // QUIC datagrams carry only the opt-in QoS 0 class (docs/datagram.md); offering them
    // is a transport parameter that peers which do not know it ignore (RFC 9000 §7.4.2).
    if settings.datagrams {
        t.datagram_receive_buffer_size(Some(datagram::QUINN_RECEIVE_BUFFER));
        t.datagram_send_buffer_size(datagram::QUINN_SEND_BUFFER);
    } else {
        t.datagram_receive_buffer_size(None);
    }
    Ok(t)
}
