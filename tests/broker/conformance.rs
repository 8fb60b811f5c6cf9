//! Conformance (issue 14): strict where the specification is explicit, Mosquitto 2.0's
//! behaviour where it leaves a choice. Each test is a class of behaviour, exercised over every
//! version and packet type it applies to, with raw packets on a real socket.
//! `docs/conformance.md` lists the choices and the deliberate differences from Mosquitto.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use petrel::codec::{
    Ack, Packet, PacketId, Properties, ProtocolVersion, PublishRef, QoS, ReasonCode, Subscribe,
    Unsubscribe, Will,
};

use crate::common::*;

use ProtocolVersion::{V31, V311, V5};

const VERSIONS: [ProtocolVersion; 3] = [V31, V311, V5];

fn bytes_of(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    petrel::codec::encode(packet, version, &mut out);
    out.to_vec()
}

/// A connected client of `version` sends `bytes`: v5 gets DISCONNECT `reason` and the close,
/// 3.1 and 3.1.1 the close alone (they have no DISCONNECT from the server).
async fn rejected(addr: SocketAddr, version: ProtocolVersion, bytes: &[u8], reason: ReasonCode) {
    let (mut client, _) = RawClient::connect_ok(addr, connect_packet(version, &unique("c"))).await;
    client.send_raw(bytes).await;
    let packets = client.expect_closed().await;
    let expected: Vec<Packet> = if version.is_v5() {
        vec![Packet::Disconnect(petrel::codec::Disconnect::new(reason))]
    } else {
        Vec::new()
    };
    assert_eq!(packets, expected, "{version:?} {bytes:02x?}");
}

/// A CONNECT refused before any CONNACK: the connection closes with no answer.
async fn closed_without_connack(addr: SocketAddr, version: ProtocolVersion, bytes: &[u8]) {
    let mut client = RawClient::tcp(addr, version).await;
    client.send_raw(bytes).await;
    client.expect_eof().await;
}

fn subscribe(filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId(1),
        properties: Properties::default(),
        filters: vec![(filter.into(), qos_options(QoS::AtLeastOnce))],
    })
}

fn unsubscribe(filter: &str) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        packet_id: PacketId(1),
        properties: Properties::default(),
        filters: vec![filter.into()],
    })
}

