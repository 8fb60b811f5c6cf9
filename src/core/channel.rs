//! The per-connection MQTT protocol state machine, from the first byte to the close.
//!
//! A `Channel` takes decoded packets, decode errors, deliveries and timeouts, each with `now`,
//! and produces encoded bytes to write (`out`) and [`Action`]s for the broker shell: find the
//! session for a CONNECT, route a message, (un)subscribe in the router, close. It owns the
//! connection-scoped state (keep-alive, topic aliases, the peer's limits) and, once accepted,
//! the client's [`Session`]. It never touches sockets, tasks or the clock.
//!
//! Contract for the driver: after every input, drain `poll_action` until `None`, write `out`,
//! and re-arm one timer to `poll_timeout`. Deliveries are offered only while `can_deliver`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::codec::{
    self, Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, ProtocolVersion,
    Publish, PublishRef, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions, UnsubAck,
    Unsubscribe,
};
use crate::core::access::{Access, Authorizer};
use crate::core::message::{Delivery, Flow, Message};
use crate::core::session::{Outgoing, Session, Subscription};
use crate::core::topic::{validate_topic_name, TopicFilter};

/// Broker-wide protocol limits and capabilities, announced in CONNACK and enforced here.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_packet_size: u32,
    /// Our Receive Maximum: inbound QoS 2 messages awaiting PUBREL per connection.
    pub receive_maximum: u16,
    /// Cap on outgoing unacknowledged QoS 1/2 messages, whatever the client allows.
    pub max_inflight: u16,
    pub topic_alias_maximum: u16,
    /// Server Keep Alive ceiling in seconds (0: no ceiling).
    pub max_keepalive: u16,
    pub maximum_qos: QoS,
    pub retain_available: bool,
    pub wildcard_subscription_available: bool,
    pub shared_subscription_available: bool,
    pub subscription_identifiers_available: bool,
    /// Topic levels allowed in names and filters (0: no limit).
    pub max_topic_levels: usize,
    pub max_client_id_len: usize,
    /// Subscriptions per session (0: no limit).
    pub max_subscriptions: usize,
    pub connect_timeout: Duration,
    /// Session expiry given to 3.1 / 3.1.1 clients that connect with clean session 0.
    pub v3_session_expiry: u32,
    /// Ceiling on the Session Expiry Interval a v5 client may ask for.
    pub max_session_expiry: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            receive_maximum: 100,
            max_inflight: 128,
            topic_alias_maximum: 65535,
            max_keepalive: 65535,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            wildcard_subscription_available: true,
            shared_subscription_available: true,
            subscription_identifiers_available: true,
            max_topic_levels: 128,
            max_client_id_len: 65535,
            max_subscriptions: 0,
            connect_timeout: Duration::from_secs(10),
            v3_session_expiry: 2 * 60 * 60,
            max_session_expiry: u32::MAX,
        }
    }
}

/// Who ended a connection (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    Client,
    Broker,
    Transport,
}

/// A will message waiting for its connection to end abnormally.
#[derive(Debug, Clone)]
pub struct PendingWill {
    /// The will as it will be routed; its `expires_at` is set only when it is published.
    pub message: Message,
    /// Will Delay Interval in seconds (0: publish at once).
    pub delay: u32,
    /// The will's Message Expiry Interval, which runs from publication, not from CONNECT
    /// [MQTT-3.1.3-9: "sent as the Publication Expiry Interval when the Server publishes"].
    pub expiry_interval: Option<u32>,
}

impl PendingWill {
    /// The message to route when the will is published at `now`.
    pub fn into_message(self, now: Instant) -> Message {
        let mut message = self.message;
        message.expires_at = self
            .expiry_interval
            .map(|secs| now + Duration::from_secs(u64::from(secs)));
        message
    }
}

#[derive(Debug)]
pub struct Close {
    pub reason: ReasonCode,
    pub initiator: Initiator,
    /// The will to publish (after its delay), when the close calls for it.
    pub will: Option<PendingWill>,
    /// The session, when one was accepted: the shell keeps it offline or discards it.
    pub session: Option<Session>,
}

