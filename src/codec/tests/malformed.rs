//! One test per malformed or forbidden input, and truncation at every offset of every packet
//! type: each must be a `DecodeError` of the right kind (or `Ok(None)`), never a panic.

use crate::codec::PacketId;
use bytes::{Bytes, BytesMut};

use super::{
    assert_malformed, assert_protocol, bytes, decode_one, decode_with, encoded, frame, hex,
};
use crate::codec::encode::put_varint;
use crate::codec::{
    Ack, Auth, Codec, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties,
    ProtocolVersion, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe, Will,
};

use ProtocolVersion::{V31, V311, V5};

const MAX: u32 = 1 << 20;

/// A CONNECT body for `level` with the given connect flags and trailing payload hex.
fn connect_body(name: &str, level: u8, flags: u8, rest: &str) -> String {
    let name_hex: String = name.bytes().map(|b| format!("{b:02X}")).collect();
    format!(
        "00 {:02X} {name_hex} {level:02X} {flags:02X} 00 3C {rest}",
        name.len()
    )
}

fn server_decode(buf: BytesMut) -> Result<Option<Packet>, DecodeError> {
    let mut buf = buf;
    Codec::new(MAX).decode(&mut buf)
}

// ---------------------------------------------------------------------------------------------
// Framing

#[test]
fn remaining_length_with_a_fifth_byte_is_malformed() {
    // The fourth byte still has its continuation bit: rejected without waiting for a fifth.
    assert_malformed(
        decode_with(V311, hex("30 FF FF FF 80")),
        "longer than 4 bytes",
    );
    assert_malformed(
        decode_with(V311, hex("30 FF FF FF FF 01")),
        "longer than 4 bytes",
    );
}

#[test]
fn non_minimal_remaining_length_is_malformed() {
    assert_malformed(decode_with(V311, hex("C0 80 00")), "[MQTT-1.5.5-1]");
    assert_malformed(decode_with(V311, hex("30 83 80 00")), "[MQTT-1.5.5-1]");
}

#[test]
fn non_minimal_property_length_is_malformed() {
    assert_malformed(
        decode_with(V5, frame(0x40, "00 01 10 80 00")),
        "[MQTT-1.5.5-1]",
    );
}

#[test]
fn non_minimal_subscription_identifier_is_malformed() {
    assert_malformed(
        decode_with(V5, frame(0x82, "00 01 03 0B 81 00 00 01 61 01")),
        "[MQTT-1.5.5-1]",
    );
}

#[test]
fn reserved_fixed_header_flags_are_malformed_from_the_first_byte() {
    for version in [V31, V311, V5] {
        let last_type = if version.is_v5() { 15 } else { 14 };
        // PUBLISH has flags of its own; CONNECT's are checked once its protocol is known
        // (`connect_header_flags_are_malformed_except_on_mqtt_3_1`).
        for packet_type in (2..=last_type).filter(|&t| t != 3) {
            let expected = if matches!(packet_type, 6 | 8 | 10) {
                0b0010
            } else {
                0
            };
            for flags in (0..16).filter(|&f| f != expected) {
                let first = packet_type << 4 | flags;
                assert_malformed(
                    decode_with(version, hex(&format!("{first:02X}"))),
                    "[MQTT-2.1.3-1]",
                );
            }
        }
    }
}

#[test]
fn connect_header_flags_are_malformed_except_on_mqtt_3_1() {
    // CONNECT for 3.1.1 and 5.0 with fixed header flags 0x1: malformed.
    let v311 = "10 0C 00 04 4D 51 54 54 04 02 00 3C 00 00";
    let v5 = "10 0D 00 04 4D 51 54 54 05 02 00 3C 00 00 00";
    for connect in [v311, v5] {
        let mut bytes = hex(connect);
        bytes[0] |= 0x01;
        assert_malformed(Codec::new(MAX).decode(&mut bytes.clone()), "[MQTT-2.1.3-1]");
        assert!(Codec::new(MAX).decode(&mut hex(connect)).unwrap().is_some());
    }
    // MQTT 3.1 did not forbid them, and Mosquitto accepts them: so does Petrel.
    let mut v31 = hex("10 0E 00 06 4D 51 49 73 64 70 03 02 00 3C 00 00");
    v31[0] |= 0x03;
    assert!(matches!(
        Codec::new(MAX).decode(&mut v31),
        Ok(Some(Packet::Connect(_)))
    ));
}

