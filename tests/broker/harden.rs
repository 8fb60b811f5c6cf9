//! Hardening against floods and misbehaving clients (`harden_`): the listeners' accept rate
//! (`max_conn_rate`), flapping detection (`[flapping_detect]`), QUIC Retry under a handshake
//! flood, QUIC stream churn, and 0-RTT replay safety (`zero_rtt`, with a UDP relay that
//! holds the client's handshake completion back).

mod zero_rtt;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use petrel::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use petrel::config::{Config, ListenerKind};
use quinn::Endpoint;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::common::{connect_packet, publish, unique, RawClient, TestBroker, V4, WAIT};
use crate::quic::{broker_with, dial, quic_addr, QuicClient, QuicStream, StreamRead};
use crate::transports::TransportBroker;

/// Every listener of `config` at `rate` new connections per second.
fn conn_rate(config: &mut Config, rate: u32) {
    for listener in &mut config.listeners {
        listener.max_conn_rate = NonZeroU32::new(rate);
    }
}

/// Polls `done` (bounded by `WAIT`); panics with `what` if it never holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let polled = tokio::time::timeout(WAIT, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(polled.is_ok(), "never happened: {what}");
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Accept rate

#[tokio::test]
async fn harden_accept_rate_pauses_accepting_and_every_client_still_connects() {
    // A burst of 5, then 5 a second: 15 clients at once make the listener pause; none of
    // them is refused.
    let broker = broker_with(|c| conn_rate(c, 5)).await;
    let metrics = &broker.running.broker.metrics;
    let tcp = broker.addr(ListenerKind::Tcp);
    let clients = (0..15).map(|i| async move {
        let (client, connack) = RawClient::connect_v5(tcp, &unique(&format!("rate-{i}"))).await;
        assert_eq!(connack.code, ReasonCode::SUCCESS);
        client
    });
    let tcp_clients = futures_util::future::join_all(clients).await;
    let after_tcp = load(&metrics.connections_rate_limited);
    assert!(after_tcp > 0, "the tcp listener paused");

    // QUIC's accept loop is paced the same way.
    let quic_clients = (0..15).map(|i| {
        let broker = &broker;
        async move { QuicClient::v5(broker, &unique(&format!("rate-quic-{i}"))).await }
    });
    let quic_clients = futures_util::future::join_all(quic_clients).await;
    assert!(
        load(&metrics.connections_rate_limited) > after_tcp,
        "the quic listener paused"
    );
    assert_eq!(
        broker
            .running
            .broker
            .permits
            .refused
            .load(Ordering::Relaxed),
        0,
        "pacing refuses nobody"
    );
    drop((tcp_clients, quic_clients));
    broker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Flapping detection

#[tokio::test]
async fn harden_flapping_client_id_is_banned_for_ban_time_then_lifted() {
    let broker = TestBroker::start_with(|c| {
        c.flapping_detect.max_count = 3;
        c.flapping_detect.window_time = Duration::from_secs(60);
        c.flapping_detect.ban_time = Duration::from_secs(60);
    })
    .await;
    let inner = &broker.running.broker;
    let id = unique("flapper");
    let banned = || {
        inner
            .auth()
            .banned()
            .list()
            .iter()
            .any(|ban| ban.who == id && ban.by == "flapping_detect")
    };
    // rumqttc reconnecting in a loop: three ends are allowed, the fourth is flapping.
    for _ in 0..3 {
        V4::connect(broker.addr, &id).await.disconnect().await;
    }
    tokio::time::sleep(crate::common::QUIET).await;
    assert!(!banned(), "max_count ends are allowed");
    V4::connect(broker.addr, &id).await.disconnect().await;
    eventually("the flapping client id is banned", banned).await;
    assert_eq!(load(&inner.metrics.flapping_bans), 1);

    let (_, connack) =
        RawClient::connect_with(broker.addr, connect_packet(ProtocolVersion::V5, &id)).await;
    assert_eq!(connack.code, ReasonCode::BANNED);
    // Another client id is not affected.
    let (_, other) = RawClient::connect_v5(broker.addr, &unique("steady")).await;
    assert_eq!(other.code, ReasonCode::SUCCESS);

    // For ban_time, on the ordinary banned list: lifting it there lets the client back.
    let ban = inner
        .auth()
        .banned()
        .list()
        .into_iter()
        .find(|ban| ban.who == id)
        .unwrap();
    assert_eq!(ban.until, Some(ban.at + 60));
    assert!(inner
        .auth()
        .banned()
        .remove(petrel::auth::banned::BanKind::Clientid, &id)
        .unwrap());
    let (client, connack) =
        RawClient::connect_with(broker.addr, connect_packet(ProtocolVersion::V5, &id)).await;
    assert_eq!(connack.code, ReasonCode::SUCCESS);
    client.disconnect().await;
    broker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// QUIC Retry under a handshake flood

/// A server certificate verifier that stops the client's handshake (and its thread) in the
/// middle, after the broker has sent its first flight and before the client answers, until
/// `release`: that handshake stays in progress at the broker meanwhile.
#[derive(Debug)]
struct StallingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    reached: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl ServerCertVerifier for StallingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(reached) = self.reached.lock().unwrap().take() {
            let _ = reached.send(());
            let _ = self.release.lock().unwrap().recv_timeout(WAIT);
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client whose handshake stalls (see [`StallingVerifier`]) on a thread and runtime of its
/// own; returns when the broker has answered its first packet, with the sender that lets it
/// go on and the thread, which yields the CONNACK's code.
async fn stalled_client(
    broker: &TransportBroker,
    client_id: String,
) -> (
    std::sync::mpsc::Sender<()>,
    std::thread::JoinHandle<ReasonCode>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&broker.ca_pem()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .unwrap();
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let verifier = StallingVerifier {
        inner,
        reached: std::sync::Mutex::new(Some(reached_tx)),
        release: std::sync::Mutex::new(release_rx),
    };
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"mqtt".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap();
    let config = quinn::ClientConfig::new(Arc::new(crypto));
    let addr = quic_addr(broker);
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut endpoint = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(config);
            let conn = dial(&endpoint, addr).await;
            let mut control = QuicStream::open(&conn, ProtocolVersion::V5).await;
            control
                .send(&Packet::Connect(Box::new(connect_packet(
                    ProtocolVersion::V5,
                    &client_id,
                ))))
                .await;
            let code = control.expect_connack().await.code;
            conn.close(0u32.into(), b"");
            code
        })
    });
    tokio::time::timeout(WAIT, reached)
        .await
        .expect("the broker answers the stalled client's first packet in time")
        .unwrap();
    (release, thread)
}