/// What the broker shell must do on the channel's behalf.
#[derive(Debug)]
pub enum Action {
    /// CONNECT passed validation: take over or create the session, then call
    /// [`Channel::accept`] (or [`Channel::reject`]).
    Connect {
        client_id: Arc<str>,
        clean_start: bool,
    },
    Route(Arc<Message>),
    Subscribe {
        subscription: Subscription,
        send_retained: bool,
    },
    /// Remove the router's mirror of the session's subscription on `flow`.
    Unsubscribe {
        filter: TopicFilter,
        flow: Flow,
    },
    /// A data flow's stream must be closed (malformed input or a packet not allowed there);
    /// the connection lives on.
    CloseFlow(Flow),
    Close(Box<Close>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnect,
    AwaitSession,
    Connected,
    Closed,
}

/// Stop accepting deliveries while this many encoded bytes wait for the socket.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// A connection's topic aliases ([MQTT-3.3.2-7]: they last as long as the connection).
#[derive(Debug, Default)]
struct Aliases {
    /// Set by the client's PUBLISHes.
    inbound: HashMap<u16, String>,
    /// Set by ours, up to the client's Topic Alias Maximum.
    outbound: HashMap<String, u16>,
}

pub struct Channel {
    limits: Arc<Limits>,
    state: State,
    version: ProtocolVersion,
    out: BytesMut,
    actions: VecDeque<Action>,
    session: Option<Session>,
    client_id: Arc<str>,
    /// The id to give a client that sent none.
    assignable_id: AssignedClientId,
    assigned_client_id: bool,
    requested_expiry: u32,
    expiry: u32,
    /// Keep-alive as negotiated, in seconds (0: none).
    keep_alive: u16,
    server_keep_alive: Option<u16>,
    last_rx: Instant,
    connect_deadline: Instant,
    peer_receive_maximum: u16,
    peer_max_packet_size: u32,
    peer_topic_alias_maximum: u16,
    /// Topic aliases in both directions; boxed, as most clients use none.
    aliases: Option<Box<Aliases>>,
    /// Boxed: most connections have none, and the channel lives as long as they do.
    will: Option<Box<PendingWill>>,
    /// Open data flows with their pending output (QUIC multi-stream only).
    flows: Vec<(Flow, BytesMut)>,
    /// The flow of the packet being handled: replies go back on it.
    input_flow: Flow,
    /// The connection's username: CONNECT's, unless the transport vouched for an identity
    /// (a verified client certificate), which wins.
    username: Option<String>,
    username_from_transport: bool,
    /// CONNECT's password, until the shell takes it to authenticate.
    password: Option<Bytes>,
    /// Topic permissions, when the shell set an authorizer (none: everything allowed).
    access: Option<Box<AccessCheck>>,
    /// Deliveries dropped because they were expired or too large for the client.
    pub dropped: u64,
    /// Publishes, subscriptions and deliveries the authorizer refused.
    pub denied: u64,
}

/// An authorizer and this connection's answers from it, dropped when the rules change.
struct AccessCheck {
    authorizer: Arc<dyn Authorizer>,
    generation: u64,
    /// Per topic, the answer for each [`Access`] asked so far.
    cache: HashMap<Box<str>, [Option<bool>; 3]>,
}

/// Answers kept per connection; past this the cache starts over.
const ACCESS_CACHE_ENTRIES: usize = 256;

impl AccessCheck {
    fn allows(
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
    pub fn new(limits: Arc<Limits>, now: Instant, assignable_id: AssignedClientId) -> Self {
        let connect_deadline = now + limits.connect_timeout;
        Self {
            limits,
            state: State::AwaitConnect,
            version: ProtocolVersion::V311,
            out: BytesMut::new(),
            actions: VecDeque::new(),
            session: None,
            client_id: Arc::from(""),
            assignable_id,
            assigned_client_id: false,
            requested_expiry: 0,
            expiry: 0,
            keep_alive: 0,
            server_keep_alive: None,
            last_rx: now,
            connect_deadline,
            peer_receive_maximum: u16::MAX,
            peer_max_packet_size: u32::MAX,
            peer_topic_alias_maximum: 0,
            aliases: None,
            will: None,
            flows: Vec::new(),
            input_flow: Flow::CONTROL,
            username_from_transport: false,
            username: None,
            password: None,
            access: None,
            dropped: 0,
            denied: 0,
        }
    }

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
    pub fn set_authorizer(&mut self, authorizer: Arc<dyn Authorizer>) {
        self.access = Some(Box::new(AccessCheck {
            generation: authorizer.generation(),
            authorizer,
            cache: HashMap::new(),
        }));
    }

    /// Whether this client may do `access` on `topic`; always true without an authorizer.
    fn allowed(&mut self, access: Access, topic: &str) -> bool {
        let Some(check) = self.access.as_deref_mut() else {
            return true;
        };
        check.allows(&self.client_id, self.username.as_deref(), access, topic)
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Encoded bytes waiting to be written; the driver writes and clears (or advances) them.
    pub fn out(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// A data flow was opened by the client (QUIC multi-stream). Input on it must not be fed
    /// before the channel is connected.
    pub fn open_flow(&mut self, flow: Flow) {
        if !flow.is_control() && !self.flows.iter().any(|(f, _)| *f == flow) {
            self.flows.push((flow, BytesMut::new()));
        }
    }

    /// Hands each data flow's pending output to `write`, leaving the buffers empty.
    pub fn drain_flow_output(&mut self, mut write: impl FnMut(Flow, &mut BytesMut)) {
        for (flow, out) in &mut self.flows {
            if !out.is_empty() {
                write(*flow, out);
            }
        }
    }

    /// A data flow's stream ended (reset, finished or failed). Its subscriptions move to the
    /// control flow and what was in flight on it is resent there, so a persistent session
    /// loses nothing when one stream dies.
    pub fn handle_flow_closed(&mut self, now: Instant, flow: Flow) {
        if flow.is_control() {
            return self.handle_transport_closed();
        }
        self.flows.retain(|(f, _)| *f != flow);
        if self.state != State::Connected {
            return;
        }
        for (id, state) in self.rehome(flow) {
            self.resend_outgoing(now, id, state);
        }
    }

    /// Moves a gone flow's subscriptions, in-flight messages and QoS 2 state to the control
    /// flow, mirrors the move in the router, and returns the in-flight entries that moved.
    fn rehome(&mut self, flow: Flow) -> Vec<(u16, Outgoing)> {
        let Some(session) = self.session.as_mut() else {
            return Vec::new();
        };
        let in_flight: Vec<(u16, Outgoing)> = session
            .outgoing()
            .filter(|(_, o)| o.flow() == flow)
            .cloned()
            .collect();
        for (old, new) in session.rehome(flow) {
            self.actions.push_back(Action::Unsubscribe {
                filter: old.filter,
                flow,
            });
            if let Some(subscription) = new {
                self.actions.push_back(Action::Subscribe {
                    subscription,
                    send_retained: false,
                });
            }
        }
        in_flight
    }

    /// [MQTT-4.4.0-1]: an unacknowledged PUBLISH goes again with DUP set, a PUBREL again as is,
    /// on the control flow.
    fn resend_outgoing(&mut self, now: Instant, id: u16, state: Outgoing) {
        match state {
            Outgoing::Publish(mut delivery) => {
                delivery.flow = Flow::CONTROL;
                self.resend(now, &delivery, id);
            }
            Outgoing::Release(_) => self.send(&Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS))),
        }
    }

    /// Malformed input on a flow: a data flow alone is closed, the control flow takes the
    /// connection with it.
    pub fn handle_flow_error(&mut self, now: Instant, flow: Flow, err: &DecodeError) {
        if flow.is_control() {
            return self.handle_decode_error(err);
        }
        self.actions.push_back(Action::CloseFlow(flow));
        self.handle_flow_closed(now, flow);
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Gives back the memory that empty buffers and queues still hold, for a connection gone
    /// quiet (an idle connection should cost its state, not its last burst's buffers).
    pub fn trim(&mut self) {
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
        if self.actions.is_empty() && self.actions.capacity() > 0 {
            self.actions = VecDeque::new();
        }
        if let Some(session) = &mut self.session {
            session.trim();
        }
    }

    /// The next instant at which `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitConnect | State::AwaitSession => Some(self.connect_deadline),
            State::Connected if self.keep_alive > 0 => {
                // [MQTT-3.1.2-24]: one and a half times the keep-alive.
                Some(self.last_rx + Duration::from_millis(u64::from(self.keep_alive) * 1500))
            }
            _ => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::AwaitConnect | State::AwaitSession if now >= self.connect_deadline => {
                self.close(
                    ReasonCode::MAXIMUM_CONNECT_TIME,
                    Initiator::Broker,
                    false,
                    false,
                );
            }
            State::Connected if self.poll_timeout().is_some_and(|deadline| now >= deadline) => {
                self.close(
                    ReasonCode::KEEP_ALIVE_TIMEOUT,
                    Initiator::Broker,
                    true,
                    true,
                );
            }
            _ => {}
        }
    }

