//! An application message as it travels between sessions, and one delivery of it.
//!
//! An `AppMessage` (an MQTT Application Message) is built once per PUBLISH and shared behind an `Arc` by every subscriber; the
//! payload is a `Bytes` slice of the read buffer, never copied. Expiry is an instant computed
//! on arrival, so forwarding can tell the remaining lifetime without reading the clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{Properties, Publish, QoS};
use crate::core::topic::{TopicFilter, TopicName};

#[derive(Debug, Clone)]
pub struct AppMessage {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Properties forwarded unchanged: payload format, content type, response topic,
    /// correlation data, user properties. Topic alias and subscription ids are per hop and
    /// never stored here; message expiry is kept as `expires_at`.
    pub properties: Properties,
    /// Client id of the publisher (for No Local); `None` for messages the broker originates.
    pub publisher: Option<Arc<str>>,
    pub expires_at: Option<Instant>,
}

impl AppMessage {
    /// Builds the routed message from an inbound PUBLISH whose topic alias is already resolved
    /// and whose topic was parsed into `topic` (the PUBLISH's own `topic` is not read).
    pub fn from_publish(
        topic: TopicName,
        publish: Publish,
        publisher: Option<Arc<str>>,
        now: Instant,
    ) -> Self {
        let mut properties = publish.properties;
        // Looked at without allocating: most messages have no properties.
        let expires_at = properties.get_mut().and_then(|set| {
            set.topic_alias = None;
            set.subscription_identifiers.clear();
            set.message_expiry_interval.take()
        });
        let expires_at = expires_at.map(|secs| now + Duration::from_secs(u64::from(secs)));
        // A set left empty (it held only per-hop properties) is dropped, so that every
        // delivery sees "no properties" without comparing.
        if properties.is_empty() {
            properties = Properties::default();
        }
        Self {
            topic,
            payload: publish.payload,
            qos: publish.qos,
            retain: publish.retain,
            properties,
            publisher,
            expires_at,
        }
    }

    /// A copy whose payload has an allocation of its own, for keeping: a payload sliced
    /// from a connection's read buffer keeps that whole buffer (up to 64 KiB) alive.
    pub fn detached(&self) -> Self {
        Self {
            payload: Bytes::copy_from_slice(&self.payload),
            ..self.clone()
        }
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Seconds left, rounded up, as the Message Expiry Interval to forward [MQTT-3.3.2-6].
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs).unwrap_or(u32::MAX)
        })
    }
}

/// One byte stream of a connection. `Flow::CONTROL` is the only one on TCP, TLS, WebSocket
/// and single-stream QUIC; in QUIC multi-stream mode each further client-opened stream is a
/// data flow with its own subscriptions and packet-id space (the EMQX mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Flow(pub u64);

impl Flow {
    pub const CONTROL: Flow = Flow(0);
    /// The pseudo-flow of QoS 0 deliveries sent as QUIC datagrams (docs/datagram.md): open
    /// only on a connection that negotiated the class; never a stream, never the flow of a
    /// subscription or of a packet id.
    pub const DATAGRAM: Flow = Flow(u64::MAX);

    pub fn is_control(self) -> bool {
        self == Self::CONTROL
    }
}

/// One message on its way to one subscriber, after overlapping subscriptions were merged.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<AppMessage>,
    /// The granted QoS: the message's QoS capped by the subscription's.
    pub qos: QoS,
    /// The RETAIN flag to send (retained-on-subscribe, or Retain As Published).
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// The flow whose subscription matched: the delivery goes out there if it is still open,
    /// on the control flow otherwise.
    pub flow: Flow,
    /// The shared subscription it came through, if that alone chose this session: when the
    /// session's connection goes, an unacknowledged delivery goes to another member.
    pub shared: Option<Arc<TopicFilter>>,
    /// Its key in the durable store, when it was stored for a persistent session.
    pub stored: Option<crate::core::session::StoreKey>,
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use super::*;

    #[test]
    fn a_detached_copy_does_not_share_the_read_buffer() {
        let buffer = Bytes::from(vec![7u8; 4096]);
        let publish = Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: true,
            topic: "t".into(),
            packet_id: None,
            properties: Properties::default(),
            payload: buffer.slice(100..110),
        };
        let topic = TopicName::parse(publish.topic.clone(), 0).unwrap();
        let message = AppMessage::from_publish(topic, publish, None, Instant::now());
        let kept = message.detached();
        assert_eq!(kept.payload, message.payload);
        assert_ne!(kept.payload.as_ptr(), message.payload.as_ptr());
        assert_eq!((kept.topic.as_str(), kept.retain), ("t", true));
    }
}
