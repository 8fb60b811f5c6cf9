//! `bad_`: malformed input, protocol violations and resource abuse (the cases of
//! `reference/bad-input.md` that apply to TCP and the core). Each offender gets the right
//! answer (a v5 reason code, a close for v3), and afterwards the broker still serves a fresh
//! client.

use petrel::codec::PacketId;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use petrel::codec::{
    Ack, Packet, Properties, ProtocolVersion, QoS, ReasonCode, Subscribe, SubscriptionOptions,
};

use crate::common::*;

/// A fresh connected v5 client sends `bytes` and must get DISCONNECT `reason` and a close.
async fn v5_rejects(addr: SocketAddr, bytes: &[u8], reason: ReasonCode) {
    let (mut client, _) = RawClient::connect_v5(addr, &unique("bad5")).await;
    client.send_raw(bytes).await;
    let packets = client.expect_closed().await;
    let disconnects: Vec<_> = packets
        .iter()
        .filter_map(|p| match p {
            Packet::Disconnect(d) => Some(d.reason),
            _ => None,
        })
        .collect();
    assert_eq!(disconnects, vec![reason], "bytes {bytes:02x?}: {packets:?}");
}

/// A fresh connected 3.1.1 client sends `bytes` and is closed without an answer.
async fn v311_closes(addr: SocketAddr, bytes: &[u8]) {
    let (mut client, _) = RawClient::connect_v311(addr, &unique("bad311")).await;
    client.send_raw(bytes).await;
    let packets = client.expect_closed().await;
    assert!(packets.is_empty(), "bytes {bytes:02x?}: {packets:?}");
}

/// A fresh TCP connection sends `bytes` first and is closed without an answer.
async fn closes_before_connect(addr: SocketAddr, bytes: &[u8]) {
    let mut client = RawClient::tcp(addr, ProtocolVersion::V5).await;
    client.send_raw(bytes).await;
    client.expect_eof().await;
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    petrel::codec::encode(packet, version, &mut out);
    out.to_vec()
}

