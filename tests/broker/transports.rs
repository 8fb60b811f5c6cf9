//! One conformance suite run over every transport (tcp, tls, ws, wss) with `rumqttc`, plus
//! transport-specific bad input (`bad`) and client certificates (`mtls`).
//!
//! Each test starts its own broker with all four listeners on `127.0.0.1:0` and the
//! development certificate in a temporary data directory; clients trust its CA. Every wait is
//! bounded by `common::WAIT`.

mod bad;
mod mtls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use petrel::codec::{encode, Codec, Packet, ProtocolVersion};
use petrel::config::{Config, ListenerKind, MAX_PACKET_SIZE_CEILING};
use petrel::server::RunningBroker;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::common::{unique, V5QoS, V4, V5, WAIT};
use rumqttc::QoS as V4QoS;

// ---------------------------------------------------------------------------------------------
// A broker with every transport

pub struct TransportBroker {
    pub running: RunningBroker,
    pub data_dir: PathBuf,
}

impl TransportBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// All four listeners on `127.0.0.1:0`, a fresh data directory (so a fresh development
    /// certificate), a short close linger, then `tweak`.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let data_dir = std::env::temp_dir().join(format!(
            "petrel-transports-{}-{}",
            std::process::id(),
            unique("data")
        ));
        let _ = std::fs::remove_dir_all(&data_dir);
        let mut config = Config::default();
        let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
        config.replace_listeners(ListenerKind::ALL.map(|kind| (kind, loopback)));
        config.broker.data_dir = data_dir.clone();
        config.broker.close_linger = Duration::from_millis(500);
        config.api.bind = loopback;
        config.api.default_password = Some(crate::common::TEST_ADMIN_PASSWORD.into());
        tweak(&mut config);
        config.validate().unwrap();
        let running = RunningBroker::start(&config).await.unwrap();
        Self { running, data_dir }
    }

    pub fn addr(&self, kind: ListenerKind) -> SocketAddr {
        self.running.addr(kind).expect("the listener is configured")
    }

    /// The development CA the TLS listeners' certificate chains to.
    pub fn ca_path(&self) -> PathBuf {
        self.data_dir.join("certs").join("ca.pem")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.ca_path()).expect("the development CA was written")
    }

    pub async fn shutdown(self) {
        let dir = self.data_dir.clone();
        tokio::time::timeout(Duration::from_secs(5), self.running.shutdown())
            .await
            .expect("broker shutdown is bounded");
        let _ = std::fs::remove_dir_all(dir);
    }
}

// ---------------------------------------------------------------------------------------------
// rumqttc over each transport

/// rumqttc's TLS settings trusting `ca`, optionally with a client certificate (PEM).
pub fn rumqttc_tls(ca: Vec<u8>, client: Option<(Vec<u8>, Vec<u8>)>) -> rumqttc::TlsConfiguration {
    rumqttc::TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth: client,
    }
}

/// Host (a URL for WebSocket), port and transport for a rumqttc client of `kind`.
fn endpoint(
    broker: &TransportBroker,
    kind: ListenerKind,
    tls: impl FnOnce() -> rumqttc::TlsConfiguration,
) -> (String, u16, rumqttc::Transport) {
    let port = broker.addr(kind).port();
    match kind {
        ListenerKind::Tcp => ("127.0.0.1".into(), port, rumqttc::Transport::Tcp),
        ListenerKind::Tls => (
            "127.0.0.1".into(),
            port,
            rumqttc::Transport::tls_with_config(tls()),
        ),
        ListenerKind::Ws => (
            format!("ws://127.0.0.1:{port}/mqtt"),
            port,
            rumqttc::Transport::Ws,
        ),
        ListenerKind::Wss => (
            format!("wss://127.0.0.1:{port}/mqtt"),
            port,
            rumqttc::Transport::Wss(tls()),
        ),
        ListenerKind::Quic => panic!("rumqttc does not speak MQTT over QUIC; see the quic module"),
    }
}

pub fn v4_options(
    broker: &TransportBroker,
    kind: ListenerKind,
    client_id: &str,
) -> rumqttc::MqttOptions {
    v4_options_with(broker, kind, client_id, || {
        rumqttc_tls(broker.ca_pem(), None)
    })
}

