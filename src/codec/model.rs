//! The packet model: one set of types for MQTT 3.1, 3.1.1 and 5.0.
//!
//! Version differences live in the decoder and encoder, never here: a v3 packet simply has
//! empty properties and success reason codes. Payloads are `Bytes` so that one PUBLISH can be
//! shared by every subscriber without a copy.

use bytes::Bytes;

use super::reason::ReasonCode;

/// The protocol level carried in CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1, protocol name `MQIsdp`, level 3.
    V31,
    /// MQTT 3.1.1, protocol name `MQTT`, level 4.
    V311,
    /// MQTT 5.0, protocol name `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    pub fn level(self) -> u8 {
        match self {
            Self::V31 => 3,
            Self::V311 => 4,
            Self::V5 => 5,
        }
    }

    pub fn is_v5(self) -> bool {
        self == Self::V5
    }
}

/// Quality of service of a message or a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// `None` for 3 and above: the caller decides whether that is malformed.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// Every MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet type as the fixed header's high nibble.
    pub fn packet_type(&self) -> u8 {
        match self {
            Self::Connect(_) => 1,
            Self::ConnAck(_) => 2,
            Self::Publish(_) => 3,
            Self::PubAck(_) => 4,
            Self::PubRec(_) => 5,
            Self::PubRel(_) => 6,
            Self::PubComp(_) => 7,
            Self::Subscribe(_) => 8,
            Self::SubAck(_) => 9,
            Self::Unsubscribe(_) => 10,
            Self::UnsubAck(_) => 11,
            Self::PingReq => 12,
            Self::PingResp => 13,
            Self::Disconnect(_) => 14,
            Self::Auth(_) => 15,
        }
    }
}

/// CONNECT. `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub will: Option<Will>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub properties: Properties,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("protocol", &self.protocol)
            .field("clean_start", &self.clean_start)
            .field("keep_alive", &self.keep_alive)
            .field("client_id", &self.client_id)
            .field("will", &self.will)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("properties", &self.properties)
            .finish()
    }
}

/// The will message carried in CONNECT. `Debug` omits the payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Will properties (v5): will delay interval, payload format, expiry, content type,
    /// response topic, correlation data, user properties.
    pub properties: Properties,
}

impl std::fmt::Debug for Will {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Will")
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// A v5 reason code; the encoder maps it to the v3 return code for 3.1 / 3.1.1.
    pub code: ReasonCode,
    pub properties: Properties,
}

/// PUBLISH. `Debug` omits the payload.
#[derive(Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in v5 when a topic alias is given.
    pub topic: String,
    /// `Some` exactly when `qos > 0`; never zero.
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    pub payload: Bytes,
}

impl std::fmt::Debug for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publish")
            .field("dup", &self.dup)
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .field("topic", &self.topic)
            .field("packet_id", &self.packet_id)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// A packet identifier [MQTT-2.2.1]: never zero on the wire (the decoder refuses 0, and the
/// broker and the client allocate from 1). A newtype so that an id is never mistaken for
/// another number where it crosses from the codec into a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PacketId(pub u16);

impl PacketId {
    /// The id after this one, wrapping from 65,535 to 1.
    pub fn next(self) -> Self {
        Self(self.0.checked_add(1).unwrap_or(1))
    }
}

impl std::fmt::Display for PacketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq<u16> for PacketId {
    fn eq(&self, other: &u16) -> bool {
        self.0 == *other
    }
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: PacketId,
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Ack {
    pub fn new(packet_id: PacketId, reason: ReasonCode) -> Self {
        Self {
            packet_id,
            reason,
            properties: Properties::default(),
        }
    }
}

/// Subscription options byte of SUBSCRIBE (only `qos` exists in v3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 send retained on subscribe, 1 only if the subscription is new, 2 never.
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<(String, SubscriptionOptions)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// Granted QoS (0, 1, 2) or a failure code; v3 encodes every failure as 0x80.
    pub reasons: Vec<ReasonCode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub properties: Properties,
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    pub properties: Properties,
    /// Empty on v3 (the packet has no payload there).
    pub reasons: Vec<ReasonCode>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    pub reason: ReasonCode,
    pub properties: Properties,
}