    /// The peer closed the stream or it failed: an abnormal end unless DISCONNECT came first.
    pub fn handle_transport_closed(&mut self) {
        if self.state != State::Closed {
            self.close(
                ReasonCode::UNSPECIFIED_ERROR,
                Initiator::Transport,
                false,
                true,
            );
        }
    }

    /// The broker is stopping: v5 clients hear "Server shutting down"; no will is published.
    pub fn handle_shutdown(&mut self) {
        if self.state != State::Closed {
            self.close(
                ReasonCode::SERVER_SHUTTING_DOWN,
                Initiator::Broker,
                true,
                false,
            );
        }
    }

    /// Another connection claimed this client id [MQTT-3.1.4-3].
    pub fn handle_takeover(&mut self) {
        if self.state != State::Closed {
            self.close(
                ReasonCode::SESSION_TAKEN_OVER,
                Initiator::Broker,
                true,
                true,
            );
        }
    }

    pub fn handle_decode_error(&mut self, err: &DecodeError) {
        match (self.state, err) {
            (State::Closed, _) => {}
            (State::AwaitConnect, DecodeError::UnsupportedProtocol { .. }) => {
                // Answered in the 3.1.1 form (return code 1): a client of an unknown level
                // cannot read a v5 CONNACK [MQTT-3.1.2-2].
                self.version = ProtocolVersion::V311;
                self.send(&Packet::ConnAck(ConnAck {
                    session_present: false,
                    code: ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
                    properties: Properties::default(),
                }));
                self.close(err.reason_code(), Initiator::Client, false, false);
            }
            (State::AwaitConnect, _) => {
                self.close(err.reason_code(), Initiator::Client, false, false)
            }
            _ => self.close(err.reason_code(), Initiator::Client, true, true),
        }
    }

