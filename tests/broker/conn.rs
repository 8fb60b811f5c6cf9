//! `conn_`: CONNECT handling, CONNACK contents, keep-alive, takeover, timeouts, shutdown.

use std::time::Duration;

use petrel::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

use crate::common::*;

#[tokio::test]
async fn conn_v311_client_connects_and_round_trips() {
    let broker = TestBroker::start().await;
    let (mut sub, connack) = V4::connect_with(V4::options(broker.addr, "v311-sub")).await;
    assert!(!connack.session_present);
    sub.subscribe("hello", rumqttc::QoS::AtLeastOnce).await;
    let mut publisher = V4::connect(broker.addr, "v311-pub").await;
    publisher
        .publish("hello", rumqttc::QoS::AtLeastOnce, false, b"world")
        .await;
    let got = sub.next_publish().await;
    assert_eq!((&got.topic[..], &got.payload[..]), ("hello", &b"world"[..]));
}

#[tokio::test]
async fn conn_v5_client_connects_and_round_trips() {
    let broker = TestBroker::start().await;
    let (mut sub, connack) = V5::connect_with(V5::options(broker.addr, "v5-sub")).await;
    assert!(!connack.session_present);
    sub.subscribe("hello", V5QoS::AtLeastOnce).await;
    let mut publisher = V5::connect(broker.addr, "v5-pub").await;
    publisher
        .publish("hello", V5QoS::AtLeastOnce, false, b"world")
        .await;
    let got = sub.next_publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..]),
        (&b"hello"[..], &b"world"[..])
    );
}

#[tokio::test]
async fn conn_v31_mqisdp_level3_connects_and_round_trips() {
    let broker = TestBroker::start().await;
    let (mut sub, connack) =
        RawClient::connect_ok(broker.addr, connect_packet(ProtocolVersion::V31, "v31-sub")).await;
    assert!(!connack.session_present);
    sub.subscribe(1, "old/school", QoS::AtLeastOnce).await;
    let (mut publisher, _) =
        RawClient::connect_ok(broker.addr, connect_packet(ProtocolVersion::V31, "v31-pub")).await;
    publisher
        .publish_acked(publish_struct(
            "old/school",
            QoS::AtLeastOnce,
            Some(3),
            b"hi",
        ))
        .await;
    let got = sub.expect_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.qos),
        ("old/school", &b"hi"[..], QoS::AtLeastOnce)
    );
}

#[tokio::test]
async fn conn_v31_empty_client_id_refused() {
    let broker = TestBroker::start().await;
    let (mut client, connack) =
        RawClient::connect_with(broker.addr, connect_packet(ProtocolVersion::V31, "")).await;
    assert_eq!(connack.code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    client.expect_closed().await;
}

#[tokio::test]
async fn conn_v311_empty_client_id_with_clean_session_accepted() {
    let broker = TestBroker::start().await;
    let (mut client, connack) =
        RawClient::connect_ok(broker.addr, connect_packet(ProtocolVersion::V311, "")).await;
    assert!(!connack.session_present);
    client.send(&Packet::PingReq).await;
    assert_eq!(client.expect_packet().await, Packet::PingResp);
}

#[tokio::test]
async fn conn_v311_empty_client_id_without_clean_session_gets_rc2() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(ProtocolVersion::V311, "");
    connect.clean_start = false;
    let mut client = RawClient::tcp(broker.addr, ProtocolVersion::V311).await;
    client.send(&Packet::Connect(Box::new(connect))).await;
    // The exact wire bytes: CONNACK, remaining length 2, no session present, return code 2.
    assert_eq!(client.read_bytes(4).await, [0x20, 0x02, 0x00, 0x02]);
    client.expect_eof().await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn conn_v5_empty_client_id_gets_assigned_identifier() {
    let broker = TestBroker::start().await;
    let (_a, connack_a) = RawClient::connect_v5(broker.addr, "").await;
    let (_b, connack_b) = RawClient::connect_v5(broker.addr, "").await;
    let a = connack_a
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned id");
    let b = connack_b
        .properties
        .assigned_client_identifier
        .clone()
        .expect("assigned id");
    assert!(!a.is_empty() && !b.is_empty());
    assert_ne!(a, b, "assigned ids are unique");
    // A client that named itself is not assigned one.
    let (_c, connack_c) = RawClient::connect_v5(broker.addr, "named").await;
    assert_eq!(connack_c.properties.assigned_client_identifier, None);
}

#[tokio::test]
async fn conn_v5_connack_announces_default_capabilities() {
    let broker = TestBroker::start().await;
    let (_c, connack) = RawClient::connect_v5(broker.addr, "caps").await;
    let p = &connack.properties;
    let defaults = petrel::config::Config::default().mqtt;
    assert_eq!(p.receive_maximum, Some(defaults.receive_maximum));
    assert_eq!(p.maximum_packet_size, Some(defaults.max_packet_size));
    assert_eq!(p.topic_alias_maximum, Some(defaults.topic_alias_maximum));
    assert_eq!(p.retain_available, Some(1));
    assert_eq!(p.wildcard_subscription_available, Some(1));
    assert_eq!(p.shared_subscription_available, Some(1));
    assert_eq!(p.subscription_identifier_available, Some(1));
    assert_eq!(
        p.maximum_qos, None,
        "QoS 2 is the default and is not announced"
    );
}

#[tokio::test]
async fn conn_reloaded_limits_apply_to_new_connections_and_spare_open_ones() {
    let broker = TestBroker::start().await;
    let (mut before, connack) = RawClient::connect_v5(broker.addr, "before-reload").await;
    let default = connack.properties.receive_maximum;
    let mut reloaded = petrel::config::Config::default();
    reloaded.mqtt.receive_maximum = 7;
    reloaded.sys_topics.interval = Duration::ZERO;
    broker.running.apply(&reloaded).unwrap();
    let (_after, connack) = RawClient::connect_v5(broker.addr, "after-reload").await;
    assert_eq!(connack.properties.receive_maximum, Some(7));
    assert_ne!(default, Some(7));
    // The connection opened before keeps working under its own limits.
    before.send(&Packet::PingReq).await;
    assert!(matches!(before.expect_packet().await, Packet::PingResp));
    // A bad configuration changes nothing.
    reloaded.rewrite.push(petrel::config::RewriteFile {
        action: "publish".into(),
        source_topic: "a/#".into(),
        re: "(".into(),
        dest_topic: "b".into(),
    });
    assert!(broker.running.apply(&reloaded).is_err());
}

#[tokio::test]
async fn conn_v5_connack_announces_configured_limits() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.receive_maximum = 7;
        c.mqtt.max_packet_size = 4096;
        c.mqtt.topic_alias_maximum = 9;
        c.mqtt.retain_available = false;
        c.mqtt.wildcard_subscription_available = false;
        c.mqtt.shared_subscription_available = false;
        c.mqtt.subscription_identifiers_available = false;
        c.mqtt.maximum_qos = 1;
    })
    .await;
    let (_c, connack) = RawClient::connect_v5(broker.addr, "caps").await;
    let p = &connack.properties;
    assert_eq!(p.receive_maximum, Some(7));
    assert_eq!(p.maximum_packet_size, Some(4096));
    assert_eq!(p.topic_alias_maximum, Some(9));
    assert_eq!(p.retain_available, Some(0));
    assert_eq!(p.wildcard_subscription_available, Some(0));
    assert_eq!(p.shared_subscription_available, Some(0));
    assert_eq!(p.subscription_identifier_available, Some(0));
    assert_eq!(p.maximum_qos, Some(1));
}

