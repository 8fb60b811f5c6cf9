//! Encoding: [`Packet`]s out as bytes, for MQTT 3.1, 3.1.1 and 5.0.
//!
//! Encoding is infallible: callers pass valid packets (strings and binary data of at most
//! 65 535 bytes, remaining length at most 268 435 455). For v3 the encoder drops what the
//! version cannot express (properties) and maps reason codes to v3 return codes. v5 acks,
//! DISCONNECT and AUTH use their short forms whenever the content allows. [`encoded_len`]
//! mirrors [`encode`] exactly so that callers can check sizes without encoding; the two are
//! kept side by side per packet for that reason.

use bytes::{BufMut, BytesMut};

use super::model::{
    Ack, ConnAck, Connect, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, SubAck,
    Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe,
};
use super::properties::{properties_len, write_properties};
use super::reason::ReasonCode;

/// Appends the packet's wire form for `version`.
///
/// CONNECT is written with `version`'s protocol name and level (`Connect::protocol` is not
/// consulted). AUTH does not exist before MQTT 5: for v3 nothing is written (and
/// [`encoded_len`] is 0).
pub fn encode(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) {
    if !version.is_v5() && matches!(packet, Packet::Auth(_)) {
        return;
    }
    let remaining = body_len(packet, version);
    out.reserve(1 + varint_len(remaining) + remaining);
    out.put_u8(packet.packet_type() << 4 | header_flags(packet));
    put_varint(out, remaining);
    let start = out.len();
    put_body(packet, version, out);
    debug_assert_eq!(
        out.len() - start,
        remaining,
        "body_len disagrees with put_body"
    );
}

/// Exact number of bytes [`encode`] would append, fixed header included.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    if !version.is_v5() && matches!(packet, Packet::Auth(_)) {
        return 0;
    }
    let remaining = body_len(packet, version);
    1 + varint_len(remaining) + remaining
}

/// A PUBLISH without properties, borrowed from its parts: what the broker writes to each
/// subscriber straight from the shared message, with no `Publish` built per delivery. In v5
/// it carries an empty property list; the bytes are those of [`encode`] given the same
/// `Publish` with default properties.
#[derive(Debug, Clone, Copy)]
pub struct PublishRef<'a> {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    pub topic: &'a str,
    pub packet_id: Option<PacketId>,
    pub payload: &'a [u8],
}

impl PublishRef<'_> {
    fn remaining(&self, version: ProtocolVersion) -> usize {
        string_len(self.topic)
            + if self.packet_id.is_some() { 2 } else { 0 }
            + usize::from(version.is_v5())
            + self.payload.len()
    }

    /// Exact number of bytes [`PublishRef::encode`] appends.
    pub fn encoded_len(&self, version: ProtocolVersion) -> usize {
        let remaining = self.remaining(version);
        1 + varint_len(remaining) + remaining
    }

    /// Appends the PUBLISH; returns where in `out` its packet id is, if it has one (so a
    /// caller can write the packet first and fill in the id it gets afterwards).
    pub fn encode(&self, version: ProtocolVersion, out: &mut BytesMut) -> Option<usize> {
        let remaining = self.remaining(version);
        out.reserve(1 + varint_len(remaining) + remaining);
        out.put_u8(
            3 << 4 | u8::from(self.dup) << 3 | (self.qos as u8) << 1 | u8::from(self.retain),
        );
        put_varint(out, remaining);
        put_string(out, self.topic);
        let id_at = self.packet_id.map(|id| {
            out.put_u16(id.0);
            out.len() - 2
        });
        if version.is_v5() {
            out.put_u8(0);
        }
        out.put_slice(self.payload);
        id_at
    }
}

fn header_flags(packet: &Packet) -> u8 {
    match packet {
        Packet::Publish(p) => u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain),
        // §2.1.3: these three carry the fixed flags 0b0010.
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    }
}

fn body_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => connect_len(c, version),
        Packet::ConnAck(c) => 2 + if v5 { properties_len(&c.properties) } else { 0 },
        Packet::Publish(p) => publish_len(p, v5),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            ack_len(a, v5)
        }
        Packet::Subscribe(s) => subscribe_len(s, v5),
        Packet::SubAck(s) => suback_len(s, v5),
        Packet::Unsubscribe(u) => unsubscribe_len(u, v5),
        Packet::UnsubAck(u) => unsuback_len(u, v5),
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) if v5 => reason_tail_len(d.reason, &d.properties),
        Packet::Disconnect(_) => 0,
        Packet::Auth(a) => reason_tail_len(a.reason, &a.properties),
    }
}

