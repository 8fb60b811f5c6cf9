//! `limits_`: the per-connection and broker-wide resource bounds, each at a small setting
//! (and at its default where a test can reach it cheaply): user properties per packet, topic
//! alias memory, retained messages, sessions held, a client that never reads its output,
//! 3.1.1 keep-alive, subscription identifiers of overlapping subscriptions. Every offender
//! gets its reason code (or a close for v3), and the broker still serves others afterwards.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use petrel::codec::{Packet, Properties, PropertySet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::AsyncWriteExt;

use crate::common::*;

fn with_user_properties(n: usize) -> Properties {
    Properties::from(PropertySet {
        user_properties: (0..n).map(|i| (format!("k{i}"), "v".into())).collect(),
        ..Default::default()
    })
}

fn publish_with(topic: &str, properties: Properties) -> Packet {
    let mut p = publish_struct(topic, QoS::AtMostOnce, None, b"x");
    p.properties = properties;
    Packet::Publish(p)
}

// ---------------------------------------------------------------------------------------------
// User properties

#[tokio::test]
async fn limits_user_properties_past_the_default_get_0x97() {
    let broker = TestBroker::start().await;
    let topic = unique("up");
    let (mut sub, _) = RawClient::connect_v5(broker.addr, &unique("up-sub")).await;
    sub.subscribe(1, &topic, QoS::AtMostOnce).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, &unique("up")).await;
    // 128, the default, passes and reaches the subscriber with every pair.
    client
        .send(&publish_with(&topic, with_user_properties(128)))
        .await;
    let got = sub.expect_publish().await;
    assert_eq!(got.properties.user_properties.len(), 128);
    // 10,000 tiny ones in one packet: cut off while decoding.
    client
        .send(&publish_with(&topic, with_user_properties(10_000)))
        .await;
    client.expect_disconnect(ReasonCode::QUOTA_EXCEEDED).await;
    assert_broker_healthy(broker.addr).await;
}

/// A real client (rumqttc 5) past a small setting; CONNECT's and the will's properties count
/// together, so a CONNECT over the limit is closed before any CONNACK.
#[tokio::test]
async fn limits_user_properties_at_a_small_setting() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_user_properties = 4).await;
    let (client, mut eventloop) =
        rumqttc::v5::AsyncClient::new(V5::options(broker.addr, &unique("up-rumqttc")), 10);
    let properties = v5p::PublishProperties {
        user_properties: (0..5).map(|i| (format!("k{i}"), "v".into())).collect(),
        ..Default::default()
    };
    client
        .publish_with_properties("up/small", V5QoS::AtLeastOnce, false, "x", properties)
        .await
        .unwrap();
    // rumqttc reports the broker's DISCONNECT as an error, or only the close when the
    // DISCONNECT and the end of the stream arrive in one read; the exact code is checked with
    // raw bytes below.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(err) = eventloop.poll().await {
                return err;
            }
        }
    })
    .await
    .expect("the broker closes the connection");
    if let rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
        reason_code,
        ..
    }) = &ended
    {
        assert_eq!(*reason_code, v5p::DisconnectReasonCode::QuotaExceeded);
    }
    let (mut raw, _) = RawClient::connect_v5(broker.addr, &unique("up-raw")).await;
    raw.send(&publish_with("up/small", with_user_properties(5)))
        .await;
    raw.expect_disconnect(ReasonCode::QUOTA_EXCEEDED).await;

    let mut connect = connect_packet(ProtocolVersion::V5, &unique("up-connect"));
    connect.properties = with_user_properties(2);
    let mut will = will("up/will", b"gone", QoS::AtMostOnce);
    will.properties = with_user_properties(3);
    connect.will = Some(will);
    let mut client = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    client.send(&Packet::Connect(Box::new(connect))).await;
    assert!(client.expect_closed().await.is_empty());
    assert_broker_healthy(broker.addr).await;
}

// ---------------------------------------------------------------------------------------------
// Topic alias memory

