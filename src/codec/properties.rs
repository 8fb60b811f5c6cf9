//! MQTT 5 properties (§2.2.2): the one table of property identifiers, their data types, the
//! packets each may appear in and the value checks the spec makes, plus reading and writing a
//! property section from that table.
//!
//! Everything here is generated from the single `property_table!` invocation below, so the
//! allowed-per-packet check, the reader, the writer and the length computation cannot drift
//! apart. This module knows nothing about packets beyond their [`Context`].

use bytes::{BufMut, BytesMut};

use super::decode::{DecodeError, Reader};
use super::encode::{put_binary, put_string, put_varint, varint_len};
use super::model::{Properties, PropertySet};

/// Where a property section sits. Will properties (inside the CONNECT payload) are their own
/// context; PUBACK, PUBREC, PUBREL and PUBCOMP allow the same properties and share `ACK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Context(u16);

impl Context {
    pub(super) const CONNECT: Self = Self(1 << 0);
    pub(super) const CONNACK: Self = Self(1 << 1);
    pub(super) const PUBLISH: Self = Self(1 << 2);
    pub(super) const WILL: Self = Self(1 << 3);
    pub(super) const ACK: Self = Self(1 << 4);
    pub(super) const SUBSCRIBE: Self = Self(1 << 5);
    pub(super) const SUBACK: Self = Self(1 << 6);
    pub(super) const UNSUBSCRIBE: Self = Self(1 << 7);
    pub(super) const UNSUBACK: Self = Self(1 << 8);
    pub(super) const DISCONNECT: Self = Self(1 << 9);
    pub(super) const AUTH: Self = Self(1 << 10);
    /// User Property may appear everywhere.
    const ALL: Self = Self((1 << 11) - 1);

    fn contains(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
}

/// Value checks whose failure the spec calls a Protocol Error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Any,
    /// Only 0 or 1 (flags such as Retain Available, and Maximum QoS).
    ZeroOrOne,
    /// 0 is a Protocol Error (Receive Maximum, Maximum Packet Size, Subscription Identifier).
    NonZero,
}

impl Check {
    fn accepts(self, value: u32) -> bool {
        match self {
            Self::Any => true,
            Self::ZeroOrOne => value <= 1,
            Self::NonZero => value != 0,
        }
    }
}

/// A property identifier. Unknown values are representable (and rejected by the reader).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PropertyId(pub u8);

/// One row of the property table.
#[derive(Debug)]
pub(super) struct PropertySpec {
    pub(super) id: PropertyId,
    pub(super) name: &'static str,
    allowed: Context,
    /// Contexts in which the property may appear more than once.
    repeatable: Context,
    check: Check,
    not_allowed: &'static str,
    duplicate: &'static str,
    invalid: &'static str,
}

impl PropertySpec {
    pub(super) fn allowed_in(&self, ctx: Context) -> bool {
        self.allowed.contains(ctx)
    }
}

impl std::fmt::Debug for PropertyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match lookup(u32::from(self.0)) {
            Some(spec) => write!(f, "0x{:02X} ({})", self.0, spec.name),
            None => write!(f, "0x{:02X}", self.0),
        }
    }
}

/// Looks a property identifier up in the table.
pub(super) fn lookup(id: u32) -> Option<&'static PropertySpec> {
    PROPERTIES.iter().find(|spec| u32::from(spec.id.0) == id)
}

/// Reads a property section (length, then properties) for `ctx`.
pub(super) fn read_properties(r: &mut Reader, ctx: Context) -> Result<Properties, DecodeError> {
    let len = r.varint()? as usize;
    let mut section = r.take(len).ok_or(DecodeError::Malformed(
        "property length runs past the end of the packet",
    ))?;
    if section.is_empty() {
        return Ok(Properties::default());
    }
    let mut props = PropertySet::default();
    while !section.is_empty() {
        let id = section.varint()?;
        let spec = lookup(id).ok_or(DecodeError::Malformed("unknown property identifier"))?;
        if !spec.allowed_in(ctx) {
            return Err(DecodeError::Malformed(spec.not_allowed));
        }
        if spec.id == PropertyId::USER_PROPERTY {
            // Counted before the pair is read, so the limit bounds the work too.
            r.user_properties_left =
                r.user_properties_left
                    .checked_sub(1)
                    .ok_or(DecodeError::Quota(
                        "more user properties than mqtt.max_user_properties allows",
                    ))?;
        }
        read_value(&mut props, spec, &mut section, ctx)?;
    }
    // At least one property was read.
    Ok(Properties::non_empty(props))
}

/// Bytes `write_properties` appends: the length prefix and the properties.
pub(super) fn properties_len(props: &Properties) -> usize {
    if props.is_unset() {
        return 1;
    }
    let body = body_len(props);
    varint_len(body) + body
}

/// Appends a property section: its length, then every property that is set, in table order.
pub(super) fn write_properties(props: &Properties, out: &mut BytesMut) {
    if props.is_unset() {
        out.put_u8(0);
        return;
    }
    put_varint(out, body_len(props));
    write_body(props, out);
}