fn put_body(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(c) => put_connect(c, version, out),
        Packet::ConnAck(c) => put_connack(c, v5, out),
        Packet::Publish(p) => put_publish(p, v5, out),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            put_ack(a, v5, out)
        }
        Packet::Subscribe(s) => put_subscribe(s, v5, out),
        Packet::SubAck(s) => put_suback(s, v5, out),
        Packet::Unsubscribe(u) => put_unsubscribe(u, v5, out),
        Packet::UnsubAck(u) => put_unsuback(u, v5, out),
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) if v5 => put_reason_tail(d.reason, &d.properties, out),
        Packet::Disconnect(_) => {}
        Packet::Auth(a) => put_reason_tail(a.reason, &a.properties, out),
    }
}

fn protocol_name(version: ProtocolVersion) -> &'static str {
    match version {
        ProtocolVersion::V31 => "MQIsdp",
        ProtocolVersion::V311 | ProtocolVersion::V5 => "MQTT",
    }
}

/// Properties are written only in v5.
fn v5_properties_len(props: &Properties, v5: bool) -> usize {
    if v5 {
        properties_len(props)
    } else {
        0
    }
}

fn put_v5_properties(props: &Properties, v5: bool, out: &mut BytesMut) {
    if v5 {
        write_properties(props, out);
    }
}

fn connect_len(c: &Connect, version: ProtocolVersion) -> usize {
    let v5 = version.is_v5();
    let mut len = string_len(protocol_name(version)) + 1 + 1 + 2;
    len += v5_properties_len(&c.properties, v5);
    len += string_len(&c.client_id);
    if let Some(will) = &c.will {
        len += v5_properties_len(&will.properties, v5);
        len += string_len(&will.topic) + 2 + will.payload.len();
    }
    len += c.username.as_deref().map_or(0, string_len);
    len += c.password.as_ref().map_or(0, |p| 2 + p.len());
    len
}

