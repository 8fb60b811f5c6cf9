//! Outbound PUBLISH: the in-flight window, expiry, the client's Maximum Packet Size,
//! outbound topic aliases, packet ids, and writing a delivery straight from the shared message.

use super::*;

impl Channel {
    /// Whether the driver may offer another delivery now: connected, the in-flight window has
    /// room, and the write buffer is not backed up.
    pub fn can_deliver(&self) -> bool {
        self.delivery_room() > 0
    }

    /// How many QoS 1/2 deliveries the channel could take now (0 when it can take none).
    pub fn delivery_room(&self) -> usize {
        let window = usize::from(self.peer_receive_maximum.min(self.limits.max_inflight));
        match &self.session {
            Some(session) if self.state == State::Connected && self.out.len() < OUT_HIGH_WATER => {
                window.saturating_sub(session.inflight())
            }
            _ => 0,
        }
    }

    /// Send one message to this client. Expired messages and messages larger than the
    /// client's Maximum Packet Size are dropped and counted [MQTT-3.1.2-25].
    pub fn deliver(&mut self, now: Instant, mut delivery: Delivery) {
        if self.state != State::Connected || delivery.message.is_expired(now) {
            self.dropped += 1;
            return self.forget(delivery.stored);
        }
        if self.access.is_some() && !self.allowed(Access::Receive, &delivery.message.topic) {
            // A permission removed since the subscription was made, or a retained or will
            // message the client may not read: dropped, and counted as denied too.
            self.dropped += 1;
            self.denied += 1;
            return self.forget(delivery.stored);
        }
        delivery.qos = delivery.qos.min(self.limits.maximum_qos);
        if !self.is_open(delivery.flow) {
            delivery.flow = Flow::CONTROL;
        }
        if delivery.qos == QoS::AtMostOnce && self.is_open(Flow::DATAGRAM) {
            // The connection opted in to the datagram class (docs/datagram.md).
            delivery.flow = Flow::DATAGRAM;
        }
        let flow = delivery.flow;
        let Err(delivery) = self.deliver_direct(delivery) else {
            return;
        };
        let mut publish = self.build_publish(now, &delivery, false);
        if delivery.qos != QoS::AtMostOnce {
            publish.packet_id = Some(PacketId(u16::MAX)); // same size as the id it will get
        }
        let mut packet = Packet::Publish(publish);
        if !self.fits(&packet) {
            self.dropped += 1;
            return self.forget(delivery.stored);
        }
        if delivery.qos != QoS::AtMostOnce {
            let (key, qos) = (delivery.stored, delivery.qos);
            let Some(session) = self.session.as_mut() else {
                return;
            };
            let Some(id) = session.track(delivery) else {
                self.dropped += 1;
                return self.forget(key);
            };
            self.sent(key, id, qos);
            if let Packet::Publish(publish) = &mut packet {
                publish.packet_id = Some(id);
            }
        }
        self.send_publish(flow, packet);
    }

    /// The common case, written straight from the shared message with no `Publish` built
    /// (no topic copied, no properties cloned): MQTT 3.1/3.1.1, or v5 for a message without
    /// properties, expiry or subscription identifiers, on a flow without topic aliases.
    /// Gives the delivery back when the full path is needed.
    pub(super) fn deliver_direct(&mut self, delivery: Delivery) -> Result<(), Delivery> {
        let message = &delivery.message;
        if self.version.is_v5()
            && (!delivery.subscription_ids.is_empty()
                || message.expires_at.is_some()
                // Messages drop an emptied property set (`AppMessage::from_publish`).
                || !message.properties.is_unset())
        {
            return Err(delivery);
        }
        if delivery.flow.is_control() && self.peer_topic_alias_maximum > 0 {
            return Err(delivery);
        }
        let qos = delivery.qos;
        let publish = PublishRef {
            dup: false,
            qos,
            retain: delivery.retain,
            topic: &message.topic,
            // A placeholder of the same size as the id it gets below.
            packet_id: (qos != QoS::AtMostOnce).then_some(PacketId(0)),
            payload: &message.payload,
        };
        if !self.fits_len(|| publish.encoded_len(self.version)) {
            self.dropped += 1;
            self.forget(delivery.stored);
            return Ok(());
        }
        // Written first, then tracked (which takes the delivery) and the id filled in, so
        // the shared message is not even reference-counted once more.
        let (flow, key) = (delivery.flow, delivery.stored);
        // Borrowed field by field: the session is needed while `out` is held.
        let out = flow_out(&mut self.flows, &mut self.out, flow);
        let start = out.len();
        let Some(id_at) = publish.encode(self.version, out) else {
            return Ok(());
        };
        match self
            .session
            .as_mut()
            .and_then(|session| session.track(delivery))
        {
            Some(id) => {
                out[id_at..id_at + 2].copy_from_slice(&id.0.to_be_bytes());
                self.sent(key, id, qos);
            }
            None => {
                out.truncate(start);
                self.dropped += 1;
                self.forget(key);
            }
        }
        Ok(())
    }