#[test]
fn the_reserved_connect_flag_is_malformed_except_on_mqtt_3_1() {
    let v311 = "10 0C 00 04 4D 51 54 54 04 03 00 3C 00 00";
    assert_malformed(Codec::new(MAX).decode(&mut hex(v311)), "[MQTT-3.1.2-3]");
    let v31 = "10 0E 00 06 4D 51 49 73 64 70 03 03 00 3C 00 00";
    assert!(matches!(
        Codec::new(MAX).decode(&mut hex(v31)),
        Ok(Some(Packet::Connect(_)))
    ));
}

#[test]
fn packet_type_zero_is_malformed() {
    for version in [V31, V311, V5] {
        assert_malformed(decode_with(version, hex("00 00")), "packet type 0");
    }
}

#[test]
fn auth_on_a_v3_connection_is_malformed() {
    assert_malformed(decode_with(V311, hex("F0 00")), "AUTH");
    assert_malformed(decode_with(V31, hex("F0 00")), "AUTH");
    assert!(matches!(
        decode_with(V5, hex("F0 00")),
        Ok(Some(Packet::Auth(_)))
    ));
}

#[test]
fn first_packet_other_than_connect_is_a_protocol_error_from_the_first_byte() {
    for packet_type in (0..16u8).filter(|&t| t != 1) {
        let flags = if matches!(packet_type, 6 | 8 | 10) {
            0b0010
        } else {
            0
        };
        let first = packet_type << 4 | flags;
        assert_protocol(
            server_decode(hex(&format!("{first:02X}"))),
            "[MQTT-3.1.0-1]",
        );
    }
}

#[test]
fn trailing_bytes_after_the_content_are_malformed() {
    assert_malformed(decode_with(V311, hex("C0 01 00")), "after the end");
    assert_malformed(decode_with(V5, hex("D0 01 00")), "after the end");
    assert_malformed(decode_with(V311, hex("40 03 00 01 00")), "after the end");
    assert_malformed(decode_with(V311, hex("B0 03 00 01 00")), "after the end");
    assert_malformed(decode_with(V311, hex("E0 01 00")), "after the end");
    assert_malformed(decode_with(V311, hex("20 03 00 00 00")), "after the end");
    assert_malformed(
        decode_with(V5, frame(0x40, "00 01 10 00 FF")),
        "after the end",
    );
    assert_malformed(decode_with(V5, frame(0xE0, "00 00 FF")), "after the end");
    let connect = connect_body("MQTT", 4, 0x02, "00 01 61 FF");
    assert_malformed(server_decode(frame(0x10, &connect)), "after the end");
}

// ---------------------------------------------------------------------------------------------
// PUBLISH and packet identifiers

#[test]
fn publish_with_qos_3_is_malformed_from_the_first_byte() {
    assert_malformed(decode_with(V311, hex("36")), "[MQTT-3.3.1-4]");
    assert_malformed(decode_with(V5, hex("3E")), "[MQTT-3.3.1-4]");
}

#[test]
fn publish_with_dup_and_qos_0_is_malformed() {
    assert_malformed(decode_with(V311, hex("38")), "[MQTT-3.3.1-2]");
}

#[test]
fn v3_publish_with_empty_topic_is_malformed() {
    assert_malformed(decode_with(V311, hex("30 02 00 00")), "empty topic");
}

#[test]
fn v5_publish_with_empty_topic_and_topic_alias_decodes() {
    let packet = decode_one(V5, frame(0x30, "00 00 03 23 00 05 68 69"));
    let Packet::Publish(publish) = packet else {
        panic!("not PUBLISH")
    };
    assert_eq!(
        (publish.topic.as_str(), publish.properties.topic_alias),
        ("", Some(5))
    );
    assert_eq!(publish.payload, bytes("hi"));
}

#[test]
fn wildcards_in_publish_topics_are_left_to_the_broker() {
    assert!(matches!(
        decode_with(V311, frame(0x30, "00 03 61 2F 23")),
        Ok(Some(Packet::Publish(_)))
    ));
}

