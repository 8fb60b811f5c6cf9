//! Decoding: bytes in, [`Packet`]s out, for MQTT 3.1, 3.1.1 and 5.0.
//!
//! [`Codec::decode`] is two-phase: the fixed header is parsed and the packet size checked
//! against the limit before the body is waited for, so a peer cannot make us buffer more than
//! the limit. "Need more bytes" is `Ok(None)` with the buffer untouched. Once a whole packet is
//! present its bytes are split off and frozen, so PUBLISH payloads are zero-copy slices of the
//! read buffer. Every violation becomes a [`DecodeError`] naming the reason code to answer
//! with; no input panics. This module does no I/O and keeps no state beyond the version and
//! the size limit; checks that need session state (topic aliases, client id rules, wildcards
//! in topic names) belong to the broker.

use bytes::{Buf, Bytes, BytesMut};

use super::model::{
    Ack, Auth, ConnAck, Connect, Disconnect, Packet, PacketId, ProtocolVersion, Publish, QoS,
    SubAck, Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, Will,
};
use super::properties::{read_properties, Context};
use super::reason::ReasonCode;

/// Why a packet could not be decoded; [`DecodeError::reason_code`] says what to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    TooLarge { size: usize, max: u32 },
    #[error("unsupported protocol name or level {level}")]
    UnsupportedProtocol { level: u8 },
    /// A well-formed packet past a limit of ours (more user properties than allowed): the
    /// spec's 0x97 "an implementation or administrative imposed limit has been exceeded".
    #[error("quota exceeded: {0}")]
    Quota(&'static str),
}

impl DecodeError {
    /// The MQTT 5 reason code for this error (CONNACK or DISCONNECT). For a v3 CONNACK,
    /// `UNSUPPORTED_PROTOCOL_VERSION` maps to return code 1.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            Self::Malformed(_) => ReasonCode::MALFORMED_PACKET,
            Self::Protocol(_) => ReasonCode::PROTOCOL_ERROR,
            Self::TooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            Self::UnsupportedProtocol { .. } => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            Self::Quota(_) => ReasonCode::QUOTA_EXCEEDED,
        }
    }
}

const TRUNCATED: DecodeError = DecodeError::Malformed("packet content ends early");
const NON_MINIMAL_VARINT: DecodeError =
    DecodeError::Malformed("[MQTT-1.5.5-1] variable byte integer not in its minimal form");
const LONG_VARINT: DecodeError =
    DecodeError::Malformed("variable byte integer longer than 4 bytes");
const PACKET_ID_ZERO: DecodeError =
    DecodeError::Protocol("[MQTT-2.2.1-3] packet identifier 0 where one is required");
const EMPTY_FILTER: DecodeError = DecodeError::Malformed("[MQTT-4.7.3-1] empty topic filter");

/// Control characters U+0001–U+001F and U+007F–U+009F in a client id, username, topic name or
/// topic filter: the specification says they SHOULD NOT appear and a receiver MAY treat them
/// as malformed [MQTT-1.5.4]; Mosquitto does, on every version, and so does Petrel.
fn no_control_chars(s: &str, err: DecodeError) -> Result<(), DecodeError> {
    if s.chars().any(|c| c.is_control()) {
        return Err(err);
    }
    Ok(())
}

/// The decoding half of one connection's codec.
#[derive(Debug, Clone)]
pub struct Codec {
    /// `None` until CONNECT is decoded on the server side.
    version: Option<ProtocolVersion>,
    max_packet_size: u32,
    /// The largest CONNECT (the first packet, before any version is known); at most
    /// `max_packet_size`.
    connect_limit: u32,
    /// User properties allowed in one packet (a CONNECT's and its will's together).
    max_user_properties: u32,
}

impl Codec {
    /// Server side, before CONNECT: only CONNECT may be decoded, and any other first packet
    /// type is a Protocol error as soon as its first byte arrives. The version of the decoded
    /// CONNECT is adopted for the rest of the connection.
    pub fn new(max_packet_size: u32) -> Self {
        Self {
            version: None,
            max_packet_size,
            connect_limit: u32::MAX,
            max_user_properties: u32::MAX,
        }
    }

    /// Client side (or after CONNECT): decode with a known version.
    pub fn with_version(version: ProtocolVersion, max_packet_size: u32) -> Self {
        Self {
            version: Some(version),
            max_packet_size,
            connect_limit: u32::MAX,
            max_user_properties: u32::MAX,
        }
    }

