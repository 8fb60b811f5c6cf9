//! MQTT over QUIC, EMQX mapping: a QUIC test client that speaks the mapping byte for byte
//! (quinn on `127.0.0.1:0`, ALPN `mqtt`, TLS 1.3, trusting the broker's development CA) and
//! the `quic_` tests, in three families: single-stream mode and interop with TCP (`single`),
//! control and data streams (`multi`), the QoS 0 datagram class (`datagram`), and the connection's life: timeouts, stream limits,
//! takeover, shutdown, migration, 0-RTT and persistent sessions (`lifecycle`).
//!
//! Each test starts its own broker with every listener (`TransportBroker`). Every wait is
//! bounded by `common::WAIT`; absence is watched for `common::QUIET`.

mod datagram;
mod lifecycle;
mod multi;
mod single;

use petrel::codec::PacketId;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use petrel::codec::{
    encode, Ack, Codec, ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish,
    QoS, ReasonCode, SubscriptionOptions, Unsubscribe,
};
use petrel::config::{Config, ListenerKind, MAX_PACKET_SIZE_CEILING};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;

use crate::common::{connect_packet, qos_options, subscribe_packet, QUIET, WAIT};
use crate::transports::TransportBroker;

// ---------------------------------------------------------------------------------------------
// Broker

/// A broker with every listener (QUIC included) and `tweak` applied.
pub async fn broker_with(tweak: impl FnOnce(&mut Config)) -> TransportBroker {
    TransportBroker::start_with(tweak).await
}

pub fn quic_addr(broker: &TransportBroker) -> SocketAddr {
    broker.addr(ListenerKind::Quic)
}

// ---------------------------------------------------------------------------------------------
// Client endpoint

/// The client side of the EMQX mapping: ALPN `mqtt`, TLS 1.3 only, ring, trusting `ca_pem`,
/// early data enabled (0-RTT once a ticket is cached; the cache lives in this configuration,
/// so every connection of one endpoint shares it).
pub fn client_config(ca_pem: &[u8]) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut crypto = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    crypto.alpn_protocols = vec![b"mqtt".to_vec()];
    crypto.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // The broker's idle timeout is long; keep ours short so a broken test cannot hang.
    transport.max_idle_timeout(Some(Duration::from_secs(10).try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    config
}

/// A quinn client endpoint on `127.0.0.1:0` trusting the broker's development CA.
pub fn client_endpoint(broker: &TransportBroker) -> Endpoint {
    let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(&broker.ca_pem()));
    endpoint
}

/// A QUIC connection to the broker, handshake bounded by [`WAIT`].
pub async fn dial(endpoint: &Endpoint, addr: SocketAddr) -> Connection {
    let connecting = endpoint.connect(addr, "localhost").unwrap();
    tokio::time::timeout(WAIT, connecting)
        .await
        .expect("the QUIC handshake ends in time")
        .expect("the QUIC handshake succeeds")
}

/// One client: its endpoint (kept for `rebind` and 0-RTT), its connection and its control
/// stream.
pub struct QuicClient {
    pub endpoint: Endpoint,
    pub conn: Connection,
    pub control: QuicStream,
    pub version: ProtocolVersion,
}

impl QuicClient {
    /// Dials, opens the control stream and sends `connect` on it; returns the CONNACK,
    /// whatever its code.
    pub async fn connect_with(broker: &TransportBroker, connect: Connect) -> (Self, ConnAck) {
        let endpoint = client_endpoint(broker);
        let conn = dial(&endpoint, quic_addr(broker)).await;
        let version = connect.protocol;
        let mut control = QuicStream::open(&conn, version).await;
        control.send(&Packet::Connect(Box::new(connect))).await;
        let connack = control.expect_connack().await;
        (
            Self {
                endpoint,
                conn,
                control,
                version,
            },
            connack,
        )
    }

    /// Connects with a clean start and asserts success.
    pub async fn connect(
        broker: &TransportBroker,
        version: ProtocolVersion,
        client_id: &str,
    ) -> Self {
        let (client, connack) =
            Self::connect_with(broker, connect_packet(version, client_id)).await;
        assert_eq!(connack.code, ReasonCode::SUCCESS, "{connack:?}");
        client
    }

    pub async fn v5(broker: &TransportBroker, client_id: &str) -> Self {
        Self::connect(broker, ProtocolVersion::V5, client_id).await
    }

    /// A data stream (the next client-opened bidirectional stream). The broker hears of it
    /// only with its first bytes.
    pub async fn data_stream(&self) -> QuicStream {
        QuicStream::open(&self.conn, self.version).await
    }
}

