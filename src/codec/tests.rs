//! Codec tests: hex fixtures citing the spec, the encoder's short and v3 forms, and
//! the size guard. One test per malformed input is in `tests/malformed.rs`, the property-based
//! round trips in `tests/proptests.rs`.

mod malformed;
pub(crate) mod proptests;

use crate::codec::PacketId;
use bytes::{Bytes, BytesMut};

use super::decode::parse_varint;
use super::encode::put_varint;
use super::properties::PROPERTIES;
use super::{
    encode, encoded_len, Ack, Auth, Codec, ConnAck, Connect, DecodeError, Disconnect, Packet,
    Properties, ProtocolVersion, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Will,
};

use ProtocolVersion::{V31, V311, V5};

const MAX: u32 = 1 << 20;

fn hex(s: &str) -> BytesMut {
    let digits: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert_eq!(digits.len() % 2, 0, "odd hex length in {s:?}");
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
        .collect::<Vec<u8>>()
        .as_slice()
        .into()
}

/// A whole packet from its first byte and body, with the remaining length computed.
fn frame(first: u8, body: &str) -> BytesMut {
    let body = hex(body);
    let mut out = BytesMut::new();
    out.extend_from_slice(&[first]);
    put_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

fn decode_with(version: ProtocolVersion, mut buf: BytesMut) -> Result<Option<Packet>, DecodeError> {
    let result = Codec::with_version(version, MAX).decode(&mut buf);
    if let Ok(Some(_)) = result {
        assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    }
    result
}

fn decode_one(version: ProtocolVersion, buf: BytesMut) -> Packet {
    decode_with(version, buf).unwrap().unwrap()
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out);
    assert_eq!(out.len(), encoded_len(packet, version));
    out
}

fn assert_malformed(result: Result<Option<Packet>, DecodeError>, cites: &str) {
    match result {
        Err(DecodeError::Malformed(text)) => {
            assert!(text.contains(cites), "{text:?} lacks {cites:?}")
        }
        other => panic!("expected Malformed citing {cites:?}, got {other:?}"),
    }
}

fn assert_protocol(result: Result<Option<Packet>, DecodeError>, cites: &str) {
    match result {
        Err(DecodeError::Protocol(text)) => {
            assert!(text.contains(cites), "{text:?} lacks {cites:?}")
        }
        other => panic!("expected Protocol error citing {cites:?}, got {other:?}"),
    }
}