    pub fn version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    pub fn set_max_packet_size(&mut self, max: u32) {
        self.max_packet_size = max;
    }

    /// Server side: a CONNECT larger than `max` is refused (PACKET_TOO_LARGE) from its fixed
    /// header, so an unauthenticated peer cannot make the broker buffer a large packet; so is
    /// an AUTH packet (the enhanced authentication exchange runs before CONNACK).
    pub fn set_connect_limit(&mut self, max: u32) {
        self.connect_limit = max;
    }

    /// At most `max` User Properties in one packet, counted while decoding (a CONNECT's and
    /// its will's together), so that 10,000 tiny properties in one packet cost neither CPU
    /// nor memory beyond the limit: past it, [`DecodeError::Quota`] (0x97). Unlimited (only
    /// the packet size bounds them) until set.
    pub fn set_max_user_properties(&mut self, max: u32) {
        self.max_user_properties = max;
    }

    /// Decodes one packet from the front of `buf`, removing exactly its bytes. `Ok(None)`
    /// means more bytes are needed and `buf` is untouched. After an error the connection is
    /// unusable (the bytes consumed are unspecified).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let packet_type = first >> 4;
        let flags = first & 0x0F;
        let version = match self.version {
            Some(version) => Some(version),
            None if packet_type == 1 => None,
            None => {
                return Err(DecodeError::Protocol(
                    "[MQTT-3.1.0-1] first packet must be CONNECT",
                ))
            }
        };
        check_fixed_header(packet_type, flags, version)?;

        let Some((remaining, len_bytes)) = parse_varint(&buf[1..])? else {
            return Ok(None);
        };
        let header_len = 1 + len_bytes;
        let size = header_len + remaining as usize;
        let max = match version {
            Some(_) if packet_type != 15 => self.max_packet_size,
            _ => self.max_packet_size.min(self.connect_limit),
        };
        if size > max as usize {
            return Err(DecodeError::TooLarge { size, max });
        }
        if buf.len() < size {
            return Ok(None);
        }

        let mut frame = buf.split_to(size).freeze();
        frame.advance(header_len);
        let mut r = Reader::new(frame);
        r.user_properties_left = self.max_user_properties;
        let packet = match version {
            // Only CONNECT gets here without a version (checked above).
            None => Packet::Connect(Box::new(decode_connect(&mut r, flags)?)),
            Some(version) => decode_body(packet_type, flags, version, &mut r)?,
        };
        r.finish()?;
        if let (None, Packet::Connect(connect)) = (self.version, &packet) {
            self.version = Some(connect.protocol);
        }
        Ok(Some(packet))
    }
}

/// Checks the first byte alone, so that garbage is rejected before its body is awaited.
fn check_fixed_header(
    packet_type: u8,
    flags: u8,
    version: Option<ProtocolVersion>,
) -> Result<(), DecodeError> {
    // Without a version only CONNECT gets here, so "not v3" is the right default.
    let is_v3 = matches!(version, Some(ProtocolVersion::V31 | ProtocolVersion::V311));
    match packet_type {
        0 => return Err(DecodeError::Malformed("reserved packet type 0")),
        15 if is_v3 => {
            return Err(DecodeError::Malformed(
                "AUTH packet on an MQTT 3 connection",
            ))
        }
        _ => {}
    }
    let expected = match packet_type {
        // Checked once the protocol is known: MQTT 3.1 did not forbid these bits.
        1 => return Ok(()),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(DecodeError::Malformed("[MQTT-3.3.1-4] PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(DecodeError::Malformed(
                    "[MQTT-3.3.1-2] DUP set on a QoS 0 PUBLISH",
                ));
            }
            return Ok(());
        }
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != expected {
        return Err(DecodeError::Malformed(
            "[MQTT-2.1.3-1] reserved fixed header flags",
        ));
    }
    Ok(())
}

/// Parses a variable byte integer (§1.5.5) from the front of `bytes`: `Ok(None)` if it is not
/// complete yet, otherwise the value and the number of bytes it took.
pub(super) fn parse_varint(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &byte) in bytes.iter().enumerate().take(4) {
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            // A zero last byte after a continuation adds nothing: a shorter form existed.
            if i > 0 && byte == 0 {
                return Err(NON_MINIMAL_VARINT);
            }
            return Ok(Some((value, i + 1)));
        }
        if i == 3 {
            return Err(LONG_VARINT);
        }
    }
    Ok(None)
}

