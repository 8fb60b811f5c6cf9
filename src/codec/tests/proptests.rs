//! Property-based tests: every packet round-trips in every version where it exists, arbitrary
//! and mutated bytes never panic, and every two-way split of a byte stream decodes the same.
//!
//! Generators produce only what the version can express (no properties or reason codes in
//! v3, v3 CONNACK and SUBACK codes from the v3 sets), with property sections restricted by
//! the same table the decoder uses.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option::weighted;
use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};

use crate::codec::properties::{restrict_to, Context};
use crate::codec::PacketId;
use crate::codec::{
    encode, encoded_len, Ack, Auth, Codec, ConnAck, Connect, DecodeError, Disconnect, Packet,
    Properties, ProtocolVersion, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will,
};

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V31,
    ProtocolVersion::V311,
    ProtocolVersion::V5,
];
const MAX: u32 = 1 << 20;

fn text() -> BoxedStrategy<String> {
    // Multi-byte characters exercise byte (not char) length prefixes.
    "[a-z/+#é€😀 ]{0,10}".boxed()
}

/// A topic filter as the decoder takes it: at least one character (its syntax is the core's).
fn filter_text() -> BoxedStrategy<String> {
    "[a-z/+#é€😀 ]{1,10}".boxed()
}

fn non_empty_text() -> BoxedStrategy<String> {
    "[a-z/é😀]{1,10}".boxed()
}

fn binary() -> BoxedStrategy<Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from).boxed()
}

fn opt<T: std::fmt::Debug>(s: impl Strategy<Value = T>) -> impl Strategy<Value = Option<T>> {
    weighted(0.25, s)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    (1..=u16::MAX).prop_map(PacketId)
}

fn reason() -> impl Strategy<Value = ReasonCode> {
    any::<u8>().prop_map(ReasonCode)
}

/// Arbitrary valid properties for `ctx` (v5), or none (v3).
fn properties(ctx: Context, v5: bool) -> BoxedStrategy<Properties> {
    if !v5 {
        return Just(Properties::default()).boxed();
    }
    let flag = || 0..=1u8;
    let a = (
        opt(flag()),
        opt(any::<u32>()),
        opt(text()),
        opt(text()),
        opt(binary()),
        vec(1..=268_435_455u32, 0..3),
        opt(any::<u32>()),
        opt(text()),
        opt(any::<u16>()),
    );
    let b = (
        opt(text()),
        opt(binary()),
        opt(flag()),
        opt(any::<u32>()),
        opt(flag()),
        opt(text()),
        opt(text()),
        opt(text()),
        opt(1..=u16::MAX),
    );
    let c = (
        opt(any::<u16>()),
        opt(any::<u16>()),
        opt(flag()),
        opt(flag()),
        vec((text(), text()), 0..3),
        opt(1..=u32::MAX),
        opt(flag()),
        opt(flag()),
        opt(flag()),
    );
    (a, b, c)
        .prop_map(move |(a, b, c)| {
            let mut p = Properties::from(crate::codec::PropertySet {
                payload_format_indicator: a.0,
                message_expiry_interval: a.1,
                content_type: a.2,
                response_topic: a.3,
                correlation_data: a.4,
                subscription_identifiers: a.5,
                session_expiry_interval: a.6,
                assigned_client_identifier: a.7,
                server_keep_alive: a.8,
                authentication_method: b.0,
                authentication_data: b.1,
                request_problem_information: b.2,
                will_delay_interval: b.3,
                request_response_information: b.4,
                response_information: b.5,
                server_reference: b.6,
                reason_string: b.7,
                receive_maximum: b.8,
                topic_alias_maximum: c.0,
                topic_alias: c.1,
                maximum_qos: c.2,
                retain_available: c.3,
                user_properties: c.4,
                maximum_packet_size: c.5,
                wildcard_subscription_available: c.6,
                subscription_identifier_available: c.7,
                shared_subscription_available: c.8,
            });
            restrict_to(&mut p, ctx);
            p
        })
        .boxed()
}

pub(crate) fn connect(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let will = (
        non_empty_text(),
        binary(),
        qos(),
        any::<bool>(),
        properties(Context::WILL, v5),
    )
        .prop_map(|(topic, payload, qos, retain, properties)| Will {
            topic,
            payload,
            qos,
            retain,
            properties,
        });
    (
        any::<bool>(),
        any::<u16>(),
        text(),
        opt(will),
        opt(text()),
        opt(binary()),
        properties(Context::CONNECT, v5),
    )
        .prop_map(
            move |(clean_start, keep_alive, client_id, will, username, password, properties)| {
                // [MQTT-3.1.2-22]: before v5 a password needs a user name.
                let password = if v5 || username.is_some() {
                    password
                } else {
                    None
                };
                Packet::Connect(Box::new(Connect {
                    protocol: version,
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                    properties,
                }))
            },
        )
        .boxed()
}