fn bytes(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// MQTT 3.1.1 §3.1.2.10, Figure 3.6: protocol name, level 4, flags 0xCE (user name, password,
/// will QoS 1, will flag, clean session), keep alive 10; then a payload in §3.1.3 order.
#[test]
fn v311_connect_fixture_from_figure_3_6() {
    let wire = hex("10 1D 00 04 4D 51 54 54 04 CE 00 0A
         00 03 61 62 63  00 01 77  00 03 62 79 65  00 01 75  00 01 70");
    let expected = Packet::Connect(Box::new(Connect {
        protocol: V311,
        clean_start: true,
        keep_alive: 10,
        client_id: "abc".into(),
        will: Some(Will {
            topic: "w".into(),
            payload: bytes("bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        }),
        username: Some("u".into()),
        password: Some(bytes("p")),
        properties: Properties::default(),
    }));
    let mut codec = Codec::new(MAX);
    let mut buf = wire.clone();
    assert_eq!(codec.decode(&mut buf), Ok(Some(expected.clone())));
    assert_eq!(
        codec.version(),
        Some(V311),
        "the server codec adopts the CONNECT's version"
    );
    assert_eq!(encoded(&expected, V311), wire);
}

/// MQTT 5.0 §3.1.2.11 example: level 5, flags 0xCE, keep alive 10, properties of length 5
/// holding Session Expiry Interval (0x11) = 10; the will carries Will Delay Interval = 5.
#[test]
fn v5_connect_fixture_with_properties_and_will_properties() {
    let wire = hex("10 29 00 04 4D 51 54 54 05 CE 00 0A 05 11 00 00 00 0A
         00 03 61 62 63  05 18 00 00 00 05  00 01 77  00 03 62 79 65  00 01 75  00 01 70");
    let expected = Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 10,
        client_id: "abc".into(),
        will: Some(Will {
            topic: "w".into(),
            payload: bytes("bye"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::from(crate::codec::PropertySet {
                will_delay_interval: Some(5),
                ..Default::default()
            }),
        }),
        username: Some("u".into()),
        password: Some(bytes("p")),
        properties: Properties::from(crate::codec::PropertySet {
            session_expiry_interval: Some(10),
            ..Default::default()
        }),
    }));
    let mut codec = Codec::new(MAX);
    let mut buf = wire.clone();
    assert_eq!(codec.decode(&mut buf), Ok(Some(expected.clone())));
    assert_eq!(codec.version(), Some(V5));
    assert_eq!(encoded(&expected, V5), wire);
}

/// MQTT 3.1: protocol name "MQIsdp", level 3.
#[test]
fn v31_connect_fixture_uses_mqisdp() {
    let wire = hex("10 10 00 06 4D 51 49 73 64 70 03 02 00 3C 00 02 63 31");
    let mut codec = Codec::new(MAX);
    let mut buf = wire.clone();
    let packet = codec.decode(&mut buf).unwrap().unwrap();
    let Packet::Connect(connect) = &packet else {
        panic!("not CONNECT: {packet:?}")
    };
    assert_eq!(
        (
            connect.protocol,
            connect.keep_alive,
            connect.client_id.as_str()
        ),
        (V31, 60, "c1")
    );
    assert!(connect.clean_start);
    assert_eq!(codec.version(), Some(V31));
    assert_eq!(encoded(&packet, V31), wire);
}

/// MQTT 5.0 §3.4.2.1: remaining length 2 means Success without properties, 3 means a reason
/// code without properties; a zero property length decodes the same. The encoder writes the
/// shortest form.
#[test]
fn v5_puback_short_forms() {
    let success = Packet::PubAck(Ack::new(PacketId(1), ReasonCode::SUCCESS));
    assert_eq!(decode_one(V5, hex("40 02 00 01")), success);
    assert_eq!(decode_one(V5, hex("40 04 00 01 00 00")), success);
    assert_eq!(encoded(&success, V5), hex("40 02 00 01"));

    let no_match = Packet::PubAck(Ack::new(PacketId(1), ReasonCode::NO_MATCHING_SUBSCRIBERS));
    assert_eq!(decode_one(V5, hex("40 03 00 01 10")), no_match);
    assert_eq!(decode_one(V5, hex("40 04 00 01 10 00")), no_match);
    assert_eq!(encoded(&no_match, V5), hex("40 03 00 01 10"));

    // Reason String (0x1F) forces the full form even with a Success code.
    let with_reason = Packet::PubRec(Ack {
        packet_id: PacketId(1),
        reason: ReasonCode::SUCCESS,
        properties: Properties::from(crate::codec::PropertySet {
            reason_string: Some("bad".into()),
            ..Default::default()
        }),
    });
    let wire = hex("50 0A 00 01 00 06 1F 00 03 62 61 64");
    assert_eq!(decode_one(V5, wire.clone()), with_reason);
    assert_eq!(encoded(&with_reason, V5), wire);
}

#[test]
fn v3_acks_are_the_packet_id_alone() {
    let ack = Ack::new(PacketId(0x1234), ReasonCode::SUCCESS);
    for (packet, wire) in [
        (Packet::PubAck(ack.clone()), "40 02 12 34"),
        (Packet::PubRec(ack.clone()), "50 02 12 34"),
        (Packet::PubRel(ack.clone()), "62 02 12 34"),
        (Packet::PubComp(ack.clone()), "70 02 12 34"),
        (
            Packet::UnsubAck(UnsubAck {
                packet_id: PacketId(0x1234),
                properties: Properties::default(),
                reasons: vec![],
            }),
            "B0 02 12 34",
        ),
    ] {
        assert_eq!(encoded(&packet, V311), hex(wire));
        assert_eq!(decode_one(V311, hex(wire)), packet);
    }
}

/// MQTT 5.0 §3.14.2.1 and §3.15.2.1: DISCONNECT and AUTH short forms.
#[test]
fn v5_disconnect_and_auth_short_forms() {
    let normal = Packet::Disconnect(Disconnect::new(ReasonCode::NORMAL_DISCONNECTION));
    assert_eq!(encoded(&normal, V5), hex("E0 00"));
    assert_eq!(decode_one(V5, hex("E0 00")), normal);
    let taken_over = Packet::Disconnect(Disconnect::new(ReasonCode::SESSION_TAKEN_OVER));
    assert_eq!(encoded(&taken_over, V5), hex("E0 01 8E"));
    assert_eq!(decode_one(V5, hex("E0 01 8E")), taken_over);
    let auth = Packet::Auth(Auth {
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    });
    assert_eq!(encoded(&auth, V5), hex("F0 00"));
    assert_eq!(decode_one(V5, hex("F0 00")), auth);
    let cont = Packet::Auth(Auth {
        reason: ReasonCode::CONTINUE_AUTHENTICATION,
        properties: Properties::from(crate::codec::PropertySet {
            authentication_method: Some("x".into()),
            ..Default::default()
        }),
    });
    assert_eq!(encoded(&cont, V5), hex("F0 06 18 04 15 00 01 78"));
    assert_eq!(decode_one(V5, hex("F0 06 18 04 15 00 01 78")), cont);
}

#[test]
fn auth_has_no_v3_form() {
    let auth = Packet::Auth(Auth {
        reason: ReasonCode::SUCCESS,
        properties: Properties::default(),
    });
    assert_eq!(encoded_len(&auth, V311), 0);
    assert!(encoded(&auth, V311).is_empty());
}

#[test]
fn pings_and_v3_disconnect_are_two_bytes() {
    for version in [V31, V311, V5] {
        assert_eq!(encoded(&Packet::PingReq, version), hex("C0 00"));
        assert_eq!(encoded(&Packet::PingResp, version), hex("D0 00"));
        assert_eq!(decode_one(version, hex("C0 00")), Packet::PingReq);
        assert_eq!(decode_one(version, hex("D0 00")), Packet::PingResp);
    }
    let disconnect = Packet::Disconnect(Disconnect::new(ReasonCode::NORMAL_DISCONNECTION));
    assert_eq!(encoded(&disconnect, V311), hex("E0 00"));
    // A v5 reason cannot be expressed in v3: the packet is still the bare DISCONNECT.
    let shutdown = Packet::Disconnect(Disconnect::new(ReasonCode::SERVER_SHUTTING_DOWN));
    assert_eq!(encoded(&shutdown, V311), hex("E0 00"));
}

/// MQTT 5.0 §1.5.5 table 1-1 and 3.1.1 §2.2.3 Table 2.4: the boundaries of each length.
#[test]
fn remaining_length_examples_of_section_1_5_5() {
    for (value, wire) in [
        (0, "00"),
        (127, "7F"),
        (128, "80 01"),
        (16_383, "FF 7F"),
        (16_384, "80 80 01"),
        (2_097_151, "FF FF 7F"),
        (2_097_152, "80 80 80 01"),
        (268_435_455, "FF FF FF 7F"),
    ] {
        let mut out = BytesMut::new();
        put_varint(&mut out, value);
        assert_eq!(out, hex(wire), "encoding {value}");
        assert_eq!(super::encode::varint_len(value), out.len());
        assert_eq!(
            parse_varint(&out),
            Ok(Some((value as u32, out.len()))),
            "decoding {value}"
        );
        // Every strict prefix is incomplete, not an error.
        for cut in 0..out.len() {
            assert_eq!(parse_varint(&out[..cut]), Ok(None));
        }
    }
}

#[test]
fn remaining_length_boundaries_through_the_codec() {
    for payload_len in [0usize, 125, 126, 16_381, 16_382] {
        // Topic "a" (3 bytes) plus payload: remaining lengths 3, 128, 129, 16 384, 16 385.
        let packet = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "a".into(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from(vec![7; payload_len]),
        });
        assert_eq!(decode_one(V311, encoded(&packet, V311)), packet);
    }
}

#[test]
fn v3_connack_return_codes_map_both_ways() {
    for (code, byte) in [
        (ReasonCode::SUCCESS, 0),
        (ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, 1),
        (ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 2),
        (ReasonCode::SERVER_UNAVAILABLE, 3),
        (ReasonCode::BAD_USER_NAME_OR_PASSWORD, 4),
        (ReasonCode::NOT_AUTHORIZED, 5),
    ] {
        let packet = Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        });
        let wire = frame(0x20, &format!("00 {byte:02X}"));
        assert_eq!(encoded(&packet, V311), wire);
        assert_eq!(decode_one(V311, wire), packet);
    }
    for other in [
        ReasonCode::SERVER_BUSY,
        ReasonCode::BANNED,
        ReasonCode::UNSPECIFIED_ERROR,
    ] {
        let packet = Packet::ConnAck(ConnAck {
            session_present: false,
            code: other,
            properties: Properties::default(),
        });
        assert_eq!(
            encoded(&packet, V311),
            hex("20 02 00 03"),
            "{other:?} becomes server unavailable"
        );
    }
    let present = Packet::ConnAck(ConnAck {
        session_present: true,
        code: ReasonCode::SUCCESS,
        properties: Properties::default(),
    });
    assert_eq!(encoded(&present, V311), hex("20 02 01 00"));
    assert_malformed(decode_with(V311, hex("20 02 00 06")), "return code");
}

#[test]
fn connack_reserved_flags_are_malformed() {
    assert_malformed(decode_with(V311, hex("20 02 02 00")), "CONNACK flags");
    assert_malformed(decode_with(V5, hex("20 03 80 00 00")), "CONNACK flags");
}

#[test]
fn v3_suback_writes_every_failure_as_0x80() {
    let packet = Packet::SubAck(SubAck {
        packet_id: PacketId(7),
        properties: Properties::default(),
        reasons: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::TOPIC_FILTER_INVALID],
    });
    assert_eq!(encoded(&packet, V311), hex("90 04 00 07 01 80"));
    let decoded = decode_one(V311, hex("90 04 00 07 01 80"));
    let Packet::SubAck(suback) = decoded else {
        panic!("not SUBACK")
    };
    assert_eq!(
        suback.reasons,
        vec![ReasonCode::GRANTED_QOS_1, ReasonCode::UNSPECIFIED_ERROR]
    );
    assert_malformed(decode_with(V311, hex("90 03 00 07 03")), "return code");
}