    /// A packet on the control flow (the only flow of TCP, TLS and WebSocket connections).
    pub fn handle_packet(&mut self, now: Instant, packet: Packet) {
        self.handle_flow_packet(now, Flow::CONTROL, packet);
    }

    /// A packet on `flow`. Data flows carry only PUBLISH, its acks, SUBSCRIBE and UNSUBSCRIBE
    /// (the EMQX mapping); anything else closes that flow alone, except PINGREQ, which counts
    /// as traffic but gets no answer there.
    pub fn handle_flow_packet(&mut self, now: Instant, flow: Flow, packet: Packet) {
        if !flow.is_control() {
            if self.state != State::Connected {
                // The driver must hold data flows until CONNACK; one that did not is dropped.
                self.actions.push_back(Action::CloseFlow(flow));
                return;
            }
            let allowed = matches!(
                packet,
                Packet::Publish(_)
                    | Packet::PubAck(_)
                    | Packet::PubRec(_)
                    | Packet::PubRel(_)
                    | Packet::PubComp(_)
                    | Packet::Subscribe(_)
                    | Packet::Unsubscribe(_)
                    | Packet::PingReq
            );
            if !allowed {
                self.actions.push_back(Action::CloseFlow(flow));
                self.handle_flow_closed(now, flow);
                return;
            }
            self.last_rx = now;
            if matches!(packet, Packet::PingReq) {
                return;
            }
            self.input_flow = flow;
            self.handle_connected(now, packet);
            self.input_flow = Flow::CONTROL;
            return;
        }
        match self.state {
            State::AwaitConnect => match packet {
                Packet::Connect(connect) => self.handle_connect(now, *connect),
                // [MQTT-3.1.0-1] the first packet must be CONNECT.
                _ => self.close(ReasonCode::PROTOCOL_ERROR, Initiator::Client, false, false),
            },
            // Nothing may follow CONNECT before CONNACK is sent; the driver holds input
            // while the session is being fetched, so anything here is a protocol error.
            State::AwaitSession => {
                self.close(ReasonCode::PROTOCOL_ERROR, Initiator::Client, false, true)
            }
            State::Connected => {
                self.last_rx = now;
                self.handle_connected(now, packet);
            }
            State::Closed => {}
        }
    }