#[test]
fn packet_id_zero_is_a_protocol_error() {
    for (version, first, body) in [
        (V311, 0x32, "00 01 61 00 00"),
        (V5, 0x34, "00 01 61 00 00 00"),
        (V311, 0x40, "00 00"),
        (V5, 0x50, "00 00"),
        (V311, 0x62, "00 00"),
        (V5, 0x70, "00 00 10"),
        (V311, 0x82, "00 00 00 01 61 00"),
        (V5, 0x90, "00 00 00 00"),
        (V311, 0xA2, "00 00 00 01 61"),
        (V311, 0xB0, "00 00"),
    ] {
        assert_protocol(
            decode_with(version, frame(first, body)),
            "packet identifier 0",
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Strings

#[test]
fn invalid_utf8_is_malformed() {
    assert_malformed(decode_with(V311, frame(0x30, "00 01 FF")), "[MQTT-1.5.4-1]");
    // U+D800 encoded as UTF-8 (a surrogate) is not valid in MQTT either.
    assert_malformed(
        decode_with(V311, frame(0x30, "00 03 ED A0 80")),
        "[MQTT-1.5.4-1]",
    );
    let connect = connect_body("MQTT", 4, 0x02, "00 02 C3 28");
    assert_malformed(server_decode(frame(0x10, &connect)), "[MQTT-1.5.4-1]");
}

#[test]
fn nul_character_in_a_string_is_malformed() {
    assert_malformed(
        decode_with(V311, frame(0x30, "00 02 61 00")),
        "[MQTT-1.5.4-2]",
    );
    assert_malformed(
        decode_with(V5, frame(0x40, "00 01 80 05 1F 00 02 00 61")),
        "[MQTT-1.5.4-2]",
    );
}

// ---------------------------------------------------------------------------------------------
// Properties

#[test]
fn duplicated_property_is_a_protocol_error() {
    assert_protocol(
        decode_with(V5, frame(0x30, "00 01 61 04 01 01 01 00")),
        "PAYLOAD_FORMAT_INDICATOR appears more than once",
    );
    assert_protocol(
        decode_with(V5, frame(0x40, "00 01 80 08 1F 00 01 61 1F 00 01 62")),
        "REASON_STRING appears more than once",
    );
}

#[test]
fn user_property_may_repeat() {
    let packet = decode_one(
        V5,
        frame(
            0x40,
            "00 01 80 0E 26 00 01 61 00 01 62 26 00 01 61 00 01 63",
        ),
    );
    let Packet::PubAck(ack) = packet else {
        panic!("not PUBACK")
    };
    assert_eq!(
        ack.properties.user_properties,
        vec![
            ("a".to_owned(), "b".to_owned()),
            ("a".to_owned(), "c".to_owned())
        ]
    );
}

#[test]
fn subscription_identifier_repeats_in_publish_but_not_in_subscribe() {
    let packet = decode_one(V5, frame(0x30, "00 01 61 04 0B 01 0B 02"));
    let Packet::Publish(publish) = packet else {
        panic!("not PUBLISH")
    };
    assert_eq!(publish.properties.subscription_identifiers, vec![1, 2]);
    assert_protocol(
        decode_with(V5, frame(0x82, "00 01 04 0B 01 0B 02 00 01 61 00")),
        "SUBSCRIPTION_IDENTIFIER appears more than once",
    );
}

#[test]
fn property_not_allowed_in_the_packet_is_malformed() {
    // Topic Alias in PUBACK.
    assert_malformed(
        decode_with(V5, frame(0x40, "00 01 00 03 23 00 01")),
        "TOPIC_ALIAS is not allowed",
    );
    // Will Delay Interval among the CONNECT properties rather than the will properties.
    let connect = connect_body("MQTT", 5, 0x02, "05 18 00 00 00 01 00 01 61");
    assert_malformed(
        server_decode(frame(0x10, &connect)),
        "WILL_DELAY_INTERVAL is not allowed",
    );
    // Session Expiry Interval among the will properties.
    let connect = connect_body(
        "MQTT",
        5,
        0x06,
        "00 00 01 61 05 11 00 00 00 01 00 01 77 00 00",
    );
    assert_malformed(
        server_decode(frame(0x10, &connect)),
        "SESSION_EXPIRY_INTERVAL is not allowed",
    );
}

#[test]
fn will_properties_are_their_own_context() {
    let connect = connect_body(
        "MQTT",
        5,
        0x06,
        "00 00 01 61  0C 18 00 00 00 01 01 01 02 00 00 00 09  00 01 77 00 00",
    );
    let Packet::Connect(connect) = server_decode(frame(0x10, &connect)).unwrap().unwrap() else {
        panic!("not CONNECT")
    };
    let will = connect.will.expect("will flag set");
    assert_eq!(will.properties.will_delay_interval, Some(1));
    assert_eq!(will.properties.payload_format_indicator, Some(1));
    assert_eq!(will.properties.message_expiry_interval, Some(9));
    assert!(connect.properties.is_empty());
}

#[test]
fn unknown_property_is_malformed() {
    assert_malformed(
        decode_with(V5, frame(0x40, "00 01 80 02 04 00")),
        "unknown property",
    );
    assert_malformed(
        decode_with(V5, frame(0xE0, "00 02 7F 00")),
        "unknown property",
    );
}

#[test]
fn property_length_past_the_end_is_malformed() {
    assert_malformed(
        decode_with(V5, frame(0x40, "00 01 10 09 1F")),
        "property length",
    );
    // A property value cut short by the property length.
    assert_malformed(
        decode_with(V5, frame(0x40, "00 01 10 02 1F 00 00 01 61")),
        "ends early",
    );
}

#[test]
fn receive_maximum_zero_is_a_protocol_error() {
    assert_protocol(
        decode_with(V5, frame(0x20, "00 00 03 21 00 00")),
        "RECEIVE_MAXIMUM",
    );
    let connect = connect_body("MQTT", 5, 0x02, "03 21 00 00 00 01 61");
    assert_protocol(server_decode(frame(0x10, &connect)), "RECEIVE_MAXIMUM");
}

#[test]
fn maximum_packet_size_zero_is_a_protocol_error() {
    assert_protocol(
        decode_with(V5, frame(0x20, "00 00 05 27 00 00 00 00")),
        "MAXIMUM_PACKET_SIZE",
    );
}

#[test]
fn subscription_identifier_zero_is_a_protocol_error() {
    assert_protocol(
        decode_with(V5, frame(0x82, "00 01 02 0B 00 00 01 61 00")),
        "SUBSCRIPTION_IDENTIFIER",
    );
}

#[test]
fn flag_properties_other_than_0_or_1_are_a_protocol_error() {
    for id in ["24", "25", "28", "29", "2A"] {
        assert_protocol(
            decode_with(V5, frame(0x20, &format!("00 00 02 {id} 02"))),
            "invalid value",
        );
        assert!(decode_with(V5, frame(0x20, &format!("00 00 02 {id} 01"))).is_ok());
    }
    for id in ["17", "19"] {
        let connect = connect_body("MQTT", 5, 0x02, &format!("02 {id} 02 00 01 61"));
        assert_protocol(server_decode(frame(0x10, &connect)), "invalid value");
    }
    assert_protocol(
        decode_with(V5, frame(0x30, "00 01 61 02 01 02")),
        "PAYLOAD_FORMAT_INDICATOR",
    );
}

#[test]
fn topic_alias_zero_is_left_to_the_broker() {
    assert!(matches!(
        decode_with(V5, frame(0x30, "00 01 61 03 23 00 00")),
        Ok(Some(Packet::Publish(_)))
    ));
}

// ---------------------------------------------------------------------------------------------
// CONNECT

#[test]
fn unsupported_protocol_name_or_level() {
    for (name, level) in [
        ("MQTT", 3),
        ("MQTT", 6),
        ("MQIsdp", 4),
        ("MQTX", 4),
        ("mqtt", 5),
    ] {
        let connect = connect_body(name, level, 0x02, "00 01 61");
        assert_eq!(
            server_decode(frame(0x10, &connect)),
            Err(DecodeError::UnsupportedProtocol { level }),
            "{name} level {level}"
        );
    }
}

#[test]
fn reserved_connect_flag_is_malformed() {
    let connect = connect_body("MQTT", 4, 0x03, "00 01 61");
    assert_malformed(server_decode(frame(0x10, &connect)), "[MQTT-3.1.2-3]");
}

#[test]
fn will_qos_or_retain_without_will_flag_is_malformed() {
    let connect = connect_body("MQTT", 4, 0x0A, "00 01 61");
    assert_malformed(server_decode(frame(0x10, &connect)), "[MQTT-3.1.2-11]");
    let connect = connect_body("MQTT", 5, 0x22, "00 00 01 61");
    assert_malformed(server_decode(frame(0x10, &connect)), "[MQTT-3.1.2-13]");
}

#[test]
fn will_qos_3_is_malformed() {
    let connect = connect_body("MQTT", 4, 0x1E, "00 01 61 00 01 77 00 00");
    assert_malformed(server_decode(frame(0x10, &connect)), "[MQTT-3.1.2-12]");
}

#[test]
fn password_without_user_name_is_malformed_before_v5() {
    for (name, level) in [("MQTT", 4), ("MQIsdp", 3)] {
        let connect = connect_body(name, level, 0x42, "00 01 61 00 01 70");
        assert_malformed(server_decode(frame(0x10, &connect)), "[MQTT-3.1.2-22]");
    }
    let connect = connect_body("MQTT", 5, 0x42, "00 00 01 61 00 01 70");
    let Packet::Connect(connect) = server_decode(frame(0x10, &connect)).unwrap().unwrap() else {
        panic!("not CONNECT")
    };
    assert_eq!(
        (connect.username, connect.password),
        (None, Some(bytes("p")))
    );
}

#[test]
fn empty_client_id_is_left_to_the_broker() {
    let connect = connect_body("MQTT", 4, 0x00, "00 00");
    assert!(matches!(
        server_decode(frame(0x10, &connect)),
        Ok(Some(Packet::Connect(_)))
    ));
}

// ---------------------------------------------------------------------------------------------
// SUBSCRIBE and UNSUBSCRIBE

#[test]
fn subscribe_without_filters_is_a_protocol_error() {
    assert_protocol(decode_with(V311, frame(0x82, "00 01")), "[MQTT-3.8.3-3]");
    assert_protocol(decode_with(V5, frame(0x82, "00 01 00")), "[MQTT-3.8.3-3]");
}

#[test]
fn unsubscribe_without_filters_is_a_protocol_error() {
    assert_protocol(decode_with(V311, frame(0xA2, "00 01")), "[MQTT-3.10.3-2]");
    assert_protocol(decode_with(V5, frame(0xA2, "00 01 00")), "[MQTT-3.10.3-2]");
}

#[test]
fn v3_subscription_options_beyond_qos_are_malformed() {
    for options in ["04", "08", "10", "40", "80"] {
        assert_malformed(
            decode_with(V311, frame(0x82, &format!("00 01 00 01 61 {options}"))),
            "[MQTT-3-8.3-4]",
        );
    }
}

#[test]
fn v5_reserved_subscription_option_bits_are_malformed() {
    for options in ["40", "80"] {
        assert_malformed(
            decode_with(V5, frame(0x82, &format!("00 01 00 00 01 61 {options}"))),
            "[MQTT-3.8.3-5]",
        );
    }
}

#[test]
fn subscription_with_qos_3_is_malformed() {
    assert_malformed(decode_with(V311, frame(0x82, "00 01 00 01 61 03")), "QoS 3");
    assert_malformed(
        decode_with(V5, frame(0x82, "00 01 00 00 01 61 03")),
        "QoS 3",
    );
}

#[test]
fn retain_handling_3_is_a_protocol_error() {
    assert_protocol(
        decode_with(V5, frame(0x82, "00 01 00 00 01 61 30")),
        "retain handling",
    );
}

#[test]
fn filter_syntax_is_left_to_the_broker() {
    assert!(matches!(
        decode_with(V311, frame(0x82, "00 01 00 03 23 2F 61 00")),
        Ok(Some(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Truncation

/// One full-featured packet of every type that exists in `version`.
fn samples(version: ProtocolVersion) -> Vec<Packet> {
    let v5 = version.is_v5();
    let props = |p: Properties| if v5 { p } else { Properties::default() };
    let reason = |r: ReasonCode| if v5 { r } else { ReasonCode::SUCCESS };
    let user_set = || crate::codec::PropertySet {
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    let user = || Properties::from(user_set());
    let ack = Ack {
        packet_id: PacketId(9),
        reason: reason(ReasonCode::UNSPECIFIED_ERROR),
        properties: props(user()),
    };
    let mut all = vec![
        Packet::Connect(Box::new(Connect {
            protocol: version,
            clean_start: false,
            keep_alive: 30,
            client_id: "client".into(),
            will: Some(Will {
                topic: "will/t".into(),
                payload: bytes("gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: props(Properties::from(crate::codec::PropertySet {
                    will_delay_interval: Some(3),
                    ..Default::default()
                })),
            }),
            username: Some("user".into()),
            password: Some(bytes("pw")),
            properties: props(Properties::from(crate::codec::PropertySet {
                receive_maximum: Some(10),
                ..user_set()
            })),
        })),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: ReasonCode::SUCCESS,
            properties: props(Properties::from(crate::codec::PropertySet {
                maximum_qos: Some(1),
                ..user_set()
            })),
        }),
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "a/b".into(),
            packet_id: Some(PacketId(5)),
            properties: props(Properties::from(crate::codec::PropertySet {
                subscription_identifiers: vec![1, 300],
                ..user_set()
            })),
            payload: Bytes::from_static(b"payload"),
        }),
        Packet::PubAck(ack.clone()),
        Packet::PubRec(ack.clone()),
        // PUBREL and PUBCOMP carry only 0x00 or 0x92.
        Packet::PubRel(Ack {
            reason: reason(ReasonCode::PACKET_IDENTIFIER_NOT_FOUND),
            ..ack.clone()
        }),
        Packet::PubComp(Ack {
            reason: reason(ReasonCode::PACKET_IDENTIFIER_NOT_FOUND),
            ..ack
        }),
        Packet::Subscribe(Subscribe {
            packet_id: PacketId(3),
            properties: props(Properties::from(crate::codec::PropertySet {
                subscription_identifiers: vec![7],
                ..user_set()
            })),
            filters: vec![
                (
                    "a/+".into(),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                ),
                ("b/#".into(), SubscriptionOptions::default()),
            ],
        }),
        Packet::SubAck(SubAck {
            packet_id: PacketId(3),
            properties: props(user()),
            reasons: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::UNSPECIFIED_ERROR],
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId(4),
            properties: props(user()),
            filters: vec!["a/+".into(), "b".into()],
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: PacketId(4),
            properties: props(user()),
            reasons: if v5 {
                vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]
            } else {
                vec![]
            },
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect {
            reason: reason(ReasonCode::SERVER_BUSY),
            properties: props(user()),
        }),
    ];
    if v5 {
        all.push(Packet::Auth(Auth {
            reason: ReasonCode::CONTINUE_AUTHENTICATION,
            properties: Properties::from(crate::codec::PropertySet {
                authentication_method: Some("m".into()),
                ..user_set()
            }),
        }));
    }
    all
}

/// A prefix of a valid packet is "need more bytes", with the buffer untouched.
#[test]
fn every_prefix_of_every_packet_needs_more_bytes() {
    for version in [V31, V311, V5] {
        for packet in samples(version) {
            let wire = encoded(&packet, version);
            assert_eq!(decode_one(version, wire.clone()), packet);
            for cut in 0..wire.len() {
                let mut buf = BytesMut::from(&wire[..cut]);
                assert_eq!(
                    Codec::with_version(version, MAX).decode(&mut buf),
                    Ok(None),
                    "{packet:?} cut at {cut}"
                );
                assert_eq!(buf.len(), cut);
            }
        }
    }
}

/// A body cut short at every offset, with the remaining length rewritten to match, is an error
/// (or, where a shorter form is legal, a different packet), never a panic.
#[test]
fn every_truncated_body_is_rejected() {
    for version in [V31, V311, V5] {
        for packet in samples(version) {
            let wire = encoded(&packet, version);
            let header_len = 1 + crate::codec::encode::varint_len(wire.len() - 2);
            let body = &wire[header_len..];
            for cut in 0..body.len() {
                let mut buf = BytesMut::from(&wire[..1]);
                put_varint(&mut buf, cut);
                buf.extend_from_slice(&body[..cut]);
                match decode_with(version, buf) {
                    Err(DecodeError::Malformed(_) | DecodeError::Protocol(_)) => {}
                    Ok(Some(other)) => assert_ne!(other, packet, "cut at {cut} decoded unchanged"),
                    other => panic!("{packet:?} cut at {cut}: {other:?}"),
                }
            }
        }
    }
}

fn connect_packet(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// Decodes `packet` as the server would (CONNECT first, with no version yet).
fn decode_as_server(
    packet: &Packet,
    version: ProtocolVersion,
) -> Result<Option<Packet>, DecodeError> {
    let mut wire = encoded(packet, version);
    if matches!(packet, Packet::Connect(_)) {
        return Codec::new(MAX).decode(&mut wire);
    }
    Codec::with_version(version, MAX).decode(&mut wire)
}

/// [MQTT-4.7.3-1]: a zero-length topic filter makes a SUBSCRIBE or UNSUBSCRIBE malformed, on
/// every version (not a per-filter failure code).
#[test]
fn an_empty_topic_filter_is_malformed_in_subscribe_and_unsubscribe() {
    for version in [V31, V311, V5] {
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: PacketId(1),
            properties: Properties::default(),
            filters: vec![
                ("a".into(), SubscriptionOptions::default()),
                (String::new(), SubscriptionOptions::default()),
            ],
        });
        assert_malformed(decode_as_server(&subscribe, version), "[MQTT-4.7.3-1]");
        let unsubscribe = Packet::Unsubscribe(Unsubscribe {
            packet_id: PacketId(1),
            properties: Properties::default(),
            filters: vec!["a".into(), String::new()],
        });
        assert_malformed(decode_as_server(&unsubscribe, version), "[MQTT-4.7.3-1]");
    }
}

/// Control characters (U+0001–U+001F, U+007F–U+009F) in a client id, user name, will topic,
/// topic name, topic filter or unsubscribe filter are malformed on every version, as
/// Mosquitto treats them.
#[test]
fn control_characters_are_malformed_where_mosquitto_refuses_them() {
    for version in [V31, V311, V5] {
        for bad in ["a\u{1}b", "\u{1f}", "a\u{7f}", "x\u{85}", "\u{9f}"] {
            let mut connect = connect_packet(version, bad);
            assert_malformed(
                decode_as_server(&Packet::Connect(Box::new(connect.clone())), version),
                "client identifier",
            );
            connect.client_id = "ok".into();
            connect.username = Some(bad.into());
            assert_malformed(
                decode_as_server(&Packet::Connect(Box::new(connect.clone())), version),
                "user name",
            );
            connect.username = None;
            connect.will = Some(Will {
                topic: bad.into(),
                payload: Bytes::from_static(b"w"),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Properties::default(),
            });
            assert_malformed(
                decode_as_server(&Packet::Connect(Box::new(connect)), version),
                "will topic",
            );
            let publish = Packet::Publish(Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: bad.into(),
                packet_id: None,
                properties: Properties::default(),
                payload: Bytes::new(),
            });
            assert_malformed(decode_as_server(&publish, version), "topic name");
            let subscribe = Packet::Subscribe(Subscribe {
                packet_id: PacketId(1),
                properties: Properties::default(),
                filters: vec![(bad.into(), SubscriptionOptions::default())],
            });
            assert_malformed(decode_as_server(&subscribe, version), "topic filter");
            let unsubscribe = Packet::Unsubscribe(Unsubscribe {
                packet_id: PacketId(1),
                properties: Properties::default(),
                filters: vec![bad.into()],
            });
            assert_malformed(decode_as_server(&unsubscribe, version), "topic filter");
        }
        // Characters outside those ranges are fine.
        let fine = connect_packet(version, "car-é€😀\u{a0}");
        assert!(decode_as_server(&Packet::Connect(Box::new(fine)), version)
            .unwrap()
            .is_some());
    }
}

