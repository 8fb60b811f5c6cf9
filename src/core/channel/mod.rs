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
//!
//! This file holds the state, the dispatch of inputs, timers and the close; each concern's
//! handlers are an `impl Channel` of their own: `connect` (CONNECT to CONNACK, identity and
//! permissions), `auth` (MQTT 5 enhanced authentication and re-authentication), `publish` (inbound PUBLISH and its handshakes), `subscribe`, `deliver`
//! (outbound PUBLISH) and `flows` (QUIC data streams).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::codec::{
    self, Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, PacketId, Properties,
    ProtocolVersion, Publish, PublishRef, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Unsubscribe,
};
use crate::core::access::{Access, Admission, Authorizer};
use crate::core::delayed;
use crate::core::message::{AppMessage, Delivery, Flow};
use crate::core::rewrite::{self, AutoSubscribe, RewriteAction, RewriteRule};
use crate::core::session::{Change, Completed, Outgoing, Session, StoreKey, Subscription};
use crate::core::topic::{validate_topic_name, TopicError, TopicFilter, TopicName};
use crate::core::window::Window;

mod auth;
mod connect;
mod deliver;
mod flows;
mod publish;
mod subscribe;

pub use auth::AuthStep;
use connect::AccessCheck;
pub use connect::AssignedClientId;
use flows::flow_out;

/// Broker-wide protocol limits and capabilities, announced in CONNACK and enforced here.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_packet_size: u32,
    /// The largest CONNECT accepted (checked by the codec from the fixed header).
    pub max_connect_packet_size: u32,
    /// Our Receive Maximum: inbound QoS 2 messages awaiting PUBREL per connection.
    pub receive_maximum: u16,
    /// Ceiling of the outgoing in-flight window (unacknowledged QoS 1/2 messages), whatever
    /// the client allows; the window moves between `min_inflight` and this (`core::window`).
    pub max_inflight: u16,
    /// Floor and starting size of the outgoing in-flight window (lowered to `max_inflight`).
    pub min_inflight: u16,
    pub topic_alias_maximum: u16,
    /// Bytes the client's topic aliases may hold (each topic plus a fixed per-entry cost;
    /// 0: no limit); past it DISCONNECT 0x97. Ours towards the client have the same budget
    /// (past it, topics go out in full).
    pub max_topic_alias_bytes: usize,
    /// User Properties in one packet (a CONNECT's and its will's together), enforced by the
    /// codec while decoding (0: no limit); past it DISCONNECT 0x97.
    pub max_user_properties: u32,
    /// Bytes of output waiting for a client that does not read (0: no limit); never below
    /// [`DELIVERY_BACKLOG`] plus `max_packet_size` and 64 KiB, so one delivery cannot reach it. Past it
    /// the connection is closed with 0x97 ([`Channel::handle_backlog`]).
    pub max_outbound_buffer: usize,
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
    /// `$exclusive/{filter}` subscriptions (EMQX); when off they are refused (0x8F).
    pub exclusive_subscription: bool,
    /// `$delayed/{seconds}/{topic}` publishes (EMQX); when off the topic is an ordinary one.
    pub delayed_publish: bool,
    /// Topic rewrite rules (EMQX), first match wins.
    pub rewrite: Vec<RewriteRule>,
    /// Subscriptions every client gets when it connects (EMQX's auto subscribe).
    pub auto_subscribe: Vec<AutoSubscribe>,
    /// A durable store records persistent sessions: the channel reports their changes
    /// ([`Channel::poll_change`]).
    pub durable: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            max_connect_packet_size: 64 * 1024,
            receive_maximum: 1024,
            max_inflight: 1024,
            min_inflight: 128,
            topic_alias_maximum: 65535,
            max_topic_alias_bytes: 64 * 1024,
            max_user_properties: 128,
            max_outbound_buffer: 4 * 1024 * 1024,
            max_keepalive: 65535,
            maximum_qos: QoS::ExactlyOnce,
            retain_available: true,
            wildcard_subscription_available: true,
            shared_subscription_available: true,
            subscription_identifiers_available: true,
            max_topic_levels: 128,
            max_client_id_len: 65535,
            max_subscriptions: 10_000,
            connect_timeout: Duration::from_secs(10),
            v3_session_expiry: 2 * 60 * 60,
            max_session_expiry: u32::MAX,
            exclusive_subscription: true,
            delayed_publish: true,
            rewrite: Vec::new(),
            auto_subscribe: Vec::new(),
            durable: false,
        }
    }
}