#[tokio::test]
async fn bad_connect_larger_than_its_limit_is_refused_from_the_header() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_connect_packet_size = 1024).await;
    // Only the fixed header of a 2 KB CONNECT: closed without waiting for the body.
    closes_before_connect(broker.addr, &[0x10, 0x80, 0x10]).await;
    // A CONNECT within it is fine, and so is a later packet above it (the connection is
    // authenticated by then).
    let (mut client, _) = RawClient::connect_v5(broker.addr, "small-connect").await;
    let payload = vec![0u8; 4000];
    client
        .publish_acked(publish_struct("t", QoS::AtLeastOnce, Some(1), &payload))
        .await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_remaining_length_in_five_bytes() {
    let broker = TestBroker::start().await;
    let five = [0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
    v5_rejects(broker.addr, &five, ReasonCode::MALFORMED_PACKET).await;
    v311_closes(broker.addr, &five).await;
    closes_before_connect(broker.addr, &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_non_minimal_varint_in_lengths() {
    let broker = TestBroker::start().await;
    // Remaining length 0 written in two bytes.
    v5_rejects(
        broker.addr,
        &[0xC0, 0x80, 0x00],
        ReasonCode::MALFORMED_PACKET,
    )
    .await;
    v311_closes(broker.addr, &[0xC0, 0x80, 0x00]).await;
    // Property length 0 written in two bytes: PUBLISH "t", properties `80 00`.
    v5_rejects(
        broker.addr,
        &[0x30, 0x05, 0x00, 0x01, b't', 0x80, 0x00],
        ReasonCode::MALFORMED_PACKET,
    )
    .await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_remaining_length_above_max_packet_size_rejected_from_the_header() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_packet_size = 1024).await;
    // Only the fixed header of a 2 KB PUBLISH: the answer must not wait for the body.
    v5_rejects(
        broker.addr,
        &[0x30, 0x80, 0x10],
        ReasonCode::PACKET_TOO_LARGE,
    )
    .await;
    v311_closes(broker.addr, &[0x30, 0x80, 0x10]).await;
    closes_before_connect(broker.addr, &[0x10, 0x80, 0x10]).await;
    // Just within the limit is fine.
    let (mut client, _) = RawClient::connect_v5(broker.addr, "fits").await;
    let payload = vec![0u8; 1000];
    client
        .publish_acked(publish_struct("t", QoS::AtLeastOnce, Some(1), &payload))
        .await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_first_packet_not_connect_closed_at_once() {
    let broker = TestBroker::start().await;
    let firsts: [&[u8]; 14] = [
        &[0x00, 0x00],
        &[0x20, 0x02, 0x00, 0x00],
        &[0x30, 0x03, 0x00, 0x01, b't'],
        &[0x40, 0x02, 0x00, 0x01],
        &[0x50, 0x02, 0x00, 0x01],
        &[0x62, 0x02, 0x00, 0x01],
        &[0x70, 0x02, 0x00, 0x01],
        &[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00],
        &[0x90, 0x03, 0x00, 0x01, 0x00],
        &[0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, b't'],
        &[0xB0, 0x02, 0x00, 0x01],
        &[0xC0, 0x00],
        &[0xE0, 0x00],
        &[0xF0, 0x00],
    ];
    for first in firsts {
        closes_before_connect(broker.addr, first).await;
    }
    // Only the first byte of a huge "PUBLISH": closed without waiting for the rest.
    closes_before_connect(broker.addr, &[0x30]).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_reserved_packet_types_after_connect() {
    let broker = TestBroker::start().await;
    v5_rejects(broker.addr, &[0x00, 0x00], ReasonCode::MALFORMED_PACKET).await;
    v311_closes(broker.addr, &[0x00, 0x00]).await;
    // AUTH is type 15: malformed on 3.1.1, a protocol error on v5 without enhanced auth.
    v311_closes(broker.addr, &[0xF0, 0x00]).await;
    v5_rejects(broker.addr, &[0xF0, 0x00], ReasonCode::PROTOCOL_ERROR).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_wrong_fixed_header_flags() {
    let broker = TestBroker::start().await;
    let cases: [&[u8]; 6] = [
        &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b't', 0x00], // SUBSCRIBE without 0b0010
        &[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b't'],       // UNSUBSCRIBE without 0b0010
        &[0x60, 0x02, 0x00, 0x01],                         // PUBREL without 0b0010
        &[0x41, 0x02, 0x00, 0x01],                         // PUBACK with a flag
        &[0xC1, 0x00],                                     // PINGREQ with a flag
        &[0xE8, 0x00],                                     // DISCONNECT with a flag
    ];
    for bytes in cases {
        v5_rejects(broker.addr, bytes, ReasonCode::MALFORMED_PACKET).await;
        v311_closes(broker.addr, bytes).await;
    }
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_publish_qos3_and_dup_on_qos0() {
    let broker = TestBroker::start().await;
    let qos3 = [0x36, 0x06, 0x00, 0x01, b't', 0x00, 0x01, 0x00];
    v5_rejects(broker.addr, &qos3, ReasonCode::MALFORMED_PACKET).await;
    v311_closes(broker.addr, &qos3[..7]).await;
    let dup_qos0 = [0x38, 0x04, 0x00, 0x01, b't', 0x00];
    v5_rejects(broker.addr, &dup_qos0, ReasonCode::MALFORMED_PACKET).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_packet_id_zero_with_qos() {
    let broker = TestBroker::start().await;
    // PUBLISH QoS 1 and QoS 2 with packet id 0.
    for first in [0x32, 0x34] {
        v5_rejects(
            broker.addr,
            &[first, 0x06, 0x00, 0x01, b't', 0x00, 0x00, 0x00],
            ReasonCode::PROTOCOL_ERROR,
        )
        .await;
        v311_closes(broker.addr, &[first, 0x05, 0x00, 0x01, b't', 0x00, 0x00]).await;
    }
    // SUBSCRIBE with packet id 0.
    v5_rejects(
        broker.addr,
        &[0x82, 0x07, 0x00, 0x00, 0x00, 0x00, 0x01, b't', 0x00],
        ReasonCode::PROTOCOL_ERROR,
    )
    .await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_second_connect_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let again = encoded(
        &Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, "again"))),
        ProtocolVersion::V5,
    );
    v5_rejects(broker.addr, &again, ReasonCode::PROTOCOL_ERROR).await;
    let again = encoded(
        &Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, "again"))),
        ProtocolVersion::V311,
    );
    v311_closes(broker.addr, &again).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_invalid_utf8_and_nul_in_topic() {
    let broker = TestBroker::start().await;
    for topic in [
        &[0xFF, 0xFE][..],
        &[b'a', 0x00, b'b'],
        &[0xED, 0xA0, 0x80],
        &[0xC0, 0xAF],
    ] {
        let mut v5 = vec![0x30, (topic.len() + 3) as u8, 0x00, topic.len() as u8];
        v5.extend_from_slice(topic);
        v5.push(0x00); // no properties
        v5_rejects(broker.addr, &v5, ReasonCode::MALFORMED_PACKET).await;
        v311_closes(
            broker.addr,
            &v5[..v5.len() - 1]
                .iter()
                .enumerate()
                .map(|(i, b)| if i == 1 { b - 1 } else { *b })
                .collect::<Vec<_>>(),
        )
        .await;
    }
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_invalid_utf8_in_connect_strings() {
    let broker = TestBroker::start().await;
    // A valid CONNECT with client id "ab", then the id patched to invalid UTF-8 / U+0000.
    let good = encoded(
        &Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, "ab"))),
        ProtocolVersion::V311,
    );
    for bad_id in [[0xFF, 0xFE], [b'a', 0x00]] {
        let mut bytes = good.clone();
        let n = bytes.len();
        bytes[n - 2..].copy_from_slice(&bad_id);
        closes_before_connect(broker.addr, &bytes).await;
    }
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_wildcard_or_empty_topic_in_publish() {
    let broker = TestBroker::start().await;
    for topic in ["a/+", "#", "a/#", "+"] {
        let bytes = encoded(
            &publish(topic, QoS::AtMostOnce, None, b"x"),
            ProtocolVersion::V5,
        );
        // Malformed, as Mosquitto treats it (issue 14), rather than 0x90.
        v5_rejects(broker.addr, &bytes, ReasonCode::MALFORMED_PACKET).await;
        let bytes = encoded(
            &publish(topic, QoS::AtMostOnce, None, b"x"),
            ProtocolVersion::V311,
        );
        v311_closes(broker.addr, &bytes).await;
    }
    // An empty topic without a Topic Alias.
    let bytes = encoded(
        &publish("", QoS::AtMostOnce, None, b"x"),
        ProtocolVersion::V5,
    );
    v5_rejects(broker.addr, &bytes, ReasonCode::PROTOCOL_ERROR).await;
    v311_closes(broker.addr, &[0x30, 0x03, 0x00, 0x00, b'x']).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_property_errors() {
    let broker = TestBroker::start().await;
    // Content Type (0x03) twice: a single-instance property repeated.
    let twice = [
        0x30, 0x0C, 0x00, 0x01, b't', 0x08, 0x03, 0x00, 0x01, b'a', 0x03, 0x00, 0x01, b'b',
    ];
    v5_rejects(broker.addr, &twice, ReasonCode::PROTOCOL_ERROR).await;
    // Session Expiry Interval (0x11) is not allowed in PUBLISH.
    let misplaced = [
        0x30, 0x09, 0x00, 0x01, b't', 0x05, 0x11, 0x00, 0x00, 0x00, 0x01,
    ];
    v5_rejects(broker.addr, &misplaced, ReasonCode::MALFORMED_PACKET).await;
    // Unknown property id 0x7F.
    let unknown = [0x30, 0x06, 0x00, 0x01, b't', 0x02, 0x7F, 0x00];
    v5_rejects(broker.addr, &unknown, ReasonCode::MALFORMED_PACKET).await;
    // Property length past the end of the packet.
    let past = [0x30, 0x05, 0x00, 0x01, b't', 0x10, 0x01];
    v5_rejects(broker.addr, &past, ReasonCode::MALFORMED_PACKET).await;
    assert_broker_healthy(broker.addr).await;
}

/// With `mqtt.max_user_properties` off (the default, 128, cuts this packet off with 0x97:
/// `limits::limits_user_properties_past_the_default_get_0x97`).
#[tokio::test]
async fn bad_ten_thousand_user_properties_handled_in_bounded_time() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_user_properties = 0).await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "many", QoS::AtMostOnce).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "many-props").await;
    let mut message = publish_struct("many", QoS::AtLeastOnce, Some(1), b"x");
    message.properties.user_properties = (0..10_000)
        .map(|i| (format!("k{i}"), "v".to_owned()))
        .collect();
    client.publish_acked(message).await;
    assert_eq!(
        sub.expect_publish().await.properties.user_properties.len(),
        10_000
    );
    assert_broker_healthy(broker.addr).await;
}