#[tokio::test]
async fn harden_quic_retry_switches_on_at_the_threshold_and_clients_still_connect() {
    // One handshake in progress is the threshold: while the stalled client holds it, every
    // new client is sent a Retry, which a correct client follows transparently.
    let broker = broker_with(|c| c.quic.retry_threshold = 1).await;
    let metrics = &broker.running.broker.metrics;
    let (release, stalled) = stalled_client(&broker, unique("stalled")).await;
    assert_eq!(load(&metrics.quic_retries), 0);

    let validated = QuicClient::v5(&broker, &unique("retried")).await;
    assert_eq!(
        load(&metrics.quic_retries),
        1,
        "the client that came during the stalled handshake was sent a Retry"
    );
    // A burst meanwhile: all connect.
    let burst = (0..12).map(|i| {
        let broker = &broker;
        async move { QuicClient::v5(broker, &unique(&format!("burst-{i}"))).await }
    });
    let burst = futures_util::future::join_all(burst).await;
    assert!(load(&metrics.quic_retries) >= 13);

    release.send(()).unwrap();
    let code = tokio::task::spawn_blocking(move || stalled.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        code,
        ReasonCode::SUCCESS,
        "the stalled client completes too"
    );
    drop((validated, burst));
    broker.shutdown().await;
}

#[tokio::test]
async fn harden_quic_without_a_flood_sends_no_retry() {
    let broker = broker_with(|_| {}).await;
    let clients = (0..8).map(|i| {
        let broker = &broker;
        async move { QuicClient::v5(broker, &unique(&format!("calm-{i}"))).await }
    });
    let clients = futures_util::future::join_all(clients).await;
    assert_eq!(load(&broker.running.broker.metrics.quic_retries), 0);
    drop(clients);
    broker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// QUIC stream churn

#[tokio::test]
async fn harden_quic_stream_churn_releases_every_stream_task() {
    let broker = broker_with(|_| {}).await;
    let tasks = &broker.running.broker.metrics.quic_stream_tasks;
    let client = QuicClient::v5(&broker, &unique("churn")).await;
    // The control stream is read and written by the connection's own task: no stream task.
    let base = load(tasks);
    assert_eq!(base, 0, "the control stream needs no task of its own");
    let topic = unique("churn");
    let mut peak = base;
    for i in 0..2000u32 {
        let mut stream = client.data_stream().await;
        stream
            .send(&publish(&topic, QoS::AtMostOnce, None, &i.to_be_bytes()))
            .await;
        stream.send.finish().unwrap();
        peak = peak.max(load(tasks));
        // The broker finishes its side once ours has ended.
        match stream.read(WAIT).await {
            StreamRead::Finished => {}
            other => panic!("stream {i}: expected the broker to finish it, got {other:?}"),
        }
    }
    assert!(
        peak > base,
        "stream tasks were counted while streams were open"
    );
    eventually("every finished stream's tasks are released", || {
        load(tasks) == base
    })
    .await;
    // The connection is still whole.
    let mut control = client.control;
    control.subscribe(1, &topic, QoS::AtMostOnce).await;
    drop(client.conn);
    broker.shutdown().await;
}