fn decode_body(
    packet_type: u8,
    flags: u8,
    version: ProtocolVersion,
    r: &mut Reader,
) -> Result<Packet, DecodeError> {
    let v5 = version.is_v5();
    Ok(match packet_type {
        1 => Packet::Connect(Box::new(decode_connect(r, flags)?)),
        2 => Packet::ConnAck(decode_connack(r, v5)?),
        3 => Packet::Publish(decode_publish(r, flags, v5)?),
        4 => Packet::PubAck(decode_ack(r, packet_type, v5)?),
        5 => Packet::PubRec(decode_ack(r, packet_type, v5)?),
        6 => Packet::PubRel(decode_ack(r, packet_type, v5)?),
        7 => Packet::PubComp(decode_ack(r, packet_type, v5)?),
        8 => Packet::Subscribe(decode_subscribe(r, v5)?),
        9 => Packet::SubAck(decode_suback(r, v5)?),
        10 => Packet::Unsubscribe(decode_unsubscribe(r, v5)?),
        11 => Packet::UnsubAck(decode_unsuback(r, v5)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect(decode_disconnect(r, v5)?),
        15 => {
            let (reason, properties) = decode_reason_tail(r, Context::AUTH)?;
            Packet::Auth(Auth { reason, properties })
        }
        // Type 0 and AUTH on v3 were rejected with the first byte; a u8 >> 4 is below 16.
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    })
}

/// `header_flags` are the fixed header's low bits. MQTT 3.1 (`MQIsdp`) is looser than 3.1.1
/// and 5.0: Mosquitto accepts a 3.1 CONNECT with flag bits in the fixed header or the reserved
/// connect flag set (old firmware sends them), and so does Petrel; the later versions stay
/// strict [MQTT-2.1.3-1], [MQTT-3.1.2-3].
fn decode_connect(r: &mut Reader, header_flags: u8) -> Result<Connect, DecodeError> {
    // Name and level come first so an unknown protocol is reported as such, not as malformed.
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQIsdp", 3) => ProtocolVersion::V31,
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        _ => return Err(DecodeError::UnsupportedProtocol { level }),
    };
    let v5 = protocol.is_v5();
    let strict = protocol != ProtocolVersion::V31;
    if strict && header_flags != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-2.1.3-1] reserved fixed header flags",
        ));
    }

    let flags = r.u8()?;
    if strict && flags & 0b0000_0001 != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.1.2-3] reserved connect flag set",
        ));
    }
    let clean_start = flags & 0b0000_0010 != 0;
    let will_flag = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    let password_flag = flags & 0b0100_0000 != 0;
    let username_flag = flags & 0b1000_0000 != 0;
    if !will_flag && will_qos != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.1.2-11] will QoS set without the will flag",
        ));
    }
    if !will_flag && will_retain {
        return Err(DecodeError::Malformed(
            "[MQTT-3.1.2-13] will retain set without the will flag",
        ));
    }
    let Some(will_qos) = QoS::from_u8(will_qos) else {
        return Err(DecodeError::Malformed("[MQTT-3.1.2-12] will QoS 3"));
    };
    if !v5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed(
            "[MQTT-3.1.2-22] password flag set without the user name flag",
        ));
    }

    let keep_alive = r.u16()?;
    let properties = if v5 {
        read_properties(r, Context::CONNECT)?
    } else {
        Default::default()
    };
    let client_id = r.string()?;
    no_control_chars(
        &client_id,
        DecodeError::Malformed("control character in the client identifier"),
    )?;
    let will = if will_flag {
        let properties = if v5 {
            read_properties(r, Context::WILL)?
        } else {
            Default::default()
        };
        let topic = r.string()?;
        if topic.is_empty() {
            return Err(DecodeError::Malformed("[MQTT-4.7.3-1] empty will topic"));
        }
        no_control_chars(
            &topic,
            DecodeError::Malformed("control character in the will topic"),
        )?;
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if username_flag {
        let username = r.string()?;
        no_control_chars(
            &username,
            DecodeError::Malformed("control character in the user name"),
        )?;
        Some(username)
    } else {
        None
    };
    let password = if password_flag {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(r: &mut Reader, v5: bool) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0b1111_1110 != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.2.2-1] reserved CONNACK flags set",
        ));
    }
    let byte = r.u8()?;
    let code = if v5 {
        ReasonCode(byte)
    } else {
        match byte {
            0 => ReasonCode::SUCCESS,
            1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            3 => ReasonCode::SERVER_UNAVAILABLE,
            4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            5 => ReasonCode::NOT_AUTHORIZED,
            _ => return Err(DecodeError::Malformed("unknown CONNACK return code")),
        }
    };
    let properties = if v5 {
        read_properties(r, Context::CONNACK)?
    } else {
        Default::default()
    };
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        code,
        properties,
    })
}

