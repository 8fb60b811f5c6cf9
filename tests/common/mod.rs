//! Shared helpers for the broker integration tests: an in-process broker on `127.0.0.1:0`,
//! `rumqttc` clients (3.1.1 and 5) driven by a spawned event-loop task, and a raw-packet client
//! built on Petrel's own codec for exact packets, exact bytes and exact reason codes.
//!
//! Every wait is bounded by [`WAIT`] (or a shorter explicit quiet period); nothing sleeps to
//! assert timing.

#![allow(
    dead_code,
    reason = "each test module uses a different subset of the helpers"
)]

use petrel::codec::PacketId;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use petrel::codec::{
    encode, Ack, ConnAck, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, SubAck, Subscribe, SubscriptionOptions, Unsubscribe, Will,
};
use petrel::config::{Config, ListenerKind};
use petrel::server::RunningBroker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The bound on every wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(3);
/// How long to watch for something that should *not* happen.
pub const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Broker

pub struct TestBroker {
    pub running: RunningBroker,
    pub addr: SocketAddr,
    /// The broker's own data directory (its durable store), removed when it is dropped.
    pub data_dir: TempDir,
}

/// A directory removed when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh data directory for one broker of this test process.
pub fn temp_data_dir(prefix: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "petrel-{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The dashboard administrator's password in test brokers.
pub const TEST_ADMIN_PASSWORD: &str = "test-admin-password";

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker with the defaults (a durable store in a data directory of its own),
    /// a short close linger, and `tweak` applied.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        config.override_listeners(&["127.0.0.1:0".parse().unwrap()]);
        config.broker.close_linger = Duration::from_millis(500);
        config.broker.data_dir = temp_data_dir("broker");
        config.api.bind = "127.0.0.1:0".parse().unwrap();
        config.api.default_password = Some(TEST_ADMIN_PASSWORD.into());
        // `$SYS` values are retained messages: tests that count retained messages or
        // subscribe to `$SYS/#` turn them on themselves.
        config.sys_topics.interval = Duration::ZERO;
        config.sys_topics.client_events = false;
        tweak(&mut config);
        config.validate().unwrap();
        let data_dir = TempDir(config.broker.data_dir.clone());
        let running = RunningBroker::start(&config).await.unwrap();
        let addr = running.addr(ListenerKind::Tcp).unwrap();
        Self {
            running,
            addr,
            data_dir,
        }
    }

    pub fn messages_dropped(&self) -> u64 {
        self.running.broker.metrics.messages_dropped()
    }

    pub async fn shutdown(self) {
        tokio::time::timeout(Duration::from_secs(5), self.running.shutdown())
            .await
            .expect("broker shutdown is bounded");
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A name unique within this test binary.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", UNIQUE.fetch_add(1, Ordering::Relaxed))
}

/// A publish/subscribe round trip on a fresh pair of raw clients: the broker still serves.
pub async fn assert_broker_healthy(addr: SocketAddr) {
    let topic = unique("health");
    let (mut sub, _) = RawClient::connect_v5(addr, &unique("health-sub")).await;
    sub.subscribe(1, &topic, QoS::AtLeastOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(addr, &unique("health-pub")).await;
    publisher
        .send(&publish(&topic, QoS::AtLeastOnce, Some(1), b"ok"))
        .await;
    let ack = publisher.expect_packet().await;
    assert!(
        matches!(
            ack,
            Packet::PubAck(Ack {
                packet_id: PacketId(1),
                reason: ReasonCode::SUCCESS,
                ..
            })
        ),
        "{ack:?}"
    );
    let got = sub.expect_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (topic.as_str(), &b"ok"[..])
    );
}

// ---------------------------------------------------------------------------------------------
// Packet builders