fn put_connect(c: &Connect, version: ProtocolVersion, out: &mut BytesMut) {
    let v5 = version.is_v5();
    put_string(out, protocol_name(version));
    out.put_u8(version.level());
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(will) = &c.will {
        flags |= 0b0000_0100 | (will.qos as u8) << 3 | u8::from(will.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    out.put_u8(flags);
    out.put_u16(c.keep_alive);
    put_v5_properties(&c.properties, v5, out);
    put_string(out, &c.client_id);
    if let Some(will) = &c.will {
        put_v5_properties(&will.properties, v5, out);
        put_string(out, &will.topic);
        put_binary(out, &will.payload);
    }
    if let Some(username) = &c.username {
        put_string(out, username);
    }
    if let Some(password) = &c.password {
        put_binary(out, password);
    }
}

fn put_connack(c: &ConnAck, v5: bool, out: &mut BytesMut) {
    out.put_u8(u8::from(c.session_present));
    out.put_u8(if v5 { c.code.0 } else { v3_return_code(c.code) });
    put_v5_properties(&c.properties, v5, out);
}

/// The v3 CONNACK return code for a v5 reason code (§3.2.2.3 of 3.1.1).
fn v3_return_code(code: ReasonCode) -> u8 {
    match code {
        ReasonCode::SUCCESS => 0,
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION => 1,
        ReasonCode::CLIENT_IDENTIFIER_NOT_VALID => 2,
        ReasonCode::BAD_USER_NAME_OR_PASSWORD => 4,
        ReasonCode::NOT_AUTHORIZED => 5,
        // v3 has no finer failure codes; "server unavailable" is the closest generic refusal.
        _ => 3,
    }
}

fn publish_len(p: &Publish, v5: bool) -> usize {
    string_len(&p.topic)
        + if p.packet_id.is_some() { 2 } else { 0 }
        + v5_properties_len(&p.properties, v5)
        + p.payload.len()
}

fn put_publish(p: &Publish, v5: bool, out: &mut BytesMut) {
    put_string(out, &p.topic);
    if let Some(id) = p.packet_id {
        out.put_u16(id.0);
    }
    put_v5_properties(&p.properties, v5, out);
    out.put_slice(&p.payload);
}

fn ack_len(a: &Ack, v5: bool) -> usize {
    2 + if v5 {
        reason_tail_len(a.reason, &a.properties)
    } else {
        0
    }
}

fn put_ack(a: &Ack, v5: bool, out: &mut BytesMut) {
    out.put_u16(a.packet_id.0);
    if v5 {
        put_reason_tail(a.reason, &a.properties, out);
    }
}

/// The v5 "reason code, then properties" tail in its shortest form (§3.4.2.1, §3.14.2.1,
/// §3.15.2.1): nothing for Success without properties, the code alone without properties.
fn reason_tail_len(reason: ReasonCode, props: &Properties) -> usize {
    if props.is_empty() {
        usize::from(reason != ReasonCode::SUCCESS)
    } else {
        1 + properties_len(props)
    }
}

fn put_reason_tail(reason: ReasonCode, props: &Properties, out: &mut BytesMut) {
    if props.is_empty() {
        if reason != ReasonCode::SUCCESS {
            out.put_u8(reason.0);
        }
    } else {
        out.put_u8(reason.0);
        write_properties(props, out);
    }
}

fn subscribe_len(s: &Subscribe, v5: bool) -> usize {
    2 + v5_properties_len(&s.properties, v5)
        + s.filters
            .iter()
            .map(|(filter, _)| string_len(filter) + 1)
            .sum::<usize>()
}

fn put_subscribe(s: &Subscribe, v5: bool, out: &mut BytesMut) {
    out.put_u16(s.packet_id.0);
    put_v5_properties(&s.properties, v5, out);
    for (filter, options) in &s.filters {
        put_string(out, filter);
        out.put_u8(options_byte(options, v5));
    }
}

/// §3.8.3.1: v3 has only the QoS bits.
fn options_byte(o: &SubscriptionOptions, v5: bool) -> u8 {
    let qos = o.qos as u8;
    if !v5 {
        return qos;
    }
    qos | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | o.retain_handling << 4
}

fn suback_len(s: &SubAck, v5: bool) -> usize {
    2 + v5_properties_len(&s.properties, v5) + s.reasons.len()
}

fn put_suback(s: &SubAck, v5: bool, out: &mut BytesMut) {
    out.put_u16(s.packet_id.0);
    put_v5_properties(&s.properties, v5, out);
    for reason in &s.reasons {
        // v3 has one failure return code, 0x80.
        out.put_u8(if !v5 && reason.is_failure() {
            0x80
        } else {
            reason.0
        });
    }
}

fn unsubscribe_len(u: &Unsubscribe, v5: bool) -> usize {
    2 + v5_properties_len(&u.properties, v5)
        + u.filters.iter().map(|f| string_len(f)).sum::<usize>()
}

fn put_unsubscribe(u: &Unsubscribe, v5: bool, out: &mut BytesMut) {
    out.put_u16(u.packet_id.0);
    put_v5_properties(&u.properties, v5, out);
    for filter in &u.filters {
        put_string(out, filter);
    }
}

/// The v3 UNSUBACK is the packet id alone.
fn unsuback_len(u: &UnsubAck, v5: bool) -> usize {
    2 + if v5 {
        properties_len(&u.properties) + u.reasons.len()
    } else {
        0
    }
}

fn put_unsuback(u: &UnsubAck, v5: bool, out: &mut BytesMut) {
    out.put_u16(u.packet_id.0);
    if v5 {
        write_properties(&u.properties, out);
        for reason in &u.reasons {
            out.put_u8(reason.0);
        }
    }
}

/// Bytes of a variable byte integer (§1.5.5).
pub(super) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends a variable byte integer (§1.5.5) in its minimal form.
pub(super) fn put_varint(out: &mut BytesMut, mut value: usize) {
    debug_assert!(value <= 268_435_455, "variable byte integer out of range");
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            return;
        }
    }
}

fn string_len(s: &str) -> usize {
    2 + s.len()
}

/// Appends a UTF-8 Encoded String (§1.5.4).
pub(super) fn put_string(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

/// Appends Binary Data (§1.5.6).
pub(super) fn put_binary(out: &mut BytesMut, bytes: &[u8]) {
    debug_assert!(
        bytes.len() <= usize::from(u16::MAX),
        "string or binary data too long"
    );
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}