/// MQTT 5.0 §3.8.3.1: QoS bits 0-1, No Local bit 2, Retain As Published bit 3, Retain
/// Handling bits 4-5.
#[test]
fn v5_subscription_options_byte() {
    let wire = hex("82 09 00 0A 00 00 03 61 2F 62 2D");
    let expected = Packet::Subscribe(Subscribe {
        packet_id: PacketId(10),
        properties: Properties::default(),
        filters: vec![(
            "a/b".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
        )],
    });
    assert_eq!(decode_one(V5, wire.clone()), expected);
    assert_eq!(encoded(&expected, V5), wire);
    // v3 writes the QoS bits only.
    assert_eq!(
        encoded(&expected, V311),
        hex("82 08 00 0A 00 03 61 2F 62 01")
    );
}

#[test]
fn publish_payload_is_a_slice_of_the_read_buffer() {
    let mut buf = hex("30 08 00 01 61 70 61 79 6C 64");
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let packet = Codec::with_version(V311, MAX)
        .decode(&mut buf)
        .unwrap()
        .unwrap();
    let Packet::Publish(publish) = packet else {
        panic!("not PUBLISH")
    };
    assert_eq!(publish.payload, bytes("payld"));
    assert!(
        range.contains(&(publish.payload.as_ptr() as usize)),
        "payload was copied"
    );
}