/// A CONNECT that must be refused: no successful CONNACK, and the connection closes.
async fn connect_refused(addr: SocketAddr, connect: petrel::codec::Connect, reason: ReasonCode) {
    let version = connect.protocol;
    let mut client = RawClient::tcp(addr, version).await;
    client.send(&Packet::Connect(Box::new(connect))).await;
    let packets = client.expect_closed().await;
    for packet in &packets {
        match packet {
            // [MQTT-4.13.1-1] the server may answer with a CONNACK carrying the reason first.
            Packet::ConnAck(connack) => assert_eq!(connack.code, reason, "{packets:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_connect_receive_maximum_or_maximum_packet_size_zero() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(ProtocolVersion::V5, "rm0");
    connect.properties.receive_maximum = Some(0);
    connect_refused(broker.addr, connect, ReasonCode::PROTOCOL_ERROR).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "mps0");
    connect.properties.maximum_packet_size = Some(0);
    connect_refused(broker.addr, connect, ReasonCode::PROTOCOL_ERROR).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_connect_flags() {
    let broker = TestBroker::start().await;
    let good = encoded(
        &Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, "flags"))),
        ProtocolVersion::V311,
    );
    const FLAGS: usize = 9; // 0x10, length, 00 04 "MQTT", level, flags
    assert_eq!(good[FLAGS], 0x02);
    for flags in [
        0x03, // reserved bit
        0x12, // will QoS 2 without the will flag
        0x22, // will retain without the will flag
        0x42, // password without user name (3.1.1)
    ] {
        let mut bytes = good.clone();
        bytes[FLAGS] = flags;
        closes_before_connect(broker.addr, &bytes).await;
    }
    // Will QoS 3.
    let mut connect = connect_packet(ProtocolVersion::V311, "wq3");
    connect.will = Some(will("w", b"x", QoS::AtMostOnce));
    let mut bytes = encoded(&Packet::Connect(Box::new(connect)), ProtocolVersion::V311);
    bytes[FLAGS] |= 0x18;
    closes_before_connect(broker.addr, &bytes).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_will_topic_with_wildcard_refused() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(ProtocolVersion::V5, "wild-will");
    connect.will = Some(will("will/#", b"x", QoS::AtMostOnce));
    let (mut client, connack) = RawClient::connect_with(broker.addr, connect).await;
    assert_eq!(connack.code, ReasonCode::TOPIC_NAME_INVALID);
    client.expect_closed().await;
    assert_broker_healthy(broker.addr).await;
}