    fn handle_connected(&mut self, now: Instant, packet: Packet) {
        match packet {
            Packet::Publish(publish) => self.handle_publish(now, publish),
            Packet::PubAck(ack) => {
                if let Some(session) = self.session.as_mut() {
                    session.complete(ack.packet_id, false);
                }
            }
            Packet::PubRec(ack) => self.handle_pubrec(ack),
            Packet::PubRel(ack) => {
                let key = (self.input_flow, ack.packet_id);
                let known = self
                    .session
                    .as_mut()
                    .is_some_and(|s| s.awaiting_release.remove(&key));
                let reason = if known {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.reply(&Packet::PubComp(Ack::new(ack.packet_id, reason)));
            }
            Packet::PubComp(ack) => {
                if let Some(session) = self.session.as_mut() {
                    session.complete(ack.packet_id, true);
                }
            }
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.handle_unsubscribe(unsubscribe),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(disconnect) => self.handle_disconnect(disconnect),
            // Enhanced authentication is not offered, so AUTH is unexpected [MQTT-4.12.0-1];
            // a second CONNECT is a protocol error [MQTT-3.1.0-2]; the rest only servers send.
            Packet::Auth(_)
            | Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => self.protocol_error(ReasonCode::PROTOCOL_ERROR),
        }
    }

    fn handle_connect(&mut self, now: Instant, connect: Connect) {
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
        if props.authentication_method.is_some() {
            return self.refuse(ReasonCode::BAD_AUTHENTICATION_METHOD);
        }
        if let Some(will) = &connect.will {
            if validate_topic_name(&will.topic, limits.max_topic_levels).is_err() {
                return self.refuse(ReasonCode::TOPIC_NAME_INVALID);
            }
            if will.qos > limits.maximum_qos {
                return self.refuse(ReasonCode::QOS_NOT_SUPPORTED);
            }
            if will.retain && !limits.retain_available {
                return self.refuse(ReasonCode::RETAIN_NOT_SUPPORTED);
            }
        }

        self.peer_receive_maximum = props.receive_maximum.unwrap_or(u16::MAX);
        self.peer_max_packet_size = props.maximum_packet_size.unwrap_or(u32::MAX);
        self.peer_topic_alias_maximum = props.topic_alias_maximum.unwrap_or(0);

        self.keep_alive = connect.keep_alive;
        if v5
            && limits.max_keepalive > 0
            && (connect.keep_alive == 0 || connect.keep_alive > limits.max_keepalive)
        {
            self.keep_alive = limits.max_keepalive;
            self.server_keep_alive = Some(limits.max_keepalive);
        }

        self.requested_expiry = if v5 {
            props.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            limits.v3_session_expiry
        };
        self.expiry = self.requested_expiry.min(limits.max_session_expiry);

        self.will = connect.will.map(|will| {
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
            let mut message =
                Message::from_publish(publish, Some(Arc::from(client_id.as_str())), now);
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
        }
        self.send(&Packet::ConnAck(ConnAck {
            session_present,
            code: ReasonCode::SUCCESS,
            properties,
        }));
        self.state = State::Connected;

        // The flows of the previous connection are gone: their subscriptions and state move
        // to the control flow until the client subscribes again on new streams.
        let old_flows = session.data_flows();
        self.session = Some(session);
        for flow in old_flows {
            self.rehome(flow);
        }
        // [MQTT-4.4.0-1]: resend unacknowledged PUBLISH (DUP set) and PUBREL, in order.
        let resend: Vec<(u16, Outgoing)> = self
            .session
            .iter()
            .flat_map(|s| s.outgoing().cloned())
            .collect();
        for (id, state) in resend {
            self.resend_outgoing(now, id, state);
        }
    }

    /// The shell could not serve the CONNECT (e.g. the old connection would not let go).
    pub fn reject(&mut self, code: ReasonCode) {
        if self.state == State::AwaitSession {
            self.refuse(code);
        }
    }

    fn refuse(&mut self, code: ReasonCode) {
        self.send(&Packet::ConnAck(ConnAck {
            session_present: false,
            code,
            properties: Properties::default(),
        }));
        self.will = None;
        self.close(code, Initiator::Broker, false, false);
    }

    fn handle_publish(&mut self, now: Instant, mut publish: Publish) {
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
                    None => return self.protocol_error(ReasonCode::TOPIC_ALIAS_INVALID),
                }
            } else {
                self.aliases
                    .get_or_insert_with(Box::default)
                    .inbound
                    .insert(alias, publish.topic.clone());
            }
        } else if publish.topic.is_empty() {
            return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
        }
        if validate_topic_name(&publish.topic, limits.max_topic_levels).is_err() {
            return self.protocol_error(ReasonCode::TOPIC_NAME_INVALID);
        }