#[test]
fn packets_are_decoded_one_at_a_time() {
    let mut buf = hex("C0 00 D0 00 C0");
    let mut codec = Codec::with_version(V311, MAX);
    assert_eq!(codec.decode(&mut buf), Ok(Some(Packet::PingReq)));
    assert_eq!(codec.decode(&mut buf), Ok(Some(Packet::PingResp)));
    assert_eq!(codec.decode(&mut buf), Ok(None));
    assert_eq!(buf, hex("C0"), "an incomplete packet stays in the buffer");
}

#[test]
fn decode_error_reason_codes() {
    assert_eq!(
        DecodeError::Malformed("x").reason_code(),
        ReasonCode::MALFORMED_PACKET
    );
    assert_eq!(
        DecodeError::Protocol("x").reason_code(),
        ReasonCode::PROTOCOL_ERROR
    );
    assert_eq!(
        DecodeError::TooLarge { size: 2, max: 1 }.reason_code(),
        ReasonCode::PACKET_TOO_LARGE
    );
    assert_eq!(
        DecodeError::UnsupportedProtocol { level: 6 }.reason_code(),
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
    );
}

/// The table must list the 27 identifiers of MQTT 5.0 §2.2.2.2, once each, in spec order.
#[test]
fn property_table_matches_the_spec_identifiers() {
    let ids: Vec<u8> = PROPERTIES.iter().map(|p| p.id.0).collect();
    assert_eq!(
        ids,
        [
            0x01, 0x02, 0x03, 0x08, 0x09, 0x0B, 0x11, 0x12, 0x13, 0x15, 0x16, 0x17, 0x18, 0x19,
            0x1A, 0x1C, 0x1F, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28, 0x29, 0x2A
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// The size guard

#[test]
fn size_guard_rejects_a_200_mb_header_before_the_body() {
    let mut buf = BytesMut::from(&[0x30][..]);
    put_varint(&mut buf, 200 * 1024 * 1024);
    assert_eq!(buf.len(), 5, "only the fixed header is present");
    let result = Codec::with_version(V311, 1024 * 1024).decode(&mut buf);
    assert_eq!(
        result,
        Err(DecodeError::TooLarge {
            size: 5 + 200 * 1024 * 1024,
            max: 1024 * 1024
        })
    );
}

#[test]
fn size_guard_applies_to_the_first_connect() {
    let mut buf = BytesMut::from(&[0x10][..]);
    put_varint(&mut buf, 100_000);
    assert!(matches!(
        Codec::new(1024).decode(&mut buf),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn connect_limit_applies_to_connect_and_auth_only() {
    let mut header = BytesMut::from(&[0x10][..]);
    put_varint(&mut header, 5000);
    let mut codec = Codec::new(1024 * 1024);
    codec.set_connect_limit(4096);
    assert_eq!(
        codec.decode(&mut header),
        Err(DecodeError::TooLarge {
            size: 5003,
            max: 4096
        })
    );
    // After CONNECT, the packet size limit is the only one.
    let mut codec = Codec::new(1024 * 1024);
    codec.set_connect_limit(64);
    let connect = Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 60,
        client_id: "c".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }));
    let mut buf = encoded(&connect, V5);
    let publish = frame(0x30, &format!("0001 74 00 {}", "00".repeat(5000)));
    buf.extend_from_slice(&publish);
    assert!(matches!(
        codec.decode(&mut buf),
        Ok(Some(Packet::Connect(_)))
    ));
    assert!(matches!(
        codec.decode(&mut buf),
        Ok(Some(Packet::Publish(_)))
    ));
    // AUTH packets stay under the CONNECT limit: the exchange is unauthenticated input.
    let mut auth = BytesMut::from(&[0xF0][..]);
    put_varint(&mut auth, 100);
    assert_eq!(
        codec.decode(&mut auth),
        Err(DecodeError::TooLarge { size: 102, max: 64 })
    );
}

#[test]
fn size_guard_counts_the_fixed_header() {
    // PINGREQ is 2 bytes: a limit of 2 admits it, a limit of 1 does not.
    assert_eq!(
        Codec::with_version(V5, 2).decode(&mut hex("C0 00")),
        Ok(Some(Packet::PingReq))
    );
    assert_eq!(
        Codec::with_version(V5, 1).decode(&mut hex("C0 00")),
        Err(DecodeError::TooLarge { size: 2, max: 1 })
    );
    let mut codec = Codec::with_version(V5, 1);
    codec.set_max_packet_size(2);
    assert_eq!(codec.decode(&mut hex("C0 00")), Ok(Some(Packet::PingReq)));
}

#[test]
fn a_borrowed_publish_encodes_like_the_packet_with_no_properties() {
    let payloads = [
        Bytes::new(),
        Bytes::from_static(b"hello"),
        Bytes::from(vec![9u8; 300]),
    ];
    for version in [V31, V311, V5] {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for (dup, retain) in [(false, false), (true, true)] {
                // [MQTT-3.3.1-2]: no DUP at QoS 0.
                let dup = dup && qos != QoS::AtMostOnce;
                for payload in &payloads {
                    let packet_id = (qos != QoS::AtMostOnce).then_some(PacketId(0xBEEF));
                    let owned = Packet::Publish(Publish {
                        dup,
                        qos,
                        retain,
                        topic: "a/b/c".into(),
                        packet_id,
                        properties: Properties::default(),
                        payload: payload.clone(),
                    });
                    let borrowed = super::PublishRef {
                        dup,
                        qos,
                        retain,
                        topic: "a/b/c",
                        packet_id,
                        payload,
                    };
                    let (mut a, mut b) = (BytesMut::new(), BytesMut::new());
                    encode(&owned, version, &mut a);
                    borrowed.encode(version, &mut b);
                    assert_eq!(a, b, "{version:?} {qos:?} dup={dup} len={}", payload.len());
                    assert_eq!(borrowed.encoded_len(version), b.len());
                    let decoded = Codec::with_version(version, MAX).decode(&mut b).unwrap();
                    assert_eq!(decoded, Some(owned));
                }
            }
        }
    }
}

#[test]
fn properties_are_allocated_only_when_set_and_compare_by_content() {
    use super::PropertySet;
    let none = Properties::default();
    assert!(none.is_empty());
    assert_eq!(none.topic_alias, None, "reads see an empty set");
    assert_eq!(Properties::from(PropertySet::default()), none);
    let mut some = Properties::default();
    assert!(some.get_mut().is_none(), "looking does not allocate");
    some.topic_alias = Some(3);
    assert!(!some.is_empty());
    assert_ne!(some, none);
    some.topic_alias = None;
    assert!(some.is_empty());
    assert_eq!(some, none, "an emptied set equals no set");
}

// ---------------------------------------------------------------------------------------------
// User property limit (bad-input.md #16)

fn with_user_properties(n: usize) -> Properties {
    Properties::from(crate::codec::PropertySet {
        user_properties: (0..n).map(|i| (i.to_string(), String::new())).collect(),
        ..Default::default()
    })
}

fn v5_connect(connect_props: usize, will_props: usize) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: true,
        keep_alive: 10,
        client_id: "c".into(),
        will: Some(Will {
            topic: "w".into(),
            payload: bytes("bye"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: with_user_properties(will_props),
        }),
        username: None,
        password: None,
        properties: with_user_properties(connect_props),
    }))
}