fn subscribe_with_properties(
    properties: Properties,
    filter: &str,
    options: SubscriptionOptions,
) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId(1),
        properties,
        filters: vec![(filter.into(), options)],
    })
}

#[tokio::test]
async fn bad_subscription_identifier_zero() {
    let broker = TestBroker::start().await;
    let properties = Properties::from(petrel::codec::PropertySet {
        subscription_identifiers: vec![0],
        ..Default::default()
    });
    let bytes = encoded(
        &subscribe_with_properties(properties, "t", qos_options(QoS::AtMostOnce)),
        ProtocolVersion::V5,
    );
    v5_rejects(broker.addr, &bytes, ReasonCode::PROTOCOL_ERROR).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_shared_subscription_with_no_local() {
    let broker = TestBroker::start().await;
    let options = SubscriptionOptions {
        no_local: true,
        ..Default::default()
    };
    let bytes = encoded(
        &subscribe_with_properties(Properties::default(), "$share/g/t", options),
        ProtocolVersion::V5,
    );
    v5_rejects(broker.addr, &bytes, ReasonCode::PROTOCOL_ERROR).await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_subscription_identifier_from_client_in_publish() {
    let broker = TestBroker::start().await;
    let mut message = publish_struct("t", QoS::AtMostOnce, None, b"x");
    message.properties.subscription_identifiers = vec![5];
    let bytes = encoded(&Packet::Publish(message), ProtocolVersion::V5);
    let (mut client, _) = RawClient::connect_v5(broker.addr, "subid").await;
    client.send_raw(&bytes).await;
    let packets = client.expect_closed().await;
    // Either the decoder (not allowed from a client: malformed) or the channel (protocol
    // error) catches it; in both cases the client is told.
    assert!(
        matches!(&packets[..], [Packet::Disconnect(d)] if d.reason == ReasonCode::PROTOCOL_ERROR || d.reason == ReasonCode::MALFORMED_PACKET),
        "{packets:?}"
    );
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_deep_topics_bounded_by_the_level_limit() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_topic_levels = 16).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "deep").await;
    let deep_filter = "a/".repeat(30_000) + "#";
    let suback = client
        .subscribe_with(1, &deep_filter, qos_options(QoS::AtMostOnce))
        .await;
    assert_eq!(suback.reasons, vec![ReasonCode::TOPIC_FILTER_INVALID]);
    let ok_filter = "a/".repeat(15) + "#";
    client.subscribe(2, &ok_filter, QoS::AtMostOnce).await;
    let deep_topic = "a/".repeat(20) + "b";
    let bytes = encoded(
        &publish(&deep_topic, QoS::AtMostOnce, None, b"x"),
        ProtocolVersion::V5,
    );
    client.send_raw(&bytes).await;
    client
        .expect_disconnect(ReasonCode::TOPIC_NAME_INVALID)
        .await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_unsolicited_acks_do_not_corrupt_state() {
    let broker = TestBroker::start().await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "acks").await;
    client
        .send(&Packet::PubAck(Ack::new(PacketId(9), ReasonCode::SUCCESS)))
        .await;
    client
        .send(&Packet::PubComp(Ack::new(PacketId(9), ReasonCode::SUCCESS)))
        .await;
    client
        .send(&Packet::PubRec(Ack::new(PacketId(9), ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        client.expect_packet().await,
        Packet::PubRel(Ack::new(
            PacketId(9),
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        ))
    );
    client
        .send(&Packet::PubRel(Ack::new(PacketId(9), ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        client.expect_packet().await,
        Packet::PubComp(Ack::new(
            PacketId(9),
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        ))
    );

    // The client's own QoS 1 and 2 flows still work, in both directions.
    client.subscribe(1, "self", QoS::ExactlyOnce).await;
    client
        .send(&publish("self", QoS::ExactlyOnce, Some(9), b"x"))
        .await;
    assert_eq!(
        client.expect_packet().await,
        Packet::PubRec(Ack::new(PacketId(9), ReasonCode::SUCCESS))
    );
    client
        .send(&Packet::PubRel(Ack::new(PacketId(9), ReasonCode::SUCCESS)))
        .await;
    // Our own message (routed at PUBREC time) and the PUBCOMP, in either order.
    let (mut got, mut completed) = (None, false);
    for _ in 0..2 {
        match client.expect_packet().await {
            Packet::Publish(p) => got = Some(p),
            Packet::PubComp(ack) => completed = ack == Ack::new(PacketId(9), ReasonCode::SUCCESS),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(completed);
    let id = got.expect("own message delivered").packet_id.unwrap();
    client
        .send(&Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        client.expect_packet().await,
        Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS))
    );
    client
        .send(&Packet::PubComp(Ack::new(id, ReasonCode::SUCCESS)))
        .await;
    client.expect_silence().await;
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_qos2_packet_id_reused_before_pubrel_is_not_routed_twice() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "t", QoS::AtMostOnce).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "reuse").await;
    for payload in [b"first", b"other"] {
        client
            .send(&publish("t", QoS::ExactlyOnce, Some(5), payload))
            .await;
        assert_eq!(
            client.expect_packet().await,
            Packet::PubRec(Ack::new(PacketId(5), ReasonCode::SUCCESS))
        );
    }
    assert_eq!(&sub.expect_publish().await.payload[..], b"first");
    sub.expect_silence().await;
    client
        .send(&Packet::PubRel(Ack::new(PacketId(5), ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        client.expect_packet().await,
        Packet::PubComp(Ack::new(PacketId(5), ReasonCode::SUCCESS))
    );
    // After the release the id is free for a new message.
    client
        .publish_acked(publish_struct("t", QoS::ExactlyOnce, Some(5), b"third"))
        .await;
    assert_eq!(&sub.expect_publish().await.payload[..], b"third");
}

#[tokio::test]
async fn bad_unreleased_qos2_ids_bounded_by_receive_maximum() {
    let broker = TestBroker::start().await;
    let (mut client, connack) = RawClient::connect_v5(broker.addr, "hoarder").await;
    let max = connack.properties.receive_maximum.expect("announced");
    // Every id one past the maximum in one write, never released.
    let mut flood = BytesMut::new();
    for id in 1..=max + 1 {
        petrel::codec::encode(
            &publish("hoard", QoS::ExactlyOnce, Some(id), b"x"),
            ProtocolVersion::V5,
            &mut flood,
        );
    }
    client.send_raw(&flood).await;
    let packets = client.expect_closed().await;
    let recs = packets
        .iter()
        .filter(|p| matches!(p, Packet::PubRec(a) if a.reason == ReasonCode::SUCCESS))
        .count();
    assert_eq!(recs, usize::from(max));
    assert!(
        matches!(packets.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::RECEIVE_MAXIMUM_EXCEEDED),
        "{:?}",
        packets.last()
    );
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_slow_consumer_does_not_hold_up_others_and_drops_are_counted() {
    const MAX_QUEUED: usize = 8;
    let broker = TestBroker::start_with(|c| {
        c.session.max_queued = MAX_QUEUED;
        c.session.queue_full = petrel::config::QueueFull::DropNew;
        c.mqtt.max_inflight = 16;
    })
    .await;
    // The slow consumer subscribes at QoS 1 and then never reads or acknowledges.
    let (mut slow, _) = RawClient::connect_v5(broker.addr, "slow").await;
    slow.subscribe(1, "hot", QoS::AtLeastOnce).await;
    let (mut fast, _) = RawClient::connect_v5(broker.addr, "fast").await;
    fast.subscribe(1, "hot", QoS::AtLeastOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;

    // Batches smaller than the fast subscriber's window plus queue, each fully delivered
    // before the next, so the fast subscriber never falls behind.
    let mut next_id = 1u16;
    for batch in 0..20u16 {
        for i in 0..10u16 {
            let n = batch * 10 + i;
            let qos = if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::AtMostOnce
            };
            let id = (qos == QoS::AtLeastOnce).then(|| {
                next_id += 1;
                next_id
            });
            publisher
                .publish_acked(publish_struct("hot", qos, id, &n.to_be_bytes()))
                .await;
        }
        for i in 0..10u16 {
            let got = fast.expect_publish().await;
            assert_eq!(
                got.payload[..],
                (batch * 10 + i).to_be_bytes(),
                "the fast subscriber gets every message, in order"
            );
            if let Some(id) = got.packet_id {
                fast.send(&Packet::PubAck(Ack::new(id, ReasonCode::SUCCESS)))
                    .await;
            }
        }
    }
    // 200 messages, half QoS 1: once the slow consumer's window holds 16 unacknowledged
    // QoS 1 messages (having been sent about as many QoS 0 ones), it takes nothing more; its
    // queue holds MAX_QUEUED (under queue_full = "drop_new"; the default "keep" would keep
    // every QoS 1 one): everything else is dropped and counted, and the publisher was never
    // slowed.
    let dropped = broker.messages_dropped();
    let kept = 200 - dropped;
    assert!(
        kept <= 2 * 16 + MAX_QUEUED as u64 + 2,
        "the slow consumer kept {kept} (dropped {dropped})"
    );
    assert_broker_healthy(broker.addr).await;
    drop(slow);
}

#[tokio::test]
async fn bad_silent_and_trickling_clients_closed_by_connect_timeout() {
    let broker =
        TestBroker::start_with(|c| c.mqtt.connect_timeout = Duration::from_millis(300)).await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(RawClient::tcp(broker.addr, ProtocolVersion::V5).await);
    }
    // A CONNECT whose remaining length promises more than ever arrives.
    let mut trickle = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    trickle
        .send_raw(&[0x10, 0x7F, 0x00, 0x04, b'M', b'Q'])
        .await;
    let mut half_header = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    half_header.send_raw(&[0x10, 0xFF]).await;
    for client in silent.iter_mut().chain([&mut trickle, &mut half_header]) {
        client.expect_eof().await;
    }
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_subscribe_with_many_filters_bounded_by_quota() {
    let broker = TestBroker::start_with(|c| c.mqtt.max_subscriptions = 100).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "greedy").await;
    let filters = (0..1000)
        .map(|i| (format!("f/{i}"), qos_options(QoS::AtMostOnce)))
        .collect();
    client
        .send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId(1),
            properties: Properties::default(),
            filters,
        }))
        .await;
    let Packet::SubAck(suback) = client.expect_packet().await else {
        panic!("expected SUBACK")
    };
    assert_eq!(suback.reasons.len(), 1000);
    assert!(suback.reasons[..100]
        .iter()
        .all(|r| *r == ReasonCode::GRANTED_QOS_0));
    assert!(suback.reasons[100..]
        .iter()
        .all(|r| *r == ReasonCode::QUOTA_EXCEEDED));
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_takeover_storm_leaves_one_live_session() {
    // Flapping detection would ban the client id after 15 of these ends (that is its job);
    // this is about the session registry under a storm.
    let broker = TestBroker::start_with(|c| c.flapping_detect.enable = false).await;
    let (mut watcher, _) = RawClient::connect_v5(broker.addr, "watcher").await;
    watcher.subscribe(1, "storm", QoS::AtMostOnce).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "stormy");
    connect.properties.session_expiry_interval = Some(60);
    let mut previous: Option<RawClient> = None;
    for i in 0..20u8 {
        connect.clean_start = i % 2 == 0;
        let (mut client, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
        if let Some(mut old) = previous.take() {
            old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
        }
        client.subscribe(1, "storm", QoS::AtMostOnce).await;
        client
            .publish_acked(publish_struct("storm", QoS::AtMostOnce, None, &[i]))
            .await;
        previous = Some(client);
    }
    for i in 0..20u8 {
        assert_eq!(watcher.expect_publish().await.payload[..], [i]);
    }
    assert_eq!(
        broker.running.broker.session_count(),
        2,
        "the watcher and exactly one stormy session"
    );
    assert_broker_healthy(broker.addr).await;
}

#[tokio::test]
async fn bad_stalled_packet_after_connect_closed_by_keep_alive() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(ProtocolVersion::V5, "staller");
    connect.keep_alive = 1;
    let (mut client, _) = RawClient::connect_ok(broker.addr, connect).await;
    // A PUBLISH announcing 100 bytes, trickled a byte at a time and never finished: partial
    // bytes are not a sign of life.
    client.send_raw(&[0x30, 0x64, 0x00]).await;
    let trickle = async {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            client.send_raw(b"x").await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1000), trickle).await;
    client
        .expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT)
        .await;
    assert_broker_healthy(broker.addr).await;
}