        let mut refused = None;
        if publish.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&publish.payload).is_err()
        {
            refused = Some(ReasonCode::PAYLOAD_FORMAT_INVALID);
        } else if publish.topic.starts_with("$SYS/") || publish.topic == "$SYS" {
            // $SYS belongs to the broker: clients cannot inject into it.
            refused = Some(ReasonCode::NOT_AUTHORIZED);
        } else if !self.allowed(Access::Publish, &publish.topic) {
            // MQTT 5 hears 0x87; 3.1.1 has no negative ack, so the message is acknowledged
            // and dropped, as Mosquitto does.
            self.denied += 1;
            refused = Some(ReasonCode::NOT_AUTHORIZED);
        }

        let id = publish.packet_id.unwrap_or(0);
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let reason = refused.unwrap_or(ReasonCode::SUCCESS);
                self.reply(&Packet::PubAck(Ack::new(id, reason)));
            }
            QoS::ExactlyOnce => {
                let Some(session) = self.session.as_mut() else {
                    return;
                };
                let key = (self.input_flow, id);
                if session.awaiting_release.contains(&key) {
                    // A resend of a message we already have [MQTT-4.3.3-9]: acknowledge again,
                    // never route twice.
                    self.reply(&Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)));
                    return;
                }
                if refused.is_none() {
                    if session.awaiting_release.len() >= usize::from(limits.receive_maximum) {
                        return self.protocol_error(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
                    }
                    session.awaiting_release.insert(key);
                }
                let reason = refused.unwrap_or(ReasonCode::SUCCESS);
                self.reply(&Packet::PubRec(Ack::new(id, reason)));
            }
        }
        if refused.is_none() {
            let message = Message::from_publish(publish, Some(Arc::clone(&self.client_id)), now);
            self.actions.push_back(Action::Route(Arc::new(message)));
        }
    }

    fn handle_pubrec(&mut self, ack: Ack) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if ack.reason.is_failure() {
            session.abandon(ack.packet_id);
            return;
        }
        let reason = if session.received(ack.packet_id).is_some() {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        self.reply(&Packet::PubRel(Ack::new(ack.packet_id, reason)));
    }

    fn handle_subscribe(&mut self, subscribe: Subscribe) {
        let limits = Arc::clone(&self.limits);
        let id = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        if id.is_some() && !limits.subscription_identifiers_available {
            return self.protocol_error(ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED);
        }
        // [MQTT-3.8.3-4]: No Local on a shared subscription is a protocol error.
        if subscribe
            .filters
            .iter()
            .any(|(f, o)| o.no_local && is_shared(f))
        {
            return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
        }
        let mut reasons = Vec::with_capacity(subscribe.filters.len());
        for (raw, options) in subscribe.filters {
            let reason = self.subscribe_one(&raw, options, id, &limits);
            reasons.push(reason);
        }
        self.reply(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
    }

    fn subscribe_one(
        &mut self,
        raw: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
        limits: &Limits,
    ) -> ReasonCode {
        let Ok(filter) = TopicFilter::parse(raw, limits.max_topic_levels) else {
            return ReasonCode::TOPIC_FILTER_INVALID;
        };
        if filter.share_group().is_some() && !limits.shared_subscription_available {
            return ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED;
        }
        if filter.has_wildcards() && !limits.wildcard_subscription_available {
            return ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED;
        }
        if !self.allowed(Access::Subscribe, filter.filter()) {
            self.denied += 1;
            return ReasonCode::NOT_AUTHORIZED;
        }
        let Some(session) = self.session.as_mut() else {
            return ReasonCode::UNSPECIFIED_ERROR;
        };
        let flow = self.input_flow;
        let is_new = !session
            .subscriptions
            .contains_key(&(flow, filter.as_str().to_owned()));
        if is_new
            && limits.max_subscriptions > 0
            && session.subscriptions.len() >= limits.max_subscriptions
        {
            return ReasonCode::QUOTA_EXCEEDED;
        }
        let granted = options.qos.min(limits.maximum_qos);
        let subscription = Subscription {
            filter,
            options: SubscriptionOptions {
                qos: granted,
                ..options
            },
            id,
            flow,
        };
        session.subscribe(subscription.clone());
        // Retain Handling [MQTT-3.3.1-9, -10, -11]; shared subscriptions get no retained
        // messages on subscribe [MQTT-4.8.2-?] (as EMQX and Mosquitto do).
        let send_retained = subscription.filter.share_group().is_none()
            && match options.retain_handling {
                0 => true,
                1 => is_new,
                _ => false,
            };
        self.actions.push_back(Action::Subscribe {
            subscription,
            send_retained,
        });
        ReasonCode(granted as u8)
    }

    fn handle_unsubscribe(&mut self, unsubscribe: Unsubscribe) {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for raw in unsubscribe.filters {
            let flow = self.input_flow;
            let removed = self
                .session
                .as_mut()
                .and_then(|s| s.unsubscribe(flow, &raw));
            let reason = match removed {
                Some(subscription) => {
                    self.actions.push_back(Action::Unsubscribe {
                        filter: subscription.filter,
                        flow,
                    });
                    ReasonCode::SUCCESS
                }
                None if TopicFilter::parse(&raw, self.limits.max_topic_levels).is_err() => {
                    ReasonCode::TOPIC_FILTER_INVALID
                }
                None => ReasonCode::NO_SUBSCRIPTION_EXISTED,
            };
            reasons.push(reason);
        }
        if !self.version.is_v5() {
            reasons.clear();
        }
        self.reply(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            properties: Properties::default(),
            reasons,
        }));
    }

    fn handle_disconnect(&mut self, disconnect: Disconnect) {
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            // [MQTT-3.14.2-2]: a session that was to end with the connection cannot be
            // extended at DISCONNECT.
            if self.requested_expiry == 0 && expiry != 0 {
                return self.protocol_error(ReasonCode::PROTOCOL_ERROR);
            }
            self.expiry = expiry.min(self.limits.max_session_expiry);
            if let Some(session) = self.session.as_mut() {
                session.expiry_interval = self.expiry;
            }
        }
        // [MQTT-3.14.4-3]: a normal DISCONNECT discards the will; 0x04 keeps it.
        let keep_will = disconnect.reason == ReasonCode::DISCONNECT_WITH_WILL;
        self.close(disconnect.reason, Initiator::Client, false, keep_will);
    }

    fn protocol_error(&mut self, reason: ReasonCode) {
        self.close(reason, Initiator::Client, true, true);
    }

    fn close(
        &mut self,
        reason: ReasonCode,
        initiator: Initiator,
        send_disconnect: bool,
        publish_will: bool,
    ) {
        if self.state == State::Closed {
            return;
        }
        if send_disconnect && self.state == State::Connected && self.version.is_v5() {
            self.send(&Packet::Disconnect(Disconnect::new(reason)));
        }
        self.state = State::Closed;
        let will = if publish_will {
            self.will.take().map(|w| *w)
        } else {
            None
        };
        self.will = None;
        let session = self.session.take();
        self.actions.push_back(Action::Close(Box::new(Close {
            reason,
            initiator,
            will,
            session,
        })));
    }

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
            return;
        }
        if self.access.is_some() && !self.allowed(Access::Receive, &delivery.message.topic) {
            // A permission removed since the subscription was made, or a retained or will
            // message the client may not read: dropped, and counted as denied too.
            self.dropped += 1;
            self.denied += 1;
            return;
        }
        delivery.qos = delivery.qos.min(self.limits.maximum_qos);
        if !self.is_open(delivery.flow) {
            delivery.flow = Flow::CONTROL;
        }
        let flow = delivery.flow;
        let Err(delivery) = self.deliver_direct(delivery) else {
            return;
        };
        let mut publish = self.build_publish(now, &delivery, false);
        if delivery.qos != QoS::AtMostOnce {
            publish.packet_id = Some(u16::MAX); // same size as the id it will get
        }
        let mut packet = Packet::Publish(publish);
        if !self.fits(&packet) {
            self.dropped += 1;
            return;
        }
        if delivery.qos != QoS::AtMostOnce {
            let Some(session) = self.session.as_mut() else {
                return;
            };
            let Some(id) = session.track(delivery) else {
                self.dropped += 1;
                return;
            };
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
    fn deliver_direct(&mut self, delivery: Delivery) -> Result<(), Delivery> {
        let message = &delivery.message;
        if self.version.is_v5()
            && (!delivery.subscription_ids.is_empty()
                || message.expires_at.is_some()
                // Messages drop an emptied property set (`Message::from_publish`).
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
            packet_id: (qos != QoS::AtMostOnce).then_some(0),
            payload: &message.payload,
        };
        if !self.fits_len(|| publish.encoded_len(self.version)) {
            self.dropped += 1;
            return Ok(());
        }
        // Written first, then tracked (which takes the delivery) and the id filled in, so
        // the shared message is not even reference-counted once more.
        let flow = delivery.flow;
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
            Some(id) => out[id_at..id_at + 2].copy_from_slice(&id.to_be_bytes()),
            None => {
                out.truncate(start);
                self.dropped += 1;
            }
        }
        Ok(())
    }

    /// Resends an unacknowledged PUBLISH after reconnect; one that no longer fits the
    /// client's Maximum Packet Size is abandoned (counted) rather than kept forever.
    fn resend(&mut self, now: Instant, delivery: &Delivery, id: u16) {
        let mut publish = self.build_publish(now, delivery, true);
        publish.packet_id = Some(id);
        let packet = Packet::Publish(publish);
        if self.fits(&packet) {
            self.send_publish(delivery.flow, packet);
        } else if let Some(session) = self.session.as_mut() {
            session.abandon(id);
            self.dropped += 1;
        }
    }

    fn fits(&self, packet: &Packet) -> bool {
        self.fits_len(|| codec::encoded_len(packet, self.version))
    }

    /// Whether a packet of `len()` bytes may go to the client. A client that set no maximum
    /// takes anything MQTT can frame, and a message that came in under our own (smaller)
    /// maximum stays frameable: then nothing is measured.
    fn fits_len(&self, len: impl FnOnce() -> usize) -> bool {
        (self.peer_max_packet_size == u32::MAX && self.limits.max_packet_size < 256 * 1024 * 1024)
            || len() <= self.peer_max_packet_size as usize
    }

    fn build_publish(&self, now: Instant, delivery: &Delivery, dup: bool) -> Publish {
        let message = &delivery.message;
        let mut publish = Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic: message.topic.clone(),
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
    fn send_publish(&mut self, flow: Flow, mut packet: Packet) {
        // Aliases are connection-wide but streams are not ordered with each other, so data
        // flows always carry the full topic.
        if flow.is_control() && self.peer_topic_alias_maximum > 0 {
            self.apply_alias(&mut packet);
        }
        self.send_on(flow, &packet);
    }

    /// Replaces the topic by an alias the client already knows, or teaches it a new one
    /// while its Topic Alias Maximum allows [MQTT-3.3.2-11] — in place, without copying the
    /// packet, and only if the aliased form still fits the client's Maximum Packet Size (the
    /// alias property adds bytes) [MQTT-3.1.2-24].
    fn apply_alias(&mut self, packet: &mut Packet) {
        let Packet::Publish(publish) = packet else {
            return;
        };
        let outbound = self.aliases.as_ref().map(|a| &a.outbound);
        let known = outbound.and_then(|o| o.get(&publish.topic).copied());
        let next = outbound.map_or(0, HashMap::len) + 1;
        let alias = match known {
            Some(alias) => alias,
            None if next <= usize::from(self.peer_topic_alias_maximum) => {
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
                self.aliases
                    .get_or_insert_with(Box::default)
                    .outbound
                    .insert(publish.topic.clone(), alias);
            }
        } else if let Packet::Publish(publish) = packet {
            publish.properties.topic_alias = None;
            if known.is_some() {
                publish.topic = topic;
            }
        }
    }

    /// Answers on the flow of the packet being handled.
    fn reply(&mut self, packet: &Packet) {
        self.send_on(self.input_flow, packet);
    }

    /// Encodes onto `flow`'s output, or the control flow's if `flow` is not open.
    fn send_on(&mut self, flow: Flow, packet: &Packet) {
        let version = self.version;
        codec::encode(
            packet,
            version,
            flow_out(&mut self.flows, &mut self.out, flow),
        );
    }

    fn is_open(&self, flow: Flow) -> bool {
        flow.is_control() || self.flows.iter().any(|(f, _)| *f == flow)
    }

    fn send(&mut self, packet: &Packet) {
        codec::encode(packet, self.version, &mut self.out);
    }
}

/// The output of `flow` among the open data flows, or the control flow's `out` if that flow
/// is not open.
fn flow_out<'a>(
    flows: &'a mut [(Flow, BytesMut)],
    out: &'a mut BytesMut,
    flow: Flow,
) -> &'a mut BytesMut {
    if !flow.is_control() {
        if let Some((_, flow_out)) = flows.iter_mut().find(|(f, _)| *f == flow) {
            return flow_out;
        }
    }
    out
}

fn is_shared(filter: &str) -> bool {
    filter.starts_with("$share/") || filter.starts_with("$queue/")
}

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

#[cfg(test)]
#[path = "channel_tests.rs"]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests;