fn connack(v5: bool) -> BoxedStrategy<Packet> {
    let code = if v5 {
        reason().boxed()
    } else {
        prop::sample::select(vec![
            ReasonCode::SUCCESS,
            ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            ReasonCode::SERVER_UNAVAILABLE,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            ReasonCode::NOT_AUTHORIZED,
        ])
        .boxed()
    };
    (any::<bool>(), code, properties(Context::CONNACK, v5))
        .prop_map(|(session_present, code, properties)| {
            Packet::ConnAck(ConnAck {
                session_present,
                code,
                properties,
            })
        })
        .boxed()
}

fn publish(v5: bool) -> BoxedStrategy<Packet> {
    let topic = if v5 { text() } else { non_empty_text() };
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic,
        packet_id(),
        properties(Context::PUBLISH, v5),
    )
        .prop_flat_map(move |(qos, dup, retain, topic, id, properties)| {
            vec(any::<u8>(), 0..64).prop_map(move |payload| {
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic: topic.clone(),
                    packet_id: (!qos0).then_some(id),
                    properties: properties.clone(),
                    payload: Bytes::from(payload),
                })
            })
        })
        .boxed()
}

/// Reason codes a PUBACK or PUBREC may carry, and a PUBREL or PUBCOMP.
const PUBACK_REASONS: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_REASONS: &[u8] = &[0x00, 0x92];

fn ack(v5: bool, wrap: fn(Ack) -> Packet, reasons: &'static [u8]) -> BoxedStrategy<Packet> {
    let reason = if v5 {
        proptest::sample::select(reasons)
            .prop_map(ReasonCode)
            .boxed()
    } else {
        Just(ReasonCode::SUCCESS).boxed()
    };
    (packet_id(), reason, properties(Context::ACK, v5))
        .prop_map(move |(packet_id, reason, properties)| {
            wrap(Ack {
                packet_id,
                reason,
                properties,
            })
        })
        .boxed()
}

fn subscription_options(v5: bool) -> BoxedStrategy<SubscriptionOptions> {
    if !v5 {
        return qos()
            .prop_map(|qos| SubscriptionOptions {
                qos,
                ..Default::default()
            })
            .boxed();
    }
    (qos(), any::<bool>(), any::<bool>(), 0..=2u8)
        .prop_map(
            |(qos, no_local, retain_as_published, retain_handling)| SubscriptionOptions {
                qos,
                no_local,
                retain_as_published,
                retain_handling,
            },
        )
        .boxed()
}

fn subscribe(v5: bool) -> BoxedStrategy<Packet> {
    (
        packet_id(),
        properties(Context::SUBSCRIBE, v5),
        vec((filter_text(), subscription_options(v5)), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        })
        .boxed()
}

fn suback(v5: bool) -> BoxedStrategy<Packet> {
    let code = if v5 {
        reason().boxed()
    } else {
        prop::sample::select(vec![
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::GRANTED_QOS_2,
            ReasonCode::UNSPECIFIED_ERROR,
        ])
        .boxed()
    };
    (
        packet_id(),
        properties(Context::SUBACK, v5),
        vec(code, 1..4),
    )
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                reasons,
            })
        })
        .boxed()
}

fn unsubscribe(v5: bool) -> BoxedStrategy<Packet> {
    (
        packet_id(),
        properties(Context::UNSUBSCRIBE, v5),
        vec(filter_text(), 1..4),
    )
        .prop_map(|(packet_id, properties, filters)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        })
        .boxed()
}

fn unsuback(v5: bool) -> BoxedStrategy<Packet> {
    let reasons = if v5 {
        vec(reason(), 1..4).boxed()
    } else {
        Just(Vec::new()).boxed()
    };
    (packet_id(), properties(Context::UNSUBACK, v5), reasons)
        .prop_map(|(packet_id, properties, reasons)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                reasons,
            })
        })
        .boxed()
}

fn disconnect(v5: bool) -> BoxedStrategy<Packet> {
    if !v5 {
        return Just(Packet::Disconnect(Disconnect::new(
            ReasonCode::NORMAL_DISCONNECTION,
        )))
        .boxed();
    }
    (reason(), properties(Context::DISCONNECT, v5))
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }))
        .boxed()
}

fn auth() -> BoxedStrategy<Packet> {
    (reason(), properties(Context::AUTH, true))
        .prop_map(|(reason, properties)| Packet::Auth(Auth { reason, properties }))
        .boxed()
}

/// Every packet type that exists in `version`, with equal weight.
pub(crate) fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let mut all = vec![
        connect(version),
        connack(v5),
        publish(v5),
        ack(v5, Packet::PubAck, PUBACK_REASONS),
        ack(v5, Packet::PubRec, PUBACK_REASONS),
        ack(v5, Packet::PubRel, PUBREL_REASONS),
        ack(v5, Packet::PubComp, PUBREL_REASONS),
        subscribe(v5),
        suback(v5),
        unsubscribe(v5),
        unsuback(v5),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect(v5),
    ];
    if v5 {
        all.push(auth());
    }
    Union::new(all).boxed()
}