fn check_numeric(spec: &PropertySpec, value: u32) -> Result<(), DecodeError> {
    if spec.check.accepts(value) {
        Ok(())
    } else {
        Err(DecodeError::Protocol(spec.invalid))
    }
}

macro_rules! property_table {
    ($(
        $id:literal $konst:ident $field:ident: $card:ident $ty:ident, $check:ident,
        [$($ctx:ident)*], repeat [$($rep:ident)*];
    )*) => {
        impl PropertyId {
            $(pub const $konst: PropertyId = PropertyId($id);)*
        }

        /// The property table of MQTT 5.0 §2.2.2.2, in spec order.
        pub(super) const PROPERTIES: &[PropertySpec] = &[$(
            PropertySpec {
                id: PropertyId::$konst,
                name: stringify!($konst),
                allowed: Context(0 $(| Context::$ctx.0)*),
                repeatable: Context(0 $(| Context::$rep.0)*),
                check: Check::$check,
                not_allowed: concat!("property ", stringify!($konst), " is not allowed in this packet"),
                duplicate: concat!("property ", stringify!($konst), " appears more than once"),
                invalid: concat!("property ", stringify!($konst), " has an invalid value"),
            },
        )*];

        fn read_value(
            props: &mut PropertySet,
            spec: &PropertySpec,
            r: &mut Reader,
            ctx: Context,
        ) -> Result<(), DecodeError> {
            match spec.id {
                $(PropertyId::$konst => {
                    let value = property_table!(@read $ty r);
                    property_table!(@check $ty spec value);
                    property_table!(@store $card props.$field, value, spec, ctx);
                })*
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            }
            Ok(())
        }

        fn body_len(props: &PropertySet) -> usize {
            let mut len = 0;
            $(property_table!(@each $card props.$field, |value| {
                len += varint_len($id) + property_table!(@len $ty value);
            });)*
            len
        }

        fn write_body(props: &PropertySet, out: &mut BytesMut) {
            $(property_table!(@each $card props.$field, |value| {
                put_varint(out, $id);
                property_table!(@put $ty out, value);
            });)*
        }

        /// Test support: clears what `ctx` does not allow and keeps one instance of what may
        /// not repeat there, so generated properties are valid for the packet.
        #[cfg(test)]
        pub(super) fn restrict_to(props: &mut PropertySet, ctx: Context) {
            $(
                let spec = lookup($id).unwrap();
                if !spec.allowed.contains(ctx) {
                    props.$field = Default::default();
                }
                property_table!(@restrict $card props.$field, spec, ctx);
            )*
        }
    };

    (@read Byte $r:ident) => { $r.u8()? };
    (@read TwoByteInteger $r:ident) => { $r.u16()? };
    (@read FourByteInteger $r:ident) => { $r.u32()? };
    (@read VariableByteInteger $r:ident) => { $r.varint()? };
    (@read Utf8String $r:ident) => { $r.string()? };
    (@read BinaryData $r:ident) => { $r.binary()? };
    (@read Utf8StringPair $r:ident) => { ($r.string()?, $r.string()?) };

    (@check Utf8String $spec:ident $v:ident) => {};
    (@check BinaryData $spec:ident $v:ident) => {};
    (@check Utf8StringPair $spec:ident $v:ident) => {};
    (@check $ty:ident $spec:ident $v:ident) => { check_numeric($spec, u32::from($v))? };

    (@store one $field:expr, $v:ident, $spec:ident, $ctx:ident) => {
        if $field.is_some() {
            return Err(DecodeError::Protocol($spec.duplicate));
        }
        $field = Some($v);
    };
    (@store many $field:expr, $v:ident, $spec:ident, $ctx:ident) => {
        if !$field.is_empty() && !$spec.repeatable.contains($ctx) {
            return Err(DecodeError::Protocol($spec.duplicate));
        }
        $field.push($v);
    };

    (@each one $field:expr, |$v:ident| $body:block) => {
        if let Some($v) = &$field $body
    };
    (@each many $field:expr, |$v:ident| $body:block) => {
        for $v in &$field $body
    };

    (@len Byte $v:ident) => { { let _ = $v; 1 } };
    (@len TwoByteInteger $v:ident) => { { let _ = $v; 2 } };
    (@len FourByteInteger $v:ident) => { { let _ = $v; 4 } };
    (@len VariableByteInteger $v:ident) => { varint_len(*$v as usize) };
    (@len Utf8String $v:ident) => { 2 + $v.len() };
    (@len BinaryData $v:ident) => { 2 + $v.len() };
    (@len Utf8StringPair $v:ident) => { 4 + $v.0.len() + $v.1.len() };

    (@put Byte $out:ident, $v:ident) => { $out.put_u8(*$v) };
    (@put TwoByteInteger $out:ident, $v:ident) => { $out.put_u16(*$v) };
    (@put FourByteInteger $out:ident, $v:ident) => { $out.put_u32(*$v) };
    (@put VariableByteInteger $out:ident, $v:ident) => { put_varint($out, *$v as usize) };
    (@put Utf8String $out:ident, $v:ident) => { put_string($out, $v) };
    (@put BinaryData $out:ident, $v:ident) => { put_binary($out, $v) };
    (@put Utf8StringPair $out:ident, $v:ident) => {{
        put_string($out, &$v.0);
        put_string($out, &$v.1);
    }};

    (@restrict one $field:expr, $spec:ident, $ctx:ident) => {};
    (@restrict many $field:expr, $spec:ident, $ctx:ident) => {
        if !$spec.repeatable.contains($ctx) {
            $field.truncate(1);
        }
    };
}