/// Defines a new alias per PUBLISH, each for a 1 KiB topic, until the broker stops it:
/// returns how many it took. Bounded by the Topic Alias Maximum.
async fn alias_flood(client: &mut RawClient, topic_len: usize) -> u16 {
    for alias in 1..=u16::MAX {
        let topic = format!("{alias:05}/{}", "a".repeat(topic_len - 6));
        let mut p = publish_struct(&topic, QoS::AtMostOnce, None, b"x");
        p.properties.topic_alias = Some(alias);
        client.send(&Packet::Publish(p)).await;
        if alias % 16 == 0 {
            // Keep the flood in step with the broker: a PINGREQ answered means the aliases
            // before it were taken.
            client.send(&Packet::PingReq).await;
            match client.read(WAIT).await {
                Read::Packet(p) if *p == Packet::PingResp => {}
                Read::Packet(p) => {
                    assert_eq!(
                        *p,
                        Packet::Disconnect(petrel::codec::Disconnect::new(
                            ReasonCode::QUOTA_EXCEEDED
                        ))
                    );
                    return alias;
                }
                other => panic!("expected PINGRESP or DISCONNECT, got {other:?}"),
            }
        }
    }
    panic!("65,535 aliases of {topic_len} bytes were all kept");
}

#[tokio::test]
async fn limits_topic_alias_flood_is_cut_at_the_default_byte_budget() {
    let broker = TestBroker::start().await;
    let (mut client, connack) = RawClient::connect_v5(broker.addr, &unique("alias")).await;
    assert_eq!(connack.properties.topic_alias_maximum, Some(65535));
    // 64 KiB of 1 KiB topics (each charged 1 KiB + 32): cut within the first 64 aliases,
    // not after 65,535 of them (64 MiB; 4 GiB with 64 KiB topics).
    let cut = alias_flood(&mut client, 1024).await;
    assert!((60..=64).contains(&cut), "cut at alias {cut}");
    client.expect_closed().await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn limits_topic_alias_bytes_at_a_small_setting() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_topic_alias_bytes = 4096).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, &unique("alias-small")).await;
    let cut = alias_flood(&mut client, 256).await;
    assert_eq!(cut, 16, "4096 bytes hold 14 aliases of 256 + 32 bytes");
    client.expect_closed().await;
    assert_broker_healthy(broker.addr).await;
}

// ---------------------------------------------------------------------------------------------
// Retained messages

async fn retained_on(addr: std::net::SocketAddr, filter: &str) -> Vec<String> {
    let (mut sub, _) = RawClient::connect_v5(addr, &unique("ret-check")).await;
    sub.subscribe(1, filter, QoS::AtMostOnce).await;
    let mut topics = Vec::new();
    while let Read::Packet(p) = sub.read(QUIET).await {
        if let Packet::Publish(p) = *p {
            topics.push(p.topic);
        }
    }
    topics.sort();
    topics
}

/// Past `max_retained_messages`, `max_payload_size` or `max_retained_bytes` a retained
/// message is still routed (and acknowledged as a success: it was accepted) but not kept;
/// replacing a kept topic is always possible; refusals are counted.
#[tokio::test]
async fn limits_retained_messages_past_a_limit_are_routed_not_retained() {
    let broker = TestBroker::start_with(|c| {
        c.retainer.max_retained_messages = 2;
        c.retainer.max_payload_size = 10;
        c.retainer.max_retained_bytes = 40;
    })
    .await;
    let (mut live, _) = RawClient::connect_v5(broker.addr, &unique("ret-live")).await;
    live.subscribe(1, "r/#", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, &unique("ret-pub")).await;
    let sends: [(&str, &[u8]); 6] = [
        ("r/a", b"1"),
        ("r/b", b"2"),
        ("r/c", b"3"),           // one too many
        ("r/a", b"0123456789x"), // payload too large: r/a keeps "1"
        ("r/b", b"0123456789"),  // a replacement within the limits
        ("r/a", b"0123456789"),  // 2 × (3 + 10) = 26 bytes, still fine
    ];
    for (id, (topic, payload)) in sends.into_iter().enumerate() {
        let mut p = publish_struct(topic, QoS::AtLeastOnce, Some(id as u16 + 1), payload);
        p.retain = true;
        let (code, _) = publisher.publish_ack(p).await;
        assert_eq!(code, ReasonCode::SUCCESS, "{topic}");
    }
    for _ in 0..6 {
        live.expect_publish().await;
    }
    assert_eq!(retained_on(broker.addr, "r/#").await, ["r/a", "r/b"]);
    let refused = &broker.running.broker.metrics.retained_refused;
    assert_eq!(refused.load(Ordering::Relaxed), 2);

    // The byte budget: a longer topic replacing one would pass 40 bytes in all.
    let broker = TestBroker::start_with(|c| c.retainer.max_retained_bytes = 20).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, &unique("ret-bytes")).await;
    for (i, topic) in ["b/1", "b/2", "b/3"].into_iter().enumerate() {
        let mut p = publish_struct(topic, QoS::AtLeastOnce, Some(i as u16 + 1), b"0123456");
        p.retain = true;
        publisher.publish_ack(p).await;
    }
    assert_eq!(retained_on(broker.addr, "b/#").await, ["b/1", "b/2"]);
}