/// The most output a transport lets wait before it stops taking deliveries (the QUIC
/// writers'; a byte stream stops at `OUT_HIGH_WATER`, lower).
pub const DELIVERY_BACKLOG: usize = 1024 * 1024;

impl Limits {
    /// The output backlog past which a connection is closed: `max_outbound_buffer`, raised
    /// to leave room for one delivery above the transports' high-water marks.
    pub fn outbound_ceiling(&self) -> usize {
        match self.max_outbound_buffer {
            0 => usize::MAX,
            // 64 KiB of slack for what a delivery adds to the publisher's packet
            // (subscription identifiers) and the replies written beside it.
            max => max.max(DELIVERY_BACKLOG + self.max_packet_size as usize + 64 * 1024),
        }
    }

    /// `max_user_properties` as the codec takes it (0 is no limit).
    pub fn user_properties_limit(&self) -> u32 {
        match self.max_user_properties {
            0 => u32::MAX,
            max => max,
        }
    }
}

/// Who ended a connection (for logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    Client,
    Broker,
    Transport,
    /// An operator (the HTTP API's kick).
    Admin,
}

/// A will message waiting for its connection to end abnormally.
#[derive(Debug, Clone)]
pub struct PendingWill {
    /// The will as it will be routed; its `expires_at` is set only when it is published.
    pub message: AppMessage,
    /// Will Delay Interval in seconds (0: publish at once).
    pub delay: u32,
    /// The will's Message Expiry Interval, which runs from publication, not from CONNECT
    /// [MQTT-3.1.3-9: "sent as the Publication Expiry Interval when the Server publishes"].
    pub expiry_interval: Option<u32>,
}