fn decode_publish(r: &mut Reader, flags: u8, v5: bool) -> Result<Publish, DecodeError> {
    // QoS 3 and DUP on QoS 0 were rejected with the fixed header.
    let qos = QoS::from_u8((flags >> 1) & 0b11).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    let topic = r.string()?;
    if !v5 && topic.is_empty() {
        return Err(DecodeError::Malformed("[MQTT-4.7.3-1] empty topic name"));
    }
    no_control_chars(
        &topic,
        DecodeError::Malformed("control character in the topic name"),
    )?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(r.packet_id()?)
    };
    let properties = if v5 {
        read_properties(r, Context::PUBLISH)?
    } else {
        Default::default()
    };
    Ok(Publish {
        dup: flags & 0b1000 != 0,
        qos,
        retain: flags & 1 != 0,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

/// PUBACK, PUBREC, PUBREL, PUBCOMP. In v5 the reason code and the properties may be omitted
/// (§3.4.2.1): remaining length 2 means Success, 3 means no properties.
fn decode_ack(r: &mut Reader, packet_type: u8, v5: bool) -> Result<Ack, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v5 {
        return Ok(Ack::new(packet_id, ReasonCode::SUCCESS));
    }
    let (reason, properties) = decode_reason_tail(r, Context::ACK)?;
    if !ack_reason_allowed(packet_type, reason) {
        return Err(DecodeError::Malformed(
            "reason code not allowed in this ack",
        ));
    }
    Ok(Ack {
        packet_id,
        reason,
        properties,
    })
}

/// The reason codes each ack may carry (MQTT 5 §3.4.2.1, §3.5.2.1, §3.6.2.1, §3.7.2.1); any
/// other makes the packet malformed.
fn ack_reason_allowed(packet_type: u8, reason: ReasonCode) -> bool {
    match packet_type {
        // PUBACK and PUBREC.
        4 | 5 => matches!(
            reason.0,
            0x00 | 0x10 | 0x80 | 0x83 | 0x87 | 0x90 | 0x91 | 0x97 | 0x99
        ),
        // PUBREL and PUBCOMP.
        _ => matches!(reason.0, 0x00 | 0x92),
    }
}

/// A SUBSCRIBE or UNSUBSCRIBE topic filter: at least one character [MQTT-4.7.3-1], no
/// control characters.
fn topic_filter(r: &mut Reader) -> Result<String, DecodeError> {
    let filter = r.string()?;
    if filter.is_empty() {
        return Err(EMPTY_FILTER);
    }
    no_control_chars(
        &filter,
        DecodeError::Malformed("control character in a topic filter"),
    )?;
    Ok(filter)
}

/// The optional "reason code, then optional properties" tail of v5 acks, DISCONNECT and AUTH.
fn decode_reason_tail(
    r: &mut Reader,
    ctx: Context,
) -> Result<(ReasonCode, super::model::Properties), DecodeError> {
    if r.is_empty() {
        return Ok((ReasonCode::SUCCESS, Default::default()));
    }
    let reason = ReasonCode(r.u8()?);
    if r.is_empty() {
        return Ok((reason, Default::default()));
    }
    Ok((reason, read_properties(r, ctx)?))
}

fn decode_subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        read_properties(r, Context::SUBSCRIBE)?
    } else {
        Default::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = topic_filter(r)?;
        let options = decode_subscription_options(r.u8()?, v5)?;
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "[MQTT-3.8.3-3] SUBSCRIBE without topic filters",
        ));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

fn decode_subscription_options(byte: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
    if !v5 && byte & 0b1111_1100 != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3-8.3-4] reserved subscription option bits set",
        ));
    }
    if byte & 0b1100_0000 != 0 {
        return Err(DecodeError::Malformed(
            "[MQTT-3.8.3-5] reserved subscription option bits set",
        ));
    }
    let qos = QoS::from_u8(byte & 0b11)
        .ok_or(DecodeError::Malformed("subscription with maximum QoS 3"))?;
    let retain_handling = (byte >> 4) & 0b11;
    if retain_handling == 3 {
        return Err(DecodeError::Protocol("subscription with retain handling 3"));
    }
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0b0100 != 0,
        retain_as_published: byte & 0b1000 != 0,
        retain_handling,
    })
}