#[tokio::test]
async fn limits_retained_defaults_keep_a_large_payload() {
    let broker = TestBroker::start().await;
    let retainer = petrel::config::Config::default().retainer;
    assert_eq!(retainer.max_payload_size, 1024 * 1024);
    assert_eq!(retainer.max_retained_messages, 1_000_000);
    assert_eq!(retainer.max_retained_bytes, 256 * 1024 * 1024);
    let big = |id: &str| {
        let mut options = V4::options(broker.addr, id);
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        options
    };
    let (mut v4, _) = V4::connect_with(big(&unique("ret-default"))).await;
    v4.publish(
        "big/one",
        rumqttc::QoS::AtLeastOnce,
        true,
        &vec![7u8; 512 * 1024],
    )
    .await;
    let (mut sub, _) = V4::connect_with(big(&unique("ret-default-sub"))).await;
    sub.subscribe("big/#", rumqttc::QoS::AtMostOnce).await;
    assert_eq!(sub.next_publish().await.payload.len(), 512 * 1024);
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// `broker.max_sessions` counts online and offline sessions: past it a CONNECT that needs a
/// new session gets 0x97 (v5) or return code 3 (3.1.1, as rumqttc sees it); a held session
/// still comes back.
#[tokio::test]
async fn limits_sessions_past_the_maximum_are_refused() {
    let broker = TestBroker::start_with(|c| c.broker.max_sessions = 2).await;
    let (_online, _) = RawClient::connect_v5(broker.addr, "held-online").await;
    let mut persistent = connect_packet(ProtocolVersion::V5, "held-offline");
    persistent.properties.session_expiry_interval = Some(600);
    let (offline, _) = RawClient::connect_ok(broker.addr, persistent.clone()).await;
    offline.disconnect().await;

    let (_, connack) = RawClient::connect_with(
        broker.addr,
        connect_packet(ProtocolVersion::V5, "one-too-many"),
    )
    .await;
    assert_eq!(connack.code, ReasonCode::QUOTA_EXCEEDED);

    let options = V4::options(broker.addr, "one-too-many-v3");
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let refused = tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("an answer in time");
    assert!(
        matches!(
            refused,
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::ServiceUnavailable
            ))
        ),
        "{refused:?}"
    );
    let metrics = &broker.running.broker.metrics;
    assert_eq!(metrics.sessions_refused.load(Ordering::Relaxed), 2);

    // The offline session is held, so it can come back.
    persistent.clean_start = false;
    let (_back, connack) = RawClient::connect_ok(broker.addr, persistent).await;
    assert!(connack.session_present);
}

#[tokio::test]
async fn limits_sessions_default_is_twice_the_connection_limit() {
    let config = petrel::config::Config::default();
    assert_eq!(
        config.broker.max_sessions,
        2 * config.broker.max_connections
    );
    // And many clients come and go at the default.
    let broker = TestBroker::start().await;
    for i in 0..20 {
        let (client, _) = RawClient::connect_v5(broker.addr, &format!("many-{i}")).await;
        client.disconnect().await;
    }
    assert_broker_healthy(broker.addr).await;
}

// ---------------------------------------------------------------------------------------------
// A client that never reads

/// A raw socket with a small receive buffer (so that the kernel holds little on our side)
/// that connects, then writes `packet` over and over and never reads again. Returns whether
/// the broker closed it (a write failed) within the byte bound.
async fn flood_without_reading(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    packet: &Packet,
) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    let mut out = BytesMut::new();
    let connect = Packet::Connect(Box::new(connect_packet(version, &unique("deaf"))));
    petrel::codec::encode(&connect, version, &mut out);
    stream.write_all(&out).await.unwrap();
    let mut one = BytesMut::new();
    petrel::codec::encode(packet, version, &mut one);
    let chunk: Bytes = one.repeat(64 * 1024 / one.len()).into();
    // At most 256 MiB: far past any buffer the broker should hold for us.
    for _ in 0..4096 {
        match tokio::time::timeout(WAIT * 2, stream.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return true,
            // The broker stopped reading without closing: not what we want either.
            Err(_) => return false,
        }
    }
    false
}

