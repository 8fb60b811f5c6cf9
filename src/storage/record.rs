//! The store's records: keys and values as bytes, and back (sans-IO, no engine).
//!
//! Keys sort by kind, then by client id (length-prefixed, so that one client's range never
//! takes in another's whose id it prefixes), then by sequence:
//!
//! | key | value |
//! |---|---|
//! | `V` | the format version (`FORMAT`) |
//! | `S` client | a persistent session: expiry, when it went offline, subscriptions, a pending will |
//! | `Q` len client key(u64) | a delivery queued for it (the whole message: one copy per recipient) |
//! | `P` len client key(u64) | the packet id it was sent with, and whether PUBREC came |
//! | `I` len client flow(u64) id(u16) | an inbound QoS 2 message awaiting PUBREL |
//! | `R` topic | a retained message |
//! | `D` key(u64) | a `$delayed/` message: when it is due (wall clock), and the message |
//! | `W` len client | the will of an offline session, waiting for its delay |
//!
//! Every value starts with the record format's version byte. A message is kept as an MQTT 5
//! PUBLISH (our codec writes and reads it, properties and all) behind a small header with what
//! a PUBLISH cannot say: the publisher, and expiry as a wall-clock time (so that it counts
//! across downtime).

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::codec::SubscriptionOptions;
use crate::codec::{
    self, Codec, Packet, PacketId, Properties, ProtocolVersion, Publish, PublishRef, QoS,
};

/// The version of the record format; a store of another version is refused at start-up.
pub const FORMAT: u8 = 1;

/// The largest encoded value we read back (an MQTT packet's limit, plus headers).
const MAX_VALUE: usize = 268_435_455 + 65_536;

pub const META: &[u8] = b"V";
pub const SESSION: u8 = b'S';
pub const QUEUED: u8 = b'Q';
pub const PACKET_ID: u8 = b'P';
pub const INBOUND: u8 = b'I';
pub const RETAINED: u8 = b'R';
pub const DELAYED: u8 = b'D';
pub const WILL: u8 = b'W';
/// A cluster node's position in the cluster's message stream (`cluster::node`).
pub const MARK: u8 = b'M';

/// Why a record could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record format version {0}, this build reads version {FORMAT}")]
    Version(u8),
    #[error("record truncated")]
    Truncated,
    #[error("record malformed: {0}")]
    Malformed(&'static str),
    #[error("unknown record kind {0:#04x}")]
    UnknownKind(u8),
}

/// A message as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
    pub publisher: Option<String>,
    /// When it expires, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

/// A message as it is written: borrowed from the broker's own, nothing copied first.
#[derive(Debug, Clone, Copy)]
pub struct MessageRef<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
    pub properties: &'a Properties,
    pub publisher: Option<&'a str>,
    pub expires_at_ms: Option<u64>,
}

impl StoredMessage {
    pub fn as_ref(&self) -> MessageRef<'_> {
        MessageRef {
            topic: &self.topic,
            payload: &self.payload,
            qos: self.qos,
            retain: self.retain,
            properties: &self.properties,
            publisher: self.publisher.as_deref(),
            expires_at_ms: self.expires_at_ms,
        }
    }
}

/// A will waiting for its delay, kept with its offline session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredWill {
    pub message: StoredMessage,
    pub delay: u32,
    pub expiry_interval: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    pub filter: String,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub expiry_interval: u32,
    /// When its connection closed (ms since the epoch); `None` while one serves it (after a
    /// crash: the session went offline when the broker stopped).
    pub offline_since_ms: Option<u64>,
    pub subscriptions: Vec<StoredSubscription>,
}

/// A delivery queued for a persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The shared subscription (`$share/g/f`) it came through, if that alone chose it.
    pub shared: Option<String>,
    pub message: StoredMessage,
}

/// The packet id a delivery went out with; `released` once the client's PUBREC came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentAs {
    pub id: PacketId,
    pub released: bool,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Meta(u8),
    Session {
        client_id: String,
        session: StoredSession,
    },
    Queued {
        client_id: String,
        key: u64,
        delivery: StoredDelivery,
    },
    Sent {
        client_id: String,
        key: u64,
        sent: SentAs,
    },
    Inbound {
        client_id: String,
        flow: u64,
        id: PacketId,
    },
    Retained(StoredMessage),
    Will {
        client_id: String,
        will: StoredWill,
    },
    Delayed {
        key: u64,
        /// When it is due, in milliseconds since the Unix epoch.
        due_ms: u64,
        message: StoredMessage,
    },
    /// Every message of the cluster's stream up to `seq` that reached node `node` was
    /// routed there, and what that stored is committed before this record.
    Mark {
        node: String,
        seq: u64,
    },
}

