//! CONNECT to CONNACK: validation, the client id, will and session negotiation, the
//! answer the shell gives (`accept`/`reject`), and the identity and topic permissions that
//! authentication leaves on the connection.

use super::*;

/// The client id a client that sent none is given [MQTT-3.1.3-6]. The shell draws it per
/// connection (randomness is an input here, like time): `serial` makes it unique within the
/// process, `secret` hard to guess. It is formatted only when used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AssignedClientId {
    pub secret: u64,
    pub serial: u64,
}

impl AssignedClientId {
    fn to_client_id(self) -> String {
        format!("petrel-{:016x}{:x}", self.secret, self.serial)
    }
}

/// An authorizer and this connection's answers from it, dropped when the rules change.
pub(super) struct AccessCheck {
    authorizer: Arc<dyn Authorizer>,
    generation: u64,
    /// Per topic, the answer for each [`Access`] asked so far.
    cache: HashMap<Box<str>, [Option<bool>; 3]>,
}

/// Answers kept per connection; past this the cache starts over.
const ACCESS_CACHE_ENTRIES: usize = 256;

impl AccessCheck {
    pub(super) fn allows(
        &mut self,
        client_id: &str,
        username: Option<&str>,
        access: Access,
        topic: &str,
    ) -> bool {
        let generation = self.authorizer.generation();
        if generation != self.generation {
            self.generation = generation;
            self.cache.clear();
        }
        let slot = access as usize;
        if let Some(answer) = self.cache.get(topic).and_then(|answers| answers[slot]) {
            return answer;
        }
        let answer = self.authorizer.allows(client_id, username, access, topic);
        if self.cache.len() >= ACCESS_CACHE_ENTRIES && !self.cache.contains_key(topic) {
            self.cache.clear();
        }
        self.cache.entry(Box::from(topic)).or_default()[slot] = Some(answer);
        answer
    }
}

impl Channel {
    /// Sets the username the transport established (e.g. from a client certificate's CN); it
    /// replaces whatever username CONNECT carries.
    pub fn set_peer_username(&mut self, username: String) {
        self.username = Some(username);
        self.username_from_transport = true;
    }

    /// The connection's username: the transport's identity if any, else CONNECT's.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// Whether the username came from the transport (a verified client certificate).
    pub fn username_is_certified(&self) -> bool {
        self.username_from_transport
    }

    /// CONNECT's password, handed over once for authentication.
    pub fn take_password(&mut self) -> Option<Bytes> {
        self.password.take()
    }

    /// The topic of the will CONNECT carried, for the shell's permission check.
    pub fn will_topic(&self) -> Option<&str> {
        self.will.as_ref().map(|will| &*will.message.topic)
    }

    /// Checks every PUBLISH, SUBSCRIBE and delivery against `authorizer` from now on.
    /// Answers broker-wide questions (exclusive subscriptions, the delayed quota).
    pub fn set_admission(&mut self, admission: Arc<dyn Admission>) {
        self.admission = Some(admission);
    }

    pub fn set_authorizer(&mut self, authorizer: Arc<dyn Authorizer>) {
        self.access = Some(Box::new(AccessCheck {
            generation: authorizer.generation(),
            authorizer,
            cache: HashMap::new(),
        }));
    }

    /// Whether this client may do `access` on `topic`; always true without an authorizer.
    pub(super) fn allowed(&mut self, access: Access, topic: &str) -> bool {
        let Some(check) = self.access.as_deref_mut() else {
            return true;
        };
        check.allows(&self.client_id, self.username.as_deref(), access, topic)
    }

