//! Petrel's own client library (`petrel::client`) against an in-process broker with every
//! listener on `127.0.0.1:0` (`TransportBroker`): one suite per transport URL (mqtt, mqtts,
//! ws, wss, quic single-stream, quic per-topic), QUIC stream policy, reconnect and session
//! resume, migration, the offline buffer, URL fallback, malformed broker input, and Mosquitto
//! (`client::mosquitto`). Every wait is bounded.

mod mosquitto;
mod resume;

use std::collections::BTreeMap;
use std::time::Duration;

use petrel::client::{
    Backoff, Client, ClientOptions, Event, Events, Message, QoS, QuicStreams, Received, Route,
    Subscription, Transport, Version,
};
use petrel::config::ListenerKind;

use crate::common::{unique, QUIET};
use crate::transports::TransportBroker;

/// The bound on waits in these tests (a few connections and reconnects on 2 cores).
pub const LONG: Duration = Duration::from_secs(10);

/// The client URL of a listener: `mqtt`, `mqtts`, `ws`, `wss` or `quic`.
pub fn url(broker: &TransportBroker, kind: ListenerKind) -> String {
    let port = broker.addr(kind).port();
    match kind {
        ListenerKind::Tcp => format!("mqtt://127.0.0.1:{port}"),
        ListenerKind::Tls => format!("mqtts://127.0.0.1:{port}"),
        ListenerKind::Ws => format!("ws://127.0.0.1:{port}/mqtt"),
        ListenerKind::Wss => format!("wss://127.0.0.1:{port}/mqtt"),
        ListenerKind::Quic => format!("quic://127.0.0.1:{port}"),
    }
}

/// Options for `kind` trusting the broker's development CA, with a unique client id.
pub fn options(broker: &TransportBroker, kind: ListenerKind, prefix: &str) -> ClientOptions {
    ClientOptions::new(&url(broker, kind))
        .unwrap()
        .client_id(unique(prefix))
        .ca_file(broker.ca_path())
        .connect_timeout(Duration::from_secs(5))
}

pub async fn connect(options: ClientOptions) -> (Client, Events) {
    let (client, mut events) = tokio::time::timeout(LONG, Client::connect(options))
        .await
        .expect("connects in time")
        .expect("connects");
    match next_event(&mut events).await {
        Event::Connected { .. } => {}
        other => panic!("expected Connected first, got {other:?}"),
    }
    (client, events)
}

pub async fn next_event(events: &mut Events) -> Event {
    tokio::time::timeout(LONG, events.recv())
        .await
        .expect("an event in time")
        .expect("the client is running")
}

/// The next message, skipping connection events.
pub async fn next_message(events: &mut Events) -> Received {
    loop {
        if let Event::Message(m) = next_event(events).await {
            return m;
        }
    }
}