// ---- keys ----

fn client_key(kind: u8, client_id: &str, extra: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(3 + client_id.len() + extra);
    key.push(kind);
    let len = u16::try_from(client_id.len()).unwrap_or(u16::MAX);
    key.extend_from_slice(&len.to_be_bytes());
    key.extend_from_slice(&client_id.as_bytes()[..usize::from(len)]);
    key
}

pub fn session_key(client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + client_id.len());
    key.push(SESSION);
    key.extend_from_slice(client_id.as_bytes());
    key
}

pub fn queued_key(client_id: &str, key: u64) -> Vec<u8> {
    let mut k = client_key(QUEUED, client_id, 8);
    k.extend_from_slice(&key.to_be_bytes());
    k
}

pub fn sent_key(client_id: &str, key: u64) -> Vec<u8> {
    let mut k = client_key(PACKET_ID, client_id, 8);
    k.extend_from_slice(&key.to_be_bytes());
    k
}

pub fn inbound_key(client_id: &str, flow: u64, id: PacketId) -> Vec<u8> {
    let mut k = client_key(INBOUND, client_id, 10);
    k.extend_from_slice(&flow.to_be_bytes());
    k.extend_from_slice(&id.0.to_be_bytes());
    k
}

/// The prefixes under which everything of one client's session lives, besides its `S` key
/// (the last is its will's whole key).
pub fn client_prefixes(client_id: &str) -> [Vec<u8>; 4] {
    [
        client_key(QUEUED, client_id, 0),
        client_key(PACKET_ID, client_id, 0),
        client_key(INBOUND, client_id, 0),
        will_key(client_id),
    ]
}

pub fn will_key(client_id: &str) -> Vec<u8> {
    client_key(WILL, client_id, 0)
}

/// A will waiting for its delay: the delay, its Message Expiry Interval, the message.
pub fn will_value(delay: u32, expiry_interval: Option<u32>, message: MessageRef<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(32 + message.topic.len() + message.payload.len());
    out.put_u8(FORMAT);
    out.put_u32(delay);
    put_opt_u32(&mut out, expiry_interval);
    put_message(&mut out, message);
    out.freeze()
}

pub fn retained_key(topic: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + topic.len());
    key.push(RETAINED);
    key.extend_from_slice(topic.as_bytes());
    key
}

// ---- values ----

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.put_slice(s.as_bytes());
}

fn put_opt_u32(out: &mut BytesMut, v: Option<u32>) {
    match v {
        Some(v) => {
            out.put_u8(1);
            out.put_u32(v);
        }
        None => out.put_u8(0),
    }
}

/// Appends a message as records hold it (also a cluster's wire format, `cluster::wire`).
pub(crate) fn put_message(out: &mut BytesMut, m: MessageRef<'_>) {
    match m.publisher {
        Some(p) => {
            out.put_u8(1);
            put_str(out, p);
        }
        None => out.put_u8(0),
    }
    out.put_u64(m.expires_at_ms.unwrap_or(0));
    let packet_id = (m.qos != QoS::AtMostOnce).then_some(PacketId(1));
    if m.properties.is_empty() {
        // The common case: written straight from the parts.
        PublishRef {
            dup: false,
            qos: m.qos,
            retain: m.retain,
            topic: m.topic,
            packet_id,
            payload: m.payload,
        }
        .encode(ProtocolVersion::V5, out);
        return;
    }
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: m.qos,
        retain: m.retain,
        topic: m.topic.to_owned(),
        packet_id,
        properties: m.properties.clone(),
        payload: Bytes::copy_from_slice(m.payload),
    });
    codec::encode(&publish, ProtocolVersion::V5, out);
}

fn options_byte(o: SubscriptionOptions) -> u8 {
    (o.qos as u8)
        | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling & 3) << 4)
}