#[test]
fn an_empty_will_topic_is_malformed() {
    for version in [V31, V311, V5] {
        let mut connect = connect_packet(version, "c");
        connect.will = Some(Will {
            topic: String::new(),
            payload: Bytes::from_static(b"w"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        assert_malformed(
            decode_as_server(&Packet::Connect(Box::new(connect)), version),
            "[MQTT-4.7.3-1]",
        );
    }
}

/// An ack with a reason code its packet type does not define is malformed (MQTT 5 §3.4.2.1,
/// §3.5.2.1, §3.6.2.1, §3.7.2.1); every defined one decodes.
#[test]
fn an_ack_with_an_unknown_reason_code_is_malformed() {
    let puback = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
    let pubrel = [0x00, 0x92];
    type Wrap = fn(Ack) -> Packet;
    let wraps: [(Wrap, &[u8]); 4] = [
        (Packet::PubAck, &puback),
        (Packet::PubRec, &puback),
        (Packet::PubRel, &pubrel),
        (Packet::PubComp, &pubrel),
    ];
    for (wrap, allowed) in wraps {
        for code in 0..=255u8 {
            let packet = wrap(Ack::new(PacketId(1), ReasonCode(code)));
            let result = decode_as_server(&packet, V5);
            if allowed.contains(&code) {
                assert_eq!(result, Ok(Some(packet)));
            } else {
                assert_malformed(result, "reason code");
            }
        }
    }
}
