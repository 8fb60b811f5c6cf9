//! Transports: what turns an accepted TCP connection into the plain MQTT byte stream the
//! connection driver reads and writes.
//!
//! Every transport produces an `AsyncRead + AsyncWrite` stream; the codec and the core never
//! know which one carries them. The accept loops that use these live in
//! `broker::listener`; this module owns no tasks and reads no clock (handshake deadlines are
//! the caller's), except that `datagram`'s send loop, a future its caller spawns, times the
//! copies' spacing with tokio's timer.
//!
//! - [`tls`]: TLS 1.2 / 1.3 (rustls, ring provider), optional client certificates, and the
//!   certificate-to-username rule.
//! - [`ws`]: the WebSocket upgrade (path, `mqtt` subprotocols) and an adapter from binary
//!   WebSocket messages to a byte stream. WSS is [`ws`] over [`tls`].
//! - [`quic`]: the QUIC endpoint configuration (ALPN `mqtt`, TLS 1.3, windows sized for
//!   messaging, congestion control); the driver is `broker::quic`.
//! - [`datagram`]: the QoS 0 latency class over QUIC DATAGRAM frames (docs/datagram.md):
//!   framing, copies, duplicate suppression; the futures it exports are spawned by the broker
//!   and the client.
//! - [`quic_endpoints`]: a QUIC listener as several quinn endpoints on one UDP port
//!   (`SO_REUSEPORT`), datagrams routed between them by connection ID so migration survives.
//!   (Making an endpoint starts quinn's own driver task; the accept loops are the broker's.)
//! - [`reader`]: `PacketReader`, the one read-and-decode path for every byte stream (the
//!   broker's and the client's).
//! - [`certs`]: the development CA and server certificate, `petrel certs`, PEM loading.
//! - `x509`: just enough DER reading for expiry, CN and DNS SAN.

pub mod certs;
pub mod datagram;
pub mod quic;
pub mod quic_endpoints;
pub mod reader;
pub mod tls;
pub mod ws;
mod x509;

use std::path::PathBuf;

/// Why a transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}