pub fn session_value(s: &StoredSession) -> Bytes {
    let mut out = BytesMut::with_capacity(32 + s.subscriptions.len() * 32);
    out.put_u8(FORMAT);
    out.put_u32(s.expiry_interval);
    out.put_u64(s.offline_since_ms.unwrap_or(0));
    out.put_u32(u32::try_from(s.subscriptions.len()).unwrap_or(u32::MAX));
    for sub in &s.subscriptions {
        put_str(&mut out, &sub.filter);
        out.put_u8(options_byte(sub.options));
        put_opt_u32(&mut out, sub.id);
    }
    out.freeze()
}

/// A queued delivery: its QoS, RETAIN flag, subscription identifiers and shared filter, and
/// the message.
pub fn delivery_value(
    qos: QoS,
    retain: bool,
    subscription_ids: &[u32],
    shared: Option<&str>,
    message: MessageRef<'_>,
) -> Bytes {
    let shared = shared.unwrap_or("");
    let mut out = BytesMut::with_capacity(
        48 + 4 * subscription_ids.len()
            + shared.len()
            + message.topic.len()
            + message.payload.len()
            + message.publisher.map_or(0, str::len),
    );
    out.put_u8(FORMAT);
    out.put_u8(qos as u8);
    out.put_u8(u8::from(retain));
    out.put_u32(u32::try_from(subscription_ids.len()).unwrap_or(u32::MAX));
    for id in subscription_ids {
        out.put_u32(*id);
    }
    put_str(&mut out, shared);
    put_message(&mut out, message);
    out.freeze()
}

/// [`delivery_value`] of a read-back delivery.
pub fn stored_delivery_value(d: &StoredDelivery) -> Bytes {
    delivery_value(
        d.qos,
        d.retain,
        &d.subscription_ids,
        d.shared.as_deref(),
        d.message.as_ref(),
    )
}

pub fn sent_value(sent: SentAs) -> Bytes {
    Bytes::copy_from_slice(&[
        FORMAT,
        (sent.id.0 >> 8) as u8,
        sent.id.0 as u8,
        u8::from(sent.released),
    ])
}

pub fn retained_value(m: MessageRef<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(
        32 + m.topic.len() + m.payload.len() + m.publisher.map_or(0, str::len),
    );
    out.put_u8(FORMAT);
    put_message(&mut out, m);
    out.freeze()
}

pub fn mark_key(node: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + node.len());
    k.push(MARK);
    k.extend_from_slice(node.as_bytes());
    k
}

pub fn mark_value(seq: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(9);
    out.put_u8(FORMAT);
    out.put_u64(seq);
    out.freeze()
}

pub fn delayed_key(key: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(DELAYED);
    k.extend_from_slice(&key.to_be_bytes());
    k
}

pub fn delayed_value(due_ms: u64, m: MessageRef<'_>) -> Bytes {
    let mut out = BytesMut::with_capacity(40 + m.topic.len() + m.payload.len());
    out.put_u8(FORMAT);
    out.put_u64(due_ms);
    put_message(&mut out, m);
    out.freeze()
}

pub fn inbound_value() -> Bytes {
    Bytes::from_static(&[FORMAT])
}

pub fn meta_value() -> Bytes {
    Bytes::from_static(&[FORMAT])
}

// ---- reading ----