#[tokio::test]
async fn conn_keep_alive_timeout_closes_and_publishes_will() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) = RawClient::connect_v5(broker.addr, "watcher").await;
    watcher.subscribe(1, "wills/#", QoS::AtLeastOnce).await;

    let mut v5 = connect_packet(ProtocolVersion::V5, "sleepy5");
    v5.keep_alive = 1;
    v5.will = Some(will("wills/sleepy5", b"gone", QoS::AtLeastOnce));
    let (mut sleepy5, _) = RawClient::connect_ok(broker.addr, v5).await;
    let mut v311 = connect_packet(ProtocolVersion::V311, "sleepy311");
    v311.keep_alive = 1;
    v311.will = Some(will("wills/sleepy311", b"gone", QoS::AtLeastOnce));
    let (mut sleepy311, _) = RawClient::connect_ok(broker.addr, v311).await;

    // 1.5 x keep-alive without a packet: v5 hears 0x8D, v3 is just closed.
    sleepy5
        .expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT)
        .await;
    assert!(sleepy311.expect_closed().await.is_empty());
    let mut topics = vec![
        watcher.expect_publish().await.topic,
        watcher.expect_publish().await.topic,
    ];
    topics.sort();
    assert_eq!(topics, ["wills/sleepy311", "wills/sleepy5"]);
}

#[tokio::test]
async fn conn_keep_alive_kept_by_pings() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(ProtocolVersion::V5, "pinger");
    connect.keep_alive = 1;
    let (mut client, _) = RawClient::connect_ok(broker.addr, connect).await;
    // Six pings 400 ms apart span 2.4 s, well past the 1.5 s limit had nothing been sent.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.send(&Packet::PingReq).await;
        assert_eq!(client.expect_packet().await, Packet::PingResp);
    }
}

#[tokio::test]
async fn conn_v5_server_keep_alive_when_above_configured_max() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_keepalive = 10).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "long-ka");
    connect.keep_alive = 600;
    let (_c, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert_eq!(connack.properties.server_keep_alive, Some(10));

    let mut connect = connect_packet(ProtocolVersion::V5, "short-ka");
    connect.keep_alive = 5;
    let (_c, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert_eq!(
        connack.properties.server_keep_alive, None,
        "a keep-alive within the maximum is kept"
    );
}

#[tokio::test]
async fn conn_takeover_disconnects_old_client_with_0x8e_and_moves_session() {
    let broker = TestBroker::start().await;
    let mut first = connect_packet(ProtocolVersion::V5, "same");
    first.properties.session_expiry_interval = Some(60);
    let (mut old, _) = RawClient::connect_ok(broker.addr, first.clone()).await;
    old.subscribe(1, "moved/topic", QoS::AtLeastOnce).await;

    let mut second = first;
    second.clean_start = false;
    let (mut new, connack) = RawClient::connect_ok(broker.addr, second).await;
    assert!(
        connack.session_present,
        "the session moves to the new connection"
    );
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;

    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct(
            "moved/topic",
            QoS::AtLeastOnce,
            Some(1),
            b"x",
        ))
        .await;
    let got = new.expect_publish().await;
    assert_eq!(got.topic, "moved/topic");
    assert_eq!(broker.running.broker.session_count(), 2);
}