    /// A stored delivery went out under `id`: the store records the id (a resend after a
    /// restart reuses it).
    fn sent(&mut self, key: Option<StoreKey>, id: PacketId, qos: QoS) {
        if let Some(key) = key {
            self.changes.push_back(Change::Sent {
                key,
                id,
                exactly_once: qos == QoS::ExactlyOnce,
            });
        }
    }

    /// Resends an unacknowledged PUBLISH after reconnect; one that no longer fits the
    /// client's Maximum Packet Size is abandoned (counted) rather than kept forever.
    pub(super) fn resend(&mut self, now: Instant, delivery: &Delivery, id: PacketId) {
        let mut publish = self.build_publish(now, delivery, true);
        publish.packet_id = Some(id);
        let packet = Packet::Publish(publish);
        if self.fits(&packet) {
            self.send_publish(delivery.flow, packet);
        } else if let Some(session) = self.session.as_mut() {
            let key = session.abandon(id);
            self.dropped += 1;
            self.forget(key);
        }
    }

    pub(super) fn fits(&self, packet: &Packet) -> bool {
        self.fits_len(|| codec::encoded_len(packet, self.version))
    }

    /// Whether a packet of `len()` bytes may go to the client. A client that set no maximum
    /// takes anything MQTT can frame, and a message that came in under our own (smaller)
    /// maximum stays frameable: then nothing is measured.
    pub(super) fn fits_len(&self, len: impl FnOnce() -> usize) -> bool {
        (self.peer_max_packet_size == u32::MAX && self.limits.max_packet_size < 256 * 1024 * 1024)
            || len() <= self.peer_max_packet_size as usize
    }

    pub(super) fn build_publish(&self, now: Instant, delivery: &Delivery, dup: bool) -> Publish {
        let message = &delivery.message;
        let mut publish = Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: message.topic.as_str().to_owned(),
            packet_id: None,
            properties: Properties::default(),
            payload: message.payload.clone(),
        };
        if self.version.is_v5() {
            publish.properties = message.properties.clone();
            // [MQTT-3.3.2-6]: forward the remaining lifetime.
            publish.properties.message_expiry_interval = message.remaining_expiry(now);
            publish
                .properties
                .subscription_identifiers
                .clone_from(&delivery.subscription_ids);
        }
        publish
    }

    /// Sends a PUBLISH the callers checked against the client's Maximum Packet Size, with a
    /// topic alias on the control flow where one applies (see `apply_alias`).
    pub(super) fn send_publish(&mut self, flow: Flow, mut packet: Packet) {
        // Aliases are connection-wide but streams are not ordered with each other, so data
        // flows always carry the full topic.
        if flow.is_control() && self.peer_topic_alias_maximum > 0 {
            self.apply_alias(&mut packet);
        }
        self.send_on(flow, &packet);
    }

    /// Replaces the topic by an alias the client already knows, or teaches it a new one
    /// while its Topic Alias Maximum and our `max_topic_alias_bytes` allow [MQTT-3.3.2-11]
    /// (the table we keep is held for the connection's life) — in place, without copying the
    /// packet, and only if the aliased form still fits the client's Maximum Packet Size (the
    /// alias property adds bytes) [MQTT-3.1.2-24].
    pub(super) fn apply_alias(&mut self, packet: &mut Packet) {
        let Packet::Publish(publish) = packet else {
            return;
        };
        let outbound = self.aliases.as_ref().map(|a| &a.outbound);
        let known = outbound.and_then(|o| o.get(&publish.topic).copied());
        let next = outbound.map_or(0, HashMap::len) + 1;
        let held = self.aliases.as_ref().map_or(0, |a| a.outbound_bytes);
        let budget = self.limits.max_topic_alias_bytes;
        let affordable = budget == 0 || held + alias_cost(&publish.topic) <= budget;
        let alias = match known {
            Some(alias) => alias,
            None if next <= usize::from(self.peer_topic_alias_maximum) && affordable => {
                u16::try_from(next).expect("bounded by a u16 maximum")
            }
            None => return,
        };
        publish.properties.topic_alias = Some(alias);
        // A known alias stands for the topic; a new one is sent with it.
        let topic = if known.is_some() {
            std::mem::take(&mut publish.topic)
        } else {
            String::new()
        };
        if self.fits(packet) {
            if let (None, Packet::Publish(publish)) = (known, &*packet) {
                let aliases = self.aliases.get_or_insert_with(Box::default);
                aliases.outbound_bytes += alias_cost(&publish.topic);
                aliases.outbound.insert(publish.topic.clone(), alias);
            }
        } else if let Packet::Publish(publish) = packet {
            publish.properties.topic_alias = None;
            if known.is_some() {
                publish.topic = topic;
            }
        }
    }
}
