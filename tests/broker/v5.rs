//! `v5_`: topic aliases, message expiry, property pass-through, the client's and the broker's
//! limits (Maximum Packet Size, Receive Maximum).

use petrel::codec::PacketId;
use std::time::Duration;

use bytes::Bytes;
use petrel::codec::{Ack, Connect, Packet, ProtocolVersion, QoS, ReasonCode};

use crate::common::*;

fn v5_connect(id: &str) -> Connect {
    connect_packet(ProtocolVersion::V5, id)
}

#[tokio::test]
async fn v5_topic_alias_client_to_broker() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "sensors/#", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;

    let mut define = publish_struct("sensors/temp", QoS::AtLeastOnce, Some(1), b"20");
    define.properties.topic_alias = Some(3);
    publisher.publish_acked(define).await;
    let mut reuse = publish_struct("", QoS::AtLeastOnce, Some(2), b"21");
    reuse.properties.topic_alias = Some(3);
    publisher.publish_acked(reuse).await;
    // Redefine the alias to another topic.
    let mut redefine = publish_struct("sensors/hum", QoS::AtLeastOnce, Some(3), b"50");
    redefine.properties.topic_alias = Some(3);
    publisher.publish_acked(redefine).await;
    let mut reuse = publish_struct("", QoS::AtMostOnce, None, b"51");
    reuse.properties.topic_alias = Some(3);
    publisher.publish_acked(reuse).await;

    for (topic, payload) in [
        ("sensors/temp", "20"),
        ("sensors/temp", "21"),
        ("sensors/hum", "50"),
        ("sensors/hum", "51"),
    ] {
        let got = sub.expect_publish().await;
        assert_eq!(
            (got.topic.as_str(), &got.payload[..]),
            (topic, payload.as_bytes())
        );
        assert_eq!(
            got.properties.topic_alias, None,
            "the subscriber set no Topic Alias Maximum"
        );
    }
}