// Columns: identifier, constant, `Properties` field, `one` (Option) or `many` (Vec), data type
// (§1.5), value check, the packets that allow it, and where it may repeat.
property_table! {
    0x01 PAYLOAD_FORMAT_INDICATOR payload_format_indicator: one Byte, ZeroOrOne,
        [PUBLISH WILL], repeat [];
    0x02 MESSAGE_EXPIRY_INTERVAL message_expiry_interval: one FourByteInteger, Any,
        [PUBLISH WILL], repeat [];
    0x03 CONTENT_TYPE content_type: one Utf8String, Any,
        [PUBLISH WILL], repeat [];
    0x08 RESPONSE_TOPIC response_topic: one Utf8String, Any,
        [PUBLISH WILL], repeat [];
    0x09 CORRELATION_DATA correlation_data: one BinaryData, Any,
        [PUBLISH WILL], repeat [];
    // Several in a PUBLISH sent by the server (one per matching subscription, §3.3.2.3.8); a
    // second one in SUBSCRIBE is a Protocol Error (§3.8.2.1.2).
    0x0B SUBSCRIPTION_IDENTIFIER subscription_identifiers: many VariableByteInteger, NonZero,
        [PUBLISH SUBSCRIBE], repeat [PUBLISH];
    0x11 SESSION_EXPIRY_INTERVAL session_expiry_interval: one FourByteInteger, Any,
        [CONNECT CONNACK DISCONNECT], repeat [];
    0x12 ASSIGNED_CLIENT_IDENTIFIER assigned_client_identifier: one Utf8String, Any,
        [CONNACK], repeat [];
    0x13 SERVER_KEEP_ALIVE server_keep_alive: one TwoByteInteger, Any,
        [CONNACK], repeat [];
    0x15 AUTHENTICATION_METHOD authentication_method: one Utf8String, Any,
        [CONNECT CONNACK AUTH], repeat [];
    0x16 AUTHENTICATION_DATA authentication_data: one BinaryData, Any,
        [CONNECT CONNACK AUTH], repeat [];
    0x17 REQUEST_PROBLEM_INFORMATION request_problem_information: one Byte, ZeroOrOne,
        [CONNECT], repeat [];
    0x18 WILL_DELAY_INTERVAL will_delay_interval: one FourByteInteger, Any,
        [WILL], repeat [];
    0x19 REQUEST_RESPONSE_INFORMATION request_response_information: one Byte, ZeroOrOne,
        [CONNECT], repeat [];
    0x1A RESPONSE_INFORMATION response_information: one Utf8String, Any,
        [CONNACK], repeat [];
    0x1C SERVER_REFERENCE server_reference: one Utf8String, Any,
        [CONNACK DISCONNECT], repeat [];
    0x1F REASON_STRING reason_string: one Utf8String, Any,
        [CONNACK ACK SUBACK UNSUBACK DISCONNECT AUTH], repeat [];
    0x21 RECEIVE_MAXIMUM receive_maximum: one TwoByteInteger, NonZero,
        [CONNECT CONNACK], repeat [];
    0x22 TOPIC_ALIAS_MAXIMUM topic_alias_maximum: one TwoByteInteger, Any,
        [CONNECT CONNACK], repeat [];
    // Topic Alias 0 is left to the broker, which answers 0x94 Topic Alias invalid.
    0x23 TOPIC_ALIAS topic_alias: one TwoByteInteger, Any,
        [PUBLISH], repeat [];
    0x24 MAXIMUM_QOS maximum_qos: one Byte, ZeroOrOne,
        [CONNACK], repeat [];
    0x25 RETAIN_AVAILABLE retain_available: one Byte, ZeroOrOne,
        [CONNACK], repeat [];
    0x26 USER_PROPERTY user_properties: many Utf8StringPair, Any,
        [ALL], repeat [ALL];
    0x27 MAXIMUM_PACKET_SIZE maximum_packet_size: one FourByteInteger, NonZero,
        [CONNECT CONNACK], repeat [];
    0x28 WILDCARD_SUBSCRIPTION_AVAILABLE wildcard_subscription_available: one Byte, ZeroOrOne,
        [CONNACK], repeat [];
    0x29 SUBSCRIPTION_IDENTIFIER_AVAILABLE subscription_identifier_available: one Byte, ZeroOrOne,
        [CONNACK], repeat [];
    0x2A SHARED_SUBSCRIPTION_AVAILABLE shared_subscription_available: one Byte, ZeroOrOne,
        [CONNACK], repeat [];
}