/// As [`v4_options`], with the TLS settings `tls` makes (used for `tls` and `wss` only).
pub fn v4_options_with(
    broker: &TransportBroker,
    kind: ListenerKind,
    client_id: &str,
    tls: impl FnOnce() -> rumqttc::TlsConfiguration,
) -> rumqttc::MqttOptions {
    let (host, port, transport) = endpoint(broker, kind, tls);
    let mut options = rumqttc::MqttOptions::new(client_id, host, port);
    options.set_transport(transport);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

pub fn v5_options(
    broker: &TransportBroker,
    kind: ListenerKind,
    client_id: &str,
) -> rumqttc::v5::MqttOptions {
    let (host, port, transport) = endpoint(broker, kind, || rumqttc_tls(broker.ca_pem(), None));
    let mut options = rumqttc::v5::MqttOptions::new(client_id, host, port);
    options.set_transport(transport);
    options.set_keep_alive(Duration::from_secs(30));
    options
}

// ---------------------------------------------------------------------------------------------
// The conformance suite

mod suite {
    use super::*;

    pub async fn conn_v311_and_v5_connect_and_disconnect(kind: ListenerKind) {
        let broker = TransportBroker::start().await;
        let (v4, connack) = V4::connect_with(v4_options(&broker, kind, &unique("conn-v4"))).await;
        assert!(!connack.session_present);
        v4.disconnect().await;
        let (v5, connack) = V5::connect_with(v5_options(&broker, kind, &unique("conn-v5"))).await;
        assert!(!connack.session_present);
        v5.disconnect().await;
        broker.shutdown().await;
    }

    pub async fn pub_qos_0_1_2_round_trip(kind: ListenerKind) {
        let broker = TransportBroker::start().await;
        let topic = unique("qos");
        let mut sub = v5_over(&broker, kind, "qos-sub").await;
        sub.subscribe(&topic, V5QoS::ExactlyOnce).await;
        let mut publisher = V4::connect_with(v4_options(&broker, kind, &unique("qos-pub")))
            .await
            .0;
        for (qos, sent) in [
            (V4QoS::AtMostOnce, 0),
            (V4QoS::AtLeastOnce, 1),
            (V4QoS::ExactlyOnce, 2),
        ] {
            let payload = format!("qos{sent}");
            publisher
                .publish(&topic, qos, false, payload.as_bytes())
                .await;
            let got = sub.next_publish().await;
            assert_eq!(
                (&got.payload[..], got.qos as u8),
                (payload.as_bytes(), sent)
            );
        }
        // And back the other way, v5 publishing to a v3.1.1 subscriber.
        publisher.subscribe(&topic, V4QoS::ExactlyOnce).await;
        sub.publish(&topic, V5QoS::ExactlyOnce, false, b"back")
            .await;
        let got = publisher.next_publish().await;
        assert_eq!(
            (&got.payload[..], got.qos),
            (&b"back"[..], V4QoS::ExactlyOnce)
        );
        broker.shutdown().await;
    }

    pub async fn retain_sent_on_subscribe(kind: ListenerKind) {
        let broker = TransportBroker::start().await;
        let topic = unique("retain");
        let mut publisher = V4::connect_with(v4_options(&broker, kind, &unique("retain-pub")))
            .await
            .0;
        publisher
            .publish(&topic, V4QoS::AtLeastOnce, true, b"kept")
            .await;
        let mut sub = v5_over(&broker, kind, "retain-sub").await;
        sub.subscribe(&topic, V5QoS::AtLeastOnce).await;
        let got = sub.next_publish().await;
        assert!(got.retain);
        assert_eq!(&got.payload[..], b"kept");
        broker.shutdown().await;
    }

    pub async fn will_published_on_abrupt_close(kind: ListenerKind) {
        let broker = TransportBroker::start().await;
        let topic = unique("will");
        let mut sub = v5_over(&broker, kind, "will-sub").await;
        sub.subscribe(&topic, V5QoS::AtLeastOnce).await;
        let mut options = v4_options(&broker, kind, &unique("will-dying"));
        options.set_last_will(rumqttc::LastWill::new(
            &topic,
            "gone",
            V4QoS::AtLeastOnce,
            false,
        ));
        let (dying, _) = V4::connect_with(options).await;
        // Dropping the client aborts its event loop: the socket goes without DISCONNECT.
        drop(dying);
        let got = sub.next_publish().await;
        assert_eq!(&got.payload[..], b"gone");
        broker.shutdown().await;
    }

    pub async fn session_persistent_receives_offline_messages(kind: ListenerKind) {
        let broker = TransportBroker::start().await;
        let topic = unique("offline");
        let mut options = v4_options(&broker, kind, &unique("offline-sub"));
        options.set_clean_session(false);
        let (mut sub, connack) = V4::connect_with(options.clone()).await;
        assert!(!connack.session_present);
        sub.subscribe(&topic, V4QoS::AtLeastOnce).await;
        sub.disconnect().await;
        let mut publisher = v5_over(&broker, kind, "offline-pub").await;
        publisher
            .publish(&topic, V5QoS::AtLeastOnce, false, b"while away")
            .await;
        let (mut sub, connack) = V4::connect_with(options).await;
        assert!(connack.session_present);
        let got = sub.next_publish().await;
        assert_eq!(&got.payload[..], b"while away");
        broker.shutdown().await;
    }
}

/// Instantiates the suite once per transport: `transports::<kind>::<test>`.
macro_rules! conformance {
    ($($module:ident => $kind:expr),* $(,)?) => {$(
        mod $module {
            use super::*;

            #[tokio::test]
            async fn conn_v311_and_v5_connect_and_disconnect() {
                suite::conn_v311_and_v5_connect_and_disconnect($kind).await
            }
            #[tokio::test]
            async fn pub_qos_0_1_2_round_trip() {
                suite::pub_qos_0_1_2_round_trip($kind).await
            }
            #[tokio::test]
            async fn retain_sent_on_subscribe() {
                suite::retain_sent_on_subscribe($kind).await
            }
            #[tokio::test]
            async fn will_published_on_abrupt_close() {
                suite::will_published_on_abrupt_close($kind).await
            }
            #[tokio::test]
            async fn session_persistent_receives_offline_messages() {
                suite::session_persistent_receives_offline_messages($kind).await
            }
        }
    )*};
}

conformance! {
    tcp => ListenerKind::Tcp,
    tls => ListenerKind::Tls,
    ws => ListenerKind::Ws,
    wss => ListenerKind::Wss,
}

/// A v5 client with a unique id over `kind`.
pub async fn v5_over(broker: &TransportBroker, kind: ListenerKind, prefix: &str) -> V5 {
    V5::connect_with(v5_options(broker, kind, &unique(prefix)))
        .await
        .0
}

// ---------------------------------------------------------------------------------------------
// Raw clients over any transport, for bad input

/// Any byte stream a raw client can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Exact packets through Petrel's codec over any stream.
pub struct Raw {
    stream: Box<dyn Io>,
    version: ProtocolVersion,
    codec: Codec,
    buf: BytesMut,
}

impl Raw {
    pub fn new(stream: impl Io + 'static, version: ProtocolVersion) -> Self {
        Self {
            stream: Box::new(stream),
            version,
            codec: Codec::with_version(version, MAX_PACKET_SIZE_CEILING),
            buf: BytesMut::new(),
        }
    }

    pub fn encode(&self, packet: &Packet) -> BytesMut {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out);
        out
    }

    /// Writes a packet; a write error is ignored (the broker may have closed).
    pub async fn send(&mut self, packet: &Packet) {
        let bytes = self.encode(packet);
        let _ = self.stream.write_all(&bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet, or `None` when the stream ends (or fails) within [`WAIT`].
    pub async fn next(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(packet) = self
                    .codec
                    .decode(&mut self.buf)
                    .expect("the broker sends valid packets")
                {
                    return Some(packet);
                }
                self.buf.reserve(4096);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a packet or the end of the stream arrives in time")
    }
}

/// The number of bytes read before the stream ends; panics if it stays open past `wait`.
pub async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin), wait: Duration) -> usize {
    tokio::time::timeout(wait, async {
        let mut total = 0;
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the broker closes the connection in time")
}

pub async fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// A rustls client configuration trusting the CA in `ca`, with an optional client
/// certificate and key (PEM files).
pub fn tls_client(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(petrel::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    Arc::new(config)
}

/// A TLS connection to `addr` as `localhost`, handshake bounded by [`WAIT`].
pub async fn tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let stream = tcp(addr).await;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(WAIT, connector.connect(name, stream))
        .await
        .expect("the TLS handshake ends in time")
}