/// [MQTT-3.2.2-5] / [MQTT-3.2.2-7]: after a CONNACK with a failure code the server closes the
/// connection, whatever the failure, on every version.
#[tokio::test]
async fn conn_every_failed_connack_is_followed_by_the_close() {
    let broker = TestBroker::start().await;
    // An unknown level under each protocol name: CONNACK 0x01 in the 3.1.1 form.
    for (name, level) in [("MQTT", 3u8), ("MQIsdp", 4), ("MQTT", 2), ("MQTT", 6)] {
        let mut bytes = vec![0x10, 0];
        bytes.extend_from_slice(&(name.len() as u16).to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&[level, 0x02, 0x00, 0x3C, 0x00, 0x01, b'c']);
        bytes[1] = (bytes.len() - 2) as u8;
        let mut client = RawClient::tcp(broker.addr, V311).await;
        client.send_raw(&bytes).await;
        let packets = client.expect_closed().await;
        assert!(
            matches!(&packets[..], [Packet::ConnAck(c)] if c.code == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
            "{name} {level}: {packets:?}"
        );
    }
    // A wrong protocol name ("short", "zero-length", "long") [MQTT-3.1.2-1].
    for name in ["MQT", "", "MQTTT"] {
        let mut bytes = vec![0x10, 0];
        bytes.extend_from_slice(&(name.len() as u16).to_be_bytes());
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(&[4, 0x02, 0x00, 0x3C, 0x00, 0x01, b'c']);
        bytes[1] = (bytes.len() - 2) as u8;
        let mut client = RawClient::tcp(broker.addr, V311).await;
        client.send_raw(&bytes).await;
        let packets = client.expect_closed().await;
        assert!(packets.len() <= 1, "{name:?}: {packets:?}");
        assert!(
            packets
                .iter()
                .all(|p| matches!(p, Packet::ConnAck(c) if c.code.is_failure())),
            "{name:?}: {packets:?}"
        );
    }
    // A refused client id: 3.1.1 and 3.1 with an empty id and no clean session, 3.1 with an
    // id longer than its 23 characters would not matter here; v5 with a bad auth method.
    for version in [V31, V311] {
        let mut connect = connect_packet(version, "");
        connect.clean_start = false;
        let (mut client, connack) = RawClient::connect_with(broker.addr, connect).await;
        assert!(connack.code.is_failure(), "{version:?}: {connack:?}");
        assert!(client.expect_closed().await.is_empty());
    }
    let mut connect = connect_packet(V5, "c");
    connect.properties.authentication_method = Some("NOPE".into());
    let (mut client, connack) = RawClient::connect_with(broker.addr, connect).await;
    assert_eq!(connack.code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert!(client.expect_closed().await.is_empty());
    assert_broker_healthy(broker.addr).await;
}

/// [MQTT-3.1.2-24]: nothing the broker sends may exceed the client's Maximum Packet Size, the
/// CONNACK included: when even the CONNACK does not fit, the connection closes unanswered.
#[tokio::test]
async fn v5_a_connack_larger_than_the_client_maximum_closes_instead() {
    let broker = TestBroker::start().await;
    for max in [2u32, 5, 20] {
        let mut connect = connect_packet(V5, &unique("tiny"));
        connect.properties.maximum_packet_size = Some(max);
        closed_without_connack(
            broker.addr,
            V5,
            &bytes_of(&Packet::Connect(Box::new(connect)), V5),
        )
        .await;
    }
    // With room for the CONNACK, the client is served.
    let mut connect = connect_packet(V5, &unique("roomy"));
    connect.properties.maximum_packet_size = Some(64);
    let (mut client, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(!connack.session_present);
    client.subscribe(1, "t", QoS::AtLeastOnce).await;
    assert_broker_healthy(broker.addr).await;
}

/// A QoS 1/2 message too large for a subscriber's Maximum Packet Size is discarded for that
/// subscriber as if delivered [MQTT-3.1.2-25]: it holds no in-flight slot, and the session's
/// later messages keep flowing.
#[tokio::test]
async fn v5_a_message_too_large_for_the_subscriber_is_skipped_without_stalling() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(V5, "small-sub");
    connect.properties.maximum_packet_size = Some(64);
    connect.properties.receive_maximum = Some(1);
    let (mut sub, _) = RawClient::connect_ok(broker.addr, connect).await;
    sub.subscribe(1, "big/#", QoS::ExactlyOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "big-pub").await;
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        for i in 0..3u16 {
            publisher
                .publish_acked(publish_struct("big/t", qos, Some(10 + i), &[0x42; 200]))
                .await;
        }
        publisher
            .publish_acked(publish_struct("big/t", qos, Some(20), b"small"))
            .await;
        let got = sub.expect_publish().await;
        assert_eq!(&got.payload[..], b"small", "{qos:?}");
        let id = got.packet_id.expect("QoS 1/2");
        match qos {
            QoS::AtLeastOnce => {
                sub.send(&Packet::PubAck(Ack::new(id, ReasonCode::SUCCESS)))
                    .await
            }
            _ => {
                sub.send(&Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)))
                    .await;
                assert!(matches!(sub.expect_packet().await, Packet::PubRel(_)));
                sub.send(&Packet::PubComp(Ack::new(id, ReasonCode::SUCCESS)))
                    .await;
            }
        }
    }
    sub.expect_silence().await;
    assert!(broker.messages_dropped() >= 6);
}