/// How `conn` ended, within [`WAIT`].
pub async fn conn_closed(conn: &Connection) -> ConnectionError {
    tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("the broker closes the QUIC connection in time")
}

/// Asserts the broker closed `conn` with the QUIC application error `code`.
pub async fn expect_app_close(conn: &Connection, code: u8) {
    match conn_closed(conn).await {
        ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                VarInt::from_u32(u32::from(code)),
                "{close:?}"
            )
        }
        other => panic!("expected an application close with code {code:#04x}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// One bidirectional stream

/// What a read on a stream produced within the wait.
#[derive(Debug)]
pub enum StreamRead {
    Packet(Box<Packet>),
    /// The broker finished its side of the stream.
    Finished,
    /// The broker reset the stream (RESET_STREAM) with this code, or the connection is gone.
    Reset(String),
    TimedOut,
}

/// One bidirectional stream carrying plain MQTT framing, read through Petrel's codec.
pub struct QuicStream {
    pub send: SendStream,
    pub recv: RecvStream,
    version: ProtocolVersion,
    codec: Codec,
    buf: BytesMut,
    ended: Option<StreamRead>,
}

impl QuicStream {
    /// Opens the next bidirectional stream (bounded: the broker may withhold stream credit).
    pub async fn open(conn: &Connection, version: ProtocolVersion) -> Self {
        let (send, recv) = tokio::time::timeout(WAIT, conn.open_bi())
            .await
            .expect("the broker grants a stream in time")
            .expect("the connection is open");
        Self::new(send, recv, version)
    }

    pub fn new(send: SendStream, recv: RecvStream, version: ProtocolVersion) -> Self {
        Self {
            send,
            recv,
            version,
            codec: Codec::with_version(version, MAX_PACKET_SIZE_CEILING),
            buf: BytesMut::new(),
            ended: None,
        }
    }

    /// The stream's index among the client's bidirectional streams (0: the control stream).
    pub fn index(&self) -> u64 {
        self.send.id().index()
    }

    pub fn encode(&self, packet: &Packet) -> BytesMut {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out);
        out
    }

    /// Writes one packet. A write error is ignored: the broker may have stopped the stream.
    pub async fn send(&mut self, packet: &Packet) {
        let bytes = self.encode(packet);
        self.send_raw(&bytes).await;
    }

    /// Writes exact bytes (errors ignored, as [`Self::send`]).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = tokio::time::timeout(WAIT, self.send.write_all(bytes)).await;
    }

    /// The next packet, the end of the stream, or a timeout after `wait`.
    pub async fn read(&mut self, wait: Duration) -> StreamRead {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(packet)) => return StreamRead::Packet(Box::new(packet)),
                Ok(None) => {}
                Err(err) => panic!("broker sent bytes our codec rejects: {err}"),
            }
            if let Some(ended) = &self.ended {
                return match ended {
                    StreamRead::Finished => StreamRead::Finished,
                    StreamRead::Reset(why) => StreamRead::Reset(why.clone()),
                    _ => unreachable!("only ends are kept"),
                };
            }
            match tokio::time::timeout_at(deadline, self.recv.read_chunk(usize::MAX, true)).await {
                Err(_) => return StreamRead::TimedOut,
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(Ok(None)) => self.ended = Some(StreamRead::Finished),
                Ok(Err(err)) => self.ended = Some(StreamRead::Reset(err.to_string())),
            }
        }
    }

    /// The next packet within [`WAIT`]; panics on an end or a timeout.
    pub async fn expect_packet(&mut self) -> Packet {
        match self.read(WAIT).await {
            StreamRead::Packet(packet) => *packet,
            other => panic!("stream {}: expected a packet, got {other:?}", self.index()),
        }
    }

    pub async fn expect_publish(&mut self) -> Publish {
        match self.expect_packet().await {
            Packet::Publish(publish) => publish,
            other => panic!("stream {}: expected PUBLISH, got {other:?}", self.index()),
        }
    }

    pub async fn expect_connack(&mut self) -> ConnAck {
        match self.expect_packet().await {
            Packet::ConnAck(connack) => connack,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Nothing arrives on this stream (and it stays open) for [`QUIET`].
    pub async fn expect_silence(&mut self) {
        match self.read(QUIET).await {
            StreamRead::TimedOut => {}
            other => panic!("stream {}: expected silence, got {other:?}", self.index()),
        }
    }

    /// The broker resets, stops or finishes this stream within [`WAIT`], sending no packet
    /// first. Returns what it saw.
    pub async fn expect_reset_or_end(&mut self) -> String {
        let stopped = self.send.stopped();
        let read = tokio::time::timeout(WAIT, async {
            tokio::select! {
                read = self.read(WAIT) => format!("{read:?}"),
                stop = stopped => format!("stopped: {stop:?}"),
            }
        })
        .await
        .expect("the broker ends the stream in time");
        assert!(
            !read.starts_with("Packet") && !read.starts_with("TimedOut"),
            "stream {}: expected a reset or an end, got {read}",
            self.index()
        );
        read
    }

    /// The broker ends this stream with the DISCONNECT `reason` (v5) as its last packet.
    pub async fn expect_disconnect(&mut self, reason: ReasonCode) {
        let mut packets = Vec::new();
        loop {
            match self.read(WAIT).await {
                StreamRead::Packet(packet) => packets.push(*packet),
                StreamRead::Finished | StreamRead::Reset(_) => break,
                StreamRead::TimedOut => panic!("stream still open; received {packets:?}"),
            }
        }
        let disconnects: Vec<_> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::Disconnect(d) => Some(d.reason),
                _ => None,
            })
            .collect();
        assert_eq!(disconnects, vec![reason], "packets: {packets:?}");
    }

    // --- MQTT conveniences ---

    pub async fn subscribe_with(
        &mut self,
        packet_id: u16,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Vec<ReasonCode> {
        self.send(&subscribe_packet(packet_id, filter, options))
            .await;
        match self.expect_packet().await {
            Packet::SubAck(suback) if suback.packet_id == packet_id => suback.reasons,
            other => panic!(
                "stream {}: expected SUBACK {packet_id}, got {other:?}",
                self.index()
            ),
        }
    }

    /// Subscribes on this stream and asserts the QoS was granted.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) {
        let reasons = self
            .subscribe_with(packet_id, filter, qos_options(qos))
            .await;
        assert_eq!(reasons, vec![ReasonCode(qos as u8)]);
    }

    pub async fn unsubscribe(&mut self, packet_id: u16, filter: &str) -> Vec<ReasonCode> {
        self.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId(packet_id),
            properties: Properties::default(),
            filters: vec![filter.to_owned()],
        }))
        .await;
        match self.expect_packet().await {
            Packet::UnsubAck(unsuback) if unsuback.packet_id == packet_id => unsuback.reasons,
            other => panic!("stream {}: expected UNSUBACK, got {other:?}", self.index()),
        }
    }

    /// Publishes on this stream and completes the publisher's side of the QoS flow on it.
    pub async fn publish_acked(&mut self, publish: Publish) {
        let qos = publish.qos;
        let id = publish.packet_id.unwrap_or(PacketId(0));
        self.send(&Packet::Publish(publish)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.expect_ack(id, "PUBACK").await,
            QoS::ExactlyOnce => {
                self.expect_ack(id, "PUBREC").await;
                self.send(&Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS)))
                    .await;
                self.expect_ack(id, "PUBCOMP").await;
            }
        }
    }

    /// The next packet is the successful ack `kind` (PUBACK, PUBREC, PUBREL, PUBCOMP) for `id`.
    pub async fn expect_ack(&mut self, id: PacketId, kind: &str) {
        let packet = self.expect_packet().await;
        let ack = match (&packet, kind) {
            (Packet::PubAck(a), "PUBACK")
            | (Packet::PubRec(a), "PUBREC")
            | (Packet::PubRel(a), "PUBREL")
            | (Packet::PubComp(a), "PUBCOMP") => a,
            _ => panic!(
                "stream {}: expected {kind} {id}, got {packet:?}",
                self.index()
            ),
        };
        assert_eq!(ack.packet_id, id, "{packet:?}");
        assert!(!ack.reason.is_failure(), "{packet:?}");
    }

    pub async fn puback(&mut self, id: PacketId) {
        self.send(&Packet::PubAck(Ack::new(id, ReasonCode::SUCCESS)))
            .await;
    }

    pub async fn disconnect(&mut self) {
        self.send(&Packet::Disconnect(Disconnect::new(
            ReasonCode::NORMAL_DISCONNECTION,
        )))
        .await;
        let _ = self.send.finish();
    }
}

/// Nothing arrives on any of `streams` for [`QUIET`] (watched together).
pub async fn expect_silence_on(streams: &mut [&mut QuicStream]) {
    futures_util::future::join_all(streams.iter_mut().map(|s| s.expect_silence())).await;
}

/// The packet id of a QoS 1/2 delivery.
pub fn id_of(publish: &Publish) -> PacketId {
    publish
        .packet_id
        .expect("a QoS 1/2 delivery has a packet id")
}