/// Reads a message written by [`put_message`]; the rest of `bytes` is ignored.
pub(crate) fn read_message(bytes: &[u8]) -> Result<StoredMessage, RecordError> {
    Input(bytes).message()
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn need(&self, n: usize) -> Result<(), RecordError> {
        if self.0.remaining() < n {
            Err(RecordError::Truncated)
        } else {
            Ok(())
        }
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        self.need(1)?;
        Ok(self.0.get_u8())
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        self.need(2)?;
        Ok(self.0.get_u16())
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        self.need(4)?;
        Ok(self.0.get_u32())
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        self.need(8)?;
        Ok(self.0.get_u64())
    }

    fn bytes(&mut self, n: usize) -> Result<&[u8], RecordError> {
        self.need(n)?;
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, RecordError> {
        let n = self.u32()? as usize;
        let bytes = self.bytes(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| RecordError::Malformed("invalid UTF-8"))
    }

    fn opt_u32(&mut self) -> Result<Option<u32>, RecordError> {
        Ok(match self.u8()? {
            0 => None,
            1 => Some(self.u32()?),
            _ => return Err(RecordError::Malformed("bad option flag")),
        })
    }

    fn bool(&mut self) -> Result<bool, RecordError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(RecordError::Malformed("bad flag")),
        }
    }

    fn qos(&mut self) -> Result<QoS, RecordError> {
        QoS::from_u8(self.u8()?).ok_or(RecordError::Malformed("bad QoS"))
    }

    fn version(&mut self) -> Result<(), RecordError> {
        match self.u8()? {
            FORMAT => Ok(()),
            v => Err(RecordError::Version(v)),
        }
    }

    fn message(&mut self) -> Result<StoredMessage, RecordError> {
        let publisher = match self.u8()? {
            0 => None,
            1 => Some(self.string()?),
            _ => return Err(RecordError::Malformed("bad publisher flag")),
        };
        let expires_at_ms = Some(self.u64()?).filter(|&ms| ms != 0);
        let rest = self.bytes(self.0.len())?;
        if rest.len() > MAX_VALUE {
            return Err(RecordError::Malformed("message too large"));
        }
        let mut buf = BytesMut::from(rest);
        let mut codec = Codec::with_version(ProtocolVersion::V5, 268_435_455);
        let publish = match codec.decode(&mut buf) {
            Ok(Some(Packet::Publish(p))) if buf.is_empty() => p,
            Ok(_) => return Err(RecordError::Malformed("not one PUBLISH")),
            Err(_) => return Err(RecordError::Malformed("bad PUBLISH")),
        };
        Ok(StoredMessage {
            topic: publish.topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties: publish.properties,
            publisher,
            expires_at_ms,
        })
    }
}

fn options_from(b: u8) -> Result<SubscriptionOptions, RecordError> {
    Ok(SubscriptionOptions {
        qos: QoS::from_u8(b & 3).ok_or(RecordError::Malformed("bad QoS"))?,
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: (b >> 4) & 3,
    })
}

/// Splits a client-scoped key after its kind byte: the client id and what follows.
fn client_of(key: &[u8]) -> Result<(String, &[u8]), RecordError> {
    let mut input = Input(key);
    let len = usize::from(input.u16()?);
    let id = input.bytes(len)?;
    let id = String::from_utf8(id.to_vec()).map_err(|_| RecordError::Malformed("client id"))?;
    Ok((id, input.0))
}