#[tokio::test]
async fn conn_takeover_of_v311_client_closes_it() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(ProtocolVersion::V311, "same311");
    connect.clean_start = false;
    let (mut old, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
    old.subscribe(1, "t", QoS::AtMostOnce).await;
    let (_new, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(connack.session_present);
    assert!(
        old.expect_closed().await.is_empty(),
        "3.1.1 has no DISCONNECT from the server"
    );
}

#[tokio::test]
async fn conn_connect_timeout_closes_silent_client() {
    let broker =
        TestBroker::start_with(|c| c.mqtt.connect_timeout = Duration::from_millis(300)).await;
    let mut silent = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    assert!(silent.expect_closed().await.is_empty());
    assert_broker_healthy(broker.addr).await;
}

/// CONNECT with protocol `name` and `level`, clean session, keep-alive 60, client id "a".
fn connect_bytes(name: &[u8], level: u8) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, 0x02, 0x00, 0x3C, 0x00, 0x01, b'a']);
    let mut bytes = vec![0x10, body.len() as u8];
    bytes.extend_from_slice(&body);
    bytes
}

#[tokio::test]
async fn conn_unsupported_protocol_level_gets_rc1_then_close() {
    let broker = TestBroker::start().await;
    for (name, level) in [
        (&b"MQTT"[..], 6),
        (b"MQTT", 2),
        (b"MQTT", 3),
        (b"MQIsdp", 4),
    ] {
        let mut client = RawClient::tcp(broker.addr, ProtocolVersion::V311).await;
        client.send_raw(&connect_bytes(name, level)).await;
        assert_eq!(
            client.read_bytes(4).await,
            [0x20, 0x02, 0x00, 0x01],
            "{name:?} level {level}"
        );
        client.expect_eof().await;
    }
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn conn_graceful_shutdown_sends_v5_clients_0x8b() {
    let broker = TestBroker::start().await;
    let (mut v5, _) = RawClient::connect_v5(broker.addr, "v5").await;
    let (mut v311, _) = RawClient::connect_v311(broker.addr, "v311").await;
    let addr = broker.addr;
    let stopping = tokio::spawn(broker.shutdown());
    v5.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
    assert!(v311.expect_closed().await.is_empty());
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn conn_will_not_published_on_shutdown() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(ProtocolVersion::V5, "w");
    connect.will = Some(will("w", b"x", QoS::AtMostOnce));
    let (mut client, _) = RawClient::connect_ok(broker.addr, connect).await;
    let (mut watcher, _) = RawClient::connect_v311(broker.addr, "watcher").await;
    watcher.subscribe(1, "w", QoS::AtMostOnce).await;
    let stopping = tokio::spawn(broker.shutdown());
    client
        .expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN)
        .await;
    let before_close = watcher.expect_closed().await;
    assert!(before_close.is_empty(), "{before_close:?}");
    stopping.await.unwrap();
}

#[tokio::test]
async fn conn_past_the_connection_limits_is_closed_and_a_freed_slot_is_taken_again() {
    let broker = TestBroker::start_with(|c| {
        c.broker.max_connections = 2;
    })
    .await;
    let (first, _) = RawClient::connect_v5(broker.addr, "limit-1").await;
    let (_second, _) = RawClient::connect_v5(broker.addr, "limit-2").await;
    // The third socket is closed before any MQTT: nothing comes back, not even a CONNACK.
    let mut third = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    third
        .send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V5,
            "limit-3",
        ))))
        .await;
    third.expect_eof().await;
    drop(first);
    // The slot comes back when the first connection's task ends.
    let mut admitted = false;
    for _ in 0..50 {
        let mut again = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
        again
            .send(&Packet::Connect(Box::new(connect_packet(
                ProtocolVersion::V5,
                "limit-3",
            ))))
            .await;
        if let Read::Packet(packet) = again.read(Duration::from_secs(2)).await {
            let Packet::ConnAck(ack) = *packet else {
                panic!("{packet:?}");
            };
            assert_eq!(ack.code, ReasonCode::SUCCESS);
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admitted, "the freed slot was never given back");
    assert!(
        broker
            .running
            .broker
            .permits
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn conn_per_address_limit_refuses_the_address_past_it() {
    let broker = TestBroker::start_with(|c| {
        c.broker.max_connections_per_address = 1;
    })
    .await;
    let (_held, _) = RawClient::connect_v5(broker.addr, "addr-1").await;
    let mut second = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    second
        .send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V5,
            "addr-2",
        ))))
        .await;
    second.expect_eof().await;
}