fn decode_suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        read_properties(r, Context::SUBACK)?
    } else {
        Default::default()
    };
    let codes = r.rest();
    if codes.is_empty() {
        return Err(DecodeError::Protocol("SUBACK without return codes"));
    }
    // v3 return codes are 0, 1, 2 and 0x80, which already are the v5 values.
    if !v5 && codes.iter().any(|&c| !matches!(c, 0 | 1 | 2 | 0x80)) {
        return Err(DecodeError::Malformed("unknown SUBACK return code"));
    }
    let reasons = codes.iter().map(|&c| ReasonCode(c)).collect();
    Ok(SubAck {
        packet_id,
        properties,
        reasons,
    })
}

fn decode_unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = if v5 {
        read_properties(r, Context::UNSUBSCRIBE)?
    } else {
        Default::default()
    };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(topic_filter(r)?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol(
            "[MQTT-3.10.3-2] UNSUBSCRIBE without topic filters",
        ));
    }
    Ok(Unsubscribe {
        packet_id,
        properties,
        filters,
    })
}

fn decode_unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v5 {
        return Ok(UnsubAck {
            packet_id,
            properties: Default::default(),
            reasons: Vec::new(),
        });
    }
    let properties = read_properties(r, Context::UNSUBACK)?;
    let codes = r.rest();
    if codes.is_empty() {
        return Err(DecodeError::Protocol("UNSUBACK without reason codes"));
    }
    let reasons = codes.iter().map(|&c| ReasonCode(c)).collect();
    Ok(UnsubAck {
        packet_id,
        properties,
        reasons,
    })
}

fn decode_disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    if !v5 {
        // The v3 DISCONNECT has no variable header; trailing bytes are caught by `finish`.
        return Ok(Disconnect::new(ReasonCode::NORMAL_DISCONNECTION));
    }
    let (reason, properties) = decode_reason_tail(r, Context::DISCONNECT)?;
    Ok(Disconnect { reason, properties })
}

/// A bounds-checked cursor over one packet's body. Every read that would pass the end is
/// `Malformed`, never a panic.
pub(super) struct Reader {
    buf: Bytes,
    /// User Properties the rest of the packet may still carry.
    pub(super) user_properties_left: u32,
}

impl Reader {
    pub(super) fn new(buf: Bytes) -> Self {
        Self {
            buf,
            user_properties_left: u32::MAX,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u8())
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u16())
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(TRUNCATED);
        }
        Ok(self.buf.get_u32())
    }

    pub(super) fn varint(&mut self) -> Result<u32, DecodeError> {
        let (value, len) = parse_varint(&self.buf)?.ok_or(TRUNCATED)?;
        self.buf.advance(len);
        Ok(value)
    }

    fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        match self.u16()? {
            0 => Err(PACKET_ID_ZERO),
            id => Ok(PacketId(id)),
        }
    }

    /// Binary Data (§1.5.6): two-byte length, then the bytes, sliced without a copy.
    pub(super) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = usize::from(self.u16()?);
        if self.buf.len() < len {
            return Err(TRUNCATED);
        }
        Ok(self.buf.split_to(len))
    }

    /// UTF-8 Encoded String (§1.5.4).
    pub(super) fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.binary()?;
        // Rust's UTF-8 check also rejects the surrogates U+D800..U+DFFF, as MQTT requires.
        let s = std::str::from_utf8(&bytes)
            .map_err(|_| DecodeError::Malformed("[MQTT-1.5.4-1] invalid UTF-8 in a string"))?;
        if s.contains('\0') {
            return Err(DecodeError::Malformed(
                "[MQTT-1.5.4-2] U+0000 in a UTF-8 string",
            ));
        }
        Ok(s.to_owned())
    }

    /// Splits off the next `len` bytes as their own reader, or `None` if fewer remain.
    pub(super) fn take(&mut self, len: usize) -> Option<Reader> {
        (self.buf.len() >= len).then(|| Reader::new(self.buf.split_to(len)))
    }

    /// Everything that is left (the PUBLISH payload, SUBACK codes).
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    /// Bytes after a packet's defined content are malformed (e.g. PINGREQ with a body).
    fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed(
                "bytes after the end of the packet content",
            ))
        }
    }
}