#[test]
fn user_properties_past_the_limit_are_a_quota_error() {
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties: with_user_properties(10_000),
        payload: Bytes::new(),
    });
    let wire = encoded(&publish, V5);
    let mut codec = Codec::with_version(V5, MAX);
    codec.set_max_user_properties(128);
    let err = codec.decode(&mut wire.clone()).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::QUOTA_EXCEEDED);
    assert!(
        err.to_string().contains("mqtt.max_user_properties"),
        "{err}"
    );
    // Without a limit, only the packet size bounds them.
    assert_eq!(decode_one(V5, wire), publish);
}

#[test]
fn user_properties_at_the_limit_decode() {
    let mut codec = Codec::new(MAX);
    codec.set_max_user_properties(4);
    let connect = v5_connect(2, 2);
    assert_eq!(
        codec.decode(&mut encoded(&connect, V5)),
        Ok(Some(connect.clone()))
    );
}

/// CONNECT's own properties and its will's are counted together: the will is held for the
/// whole connection.
#[test]
fn user_properties_of_connect_and_will_count_together() {
    let mut codec = Codec::new(MAX);
    codec.set_max_user_properties(4);
    let err = codec
        .decode(&mut encoded(&v5_connect(2, 3), V5))
        .unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::QUOTA_EXCEEDED);
}