impl Disconnect {
    pub fn new(reason: ReasonCode) -> Self {
        Self {
            reason,
            properties: Properties::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub reason: ReasonCode,
    pub properties: Properties,
}

/// Every MQTT 5 property, as one struct for all packets. The decoder rejects properties that
/// are not allowed in the packet they arrived in and single-instance properties given twice;
/// the encoder writes whatever is set (callers set only what the packet allows).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PropertySet {
    /// 0x01
    pub payload_format_indicator: Option<u8>,
    /// 0x02, seconds
    pub message_expiry_interval: Option<u32>,
    /// 0x03
    pub content_type: Option<String>,
    /// 0x08
    pub response_topic: Option<String>,
    /// 0x09
    pub correlation_data: Option<Bytes>,
    /// 0x0B, variable byte integer 1..=268_435_455; several allowed in PUBLISH from the server.
    pub subscription_identifiers: Vec<u32>,
    /// 0x11, seconds
    pub session_expiry_interval: Option<u32>,
    /// 0x12
    pub assigned_client_identifier: Option<String>,
    /// 0x13, seconds
    pub server_keep_alive: Option<u16>,
    /// 0x15
    pub authentication_method: Option<String>,
    /// 0x16
    pub authentication_data: Option<Bytes>,
    /// 0x17
    pub request_problem_information: Option<u8>,
    /// 0x18, seconds
    pub will_delay_interval: Option<u32>,
    /// 0x19
    pub request_response_information: Option<u8>,
    /// 0x1A
    pub response_information: Option<String>,
    /// 0x1C
    pub server_reference: Option<String>,
    /// 0x1F
    pub reason_string: Option<String>,
    /// 0x21
    pub receive_maximum: Option<u16>,
    /// 0x22
    pub topic_alias_maximum: Option<u16>,
    /// 0x23
    pub topic_alias: Option<u16>,
    /// 0x24
    pub maximum_qos: Option<u8>,
    /// 0x25
    pub retain_available: Option<u8>,
    /// 0x26, in order of appearance; may repeat
    pub user_properties: Vec<(String, String)>,
    /// 0x27
    pub maximum_packet_size: Option<u32>,
    /// 0x28
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29
    pub subscription_identifier_available: Option<u8>,
    /// 0x2A
    pub shared_subscription_available: Option<u8>,
}

/// No properties at all: what an absent property section reads as.
static EMPTY: PropertySet = PropertySet {
    payload_format_indicator: None,
    message_expiry_interval: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    subscription_identifiers: Vec::new(),
    session_expiry_interval: None,
    assigned_client_identifier: None,
    server_keep_alive: None,
    authentication_method: None,
    authentication_data: None,
    request_problem_information: None,
    will_delay_interval: None,
    request_response_information: None,
    response_information: None,
    server_reference: None,
    reason_string: None,
    receive_maximum: None,
    topic_alias_maximum: None,
    topic_alias: None,
    maximum_qos: None,
    retain_available: None,
    user_properties: Vec::new(),
    maximum_packet_size: None,
    wildcard_subscription_available: None,
    subscription_identifier_available: None,
    shared_subscription_available: None,
};

/// A packet's properties: a [`PropertySet`] allocated only when the packet has any, so a
/// packet without properties (every MQTT 3.1.1 packet, most MQTT 5 ones) is small to move
/// and builds no set. Reads go through `Deref` (an empty set when there is none); writes
/// through `DerefMut` allocate the set on first use, or [`Properties::get_mut`] looks
/// without allocating.
#[derive(Clone, Default)]
pub struct Properties(Option<Box<PropertySet>>);

impl Properties {
    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        match self.0.as_deref() {
            None => true,
            Some(set) => *set == EMPTY,
        }
    }

    /// Whether no set was ever allocated (cheaper than [`Properties::is_empty`], which also
    /// looks inside one).
    pub(crate) fn is_unset(&self) -> bool {
        self.0.is_none()
    }

    /// Wraps a set known to hold at least one property.
    pub(crate) fn non_empty(set: PropertySet) -> Self {
        Self(Some(Box::new(set)))
    }

    /// The set, if one was allocated: for changing properties that may well be absent
    /// without allocating a set to find that out.
    pub fn get_mut(&mut self) -> Option<&mut PropertySet> {
        self.0.as_deref_mut()
    }
}

impl std::ops::Deref for Properties {
    type Target = PropertySet;

    fn deref(&self) -> &PropertySet {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut PropertySet {
        self.0.get_or_insert_with(Box::default)
    }
}

impl From<PropertySet> for Properties {
    fn from(set: PropertySet) -> Self {
        if set == EMPTY {
            Self(None)
        } else {
            Self(Some(Box::new(set)))
        }
    }
}

impl PartialEq for Properties {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Properties {}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}