pub(crate) fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop::sample::select(VERSIONS.to_vec())
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode(packet, version, &mut out);
    out
}

/// Encodes, checks `encoded_len`, decodes, and compares.
fn round_trip(packet: &Packet, version: ProtocolVersion) -> Result<(), TestCaseError> {
    let mut buf = encoded(packet, version);
    prop_assert_eq!(buf.len(), encoded_len(packet, version));
    let mut codec = Codec::with_version(version, MAX);
    prop_assert_eq!(codec.decode(&mut buf), Ok(Some(packet.clone())));
    prop_assert!(buf.is_empty());
    Ok(())
}

/// Decodes everything `buf` holds, stopping at the first error or `Ok(None)`.
fn decode_all(codec: &mut Codec, buf: &mut BytesMut) -> Result<Vec<Packet>, DecodeError> {
    let mut packets = Vec::new();
    while let Some(packet) = codec.decode(buf)? {
        packets.push(packet);
    }
    Ok(packets)
}

/// Feeds `bytes` to `codec` until it stops, checking the decoder's contract on the way: a
/// decoded packet consumes bytes and re-encodes to something that decodes to itself.
fn feed_checked(mut codec: Codec, bytes: &[u8]) -> Result<(), TestCaseError> {
    let mut buf = BytesMut::from(bytes);
    loop {
        let before = buf.len();
        match codec.decode(&mut buf) {
            Ok(Some(packet)) => {
                prop_assert!(buf.len() < before);
                let version = codec.version().unwrap_or(ProtocolVersion::V5);
                let mut again = encoded(&packet, version);
                let mut fresh = Codec::with_version(version, u32::MAX);
                prop_assert_eq!(fresh.decode(&mut again), Ok(Some(packet)));
            }
            Ok(None) => {
                prop_assert_eq!(buf.len(), before);
                return Ok(());
            }
            Err(_) => return Ok(()),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_v31_packet_round_trips(packet in packet(ProtocolVersion::V31)) {
        round_trip(&packet, ProtocolVersion::V31)?;
    }

    #[test]
    fn every_v311_packet_round_trips(packet in packet(ProtocolVersion::V311)) {
        round_trip(&packet, ProtocolVersion::V311)?;
    }

    #[test]
    fn every_v5_packet_round_trips(packet in packet(ProtocolVersion::V5)) {
        round_trip(&packet, ProtocolVersion::V5)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..300),
        max in prop_oneof![2u32..64, Just(MAX)],
    ) {
        feed_checked(Codec::new(max), &bytes)?;
        for version in VERSIONS {
            feed_checked(Codec::with_version(version, max), &bytes)?;
        }
    }

    /// Random bytes rarely get past the fixed header; damaged valid packets reach deep into
    /// the body parsers.
    #[test]
    fn mutated_valid_packets_never_panic(
        (version, packet) in version().prop_flat_map(|v| (Just(v), packet(v))),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encoded(&packet, version).to_vec();
        for (index, value) in edits {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        feed_checked(Codec::with_version(version, MAX), &bytes)?;
        feed_checked(Codec::new(MAX), &bytes)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A server-side codec sees CONNECT, adopts its version, then decodes the rest; splitting
    /// the stream anywhere must not change what comes out.
    #[test]
    fn every_two_way_split_decodes_the_same_packets(
        (version, first, rest) in version()
            .prop_flat_map(|v| (Just(v), connect(v), vec(packet(v), 0..4)))
    ) {
        let mut packets = vec![first];
        packets.extend(rest);
        let mut stream = BytesMut::new();
        for packet in &packets {
            encode(packet, version, &mut stream);
        }
        for split in 0..=stream.len() {
            let mut codec = Codec::new(MAX);
            let mut buf = BytesMut::from(&stream[..split]);
            let mut decoded = decode_all(&mut codec, &mut buf).map_err(|e| {
                TestCaseError::fail(format!("split {split}: {e}"))
            })?;
            buf.extend_from_slice(&stream[split..]);
            decoded.extend(decode_all(&mut codec, &mut buf).map_err(|e| {
                TestCaseError::fail(format!("split {split}: {e}"))
            })?);
            prop_assert_eq!(&decoded, &packets, "split at {}", split);
            prop_assert!(buf.is_empty());
            prop_assert_eq!(codec.version(), Some(version));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(50_000))]

    /// The long fuzzing run of the two properties above:
    /// `cargo test --lib fuzz_long -- --ignored`.
    #[test]
    #[ignore = "long fuzzing run; cargo test --lib fuzz_long -- --ignored"]
    fn fuzz_long_damaged_packets_never_panic(
        (version, packet) in version().prop_flat_map(|v| (Just(v), packet(v))),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        noise in vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = encoded(&packet, version).to_vec();
        for (index, value) in edits {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        bytes.extend_from_slice(&noise);
        feed_checked(Codec::with_version(version, MAX), &bytes)?;
        feed_checked(Codec::new(MAX), &bytes)?;
        feed_checked(Codec::new(16), &bytes)?;
    }
}