#[tokio::test]
async fn limits_never_reading_client_is_closed_and_others_are_served() {
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_packet_size = 4096;
        c.mqtt.max_outbound_buffer = 1; // raised to 1 MiB + one packet + 64 KiB
        c.broker.close_linger = Duration::from_millis(200);
    })
    .await;
    let metrics = &broker.running.broker.metrics;
    // 3.1.1, PINGREQ after PINGREQ.
    assert!(flood_without_reading(broker.addr, ProtocolVersion::V311, &Packet::PingReq).await);
    assert_eq!(metrics.slow_readers_closed.load(Ordering::Relaxed), 1);
    assert_broker_healthy(broker.addr).await;
    // 5.0, QoS 1 PUBLISH after PUBLISH (each answered by a PUBACK); the packet id is
    // reused, as a client that reads no PUBACK would.
    let publish = publish(&unique("deaf"), QoS::AtLeastOnce, Some(1), b"p");
    assert!(flood_without_reading(broker.addr, ProtocolVersion::V5, &publish).await);
    assert_eq!(metrics.slow_readers_closed.load(Ordering::Relaxed), 2);
    assert_broker_healthy(broker.addr).await;
}

// ---------------------------------------------------------------------------------------------
// Keep-alive and subscription identifiers

/// 3.1.1 cannot hear a Server Keep Alive: keep-alive 0 or above `mqtt.max_keepalive` is
/// capped on the broker's side, and a silent client is closed at 1.5 times the cap.
#[tokio::test]
async fn limits_v311_keep_alive_zero_is_capped_by_max_keepalive() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_keepalive = 1).await;
    let mut connect = connect_packet(ProtocolVersion::V311, &unique("ka0"));
    connect.keep_alive = 0;
    let (mut client, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(connack.properties.server_keep_alive.is_none());
    assert!(client.expect_closed().await.is_empty());
    assert_broker_healthy(broker.addr).await;
}

/// Overlapping subscriptions with the same identifier: the message arrives once, carrying
/// each matching identifier once [MQTT-3.3.4-4] (rumqttc 5 as the subscriber).
#[tokio::test]
async fn limits_overlapping_subscriptions_name_each_identifier_once() {
    let broker = TestBroker::start().await;
    let mut sub = V5::connect(broker.addr, &unique("subid")).await;
    for (filter, id) in [("s/#", 7), ("s/+", 7), ("s/x", 3)] {
        let properties = v5p::SubscribeProperties {
            id: Some(id),
            user_properties: Vec::new(),
        };
        sub.client
            .subscribe_with_properties(filter, V5QoS::AtMostOnce, properties)
            .await
            .unwrap();
        sub.wait_suback().await;
    }
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, &unique("subid-pub")).await;
    publisher
        .send(&publish("s/x", QoS::AtMostOnce, None, b"once"))
        .await;
    let got = sub.next_publish().await;
    let mut ids = got
        .properties
        .expect("subscription identifiers")
        .subscription_identifiers;
    ids.sort();
    assert_eq!(ids, [3, 7]);
    sub.expect_no_publish().await;
}

/// The same over QUIC: the client never reads its control stream, the broker's writer queue
/// backs up behind QUIC flow control, and the connection is closed with 0x97 as its QUIC
/// error code once the queue passes the ceiling (it used to be an unbounded channel).
#[tokio::test]
async fn limits_quic_writer_queue_is_bounded_for_a_client_that_never_reads() {
    use crate::quic::{expect_app_close, QuicClient};
    let broker = crate::quic::broker_with(|c| {
        c.mqtt.max_packet_size = 4096;
        c.mqtt.max_outbound_buffer = 1; // raised to 1 MiB + one packet + 64 KiB
        c.broker.close_linger = Duration::from_millis(200);
    })
    .await;
    let mut client = QuicClient::v5(&broker, &unique("deaf-quic")).await;
    let chunk = Bytes::from([0xC0, 0x00].repeat(32 * 1024));
    // At most 256 MiB of PINGREQs; the broker closes the connection long before.
    for _ in 0..4096 {
        match tokio::time::timeout(WAIT * 2, client.control.send.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => panic!("the broker neither read nor closed"),
        }
    }
    expect_app_close(&client.conn, 0x97).await;
    let metrics = &broker.running.broker.metrics;
    assert_eq!(metrics.slow_readers_closed.load(Ordering::Relaxed), 1);
    // Others are served.
    let other = QuicClient::v5(&broker, &unique("quic-after")).await;
    drop(other);
}