pub fn connect_packet(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

pub fn will(topic: &str, payload: &[u8], qos: QoS) -> Will {
    Will {
        topic: topic.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        qos,
        retain: false,
        properties: Properties::default(),
    }
}

pub fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> Packet {
    Packet::Publish(publish_struct(topic, qos, packet_id, payload))
}

pub fn publish_struct(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.to_owned(),
        packet_id: packet_id.map(PacketId),
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

pub fn subscribe_packet(packet_id: u16, filter: &str, options: SubscriptionOptions) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId(packet_id),
        properties: Properties::default(),
        filters: vec![(filter.to_owned(), options)],
    })
}

pub fn qos_options(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Raw client

/// A TCP client speaking exact packets (or exact bytes) through Petrel's codec.
pub struct RawClient {
    stream: TcpStream,
    version: ProtocolVersion,
    codec: petrel::codec::Codec,
    buf: BytesMut,
    closed: bool,
}

/// What a read produced within the wait.
#[derive(Debug)]
pub enum Read {
    Packet(Box<Packet>),
    Closed,
    TimedOut,
}

impl RawClient {
    /// Opens the TCP connection only; the caller sends CONNECT (or not).
    pub async fn tcp(addr: SocketAddr, version: ProtocolVersion) -> Self {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            version,
            codec: petrel::codec::Codec::with_version(
                version,
                petrel::config::MAX_PACKET_SIZE_CEILING,
            ),
            buf: BytesMut::new(),
            closed: false,
        }
    }

    /// Sends `connect` and returns the client with the CONNACK (whatever its code).
    pub async fn connect_with(addr: SocketAddr, connect: Connect) -> (Self, ConnAck) {
        let mut client = Self::tcp(addr, connect.protocol).await;
        client.send(&Packet::Connect(Box::new(connect))).await;
        match client.expect_packet().await {
            Packet::ConnAck(connack) => (client, connack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and asserts success.
    pub async fn connect_ok(addr: SocketAddr, connect: Connect) -> (Self, ConnAck) {
        let (client, connack) = Self::connect_with(addr, connect).await;
        assert_eq!(connack.code, ReasonCode::SUCCESS, "{connack:?}");
        (client, connack)
    }

    pub async fn connect_v5(addr: SocketAddr, client_id: &str) -> (Self, ConnAck) {
        Self::connect_ok(addr, connect_packet(ProtocolVersion::V5, client_id)).await
    }

    pub async fn connect_v311(addr: SocketAddr, client_id: &str) -> (Self, ConnAck) {
        Self::connect_ok(addr, connect_packet(ProtocolVersion::V311, client_id)).await
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out);
        self.send_raw(&out).await;
    }

    /// Writes exact bytes. A write error is ignored: the broker may already have closed.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet, a close, or a timeout after `wait`.
    pub async fn read(&mut self, wait: Duration) -> Read {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(packet)) => return Read::Packet(Box::new(packet)),
                Ok(None) => {}
                Err(err) => panic!("broker sent bytes our codec rejects: {err}"),
            }
            if self.closed {
                return Read::Closed;
            }
            self.buf.reserve(4096);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Read::TimedOut,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Exactly `n` raw bytes (undecoded) within [`WAIT`].
    pub async fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        tokio::time::timeout(WAIT, async {
            while self.buf.len() < n && !self.closed {
                self.buf.reserve(4096);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => self.closed = true,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("bytes arrive in time");
        assert!(
            self.buf.len() >= n,
            "closed after {:?}, expected {n} bytes",
            &self.buf[..]
        );
        self.buf.split_to(n).to_vec()
    }

    /// The connection closes within [`WAIT`] with no further bytes.
    pub async fn expect_eof(&mut self) {
        let extra = self.read_bytes_until_close().await;
        assert!(
            extra.is_empty(),
            "unexpected bytes before the close: {extra:02x?}"
        );
    }

    async fn read_bytes_until_close(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, async {
            while !self.closed {
                self.buf.reserve(4096);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => self.closed = true,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("connection closes in time");
        self.buf.split().to_vec()
    }

    /// The next packet within [`WAIT`]; panics on close or timeout.
    pub async fn expect_packet(&mut self) -> Packet {
        match self.read(WAIT).await {
            Read::Packet(packet) => *packet,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    pub async fn expect_publish(&mut self) -> Publish {
        match self.expect_packet().await {
            Packet::Publish(publish) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The connection closes within [`WAIT`]; returns the packets received before the close.
    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut packets = Vec::new();
        loop {
            match self.read(WAIT).await {
                Read::Packet(packet) => packets.push(*packet),
                Read::Closed => return packets,
                Read::TimedOut => {
                    panic!("connection still open after {WAIT:?}; received {packets:?}")
                }
            }
        }
    }

    /// The broker sends DISCONNECT with `reason` (v5) and closes the connection.
    pub async fn expect_disconnect(&mut self, reason: ReasonCode) {
        let packets = self.expect_closed().await;
        let disconnects: Vec<_> = packets
            .iter()
            .filter_map(|p| match p {
                Packet::Disconnect(d) => Some(d.reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            disconnects,
            vec![reason],
            "packets before the close: {packets:?}"
        );
    }

    /// Nothing arrives (and the connection stays open) for [`QUIET`].
    pub async fn expect_silence(&mut self) {
        match self.read(QUIET).await {
            Read::TimedOut => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    pub async fn subscribe_with(
        &mut self,
        packet_id: u16,
        filter: &str,
        options: SubscriptionOptions,
    ) -> SubAck {
        self.send(&subscribe_packet(packet_id, filter, options))
            .await;
        match self.expect_packet().await {
            Packet::SubAck(suback) => {
                assert_eq!(suback.packet_id, packet_id);
                suback
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Subscribes and asserts the requested QoS was granted.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) {
        let suback = self
            .subscribe_with(packet_id, filter, qos_options(qos))
            .await;
        assert_eq!(suback.reasons, vec![ReasonCode(qos as u8)], "{suback:?}");
    }

    pub async fn unsubscribe(&mut self, packet_id: u16, filter: &str) -> Vec<ReasonCode> {
        self.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId(packet_id),
            properties: Properties::default(),
            filters: vec![filter.to_owned()],
        }))
        .await;
        match self.expect_packet().await {
            Packet::UnsubAck(unsuback) => {
                assert_eq!(unsuback.packet_id, packet_id);
                unsuback.reasons
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Subscribes to several filters at once; returns the SUBACK's reason codes.
    pub async fn subscribe_codes(
        &mut self,
        packet_id: u16,
        filters: &[&str],
        qos: QoS,
    ) -> Vec<ReasonCode> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId(packet_id),
            properties: Properties::default(),
            filters: filters
                .iter()
                .map(|f| ((*f).to_owned(), qos_options(qos)))
                .collect(),
        }))
        .await;
        match self.expect_packet().await {
            Packet::SubAck(suback) if suback.packet_id == packet_id => suback.reasons,
            other => panic!("expected SUBACK {packet_id}, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and returns the PUBACK's reason code, with any PUBLISH that
    /// arrived before it.
    pub async fn publish_ack(&mut self, publish: Publish) -> (ReasonCode, Vec<Publish>) {
        let id = publish.packet_id.expect("a QoS 1 publish");
        self.send(&Packet::Publish(publish)).await;
        let mut before = Vec::new();
        loop {
            match self.expect_packet().await {
                Packet::PubAck(ack) if ack.packet_id == id => return (ack.reason, before),
                Packet::Publish(publish) => before.push(publish),
                other => panic!("expected PUBACK {id}, got {other:?}"),
            }
        }
    }

    /// Acknowledges a QoS 1 delivery (PUBACK 0x00).
    pub async fn puback(&mut self, publish: &Publish) {
        let id = publish.packet_id.expect("a QoS 1 delivery has a packet id");
        self.send(&Packet::PubAck(Ack::new(id, ReasonCode::SUCCESS)))
            .await;
    }

    /// Publishes and completes the QoS flow from the publisher's side.
    pub async fn publish_acked(&mut self, publish: Publish) {
        let qos = publish.qos;
        let id = publish.packet_id.unwrap_or(PacketId(0));
        self.send(&Packet::Publish(publish)).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => match self.expect_packet().await {
                Packet::PubAck(ack) if ack.packet_id == id && !ack.reason.is_failure() => {}
                other => panic!("expected PUBACK {id}, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                match self.expect_packet().await {
                    Packet::PubRec(ack) if ack.packet_id == id && !ack.reason.is_failure() => {}
                    other => panic!("expected PUBREC {id}, got {other:?}"),
                }
                self.send(&Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS)))
                    .await;
                match self.expect_packet().await {
                    Packet::PubComp(ack) if ack.packet_id == id => {}
                    other => panic!("expected PUBCOMP {id}, got {other:?}"),
                }
            }
        }
    }

    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Disconnect::new(
            ReasonCode::NORMAL_DISCONNECTION,
        )))
        .await;
        let _ = self.stream.shutdown().await;
        // Wait for the broker's close so the session is filed before the test goes on.
        let _ = tokio::time::timeout(WAIT, async {
            while !matches!(self.read(WAIT).await, Read::Closed | Read::TimedOut) {}
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc clients

/// A rumqttc 3.1.1 client whose event loop runs in a task that forwards every event; the
/// task stops at the first error (no reconnects). Dropping the client aborts the task, which
/// drops the socket without DISCONNECT.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::Event, rumqttc::ConnectionError>>,
    task: JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V4 {
    pub fn options(addr: SocketAddr, client_id: &str) -> rumqttc::MqttOptions {
        let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    /// Connects with `options` and returns the client and the CONNACK.
    pub async fn connect_with(options: rumqttc::MqttOptions) -> (Self, rumqttc::ConnAck) {
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let stop = event.is_err();
                if tx.send(event).is_err() || stop {
                    return;
                }
            }
        });
        let mut this = Self {
            client,
            events,
            task,
        };
        let connack = this
            .next_incoming(|p| match p {
                rumqttc::Packet::ConnAck(c) => Some(c),
                _ => None,
            })
            .await;
        assert_eq!(connack.code, rumqttc::ConnectReturnCode::Success);
        (this, connack)
    }

    pub async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        Self::connect_with(Self::options(addr, client_id)).await.0
    }

    /// Waits (bounded) for the first incoming packet `pick` accepts, skipping the others.
    pub async fn next_incoming<T>(
        &mut self,
        mut pick: impl FnMut(rumqttc::Packet) -> Option<T>,
    ) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(rumqttc::Event::Incoming(packet))) => {
                        if let Some(found) = pick(packet) {
                            return found;
                        }
                    }
                    Some(Ok(rumqttc::Event::Outgoing(_))) => {}
                    Some(Err(err)) => panic!("connection error: {err:?}"),
                    None => panic!("event loop ended"),
                }
            }
        })
        .await
        .expect("expected packet did not arrive in time")
    }

    /// Waits (bounded) for the connection to end (the broker closed it).
    pub async fn expect_connection_error(&mut self) {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        })
        .await
        .expect("the connection did not end in time");
    }

    pub async fn next_publish(&mut self) -> rumqttc::Publish {
        self.next_incoming(|p| match p {
            rumqttc::Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    /// No PUBLISH arrives for [`QUIET`].
    pub async fn expect_no_publish(&mut self) {
        let waited = tokio::time::timeout(QUIET, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => return p,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => std::future::pending().await,
                }
            }
        })
        .await;
        if let Ok(p) = waited {
            panic!("unexpected PUBLISH {p:?}");
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) -> rumqttc::SubAck {
        self.client.subscribe(filter, qos).await.unwrap();
        self.next_incoming(|p| match p {
            rumqttc::Packet::SubAck(s) => Some(s),
            _ => None,
        })
        .await
    }

    /// Publishes and, for QoS 1/2, waits for the broker's PUBACK / PUBCOMP.
    pub async fn publish(&mut self, topic: &str, qos: rumqttc::QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .unwrap();
        match qos {
            rumqttc::QoS::AtMostOnce => {}
            rumqttc::QoS::AtLeastOnce => {
                self.next_incoming(|p| matches!(p, rumqttc::Packet::PubAck(_)).then_some(()))
                    .await
            }
            rumqttc::QoS::ExactlyOnce => {
                self.next_incoming(|p| matches!(p, rumqttc::Packet::PubComp(_)).then_some(()))
                    .await
            }
        }
    }

    /// Sends DISCONNECT and waits for the event loop to end.
    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)))
                    | Some(Err(_))
                    | None => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
    }
}