/// Will delay and session expiry across a reconnect [MQTT-3.1.3-9], [MQTT-3.1.2-23], and a
/// clean start after a QoS 2 exchange (session present 0).
#[tokio::test]
async fn v5_session_state_across_reconnects() {
    let broker = TestBroker::start().await;
    let (mut watcher, _) = RawClient::connect_v5(broker.addr, "watcher").await;
    watcher.subscribe(1, "will/#", QoS::AtMostOnce).await;

    // Reconnecting before the will delay ends: no will.
    let mut connect = connect_packet(V5, "delayed");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    let mut will_properties = Properties::default();
    will_properties.will_delay_interval = Some(2);
    connect.will = Some(Will {
        topic: "will/delayed".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: will_properties,
    });
    let (client, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
    drop(client); // an abnormal close
    tokio::time::sleep(Duration::from_millis(300)).await;
    connect.will = None;
    let (mut again, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(connack.session_present);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    watcher.expect_silence().await;
    again
        .send(&Packet::Disconnect(petrel::codec::Disconnect::new(
            ReasonCode::SUCCESS,
        )))
        .await;

    // A session whose expiry ran out while disconnected is gone.
    let mut connect = connect_packet(V5, "expiring");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(1);
    let (client, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
    client.disconnect().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (client, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(!connack.session_present, "the session expired");
    client.disconnect().await;

    // A QoS 2 publish, DISCONNECT, then a clean start: session present 0.
    for version in [V311, V5] {
        let id = unique("qos2");
        let mut connect = connect_packet(version, &id);
        connect.clean_start = false;
        if version.is_v5() {
            connect.properties.session_expiry_interval = Some(60);
        }
        let (mut client, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
        client
            .publish_acked(publish_struct("q/2", QoS::ExactlyOnce, Some(1), b"x"))
            .await;
        client.disconnect().await;
        connect.clean_start = true;
        let (client, connack) = RawClient::connect_ok(broker.addr, connect).await;
        assert!(!connack.session_present, "{version:?}");
        client.disconnect().await;
    }
}

/// Malformed in every packet type: an empty topic filter in SUBSCRIBE and UNSUBSCRIBE, one
/// with no filter at all (properties ending where a filter should start), `$share/g/` with
/// no topic part, an empty will topic: close (3.x) or DISCONNECT 0x81/0x82 (5.0), never a
/// per-filter reason code or a CONNACK.
#[tokio::test]
async fn bad_malformed_subscriptions_and_wills_close_the_connection() {
    let broker = TestBroker::start().await;
    for version in VERSIONS {
        for packet in [
            subscribe(""),
            unsubscribe(""),
            subscribe("$share/g/"),
            unsubscribe("$share/g/"),
        ] {
            rejected(
                broker.addr,
                version,
                &bytes_of(&packet, version),
                ReasonCode::MALFORMED_PACKET,
            )
            .await;
        }
        // No filter at all [MQTT-3.8.3-3], [MQTT-3.10.3-2].
        for packet_type in [0x82u8, 0xA2] {
            let bytes: &[u8] = if version.is_v5() {
                &[packet_type, 0x03, 0x00, 0x01, 0x00]
            } else {
                &[packet_type, 0x02, 0x00, 0x01]
            };
            rejected(broker.addr, version, bytes, ReasonCode::PROTOCOL_ERROR).await;
        }
        let mut connect = connect_packet(version, &unique("will"));
        connect.will = Some(Will {
            topic: String::new(),
            payload: Bytes::from_static(b"w"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        closed_without_connack(
            broker.addr,
            version,
            &bytes_of(&Packet::Connect(Box::new(connect)), version),
        )
        .await;
    }
    assert_broker_healthy(broker.addr).await;
}

/// An ack with a reason code its type does not define is malformed (DISCONNECT 0x81).
#[tokio::test]
async fn v5_an_ack_with_an_unknown_reason_code_disconnects_0x81() {
    let broker = TestBroker::start().await;
    for (packet_type, code) in [(0x40u8, 0x77u8), (0x50, 0x05), (0x62, 0x10), (0x70, 0x93)] {
        rejected(
            broker.addr,
            V5,
            &[packet_type, 0x03, 0x00, 0x01, code],
            ReasonCode::MALFORMED_PACKET,
        )
        .await;
    }
    assert_broker_healthy(broker.addr).await;
}

/// An ack that belongs to another QoS flow than the message in flight under its id — PUBREC
/// for QoS 1, PUBACK for QoS 2, PUBCOMP before PUBREL — is a protocol error, not an answer
/// with 0x92.
#[tokio::test]
async fn pub_an_ack_of_the_wrong_flow_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    type Wrap = fn(Ack) -> Packet;
    let cases: [(QoS, Wrap); 4] = [
        (QoS::AtLeastOnce, Packet::PubRec),
        (QoS::AtLeastOnce, Packet::PubComp),
        (QoS::ExactlyOnce, Packet::PubAck),
        (QoS::ExactlyOnce, Packet::PubComp),
    ];
    for version in VERSIONS {
        for (qos, wrong) in cases {
            let id = unique("wrong");
            let (mut sub, _) =
                RawClient::connect_ok(broker.addr, connect_packet(version, &id)).await;
            let topic = format!("wrong/{id}");
            sub.subscribe(1, &topic, qos).await;
            let (mut publisher, _) = RawClient::connect_v311(broker.addr, &unique("p")).await;
            publisher
                .publish_acked(publish_struct(&topic, qos, Some(1), b"x"))
                .await;
            let got = sub.expect_publish().await;
            let packet = wrong(Ack::new(got.packet_id.unwrap(), ReasonCode::SUCCESS));
            let packets = {
                sub.send(&packet).await;
                sub.expect_closed().await
            };
            let expected: Vec<Packet> = if version.is_v5() {
                vec![Packet::Disconnect(petrel::codec::Disconnect::new(
                    ReasonCode::PROTOCOL_ERROR,
                ))]
            } else {
                Vec::new()
            };
            assert_eq!(packets, expected, "{version:?} {qos:?} {packet:?}");
        }
    }
    // Unsolicited acks for unknown ids stay harmless (PUBREC and PUBREL get 0x92): kept, and
    // tested in bad.rs (`bad_unsolicited_acks_do_not_corrupt_state`).
}

/// PUBLISH topic names: wildcards are malformed (DISCONNECT 0x81, as Mosquitto), a Response
/// Topic with wildcards is a protocol error [MQTT-3.3.2-14], an alias never defined with an
/// empty topic a protocol error, an alias above the maximum 0x94, a Subscription Identifier
/// from a client a protocol error [MQTT-3.3.4-6].
#[tokio::test]
async fn v5_publish_topic_rules() {
    let broker = TestBroker::start_with(|c| c.mqtt.topic_alias_maximum = 10).await;
    for topic in ["a/+", "#", "a/#/b"] {
        for version in VERSIONS {
            let packet = publish(topic, QoS::AtMostOnce, None, b"x");
            rejected(
                broker.addr,
                version,
                &bytes_of(&packet, version),
                ReasonCode::MALFORMED_PACKET,
            )
            .await;
        }
    }
    let mut cases = Vec::new();
    let mut response = publish_struct("a/b", QoS::AtMostOnce, None, b"x");
    response.properties.response_topic = Some("reply/+".into());
    cases.push((response, ReasonCode::PROTOCOL_ERROR));
    let mut unknown_alias = publish_struct("", QoS::AtMostOnce, None, b"x");
    unknown_alias.properties.topic_alias = Some(3);
    cases.push((unknown_alias, ReasonCode::PROTOCOL_ERROR));
    let mut above = publish_struct("a", QoS::AtMostOnce, None, b"x");
    above.properties.topic_alias = Some(11);
    cases.push((above, ReasonCode::TOPIC_ALIAS_INVALID));
    let mut subscription_id = publish_struct("a", QoS::AtMostOnce, None, b"x");
    subscription_id.properties.subscription_identifiers = vec![1];
    cases.push((subscription_id, ReasonCode::PROTOCOL_ERROR));
    for (packet, reason) in cases {
        rejected(
            broker.addr,
            V5,
            &bytes_of(&Packet::Publish(packet), V5),
            reason,
        )
        .await;
    }
    // A will whose Response Topic has wildcards is refused with the CONNACK.
    let mut connect = connect_packet(V5, "response-will");
    let mut properties = Properties::default();
    properties.response_topic = Some("r/#".into());
    connect.will = Some(Will {
        topic: "w".into(),
        payload: Bytes::new(),
        qos: QoS::AtMostOnce,
        retain: false,
        properties,
    });
    let (mut client, connack) = RawClient::connect_with(broker.addr, connect).await;
    assert_eq!(connack.code, ReasonCode::PROTOCOL_ERROR);
    assert!(client.expect_closed().await.is_empty());
    assert_broker_healthy(broker.addr).await;
}

/// Control characters U+0001–U+001F and U+007F–U+009F in a client id, user name, will topic,
/// topic name, topic filter or unsubscribe filter: malformed on every version, as Mosquitto.
#[tokio::test]
async fn bad_control_characters_are_malformed_on_every_version() {
    let broker = TestBroker::start().await;
    for version in VERSIONS {
        for bad in ["a\u{1}b", "a\u{7f}", "a\u{85}b"] {
            let mut connect = connect_packet(version, bad);
            closed_without_connack(
                broker.addr,
                version,
                &bytes_of(&Packet::Connect(Box::new(connect.clone())), version),
            )
            .await;
            connect.client_id = unique("ok");
            connect.username = Some(bad.into());
            closed_without_connack(
                broker.addr,
                version,
                &bytes_of(&Packet::Connect(Box::new(connect.clone())), version),
            )
            .await;
            connect.username = None;
            connect.will = Some(Will {
                topic: bad.into(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Properties::default(),
            });
            closed_without_connack(
                broker.addr,
                version,
                &bytes_of(&Packet::Connect(Box::new(connect)), version),
            )
            .await;
            let publish_raw = PublishRef {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: bad,
                packet_id: None,
                payload: &Bytes::from_static(b"x"),
            };
            let mut out = BytesMut::new();
            publish_raw.encode(version, &mut out);
            for bytes in [
                out.to_vec(),
                bytes_of(&subscribe(bad), version),
                bytes_of(&unsubscribe(bad), version),
            ] {
                rejected(broker.addr, version, &bytes, ReasonCode::MALFORMED_PACKET).await;
            }
        }
    }
    assert_broker_healthy(broker.addr).await;
}

/// MQTT 3.1 (`MQIsdp`) is looser: a reserved connect flag or fixed-header flags on its
/// CONNECT are accepted (old firmware sends them; Mosquitto accepts them). 3.1.1 and 5.0 stay
/// strict: closed without a CONNACK.
#[tokio::test]
async fn conn_mqtt_3_1_accepts_what_it_did_not_forbid() {
    let broker = TestBroker::start().await;
    let v31 = [
        0x10, 0x0F, 0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03, 0x02, 0x00, 0x3C, 0x00,
        0x01, b'o',
    ];
    for (header, flags) in [(0x10u8, 0x03u8), (0x13, 0x02), (0x1F, 0x03)] {
        let mut bytes = v31;
        bytes[0] = header;
        bytes[11] = flags;
        let mut client = RawClient::tcp(broker.addr, V31).await;
        client.send_raw(&bytes).await;
        match client.expect_packet().await {
            Packet::ConnAck(connack) => assert_eq!(connack.code, ReasonCode::SUCCESS),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        client.subscribe(1, "old/#", QoS::AtLeastOnce).await;
    }
    let v311 = [
        0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x01, b's',
    ];
    for (header, flags) in [(0x10u8, 0x03u8), (0x13, 0x02)] {
        let mut bytes = v311;
        bytes[0] = header;
        bytes[9] = flags;
        closed_without_connack(broker.addr, V311, &bytes).await;
    }
    assert_broker_healthy(broker.addr).await;
}

/// A client that exceeds our Receive Maximum gets DISCONNECT 0x93 and can read it: the broker
/// closes its write side and drains the client's input for the linger time instead of
/// resetting the connection while the client's packets are still arriving (a reset would
/// destroy the DISCONNECT before the client reads it). The client here keeps writing while
/// it reads, as a flooding device does.
#[tokio::test]
async fn v5_receive_maximum_exceeded_is_readable_before_the_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = TestBroker::start_with(|c| c.mqtt.receive_maximum = 2).await;
    for round in 0..3 {
        let stream = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let connect = connect_packet(V5, &format!("flood-{round}"));
        write
            .write_all(&bytes_of(&Packet::Connect(Box::new(connect)), V5))
            .await
            .unwrap();
        // Bounded: 200 bursts of 1,000 QoS 2 publishes (about 20 MB, more than the sockets
        // buffer), stopping at the first write error.
        let writer = tokio::spawn(async move {
            let mut burst = Vec::new();
            for id in 1..=1000u16 {
                let packet = publish("f", QoS::ExactlyOnce, Some(id), &[0; 100]);
                burst.extend(bytes_of(&packet, V5));
            }
            for _ in 0..200 {
                write.write_all(&burst).await?;
            }
            Ok::<(), std::io::Error>(())
        });
        let mut codec = petrel::codec::Codec::with_version(V5, u32::MAX);
        let mut buf = BytesMut::new();
        let mut packets = Vec::new();
        let outcome = tokio::time::timeout(WAIT, async {
            loop {
                while let Some(packet) = codec.decode(&mut buf).expect("well-formed") {
                    packets.push(packet);
                }
                match read.read_buf(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(err) => return Err(err),
                }
            }
        })
        .await
        .expect("closed in time");
        let written = writer.await.unwrap();
        assert!(
            outcome.is_ok(),
            "reset before the close was read: {outcome:?} after {packets:?}"
        );
        // The broker read what the client still sent instead of resetting: its writes went
        // through, as a client's must until it has read the DISCONNECT.
        assert!(written.is_ok(), "the client's writes failed: {written:?}");
        assert_eq!(
            packets.last(),
            Some(&Packet::Disconnect(petrel::codec::Disconnect::new(
                ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
            ))),
            "{packets:?}"
        );
    }
    assert_broker_healthy(broker.addr).await;
}