fn u64_key(rest: &[u8]) -> Result<u64, RecordError> {
    let bytes: [u8; 8] = rest
        .try_into()
        .map_err(|_| RecordError::Malformed("bad key"))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Reads one key-value pair back.
pub fn decode(key: &[u8], value: &[u8]) -> Result<Record, RecordError> {
    let Some((&kind, rest)) = key.split_first() else {
        return Err(RecordError::Malformed("empty key"));
    };
    let mut v = Input(value);
    match kind {
        b'V' => {
            let version = v.u8()?;
            Ok(Record::Meta(version))
        }
        SESSION => {
            v.version()?;
            let client_id = String::from_utf8(rest.to_vec())
                .map_err(|_| RecordError::Malformed("client id"))?;
            let expiry_interval = v.u32()?;
            let offline_since_ms = Some(v.u64()?).filter(|&ms| ms != 0);
            let n = v.u32()? as usize;
            let mut subscriptions = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                let filter = v.string()?;
                let options = options_from(v.u8()?)?;
                let id = v.opt_u32()?;
                subscriptions.push(StoredSubscription {
                    filter,
                    options,
                    id,
                });
            }
            Ok(Record::Session {
                client_id,
                session: StoredSession {
                    expiry_interval,
                    offline_since_ms,
                    subscriptions,
                },
            })
        }
        QUEUED => {
            let (client_id, rest) = client_of(rest)?;
            let key = u64_key(rest)?;
            v.version()?;
            let qos = v.qos()?;
            let retain = v.bool()?;
            let n = v.u32()? as usize;
            let mut subscription_ids = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                subscription_ids.push(v.u32()?);
            }
            let shared = Some(v.string()?).filter(|s| !s.is_empty());
            let message = v.message()?;
            Ok(Record::Queued {
                client_id,
                key,
                delivery: StoredDelivery {
                    qos,
                    retain,
                    subscription_ids,
                    shared,
                    message,
                },
            })
        }
        PACKET_ID => {
            let (client_id, rest) = client_of(rest)?;
            let key = u64_key(rest)?;
            v.version()?;
            let id = PacketId(v.u16()?);
            let released = v.bool()?;
            if id.0 == 0 {
                return Err(RecordError::Malformed("packet id 0"));
            }
            Ok(Record::Sent {
                client_id,
                key,
                sent: SentAs { id, released },
            })
        }
        INBOUND => {
            let (client_id, rest) = client_of(rest)?;
            v.version()?;
            if rest.len() != 10 {
                return Err(RecordError::Malformed("bad inbound key"));
            }
            let flow = u64_key(&rest[..8])?;
            let id = PacketId(u16::from_be_bytes([rest[8], rest[9]]));
            Ok(Record::Inbound {
                client_id,
                flow,
                id,
            })
        }
        RETAINED => {
            v.version()?;
            let message = v.message()?;
            if message.topic.as_bytes() != rest {
                return Err(RecordError::Malformed(
                    "retained topic differs from its key",
                ));
            }
            Ok(Record::Retained(message))
        }
        WILL => {
            let (client_id, rest) = client_of(rest)?;
            if !rest.is_empty() {
                return Err(RecordError::Malformed("bad will key"));
            }
            v.version()?;
            let delay = v.u32()?;
            let expiry_interval = v.opt_u32()?;
            Ok(Record::Will {
                client_id,
                will: StoredWill {
                    delay,
                    expiry_interval,
                    message: v.message()?,
                },
            })
        }
        DELAYED => {
            let key = u64_key(rest)?;
            v.version()?;
            let due_ms = v.u64()?;
            Ok(Record::Delayed {
                key,
                due_ms,
                message: v.message()?,
            })
        }
        MARK => {
            v.version()?;
            let node =
                String::from_utf8(rest.to_vec()).map_err(|_| RecordError::Malformed("node"))?;
            Ok(Record::Mark {
                node,
                seq: v.u64()?,
            })
        }
        other => Err(RecordError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message(topic: &str, payload: &[u8]) -> StoredMessage {
        StoredMessage {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties::default(),
            publisher: Some("pub".into()),
            expires_at_ms: Some(1_800_000_000_000),
        }
    }

    #[test]
    fn a_session_and_its_will_read_back() {
        let mut will = message("will/t", b"gone");
        will.properties.content_type = Some("text/plain".into());
        let value = will_value(30, None, will.as_ref());
        assert_eq!(
            decode(&will_key("c1"), &value).unwrap(),
            Record::Will {
                client_id: "c1".into(),
                will: StoredWill {
                    message: will,
                    delay: 30,
                    expiry_interval: None,
                },
            }
        );
        let session = StoredSession {
            expiry_interval: 3600,
            offline_since_ms: Some(1_700_000_000_000),
            subscriptions: vec![StoredSubscription {
                filter: "$share/g/a/#".into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
                id: Some(7),
            }],
        };
        let record = decode(&session_key("c1"), &session_value(&session)).unwrap();
        assert_eq!(
            record,
            Record::Session {
                client_id: "c1".into(),
                session
            }
        );
    }

    #[test]
    fn client_ranges_do_not_overlap() {
        let [a, ..] = client_prefixes("ab");
        assert!(!queued_key("abc", 1).starts_with(&a));
        assert!(queued_key("ab", 1).starts_with(&a));
    }

    #[test]
    fn another_format_version_is_refused() {
        let mut value = retained_value(message("t", b"x").as_ref()).to_vec();
        value[0] = FORMAT + 1;
        assert_eq!(
            decode(&retained_key("t"), &value),
            Err(RecordError::Version(FORMAT + 1))
        );
    }

    proptest! {
        #[test]
        fn deliveries_read_back(
            topic in "[a-z/]{1,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            client in "[a-zA-Z0-9]{0,30}",
            key in any::<u64>(),
            ids in proptest::collection::vec(1u32..268_435_455, 0..3),
        ) {
            let delivery = StoredDelivery {
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: ids,
                shared: None,
                message: message(&topic, &payload),
            };
            let record = decode(&queued_key(&client, key), &stored_delivery_value(&delivery)).unwrap();
            prop_assert_eq!(record, Record::Queued { client_id: client, key, delivery });
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(
            key in proptest::collection::vec(any::<u8>(), 0..40),
            value in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let _ = decode(&key, &value);
        }
    }
}