impl PendingWill {
    /// The message to route when the will is published at `now`.
    pub fn into_message(self, now: Instant) -> AppMessage {
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
    /// A step of MQTT 5 enhanced authentication to judge: answer with
    /// [`Channel::auth_continue`], [`Channel::auth_succeed`] or [`Channel::auth_fail`].
    Authenticate(AuthStep),
    /// Route the message; then answer `ack` (the PUBACK or PUBREC of a QoS 1/2 PUBLISH)
    /// with [`Channel::acknowledge`], saying whether it could be stored.
    Route {
        message: Arc<AppMessage>,
        ack: Option<PendingAck>,
    },
    /// Publish `message` at `at` (a `$delayed/` publish, already admitted); then answer
    /// `ack` with [`Channel::acknowledge`], as for `Route`.
    Delay {
        message: Arc<AppMessage>,
        at: Instant,
        ack: Option<PendingAck>,
    },
    Subscribe {
        subscription: Subscription,
        send_retained: bool,
    },
    /// Put `subscription` into the router and remove the same filter's subscription on
    /// `from` in the same step: a subscription the broker parked on the control flow, taken
    /// back onto a data flow, never matches a message twice nor misses one.
    Move {
        subscription: Subscription,
        from: Flow,
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

/// The acknowledgement of an inbound QoS 1/2 PUBLISH, waiting for the message to be routed
/// (and, for persistent subscribers, stored): [`Channel::acknowledge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingAck {
    flow: Flow,
    id: PacketId,
    qos: QoS,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnect,
    /// CONNECT named an Authentication Method: the AUTH exchange runs before the session
    /// lookup (MQTT 5 §4.12).
    Authenticating,
    AwaitSession,
    Connected,
    Closed,
}

/// Stop accepting deliveries while this many encoded bytes wait for the socket.
const OUT_HIGH_WATER: usize = 256 * 1024;

/// What one topic alias costs against `Limits::max_topic_alias_bytes`: its topic and the
/// map entry holding it (a `String` and the alias), so that 65,535 one-byte topics are
/// charged too.
fn alias_cost(topic: &str) -> usize {
    const ENTRY: usize = 32;
    topic.len() + ENTRY
}

/// A connection's topic aliases ([MQTT-3.3.2-7]: they last as long as the connection).
#[derive(Debug, Default)]
struct Aliases {
    /// Set by the client's PUBLISHes.
    inbound: HashMap<u16, String>,
    /// What `inbound` is charged against `Limits::max_topic_alias_bytes`.
    inbound_bytes: usize,
    /// Set by ours, up to the client's Topic Alias Maximum and within
    /// `Limits::max_topic_alias_bytes` (past it, topics go out in full).
    outbound: HashMap<String, u16>,
    /// What `outbound` is charged.
    outbound_bytes: usize,
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
    peer_max_packet_size: u32,
    peer_topic_alias_maximum: u16,
    /// The outbound in-flight window (within `max_inflight` and the client's Receive Maximum).
    window: Window,
    /// Topic aliases in both directions; boxed, as most clients use none.
    aliases: Option<Box<Aliases>>,
    /// Boxed: most connections have none, and the channel lives as long as they do.
    will: Option<Box<PendingWill>>,
    /// Open data flows with their pending output (QUIC multi-stream only).
    flows: Vec<(Flow, BytesMut)>,
    /// The flow of the packet being handled: replies go back on it.
    input_flow: Flow,
    /// The User Property CONNACK confirms the datagram class with (`open_datagram_flow`).
    datagram_confirmation: Option<Box<(String, String)>>,
    /// The connection's username: CONNECT's, unless the transport vouched for an identity
    /// (a verified client certificate), which wins.
    username: Option<String>,
    username_from_transport: bool,
    /// CONNECT's password, until the shell takes it to authenticate.
    password: Option<Bytes>,
    /// Topic permissions, when the shell set an authorizer (none: everything allowed).
    access: Option<Box<AccessCheck>>,
    /// MQTT 5 enhanced authentication, when CONNECT named a method.
    enhanced: Option<Box<auth::Enhanced>>,
    /// Broker-wide admission (exclusive subscriptions, the delayed quota); none: admitted.
    admission: Option<Arc<dyn Admission>>,
    /// Whether the session's changes go to a durable store (`limits.durable` and a session
    /// that outlives the connection).
    durable: bool,
    /// Changes to the persistent session's state, for the store, in order.
    changes: VecDeque<Change>,
    /// Bytes of the resends written at CONNACK ([`Channel::handle_backlog`] allows them).
    resent: usize,
    /// Deliveries dropped because they were expired or too large for the client.
    pub dropped: u64,
    /// Publishes, subscriptions and deliveries the authorizer refused.
    pub denied: u64,
}

impl Channel {
    pub fn new(limits: Arc<Limits>, now: Instant, assignable_id: AssignedClientId) -> Self {
        let connect_deadline = now + limits.connect_timeout;
        let window = Window::new(limits.min_inflight, limits.max_inflight, now);
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
            peer_max_packet_size: u32::MAX,
            peer_topic_alias_maximum: 0,
            window,
            aliases: None,
            will: None,
            flows: Vec::new(),
            input_flow: Flow::CONTROL,
            datagram_confirmation: None,
            username_from_transport: false,
            username: None,
            password: None,
            access: None,
            enhanced: None,
            admission: None,
            durable: false,
            changes: VecDeque::new(),
            resent: 0,
            dropped: 0,
            denied: 0,
        }
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

    /// Whether the session's changes go to the durable store.
    pub fn is_durable(&self) -> bool {
        self.durable
    }

    /// The session this connection serves, once accepted.
    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// Encoded bytes waiting to be written; the driver writes and clears (or advances) them.
    pub fn out(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// The next change to the persistent session's state for the durable store to record,
    /// in the order they happened.
    pub fn poll_change(&mut self) -> Option<Change> {
        self.changes.pop_front()
    }

    /// A stored delivery will not be sent after all: the store forgets it.
    pub(super) fn forget(&mut self, key: Option<StoreKey>) {
        if let Some(key) = key {
            self.changes.push_back(Change::Done { key });
        }
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
            State::AwaitConnect | State::Authenticating | State::AwaitSession => {
                Some(self.connect_deadline)
            }
            State::Connected => {
                // [MQTT-3.1.2-24]: one and a half times the keep-alive.
                let keep_alive = (self.keep_alive > 0).then(|| {
                    self.last_rx + Duration::from_millis(u64::from(self.keep_alive) * 1500)
                });
                match (keep_alive, self.reauth_deadline()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            State::Closed => None,
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
            // An authentication exchange that did not finish in the connect timeout.
            State::Authenticating if now >= self.connect_deadline => {
                self.refuse(ReasonCode::NOT_AUTHORIZED);
            }
            State::Connected if self.reauth_deadline().is_some_and(|at| now >= at) => {
                self.reauth_timed_out();
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
    /// The durable store could not record what this connection's pending output depends on
    /// (a disk error): nothing more is sent (an acknowledgement of what was not stored must
    /// never go out), and the connection closes; the client sends again on its next one.
    pub fn handle_store_failed(&mut self) {
        self.out.clear();
        for (_, out) in &mut self.flows {
            out.clear();
        }
        self.close(
            ReasonCode::UNSPECIFIED_ERROR,
            Initiator::Broker,
            false,
            true,
        );
    }

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

    /// An operator kicked the client (EMQX's `DELETE /clients/{clientid}`): DISCONNECT
    /// 0x98 (Administrative action) to a v5 client, the will published (the client did not
    /// say goodbye), and the session discarded whatever its expiry.
    pub fn handle_kick(&mut self) {
        if self.state == State::Closed {
            return;
        }
        if let Some(session) = &mut self.session {
            session.expiry_interval = 0;
        }
        self.close(
            ReasonCode::ADMINISTRATIVE_ACTION,
            Initiator::Admin,
            true,
            true,
        );
    }

    /// The session's queue overflowed under `session.queue_full = "disconnect"`: DISCONNECT
    /// 0x97 (Quota exceeded) to a v5 client, the will published; the session is kept as usual.
    pub fn handle_queue_full(&mut self) {
        self.close(ReasonCode::QUOTA_EXCEEDED, Initiator::Broker, true, true);
    }

    /// The client sent something the shell holds for now (see `broker::link`): it counts as
    /// traffic for keep-alive.
    pub fn handle_traffic(&mut self, now: Instant) {
        if self.state == State::Connected {
            self.last_rx = self.last_rx.max(now);
        }
    }

    /// The Keep Alive in force (the client's, or the one the server assigned).
    pub fn keep_alive(&self) -> u16 {
        self.keep_alive
    }

    /// The outbound in-flight window's size now (`core::window`).
    pub fn inflight_window(&self) -> usize {
        self.window.size()
    }

    /// QoS 1/2 deliveries sent and not yet completed.
    pub fn inflight(&self) -> usize {
        self.session.as_ref().map_or(0, Session::inflight)
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
            (State::AwaitConnect | State::Authenticating, _) => {
                self.close(err.reason_code(), Initiator::Client, false, false)
            }
            _ => self.close(err.reason_code(), Initiator::Client, true, true),
        }
    }

    /// Encoded output not yet taken by the shell, on every flow.
    fn pending_output(&self) -> usize {
        self.out.len() + self.flows.iter().map(|(_, out)| out.len()).sum::<usize>()
    }

    /// The transport holds `backlog` bytes of our output that the client has not read.
    /// Deliveries stop at the high-water mark, but every PINGREQ and QoS 1/2 PUBLISH the
    /// client sends adds a reply: a client that sends and never reads is closed with 0x97
    /// once the backlog passes `Limits::outbound_ceiling` (plus what was resent at CONNACK,
    /// bounded by the in-flight window), before it grows without bound.
    /// Returns whether it was closed.
    pub fn handle_backlog(&mut self, backlog: usize) -> bool {
        let ceiling = self.limits.outbound_ceiling().saturating_add(self.resent);
        if self.state == State::Closed || backlog <= ceiling {
            return false;
        }
        // The DISCONNECT is written if the client ever reads again; the shell closes anyway.
        self.close(ReasonCode::QUOTA_EXCEEDED, Initiator::Broker, true, true);
        true
    }

    /// A packet on the control flow (the only flow of TCP, TLS and WebSocket connections).
    #[cfg_attr(
        not(any(test, feature = "internals")),
        expect(dead_code, reason = "the shell goes through `Link::handle_packet`")
    )]
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
            // [MQTT-3.1.2-30]: until CONNACK, a client that named an Authentication Method
            // sends only AUTH or DISCONNECT.
            State::Authenticating => match packet {
                Packet::Auth(auth) => self.handle_auth(now, auth),
                Packet::Disconnect(disconnect) => {
                    self.close(disconnect.reason, Initiator::Client, false, false)
                }
                _ => self.refuse(ReasonCode::PROTOCOL_ERROR),
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
            Packet::PubAck(ack) => self.handle_completion(now, ack.packet_id, false),
            Packet::PubRec(ack) => self.handle_pubrec(ack),
            Packet::PubRel(ack) => {
                let key = (self.input_flow, ack.packet_id);
                let known = self
                    .session
                    .as_mut()
                    .is_some_and(|s| s.awaiting_release.remove(&key));
                if known && self.durable {
                    self.changes.push_back(Change::Freed {
                        flow: key.0,
                        id: key.1,
                    });
                }
                let reason = if known {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.reply(&Packet::PubComp(Ack::new(ack.packet_id, reason)));
            }
            Packet::PubComp(ack) => self.handle_completion(now, ack.packet_id, true),
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe),
            Packet::Unsubscribe(unsubscribe) => self.handle_unsubscribe(unsubscribe),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(disconnect) => self.handle_disconnect(disconnect),
            Packet::Auth(auth) => self.handle_auth(now, auth),
            // A second CONNECT is a protocol error [MQTT-3.1.0-2]; the rest only servers send.
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => self.protocol_error(ReasonCode::PROTOCOL_ERROR),
        }
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

    /// PUBACK (`qos2` false) or PUBCOMP: completes the message in flight under `id`. An ack
    /// of another QoS flow (PUBACK for QoS 2, PUBCOMP before PUBREL) is a protocol error; an
    /// unknown id is ignored (it may be a late duplicate).
    fn handle_completion(&mut self, now: Instant, id: PacketId, qos2: bool) {
        let completed = self.session.as_mut().map(|s| s.complete(id, qos2));
        if let Some(Completed::Done(_)) = completed {
            self.window.on_completed(now, id);
        }
        match completed {
            Some(Completed::WrongFlow) => self.protocol_error(ReasonCode::PROTOCOL_ERROR),
            Some(Completed::Done(Some(key))) => self.changes.push_back(Change::Done { key }),
            _ => {}
        }
    }

    /// Whether a PUBREC for `id` belongs to a QoS 1 message in flight (another QoS flow). An
    /// unknown id is not wrong here: it is answered with 0x92.
    fn pubrec_for_qos1(&self, id: PacketId) -> bool {
        let state = self.session.as_ref().and_then(|s| s.outgoing_state(id));
        matches!(state, Some(Outgoing::Publish(d)) if d.qos == QoS::AtLeastOnce)
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
        // A client that never authenticated leaves no will.
        let publish_will = publish_will && self.state != State::Authenticating;
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

    /// Answers on the flow of the packet being handled.
    fn reply(&mut self, packet: &Packet) {
        self.send_on(self.input_flow, packet);
    }

    /// Encodes onto `flow`'s output, or the control flow's if `flow` is not open.
    fn send_on(&mut self, flow: Flow, packet: &Packet) {
        if !self.may_send(packet) {
            return;
        }
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
        if !self.may_send(packet) {
            return;
        }
        codec::encode(packet, self.version, &mut self.out);
    }

    /// A packet larger than the client's Maximum Packet Size is not sent at all
    /// [MQTT-3.1.2-24]: an ack or SUBACK is dropped, a DISCONNECT left out (the connection
    /// closes all the same). Measured only when the client set a maximum.
    fn may_send(&self, packet: &Packet) -> bool {
        self.peer_max_packet_size == u32::MAX || self.fits(packet)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests;
