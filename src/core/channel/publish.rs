//! Inbound PUBLISH and its QoS handshakes: topic aliases, validation, permissions, QoS 2
//! deduplication under our Receive Maximum, routing.

use super::*;

impl Channel {
    pub(super) fn handle_publish(&mut self, now: Instant, mut publish: Publish) {
        let limits = Arc::clone(&self.limits);
        if publish.qos > limits.maximum_qos {
            return self.protocol_error(ReasonCode::QOS_NOT_SUPPORTED);
        }
        if publish.retain && !limits.retain_available {
            return self.protocol_error(ReasonCode::RETAIN_NOT_SUPPORTED);
        }
        // [MQTT-3.3.4-6]: only the server sends subscription identifiers.
        if !publish.properties.subscription_identifiers.is_empty() {
            return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
        }
        let alias = publish
            .properties
            .get_mut()
            .and_then(|set| set.topic_alias.take());
        if let Some(alias) = alias {
            // [MQTT-3.3.2-8], [MQTT-3.3.2-9]
            if alias == 0 || alias > limits.topic_alias_maximum {
                return self.protocol_error(ReasonCode::TOPIC_ALIAS_INVALID);
            }
            if publish.topic.is_empty() {
                match self.aliases.as_ref().and_then(|a| a.inbound.get(&alias)) {
                    Some(topic) => publish.topic.clone_from(topic),
                    // An alias never set, with no topic to set it to: a protocol error.
                    None => return self.protocol_error(ReasonCode::PROTOCOL_ERROR),
                }
            } else {
                let aliases = self.aliases.get_or_insert_with(Box::default);
                let cost = alias_cost(&publish.topic);
                let freed = aliases.inbound.get(&alias).map_or(0, |old| alias_cost(old));
                let held = aliases.inbound_bytes - freed + cost;
                if limits.max_topic_alias_bytes > 0 && held > limits.max_topic_alias_bytes {
                    // Within the Topic Alias Maximum (so not 0x94) but past a limit of ours:
                    // 0x97, "an implementation or administrative imposed limit".
                    tracing::debug!(
                        client_id = %self.client_id,
                        held,
                        "topic aliases past mqtt.max_topic_alias_bytes, disconnecting"
                    );
                    return self.protocol_error(ReasonCode::QUOTA_EXCEEDED);
                }
                aliases.inbound_bytes = held;
                aliases.inbound.insert(alias, publish.topic.clone());
            }
        } else if publish.topic.is_empty() {
            return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
        }
        if let Some(rewritten) = self.rewritten(RewriteAction::Publish, &publish.topic) {
            publish.topic = rewritten;
        }
        let topic = std::mem::take(&mut publish.topic);
        let topic = match TopicName::parse(topic, limits.max_topic_levels) {
            Ok(topic) => topic,
            // Wildcards in a topic name make the packet malformed, as Mosquitto treats it.
            Err(TopicError::WildcardInName) => {
                return self.protocol_error(ReasonCode::MALFORMED_PACKET)
            }
            Err(_) => return self.protocol_error(ReasonCode::TOPIC_NAME_INVALID),
        };
        // [MQTT-3.3.2-14]: a Response Topic is a topic name, without wildcards.
        if let Some(response) = &publish.properties.response_topic {
            if validate_topic_name(response, 0).is_err() {
                return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
            }
        }

        // `$delayed/{seconds}/{topic}`: checked and routed as `{topic}`, later.
        let (topic, delay) = self.delayed_target(topic);
        let mut refused = None;
        if delay == Delay::Invalid {
            // A `$delayed/` topic with a bad interval or no target: dropped and counted
            // (MQTT 5: PUBACK 0x90), as EMQX drops it.
            tracing::debug!(client_id = %self.client_id, "bad $delayed topic, dropped");
            self.dropped += 1;
            refused = Some(ReasonCode::TOPIC_NAME_INVALID);
        } else if publish.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&publish.payload).is_err()
        {
            refused = Some(ReasonCode::PAYLOAD_FORMAT_INVALID);
        } else if topic.is_sys() {
            // $SYS belongs to the broker: clients cannot inject into it.
            refused = Some(ReasonCode::NOT_AUTHORIZED);
        } else if !self.allowed(Access::Publish, &topic) {
            // MQTT 5 hears 0x87; 3.1.1 has no negative ack, so the message is acknowledged
            // and dropped, as Mosquitto does.
            self.denied += 1;
            refused = Some(ReasonCode::NOT_AUTHORIZED);
        } else if delay != Delay::None
            && !self.admission.as_ref().is_none_or(|a| a.reserve_delayed())
        {
            // Past `delayed.max_delayed_messages`.
            self.dropped += 1;
            refused = Some(ReasonCode::QUOTA_EXCEEDED);
        }