/// CONNECT, SUBSCRIBE to "loop", PUBLISH QoS 1 to it, PINGREQ: the wire bytes.
fn pipelined_session() -> Vec<u8> {
    let v = ProtocolVersion::V5;
    let mut bytes = encoded(
        &Packet::Connect(Box::new(connect_packet(v, "pipelined"))),
        v,
    );
    bytes.extend(encoded(
        &subscribe_packet(1, "loop", qos_options(QoS::AtLeastOnce)),
        v,
    ));
    bytes.extend(encoded(
        &publish("loop", QoS::AtLeastOnce, Some(2), b"echo"),
        v,
    ));
    bytes.extend(encoded(&Packet::PingReq, v));
    bytes
}

async fn expect_pipelined_answers(client: &mut RawClient) {
    assert!(
        matches!(client.expect_packet().await, Packet::ConnAck(c) if c.code == ReasonCode::SUCCESS)
    );
    assert!(
        matches!(client.expect_packet().await, Packet::SubAck(s) if s.reasons == [ReasonCode::GRANTED_QOS_1])
    );
    let mut rest = Vec::new();
    for _ in 0..3 {
        rest.push(client.expect_packet().await);
    }
    assert!(
        rest.contains(&Packet::PubAck(Ack::new(PacketId(2), ReasonCode::SUCCESS))),
        "{rest:?}"
    );
    assert!(rest.contains(&Packet::PingResp), "{rest:?}");
    assert!(
        rest.iter()
            .any(|p| matches!(p, Packet::Publish(p) if &p.payload[..] == b"echo")),
        "{rest:?}"
    );
}

#[tokio::test]
async fn bad_many_packets_in_one_write_and_split_at_every_byte() {
    let broker = TestBroker::start().await;
    let bytes = pipelined_session();
    let mut client = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    client.send_raw(&bytes).await;
    expect_pipelined_answers(&mut client).await;
    client.disconnect().await;

    let mut client = RawClient::tcp(broker.addr, ProtocolVersion::V5).await;
    for byte in &bytes {
        client.send_raw(std::slice::from_ref(byte)).await;
        tokio::task::yield_now().await;
    }
    expect_pipelined_answers(&mut client).await;
    assert_broker_healthy(broker.addr).await;
}