/// The rumqttc MQTT 5 client, with the same shape as [`V4`].
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    events: mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, rumqttc::v5::ConnectionError>>,
    task: JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub use rumqttc::v5::mqttbytes::v5 as v5p;
pub use rumqttc::v5::mqttbytes::QoS as V5QoS;

impl V5 {
    pub fn options(addr: SocketAddr, client_id: &str) -> rumqttc::v5::MqttOptions {
        let mut options =
            rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options
    }

    pub async fn connect_with(options: rumqttc::v5::MqttOptions) -> (Self, v5p::ConnAck) {
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 100);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let event = eventloop.poll().await;
                let stop = event.is_err();
                if tx.send(event).is_err() || stop {
                    return;
                }
            }
        });
        let mut this = Self {
            client,
            events,
            task,
        };
        let connack = this
            .next_incoming(|p| match p {
                v5p::Packet::ConnAck(c) => Some(c),
                _ => None,
            })
            .await;
        assert_eq!(connack.code, v5p::ConnectReturnCode::Success);
        (this, connack)
    }

    pub async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        Self::connect_with(Self::options(addr, client_id)).await.0
    }

    pub async fn next_incoming<T>(&mut self, mut pick: impl FnMut(v5p::Packet) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(rumqttc::v5::Event::Incoming(packet))) => {
                        if let Some(found) = pick(packet) {
                            return found;
                        }
                    }
                    Some(Ok(rumqttc::v5::Event::Outgoing(_))) => {}
                    Some(Err(err)) => panic!("connection error: {err:?}"),
                    None => panic!("event loop ended"),
                }
            }
        })
        .await
        .expect("expected packet did not arrive in time")
    }

    pub async fn next_publish(&mut self) -> v5p::Publish {
        self.next_incoming(|p| match p {
            v5p::Packet::Publish(p) => Some(p),
            _ => None,
        })
        .await
    }

    pub async fn expect_no_publish(&mut self) {
        let waited = tokio::time::timeout(QUIET, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(rumqttc::v5::Event::Incoming(v5p::Packet::Publish(p)))) => return p,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => std::future::pending().await,
                }
            }
        })
        .await;
        if let Ok(p) = waited {
            panic!("unexpected PUBLISH {p:?}");
        }
    }

    pub async fn subscribe(&mut self, filter: &str, qos: V5QoS) -> v5p::SubAck {
        self.client.subscribe(filter, qos).await.unwrap();
        self.wait_suback().await
    }

    pub async fn wait_suback(&mut self) -> v5p::SubAck {
        self.next_incoming(|p| match p {
            v5p::Packet::SubAck(s) => Some(s),
            _ => None,
        })
        .await
    }

    pub async fn publish(&mut self, topic: &str, qos: V5QoS, retain: bool, payload: &[u8]) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .unwrap();
        self.wait_publish_done(qos).await;
    }

    pub async fn wait_publish_done(&mut self, qos: V5QoS) {
        match qos {
            V5QoS::AtMostOnce => {}
            V5QoS::AtLeastOnce => {
                self.next_incoming(|p| matches!(p, v5p::Packet::PubAck(_)).then_some(()))
                    .await
            }
            V5QoS::ExactlyOnce => {
                self.next_incoming(|p| matches!(p, v5p::Packet::PubComp(_)).then_some(()))
                    .await
            }
        }
    }

    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        let _ = tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)))
                    | Some(Err(_))
                    | None => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
    }
}