        // The decoder gives QoS 1 and 2 an id, and QoS 0 none.
        let mut ack = None;
        match (publish.qos, publish.packet_id) {
            (QoS::AtMostOnce, _) | (_, None) => {}
            (QoS::AtLeastOnce, Some(id)) => {
                ack = Some(PendingAck {
                    flow: self.input_flow,
                    id,
                    qos: QoS::AtLeastOnce,
                });
            }
            (QoS::ExactlyOnce, Some(id)) => {
                let Some(session) = self.session.as_mut() else {
                    return;
                };
                let key = (self.input_flow, id);
                if session.awaiting_release.contains(&key) {
                    // Written again, and the PUBREC held on it: what this acknowledges must be
                    // on disk (after a failed commit the memory may know more than the disk).
                    if self.durable {
                        self.changes.push_back(Change::Held {
                            flow: key.0,
                            id: key.1,
                        });
                    }
                    tracing::debug!(client_id = %self.client_id, %id, dup = publish.dup, "QoS 2 resend not routed again");
                    // A resend of a message we already have [MQTT-4.3.3-9]: acknowledge again,
                    // never route twice.
                    self.reply(&Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)));
                    return;
                }
                if refused.is_none()
                    && session.awaiting_release.len() >= usize::from(limits.receive_maximum)
                {
                    return self.protocol_error(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                }
                ack = Some(PendingAck {
                    flow: self.input_flow,
                    id,
                    qos: QoS::ExactlyOnce,
                });
            }
        }
        if let Some(reason) = refused {
            if let Some(ack) = ack {
                self.send_ack(ack, reason);
            }
            return;
        }
        let message =
            AppMessage::from_publish(topic, publish, Some(Arc::clone(&self.client_id)), now);
        let message = Arc::new(message);
        self.actions.push_back(match delay {
            Delay::After(after) => Action::Delay {
                message,
                at: now + after,
                ack,
            },
            _ => Action::Route { message, ack },
        });
    }

    /// The shell routed the message a PUBLISH carried: acknowledge it, or say why it could
    /// not be taken (`refused`, 0x97 when the durable store is full or failing). MQTT 3.1.1
    /// has no negative acknowledgement: the connection closes instead, so the client sends
    /// the message again on its next one.
    pub fn acknowledge(&mut self, ack: PendingAck, refused: Option<ReasonCode>) {
        if self.state != State::Connected {
            return;
        }
        if let Some(reason) = refused {
            if !self.version.is_v5() {
                return self.close(reason, Initiator::Broker, false, true);
            }
            return self.send_ack(ack, reason);
        }
        if ack.qos == QoS::ExactlyOnce {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            session.awaiting_release.insert((ack.flow, ack.id));
            if self.durable {
                self.changes.push_back(Change::Held {
                    flow: ack.flow,
                    id: ack.id,
                });
            }
        }
        self.send_ack(ack, ReasonCode::SUCCESS);
    }

    fn send_ack(&mut self, ack: PendingAck, reason: ReasonCode) {
        let packet = match ack.qos {
            QoS::ExactlyOnce => Packet::PubRec(Ack::new(ack.id, reason)),
            _ => Packet::PubAck(Ack::new(ack.id, reason)),
        };
        self.send_on(ack.flow, &packet);
    }

    /// For a `$delayed/{seconds}/{topic}` publish (when enabled): the target topic and the
    /// delay. Any other topic comes back as it is.
    fn delayed_target(&self, topic: TopicName) -> (TopicName, Delay) {
        if !self.limits.delayed_publish {
            return (topic, Delay::None);
        }
        let target = match delayed::parse(&topic) {
            None => return (topic, Delay::None),
            Some(Err(_)) => None,
            Some(Ok((after, target))) => {
                TopicName::parse(target.to_owned(), self.limits.max_topic_levels)
                    .ok()
                    .map(|target| (target, after))
            }
        };
        match target {
            Some((target, after)) => (target, Delay::After(after)),
            None => (topic, Delay::Invalid),
        }
    }

    pub(super) fn handle_pubrec(&mut self, ack: Ack) {
        if self.pubrec_for_qos1(ack.packet_id) {
            return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
        }
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if ack.reason.is_failure() {
            let key = session.abandon(ack.packet_id);
            self.window.forget(ack.packet_id);
            return self.forget(key);
        }
        let reason = match session.received(ack.packet_id) {
            Some((_, key)) => {
                self.window.on_round_trip();
                if let Some(key) = key {
                    self.changes.push_back(Change::Released {
                        key,
                        id: ack.packet_id,
                    });
                }
                ReasonCode::SUCCESS
            }
            None => ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
        };
        self.reply(&Packet::PubRel(Ack::new(ack.packet_id, reason)));
    }
}

/// What a PUBLISH topic says about delaying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delay {
    /// Not a `$delayed/` topic (or delayed publish is off).
    None,
    /// A `$delayed/` topic with a bad interval or target.
    Invalid,
    After(Duration),
}