async fn expect_alias_rejected(alias: u16, topic: &str, reason: ReasonCode) {
    let broker = TestBroker::start_with(|c| c.mqtt.topic_alias_maximum = 5).await;
    let (mut client, connack) = RawClient::connect_v5(broker.addr, "c").await;
    assert_eq!(connack.properties.topic_alias_maximum, Some(5));
    let mut bad = publish_struct(topic, QoS::AtMostOnce, None, b"x");
    bad.properties.topic_alias = Some(alias);
    client.send(&Packet::Publish(bad)).await;
    client.expect_disconnect(reason).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn v5_topic_alias_zero_disconnects_0x94() {
    expect_alias_rejected(0, "t", ReasonCode::TOPIC_ALIAS_INVALID).await;
}

#[tokio::test]
async fn v5_topic_alias_above_maximum_disconnects_0x94() {
    expect_alias_rejected(6, "t", ReasonCode::TOPIC_ALIAS_INVALID).await;
}

/// An alias never defined, with an empty topic to take it from: a protocol error (issue 14;
/// Mosquitto answers the same).
#[tokio::test]
async fn v5_topic_alias_used_before_defined_disconnects_0x82() {
    expect_alias_rejected(2, "", ReasonCode::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn v5_topic_alias_broker_to_client() {
    let broker = TestBroker::start().await;
    let mut connect = v5_connect("aliased");
    connect.properties.topic_alias_maximum = Some(1);
    let (mut sub, _) = RawClient::connect_ok(broker.addr, connect).await;
    sub.subscribe(1, "#", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    for (topic, payload) in [
        ("long/topic/name", "1"),
        ("long/topic/name", "2"),
        ("other", "3"),
        ("long/topic/name", "4"),
    ] {
        publisher
            .publish_acked(publish_struct(
                topic,
                QoS::AtMostOnce,
                None,
                payload.as_bytes(),
            ))
            .await;
    }
    let first = sub.expect_publish().await;
    let alias = first
        .properties
        .topic_alias
        .expect("the broker defines an alias");
    assert_eq!(alias, 1, "within the client's Topic Alias Maximum");
    assert_eq!(
        first.topic, "long/topic/name",
        "the defining PUBLISH carries the topic"
    );
    let second = sub.expect_publish().await;
    assert_eq!(
        (second.topic.as_str(), second.properties.topic_alias),
        ("", Some(1))
    );
    assert_eq!(&second.payload[..], b"2");
    // The maximum is used up: another topic goes out in full, without an alias.
    let third = sub.expect_publish().await;
    assert_eq!(
        (third.topic.as_str(), third.properties.topic_alias),
        ("other", None)
    );
    let fourth = sub.expect_publish().await;
    assert_eq!(
        (fourth.topic.as_str(), fourth.properties.topic_alias),
        ("", Some(1))
    );
}

#[tokio::test]
async fn v5_no_broker_aliases_without_client_topic_alias_maximum() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "plain").await;
    sub.subscribe(1, "t", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    for _ in 0..2 {
        publisher
            .publish_acked(publish_struct("t", QoS::AtMostOnce, None, b"x"))
            .await;
        let got = sub.expect_publish().await;
        assert_eq!(
            (got.topic.as_str(), got.properties.topic_alias),
            ("t", None)
        );
    }
}

#[tokio::test]
async fn v5_message_expiry_decremented_when_forwarded() {
    let broker = TestBroker::start().await;
    let mut connect = v5_connect("offline");
    connect.properties.session_expiry_interval = Some(60);
    let (mut sub, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
    sub.subscribe(1, "exp", QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    let mut message = publish_struct("exp", QoS::AtLeastOnce, Some(1), b"x");
    message.properties.message_expiry_interval = Some(60);
    publisher.publish_acked(message).await;
    let mut short = publish_struct("exp", QoS::AtLeastOnce, Some(2), b"gone");
    short.properties.message_expiry_interval = Some(1);
    publisher.publish_acked(short).await;
    let mut forever = publish_struct("exp", QoS::AtLeastOnce, Some(3), b"forever");
    forever.properties.message_expiry_interval = None;
    publisher.publish_acked(forever).await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    connect.clean_start = false;
    let (mut sub, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(connack.session_present);
    let got = sub.expect_publish().await;
    assert_eq!(&got.payload[..], b"x");
    let left = got
        .properties
        .message_expiry_interval
        .expect("the expiry is forwarded");
    assert!(
        (1..60).contains(&left),
        "forwarded expiry {left} must be below 60 after waiting"
    );
    // The 1 s message expired while queued; the one without expiry has none.
    let got = sub.expect_publish().await;
    assert_eq!(
        (&got.payload[..], got.properties.message_expiry_interval),
        (&b"forever"[..], None)
    );
}

#[tokio::test]
async fn v5_publish_properties_pass_through_unchanged() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "props", QoS::AtLeastOnce).await;
    let mut v311 = V4::connect(broker.addr, "v311").await;
    v311.subscribe("props", rumqttc::QoS::AtLeastOnce).await;

    let mut message = publish_struct("props", QoS::AtLeastOnce, Some(1), "ünïcode".as_bytes());
    let p = &mut message.properties;
    p.payload_format_indicator = Some(1);
    p.content_type = Some("application/json; charset=utf-8".into());
    p.response_topic = Some("reply/to/me".into());
    p.correlation_data = Some(Bytes::from_static(b"\x00\xffcorr"));
    p.user_properties = vec![
        ("z".into(), "1".into()),
        ("a".into(), "2".into()),
        ("z".into(), "3".into()),
    ];
    let sent = message.properties.clone();
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher.publish_acked(message).await;

    let got = sub.expect_publish().await;
    assert_eq!(
        got.properties, sent,
        "every property arrives unchanged and in order"
    );
    // A 3.1.1 subscriber gets the payload without properties.
    assert_eq!(&v311.next_publish().await.payload[..], "ünïcode".as_bytes());

    // And through a third-party v5 client.
    let mut rumq = V5::connect(broker.addr, "rumq").await;
    rumq.subscribe("props", V5QoS::AtLeastOnce).await;
    let mut message = publish_struct("props", QoS::AtMostOnce, None, b"again");
    message.properties = sent.clone();
    publisher.publish_acked(message).await;
    let got = rumq.next_publish().await;
    let p = got.properties.expect("properties");
    assert_eq!(p.content_type, sent.content_type);
    assert_eq!(p.response_topic, sent.response_topic);
    assert_eq!(p.correlation_data, sent.correlation_data);
    assert_eq!(p.user_properties, sent.user_properties);
    assert_eq!(p.payload_format_indicator, Some(1));
}

#[tokio::test]
async fn v5_payload_format_invalid_refused_with_0x99() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "pfi", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    let mut message = publish_struct("pfi", QoS::AtLeastOnce, Some(1), b"\xff\xfe");
    message.properties.payload_format_indicator = Some(1);
    publisher.send(&Packet::Publish(message)).await;
    assert_eq!(
        publisher.expect_packet().await,
        Packet::PubAck(Ack::new(PacketId(1), ReasonCode::PAYLOAD_FORMAT_INVALID))
    );
    sub.expect_silence().await;
}

#[tokio::test]
async fn v5_client_maximum_packet_size_drops_only_for_that_client() {
    let broker = TestBroker::start().await;
    let mut connect = v5_connect("small");
    connect.properties.maximum_packet_size = Some(128);
    let (mut small, _) = RawClient::connect_ok(broker.addr, connect).await;
    small.subscribe(1, "big", QoS::AtLeastOnce).await;
    let (mut large, _) = RawClient::connect_v5(broker.addr, "large").await;
    large.subscribe(1, "big", QoS::AtLeastOnce).await;

    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    let payload = vec![b'x'; 200];
    publisher
        .publish_acked(publish_struct("big", QoS::AtLeastOnce, Some(1), &payload))
        .await;
    publisher
        .publish_acked(publish_struct("big", QoS::AtLeastOnce, Some(2), b"small"))
        .await;

    assert_eq!(large.expect_publish().await.payload.len(), 200);
    assert_eq!(&large.expect_publish().await.payload[..], b"small");
    let got = small.expect_publish().await;
    assert_eq!(
        &got.payload[..],
        b"small",
        "the oversized message was skipped, the next one delivered"
    );
    // The drop is counted while the client is still connected.
    assert_eq!(broker.messages_dropped(), 1);
    let delivered = broker
        .running
        .broker
        .metrics
        .messages_delivered
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(delivered, 3, "two to `large`, one to `small`");
    small.puback(&got).await;
}

#[tokio::test]
async fn v5_client_maximum_packet_size_counts_the_alias_property() {
    let broker = TestBroker::start().await;
    // Size the subscriber's limit to the PUBLISH exactly as it would go out without an alias:
    // the broker must not make it larger by adding a Topic Alias.
    let topic = "t".repeat(40);
    let mut expected = publish_struct(&topic, QoS::AtMostOnce, None, b"payload");
    let exact = petrel::codec::encoded_len(&Packet::Publish(expected.clone()), ProtocolVersion::V5);
    let mut connect = v5_connect("tight");
    connect.properties.maximum_packet_size = Some(exact as u32);
    connect.properties.topic_alias_maximum = Some(10);
    let (mut sub, _) = RawClient::connect_ok(broker.addr, connect).await;
    sub.subscribe(1, &topic, QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher.publish_acked(expected.clone()).await;
    let got = sub.expect_publish().await;
    expected.properties.topic_alias = got.properties.topic_alias;
    let size = petrel::codec::encoded_len(&Packet::Publish(got), ProtocolVersion::V5);
    assert!(
        size <= exact,
        "the broker sent {size} bytes to a client whose maximum is {exact}"
    );
}

#[tokio::test]
async fn v5_client_receive_maximum_honoured() {
    let broker = TestBroker::start().await;
    let mut connect = v5_connect("slow");
    connect.properties.receive_maximum = Some(2);
    let (mut sub, _) = RawClient::connect_ok(broker.addr, connect).await;
    sub.subscribe(1, "rm", QoS::AtLeastOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    for i in 1..=5u8 {
        publisher
            .publish_acked(publish_struct(
                "rm",
                QoS::AtLeastOnce,
                Some(u16::from(i)),
                &[i],
            ))
            .await;
    }
    let a = sub.expect_publish().await;
    let b = sub.expect_publish().await;
    assert_eq!((a.payload[0], b.payload[0]), (1, 2));
    sub.expect_silence().await;
    sub.puback(&a).await;
    let c = sub.expect_publish().await;
    assert_eq!(c.payload[0], 3);
    sub.expect_silence().await;
    for p in [b, c] {
        sub.puback(&p).await;
    }
    let d = sub.expect_publish().await;
    let e = sub.expect_publish().await;
    assert_eq!((d.payload[0], e.payload[0]), (4, 5));
}

#[tokio::test]
async fn v5_broker_receive_maximum_enforced_with_0x93() {
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    let (mut client, connack) = RawClient::connect_v5(broker.addr, "eager").await;
    assert_eq!(connack.properties.receive_maximum, Some(2));
    for id in 1..=2 {
        client
            .send(&publish("rm", QoS::ExactlyOnce, Some(id), b"x"))
            .await;
        assert_eq!(
            client.expect_packet().await,
            Packet::PubRec(Ack::new(PacketId(id), ReasonCode::SUCCESS))
        );
    }
    // Releasing one makes room again.
    client
        .send(&Packet::PubRel(Ack::new(PacketId(1), ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        client.expect_packet().await,
        Packet::PubComp(Ack::new(PacketId(1), ReasonCode::SUCCESS))
    );
    client
        .send(&publish("rm", QoS::ExactlyOnce, Some(3), b"x"))
        .await;
    assert_eq!(
        client.expect_packet().await,
        Packet::PubRec(Ack::new(PacketId(3), ReasonCode::SUCCESS))
    );
    // A third unreleased one exceeds the maximum.
    client
        .send(&publish("rm", QoS::ExactlyOnce, Some(4), b"x"))
        .await;
    client
        .expect_disconnect(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED)
        .await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn v5_session_expiry_can_be_shortened_at_disconnect() {
    let broker = TestBroker::start().await;
    let mut connect = v5_connect("shorten");
    connect.properties.session_expiry_interval = Some(600);
    let (mut client, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
    let mut disconnect = petrel::codec::Disconnect::new(ReasonCode::NORMAL_DISCONNECTION);
    disconnect.properties.session_expiry_interval = Some(0);
    client.send(&Packet::Disconnect(disconnect)).await;
    client.expect_closed().await;
    connect.clean_start = false;
    let (_client, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(
        !connack.session_present,
        "expiry 0 at DISCONNECT ends the session"
    );
}

#[tokio::test]
async fn v5_session_expiry_cannot_be_raised_from_zero_at_disconnect() {
    let broker = TestBroker::start().await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "raise").await;
    let mut disconnect = petrel::codec::Disconnect::new(ReasonCode::NORMAL_DISCONNECTION);
    disconnect.properties.session_expiry_interval = Some(60);
    client.send(&Packet::Disconnect(disconnect)).await;
    client.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}