    pub(super) fn handle_connect(&mut self, now: Instant, mut connect: Connect) {
        self.version = connect.protocol;
        self.last_rx = now;
        let limits = Arc::clone(&self.limits);
        let v5 = self.version.is_v5();

        // Client identifier: 3.1 requires one; 3.1.1 allows an empty one only with a clean
        // session [MQTT-3.1.3-7, -8]; v5 assigns one to any empty id [MQTT-3.1.3-6].
        let mut client_id = connect.client_id;
        if client_id.is_empty() {
            let allowed = match self.version {
                ProtocolVersion::V31 => false,
                ProtocolVersion::V311 => connect.clean_start,
                ProtocolVersion::V5 => true,
            };
            if !allowed {
                return self.refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
            }
            client_id = self.assignable_id.to_client_id();
            self.assigned_client_id = true;
        }
        if client_id.len() > limits.max_client_id_len {
            return self.refuse(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        }

        let props = &connect.properties;
        if props.authentication_data.is_some() && props.authentication_method.is_none() {
            // §3.1.2.11.10: Authentication Data without a method is a Protocol Error.
            return self.refuse(ReasonCode::PROTOCOL_ERROR);
        }
        let mut will_topic = None;
        if let Some(will) = &mut connect.will {
            let topic = std::mem::take(&mut will.topic);
            let Ok(topic) = TopicName::parse(topic, limits.max_topic_levels) else {
                return self.refuse(ReasonCode::TOPIC_NAME_INVALID);
            };
            will_topic = Some(topic);
            // [MQTT-3.3.2-14]: a Response Topic is a topic name, without wildcards.
            if let Some(response) = &will.properties.response_topic {
                if validate_topic_name(response, 0).is_err() {
                    return self.refuse(ReasonCode::PROTOCOL_ERROR);
                }
            }
            if will.qos > limits.maximum_qos {
                return self.refuse(ReasonCode::QOS_NOT_SUPPORTED);
            }
            if will.retain && !limits.retain_available {
                return self.refuse(ReasonCode::RETAIN_NOT_SUPPORTED);
            }
        }

        // The client's Receive Maximum bounds the window (it lives on only there).
        let peer_receive_maximum = props.receive_maximum.unwrap_or(u16::MAX);
        self.window = Window::new(
            limits.min_inflight,
            limits.max_inflight.min(peer_receive_maximum),
            now,
        );
        self.peer_max_packet_size = props.maximum_packet_size.unwrap_or(u32::MAX);
        self.peer_topic_alias_maximum = props.topic_alias_maximum.unwrap_or(0);

        self.keep_alive = connect.keep_alive;
        if limits.max_keepalive > 0
            && (connect.keep_alive == 0 || connect.keep_alive > limits.max_keepalive)
        {
            // A v5 client is told (Server Keep Alive, [MQTT-3.2.2-21]); a 3.1/3.1.1 client
            // cannot be, so the ceiling holds on our side alone: silent for 1.5 times
            // `mqtt.max_keepalive`, it is closed like any client past its keep-alive
            // (Mosquitto refuses such a CONNECT instead; closing an idle one breaks less).
            self.keep_alive = limits.max_keepalive;
            if v5 {
                self.server_keep_alive = Some(limits.max_keepalive);
            }
        }

        self.requested_expiry = if v5 {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            limits.v3_session_expiry
        };
        self.expiry = self.requested_expiry.min(limits.max_session_expiry);

        self.will = connect.will.zip(will_topic).map(|(will, topic)| {
            let mut properties = will.properties;
            let delay = properties.will_delay_interval.take().unwrap_or(0);
            let publish = Publish {
                dup: false,
                qos: will.qos,
                retain: will.retain,
                topic: will.topic,
                packet_id: None,
                properties,
                payload: will.payload,
            };
            let expiry_interval = publish.properties.message_expiry_interval;
            let publisher = Some(Arc::from(client_id.as_str()));
            let mut message = AppMessage::from_publish(topic, publish, publisher, now);
            message.expires_at = None;
            Box::new(PendingWill {
                message,
                delay,
                expiry_interval,
            })
        });

        if !self.username_from_transport {
            self.username = connect.username;
        }
        self.password = connect.password;
        self.client_id = Arc::from(client_id);
        // MQTT 5 enhanced authentication (§4.12) runs first; an unknown method is the
        // shell's to refuse (0x8C).
        if let Some(method) = connect.properties.authentication_method.take() {
            let data = connect.properties.authentication_data.take();
            return self.start_enhanced(method, data, connect.clean_start);
        }
        self.state = State::AwaitSession;
        self.actions.push_back(Action::Connect {
            client_id: Arc::clone(&self.client_id),
            clean_start: connect.clean_start,
        });
    }

    /// The shell found (or made) the session: send CONNACK and resend what was in flight.
    /// `session` is `None` for a new session.
    pub fn accept(&mut self, now: Instant, session: Option<Session>) {
        if self.state != State::AwaitSession {
            return;
        }
        let session_present = session.is_some();
        let mut session = session.unwrap_or_else(|| Session::new(Arc::clone(&self.client_id), 0));
        session.expiry_interval = self.expiry;
        self.durable = self.limits.durable && self.expiry != 0;

        let mut properties = Properties::default();
        if self.version.is_v5() {
            let limits = &self.limits;
            properties.receive_maximum = Some(limits.receive_maximum);
            properties.maximum_packet_size = Some(limits.max_packet_size);
            properties.topic_alias_maximum = Some(limits.topic_alias_maximum);
            properties.retain_available = Some(u8::from(limits.retain_available));
            properties.wildcard_subscription_available =
                Some(u8::from(limits.wildcard_subscription_available));
            properties.subscription_identifier_available =
                Some(u8::from(limits.subscription_identifiers_available));
            properties.shared_subscription_available =
                Some(u8::from(limits.shared_subscription_available));
            if limits.maximum_qos < QoS::ExactlyOnce {
                properties.maximum_qos = Some(limits.maximum_qos as u8);
            }
            properties.server_keep_alive = self.server_keep_alive;
            if self.assigned_client_id {
                properties.assigned_client_identifier = Some(self.client_id.to_string());
            }
            if self.expiry != self.requested_expiry {
                properties.session_expiry_interval = Some(self.expiry);
            }
            self.connack_auth(&mut properties);
            if let Some(confirmation) = self.datagram_confirmation.take() {
                properties.user_properties.push(*confirmation);
            }
        }
        let connack = Packet::ConnAck(ConnAck {
            session_present,
            code: ReasonCode::SUCCESS,
            properties,
        });
        if !self.fits(&connack) {
            // [MQTT-3.1.2-24]: not even the CONNACK fits the client's Maximum Packet Size, so
            // the connection cannot be served; the session is kept as if it had ended.
            self.session = Some(session);
            return self.close(
                ReasonCode::PACKET_TOO_LARGE,
                Initiator::Broker,
                false,
                false,
            );
        }
        self.send(&connack);
        self.state = State::Connected;

        // The flows of the previous connection are gone: their subscriptions and state move
        // to the control flow until the client subscribes again on new streams.
        let old_flows = session.data_flows();
        self.session = Some(session);
        for flow in old_flows {
            self.rehome(flow);
        }
        // [MQTT-4.4.0-1]: resend unacknowledged PUBLISH (DUP set) and PUBREL, in order.
        let resend: Vec<(PacketId, Outgoing)> = self
            .session
            .iter()
            .flat_map(|s| s.outgoing().cloned())
            .collect();
        let before = self.pending_output();
        for (id, state) in resend {
            self.resend_outgoing(now, id, state);
        }
        // Written at once, whatever the transport's room: allowed on top of the ceiling
        // (bounded by the in-flight window), so that a reconnecting slow reader is not
        // mistaken for one that never reads.
        self.resent = self.pending_output() - before;
    }

    /// The shell could not serve the CONNECT (e.g. the old connection would not let go).
    pub fn reject(&mut self, code: ReasonCode) {
        if self.state == State::AwaitSession {
            self.refuse(code);
        }
    }

    pub(super) fn refuse(&mut self, code: ReasonCode) {
        self.send(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        }));
        self.will = None;
        self.close(code, Initiator::Broker, false, false);
    }
}