/// Asserts that no message arrives for a while.
pub async fn no_message(events: &mut Events) {
    let quiet = tokio::time::timeout(QUIET, async {
        loop {
            match events.recv().await {
                Some(Event::Message(m)) => return Some(m),
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await;
    if let Ok(Some(m)) = quiet {
        panic!("unexpected message on {}", m.topic);
    }
}

/// How a test client maps streams over QUIC.
#[derive(Clone, Copy)]
pub enum Streams {
    Single,
    PerTopic,
}

pub fn with_streams(options: ClientOptions, streams: Streams) -> ClientOptions {
    match streams {
        Streams::Single => options.streams(QuicStreams::single()),
        Streams::PerTopic => options.streams(QuicStreams::per_topic()),
    }
}

// ---------------------------------------------------------------------------------------------
// The suite, once per transport

mod suite {
    use super::*;

    pub async fn conn_v311_and_v5_connect_and_disconnect(kind: ListenerKind, streams: Streams) {
        let broker = TransportBroker::start().await;
        for version in [Version::V311, Version::V5] {
            let options = with_streams(options(&broker, kind, "conn"), streams).version(version);
            let (client, mut events) = tokio::time::timeout(LONG, Client::connect(options))
                .await
                .unwrap()
                .unwrap();
            match next_event(&mut events).await {
                Event::Connected {
                    url,
                    session_present,
                    ..
                } => {
                    assert!(!session_present);
                    assert_eq!(url.port, broker.addr(kind).port());
                }
                other => panic!("{other:?}"),
            }
            client.disconnect().await.unwrap();
            assert!(matches!(
                next_event(&mut events).await,
                Event::Disconnected { .. }
            ));
        }
        broker.shutdown().await;
    }

    pub async fn pub_qos_0_1_2_round_trip(kind: ListenerKind, streams: Streams) {
        let broker = TransportBroker::start().await;
        let topic = unique("qos");
        let sub_options = with_streams(options(&broker, kind, "qos-sub"), streams);
        let (sub, mut sub_events) = connect(sub_options).await;
        assert_eq!(
            sub.subscribe(&topic, QoS::ExactlyOnce).await.unwrap(),
            QoS::ExactlyOnce
        );
        let pub_options =
            with_streams(options(&broker, kind, "qos-pub"), streams).version(Version::V311);
        let (publisher, _pub_events) = connect(pub_options).await;
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let payload = format!("qos{}", qos as u8);
            let outcome = publisher
                .publish(Message::new(&topic, payload.clone()).qos(qos))
                .await
                .unwrap();
            assert_eq!(outcome.packet_id.is_some(), qos != QoS::AtMostOnce);
            let got = next_message(&mut sub_events).await;
            assert_eq!((&got.payload[..], got.qos), (payload.as_bytes(), qos));
        }
        // v5 user properties travel.
        publisher.disconnect().await.unwrap();
        let (publisher, _e) =
            connect(with_streams(options(&broker, kind, "qos-pub5"), streams)).await;
        publisher
            .publish(
                Message::new(&topic, "props")
                    .qos(QoS::AtLeastOnce)
                    .user_property("k", "v")
                    .content_type("text/plain"),
            )
            .await
            .unwrap();
        let got = next_message(&mut sub_events).await;
        assert_eq!(
            got.properties.user_properties,
            vec![("k".into(), "v".into())]
        );
        assert_eq!(got.properties.content_type.as_deref(), Some("text/plain"));
        broker.shutdown().await;
    }

    pub async fn retain_sent_on_subscribe(kind: ListenerKind, streams: Streams) {
        let broker = TransportBroker::start().await;
        let topic = unique("retain");
        let (publisher, _e) =
            connect(with_streams(options(&broker, kind, "ret-pub"), streams)).await;
        publisher
            .publish(
                Message::new(&topic, "kept")
                    .qos(QoS::AtLeastOnce)
                    .retain(true),
            )
            .await
            .unwrap();
        let (sub, mut events) =
            connect(with_streams(options(&broker, kind, "ret-sub"), streams)).await;
        sub.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
        let got = next_message(&mut events).await;
        assert!(got.retain);
        assert_eq!(&got.payload[..], b"kept");
        broker.shutdown().await;
    }

    pub async fn will_published_on_abrupt_close(kind: ListenerKind, streams: Streams) {
        let broker = TransportBroker::start().await;
        let topic = unique("will");
        let (sub, mut events) =
            connect(with_streams(options(&broker, kind, "will-sub"), streams)).await;
        sub.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
        let dying = with_streams(options(&broker, kind, "will-dying"), streams)
            .will(Message::new(&topic, "gone").qos(QoS::AtLeastOnce));
        let (dying, _e) = connect(dying).await;
        dying.abort().await.unwrap();
        let got = next_message(&mut events).await;
        assert_eq!(&got.payload[..], b"gone");
        // A normal disconnect publishes no will.
        let polite = with_streams(options(&broker, kind, "will-polite"), streams)
            .will(Message::new(&topic, "not sent"));
        let (polite, _e) = connect(polite).await;
        polite.disconnect().await.unwrap();
        no_message(&mut events).await;
        broker.shutdown().await;
    }
}

/// Instantiates the suite once per transport: `client::<transport>::<test>`.
macro_rules! suite {
    ($($module:ident => $kind:expr, $streams:expr;)*) => {$(
        mod $module {
            use super::*;

            #[tokio::test]
            async fn conn_v311_and_v5_connect_and_disconnect() {
                suite::conn_v311_and_v5_connect_and_disconnect($kind, $streams).await
            }
            #[tokio::test]
            async fn pub_qos_0_1_2_round_trip() {
                suite::pub_qos_0_1_2_round_trip($kind, $streams).await
            }
            #[tokio::test]
            async fn retain_sent_on_subscribe() {
                suite::retain_sent_on_subscribe($kind, $streams).await
            }
            #[tokio::test]
            async fn will_published_on_abrupt_close() {
                suite::will_published_on_abrupt_close($kind, $streams).await
            }
        }
    )*};
}

suite! {
    tcp => ListenerKind::Tcp, Streams::Single;
    tls => ListenerKind::Tls, Streams::Single;
    ws => ListenerKind::Ws, Streams::Single;
    wss => ListenerKind::Wss, Streams::Single;
    quic_single => ListenerKind::Quic, Streams::Single;
    quic_per_topic => ListenerKind::Quic, Streams::PerTopic;
}

// ---------------------------------------------------------------------------------------------
// QUIC streams

#[tokio::test]
async fn quic_per_topic_publishes_use_one_data_stream_per_topic() {
    let broker = TransportBroker::start().await;
    let (a, b) = (unique("stream-a"), unique("stream-b"));
    let (sub, mut events) = connect(options(&broker, ListenerKind::Tcp, "streams-sub")).await;
    sub.subscribe(&a, QoS::AtLeastOnce).await.unwrap();
    sub.subscribe(&b, QoS::AtLeastOnce).await.unwrap();
    let publisher =
        options(&broker, ListenerKind::Quic, "streams-pub").streams(QuicStreams::per_topic());
    let (publisher, _e) = connect(publisher).await;
    assert_eq!(publisher.stats().data_streams_opened, 0);
    for round in 0..3 {
        for topic in [&a, &b] {
            publisher
                .publish(Message::new(topic.as_str(), format!("{round}")).qos(QoS::AtLeastOnce))
                .await
                .unwrap();
        }
    }
    assert_eq!(
        publisher.stats().data_streams_opened,
        2,
        "one stream per topic"
    );
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for _ in 0..6 {
        let m = next_message(&mut events).await;
        got.entry(m.topic)
            .or_default()
            .push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    let expected: Vec<String> = (0..3).map(|r| r.to_string()).collect();
    assert_eq!(got.get(&a), Some(&expected), "in order on its stream");
    assert_eq!(got.get(&b), Some(&expected));
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_subscribe_on_a_groups_stream_receives_deliveries_there() {
    let broker = TransportBroker::start().await;
    let cmd = unique("cmd");
    let streams = QuicStreams::per_group()
        .group("telemetry", &["telemetry/#"], 0)
        .group("commands", &[&format!("{cmd}/#")], 10)
        .max_data_streams(4);
    let (sub, mut events) =
        connect(options(&broker, ListenerKind::Quic, "group-sub").streams(streams)).await;
    sub.subscribe(&format!("{cmd}/car-1/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    // An explicit group works too, for a filter no group names.
    let other = unique("other");
    sub.subscribe_with(Subscription::new(&other, QoS::AtMostOnce).stream_group("telemetry"))
        .await
        .unwrap();
    assert_eq!(sub.stats().data_streams_opened, 2);

    let (publisher, _e) = connect(options(&broker, ListenerKind::Tcp, "group-pub")).await;
    publisher
        .publish(Message::new(format!("{cmd}/car-1/stop"), "now").qos(QoS::AtLeastOnce))
        .await
        .unwrap();
    let got = next_message(&mut events).await;
    assert_eq!(&got.payload[..], b"now");
    let command_route = got.route;
    assert!(matches!(command_route, Route::Data(_)), "{command_route:?}");
    publisher.publish(Message::new(&other, "t")).await.unwrap();
    let got = next_message(&mut events).await;
    assert!(matches!(got.route, Route::Data(_)));
    assert_ne!(got.route, command_route, "each group has its own stream");
    broker.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Fallback, malformed input

#[tokio::test]
async fn fallback_from_blocked_quic_to_mqtts() {
    let broker = TransportBroker::start().await;
    // A UDP port that swallows everything: QUIC cannot get through.
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let blocked = format!(
        "quic://127.0.0.1:{}",
        black_hole.local_addr().unwrap().port()
    );
    let tls = url(&broker, ListenerKind::Tls);
    let options = ClientOptions::with_urls(&[&blocked, &tls])
        .unwrap()
        .client_id(unique("fallback"))
        .ca_file(broker.ca_path())
        .connect_timeout(Duration::from_millis(500));
    let (client, mut events) = Client::connect(options).await.unwrap();
    match next_event(&mut events).await {
        Event::Connected { url, .. } => assert_eq!(url.transport, Transport::Tls),
        other => panic!("{other:?}"),
    }
    client
        .subscribe("fallback/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    broker.shutdown().await;
}

#[tokio::test]
async fn connect_fails_when_no_url_answers() {
    let black_hole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let blocked = format!(
        "quic://127.0.0.1:{}",
        black_hole.local_addr().unwrap().port()
    );
    let options = ClientOptions::new(&blocked)
        .unwrap()
        .insecure(true)
        .connect_timeout(Duration::from_millis(200));
    let err = Client::connect(options)
        .await
        .err()
        .expect("nothing answers");
    assert!(
        matches!(err, petrel::client::ClientError::Connect(_)),
        "{err}"
    );
}

#[tokio::test]
async fn malformed_broker_input_disconnects_and_reconnects() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A fake server: the first connection gets CONNACK then garbage, the second behaves.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let connack = [0x20, 0x03, 0x00, 0x00, 0x00]; // v5 CONNACK, success, no properties
        let mut kept = Vec::new();
        for round in 0..2 {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = socket.read(&mut buf).await.unwrap();
            socket.write_all(&connack).await.unwrap();
            if round == 0 {
                socket.write_all(&[0x00, 0x00]).await.unwrap(); // reserved packet type 0
            }
            kept.push(socket);
        }
        kept
    });
    let options = ClientOptions::new(&format!("mqtt://127.0.0.1:{port}"))
        .unwrap()
        .client_id("fragile")
        .reconnect(Some(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(20),
            jitter: 0.0,
        }));
    let (_client, mut events) = Client::connect(options).await.unwrap();
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|e| matches!(e, Event::Connected { .. }))
        .count()
        < 2
    {
        seen.push(next_event(&mut events).await);
    }
    assert!(
        seen.iter().any(|e| matches!(
            e,
            Event::Disconnected {
                reason: petrel::client::DisconnectReason::Protocol(_),
                ..
            }
        )),
        "{seen:?}"
    );
    drop(server.await.unwrap());
}

// ---------------------------------------------------------------------------------------------
// TLS trust

#[tokio::test]
async fn tls_client_certificate_passes_required_verification() {
    use petrel::config::ClientVerify;
    let bundle = std::env::temp_dir().join(format!(
        "petrel-client-mtls-{}-{}",
        std::process::id(),
        unique("certs")
    ));
    petrel::transport::certs::write_bundle(&bundle, "car-1").unwrap();
    let broker = TransportBroker::start_with(|c| {
        for l in c
            .listeners
            .iter_mut()
            .filter(|l| matches!(l.kind, ListenerKind::Tls | ListenerKind::Wss))
        {
            l.tls.cert = Some(bundle.join("server.pem"));
            l.tls.key = Some(bundle.join("server.key"));
            l.tls.verify = ClientVerify::Required;
            l.tls.client_ca = Some(bundle.join("ca.pem"));
        }
    })
    .await;
    for kind in [ListenerKind::Tls, ListenerKind::Wss] {
        let base = || {
            ClientOptions::new(&url(&broker, kind))
                .unwrap()
                .client_id(unique("mtls"))
                .ca_file(bundle.join("ca.pem"))
                .connect_timeout(Duration::from_secs(3))
                .reconnect(None)
        };
        let with_cert = base().client_cert(bundle.join("client.pem"), bundle.join("client.key"));
        let (client, _e) = connect(with_cert).await;
        client.subscribe("mtls/#", QoS::AtLeastOnce).await.unwrap();
        // TLS 1.3 reports a refused client certificate after the handshake, so the refusal
        // shows as a failed connect either way.
        assert!(
            Client::connect(base()).await.is_err(),
            "{kind:?} without a certificate"
        );
    }
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(bundle);
}

#[tokio::test]
async fn tls_needs_trust_unless_insecure() {
    let broker = TransportBroker::start().await;
    let tls = url(&broker, ListenerKind::Tls);
    let untrusting = ClientOptions::new(&tls).unwrap().client_id(unique("trust"));
    assert!(matches!(
        Client::connect(untrusting).await.err(),
        Some(petrel::client::ClientError::Config(_))
    ));
    // A CA that did not sign the server's certificate fails the handshake.
    let other = std::env::temp_dir().join(format!("petrel-other-ca-{}", unique("ca")));
    petrel::transport::certs::write_bundle(&other, "x").unwrap();
    let wrong = ClientOptions::new(&tls)
        .unwrap()
        .client_id(unique("trust"))
        .ca_file(other.join("ca.pem"))
        .connect_timeout(Duration::from_secs(3));
    assert!(Client::connect(wrong).await.is_err());
    for kind in [ListenerKind::Tls, ListenerKind::Quic] {
        let insecure = ClientOptions::new(&url(&broker, kind))
            .unwrap()
            .client_id(unique("insecure"))
            .insecure(true);
        let (client, _e) = connect(insecure).await;
        client.disconnect().await.unwrap();
    }
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(other);
}

#[tokio::test]
async fn connections_are_made_from_the_chosen_local_address() {
    // A plain listener shows where the client's TCP connection comes from.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let source: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    let options = ClientOptions::new(&format!("mqtt://127.0.0.1:{port}"))
        .unwrap()
        .client_id("from-127-0-0-2")
        .reconnect(None)
        .connect_timeout(Duration::from_secs(2))
        .local_addr(source);
    let client = tokio::spawn(Client::connect(options));
    let (_socket, peer) = tokio::time::timeout(LONG, listener.accept())
        .await
        .expect("the client connects")
        .unwrap();
    assert_eq!(peer.ip(), source);
    // Nobody answers CONNECT here: the attempt ends with an error, within its timeout.
    let attempt = tokio::time::timeout(LONG, client).await.unwrap().unwrap();
    assert!(attempt.is_err());
}
