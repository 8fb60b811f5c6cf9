//! The ties between one connection's [`Channel`] and the shared [`Broker`], common to every
//! transport's driver loop: carrying out the channel's actions (session lookup and takeover,
//! routing, (un)subscribing, closing) and moving deliveries from the session's mailbox into
//! the channel while its window has room, and holding a publisher's input while the broker
//! queues more than its budget.
//!
//! **Holding input.** While the deliveries queued broker-wide are over
//! `broker.max_queued_bytes` ([`QueueBudget`]), a connection goes on reading and decoding, so
//! that PINGREQ, the acknowledgements of its own deliveries (PUBACK, PUBREC, PUBREL, PUBCOMP)
//! and everything that drains queues are handled at once; it holds the PUBLISHes it reads,
//! and what follows them in order, until the budget is relieved. QoS 1/2 publishes are held
//! unanswered, so the client's own window (Receive Maximum) bounds them; QoS 0 has no flow
//! control, so past `HOLD_BYTES` held a QoS 0 publish is dropped and counted
//! (`messages.dropped.publisher_paused`). Any other packet past it stops reading (the held
//! input is bounded either way) until the budget is relieved. Held input counts as the
//! client's traffic: the broker's own pause never closes it for keep-alive.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::clients::ClientInfo;
use super::mailbox::{Mailbox, QueueBudget, Signal};
use super::{clock, Broker};
use crate::auth::{ClientAuthorizer, Credentials, Refusal};
use crate::codec::{Packet, QoS, ReasonCode};
use crate::core::access::{Access, Authorizer};
use crate::core::channel::{Action, AuthStep, Channel};
use crate::core::hooks::{DropReason, Store, Ticket};
use crate::core::message::{Delivery, Flow};

/// How long a refused CONNECT waits for its CONNACK: guessing passwords costs a second a try.
pub const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);

/// Input held while the budget is over, in topic and payload bytes: past it QoS 0 publishes
/// are dropped, and anything else stops reading.
const HOLD_BYTES: usize = 64 * 1024;
/// How often a held connection looks at the budget again even if no drain woke it.
const HOLD_RECHECK: Duration = Duration::from_secs(1);
/// Deliveries taken from the mailbox under one lock.
const PUMP_BATCH: usize = 16;

pub struct Link {
    pub broker: Arc<Broker>,
    pub channel: Channel,
    pub mailbox: Option<Arc<Mailbox>>,
    /// Data flows the channel asked to close; the QUIC driver resets their streams.
    pub closed_flows: Vec<Flow>,
    /// The time of the current wake-up (`tick`): read once per batch of work, not per packet.
    pub now: Instant,
    /// Set once the channel's `Close` has been carried out.
    pub closed: bool,
    /// Why it closed, for transports that can say so (QUIC's application error code).
    pub close_reason: Option<ReasonCode>,
    /// Input held while the broker's queue budget is over (see the module docs), in order.
    held: VecDeque<(Flow, Packet)>,
    /// The topic and payload bytes of the PUBLISHes in `held`.
    held_bytes: usize,
    /// Past `HOLD_BYTES` something other than a QoS 0 publish came: reading stops.
    blocked: bool,
    conn_id: u64,
    /// The client's address, as the listener saw it (for authentication).
    peer: SocketAddr,
    /// A takeover in progress: answered once our session is filed.
    takeover_ack: Option<oneshot::Sender<()>>,
    /// The broker's durable store, if it has one (a handle of the connection's own).
    store: Option<Arc<dyn Store>>,
    /// The store's ticket that the output written so far depends on (0: none): nothing is
    /// sent until it is on disk.
    ticket: Ticket,
    /// The lowest ticket it depends on (every commit between the two must have succeeded).
    ticket_from: Ticket,
    /// The persistent session's subscriptions changed: its record is saved again.
    session_changed: bool,
    /// `tcp`, `tls`, `ws`, `wss` or `quic`.
    transport: &'static str,
    /// The QUIC connection (for the operators' view of its path).
    pub quic: Option<quinn::Connection>,
    /// Our end of a byte-stream transport's TCP connection (for the operators' view of its
    /// `TCP_INFO`).
    pub local: Option<SocketAddr>,
    /// Our entry in the broker's table of connected clients, once CONNECT is accepted.
    info: Option<Arc<ClientInfo>>,
    /// A SCRAM-SHA-256 exchange between its server-first and client-final messages.
    scram: Option<Box<crate::auth::scram::ServerExchange>>,
}

impl Link {
    pub fn new(broker: Arc<Broker>, peer: SocketAddr, transport: &'static str) -> Self {
        let conn_id = broker.next_conn_id();
        let assignable_id = broker.assignable_client_id(conn_id);
        let mut channel = Channel::new(broker.limits(), clock::now(), assignable_id);
        channel.set_admission(Arc::clone(&broker) as Arc<dyn crate::core::access::Admission>);
        let store = broker.hooks().store.clone();
        Self {
            peer,
            conn_id,
            channel,
            now: clock::now(),
            broker,
            mailbox: None,
            closed_flows: Vec::new(),
            closed: false,
            close_reason: None,
            held: VecDeque::new(),
            held_bytes: 0,
            blocked: false,
            takeover_ack: None,
            store,
            ticket: 0,
            ticket_from: 0,
            session_changed: false,
            transport,
            quic: None,
            local: None,
            info: None,
            scram: None,
        }
    }

    /// Ready when the output written so far may go to the client: everything it depends on
    /// is on disk. A failed commit closes the connection with nothing more sent (see
    /// `Channel::handle_store_failed`).
    pub fn poll_durable(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ticket == 0 {
            return Poll::Ready(());
        }
        let Some(store) = &self.store else {
            self.ticket = 0;
            return Poll::Ready(());
        };
        match store.poll_durable(cx, self.ticket_from, self.ticket) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.ticket = 0;
                if result.is_err() {
                    tracing::warn!("a store commit failed: closing without acknowledging");
                    self.channel.handle_store_failed();
                }
                Poll::Ready(())
            }
        }
    }

    /// The output written from now on depends on `ticket` too.
    fn hold(&mut self, ticket: Ticket) {
        if ticket == 0 {
            return;
        }
        if self.ticket == 0 || ticket < self.ticket_from {
            self.ticket_from = ticket;
        }
        self.ticket = self.ticket.max(ticket);
    }

    /// Whether output written so far waits for a store commit (see `poll_durable`).
    pub fn output_held(&self) -> bool {
        self.ticket != 0
    }

    /// Waits (up to `linger`) for the output written so far to be on disk; `false` if it
    /// is not (the output must then be dropped).
    pub async fn durable(&mut self, linger: Duration) -> bool {
        let waited =
            tokio::time::timeout(linger, std::future::poll_fn(|cx| self.poll_durable(cx))).await;
        waited.is_ok() && self.ticket == 0
    }

    /// Hands the channel's changes to the persistent session's state to the store; the
    /// ones the client's next packets depend on hold the output until they are on disk.
    fn record_changes(&mut self) {
        // Taken out for the while (not cloned: this runs after every turn).
        let Some(store) = self.store.take() else {
            return;
        };
        self.record_changes_to(&*store);
        self.store = Some(store);
    }

    fn record_changes_to(&mut self, store: &dyn Store) {
        while let Some(change) = self.channel.poll_change() {
            let ticket = store.changed(self.channel.client_id(), change);
            if change.gates_output() {
                self.hold(ticket);
            }
        }
        if std::mem::take(&mut self.session_changed) && self.channel.is_durable() {
            if let Some(session) = self.channel.session() {
                let ticket = store.session_saved(session);
                self.hold(ticket);
            }
        }
    }

    /// Ready when the session's mailbox has something for this connection: a takeover
    /// request (`Some`: pass it to [`Link::handle_takeover`]), or deliveries the channel
    /// can take now (`None`). An operator's kick closes the channel here (and is ready with
    /// `None`: the driver goes on to write the DISCONNECT). Pending before CONNECT has found
    /// a session.
    pub fn poll_mailbox(&mut self, cx: &mut Context<'_>) -> Poll<Option<oneshot::Sender<()>>> {
        let Some(mailbox) = &self.mailbox else {
            return Poll::Pending;
        };
        match mailbox.poll_signal(cx, self.conn_id, self.channel.can_deliver()) {
            Poll::Ready(Signal::Takeover(ack)) => Poll::Ready(Some(ack)),
            Poll::Ready(Signal::Deliveries) => Poll::Ready(None),
            Poll::Ready(Signal::Kick) => {
                tracing::info!(client_id = %self.channel.client_id(), "kicked by an operator");
                self.channel.handle_kick();
                Poll::Ready(None)
            }
            Poll::Ready(Signal::QueueFull) => {
                tracing::debug!(
                    "session queue full (session.max_queued, session.queue_full = \"disconnect\")"
                );
                self.channel.handle_queue_full();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Another connection claims the session: close, and answer `ack` once it is filed.
    pub fn handle_takeover(&mut self, ack: oneshot::Sender<()>) {
        // A second request replaces the first, whose requester then looks again.
        self.takeover_ack = Some(ack);
        self.channel.handle_takeover();
    }

    /// Reads the clock for the work that follows a wake-up.
    pub fn tick(&mut self) -> Instant {
        self.now = clock::now();
        self.now
    }

    /// Carries out the channel's actions in order. Only a CONNECT's session lookup can wait
    /// (for a takeover); everything else is done without yielding.
    pub async fn carry_out_actions(&mut self) {
        while let Some(awaited) = self.carry_out_until_connect() {
            // Boxed: a takeover's wait (or a failed login's delay) is rare and would
            // otherwise enlarge every connection's task for its whole life.
            match awaited {
                Awaited::Connect(connect) => Box::pin(self.connect(connect)).await,
                Awaited::Authenticate(step) => Box::pin(self.enhanced_auth(step)).await,
            }
        }
    }

    async fn connect(&mut self, (client_id, clean_start): (Arc<str>, bool)) {
        let span = tracing::Span::current();
        span.record("client_id", &*client_id);
        if let Some(username) = self.channel.username() {
            // A JWT in the username is a credential: never logged.
            let shown = if self.broker.auth().username_carries_token() {
                "(token)"
            } else {
                username
            };
            span.record("username", shown);
        }
        if let Err(code) = self.authenticate(&client_id).await {
            return self.channel.reject(code);
        }
        let opened = self
            .broker
            .open_session(self.now, &client_id, clean_start, self.conn_id)
            .await;
        match opened {
            Ok((session, mailbox)) => {
                let present = session.is_some();
                // A takeover may have taken a while.
                let now = self.tick();
                self.channel.accept(now, session);
                if let Some(store) = &self.store {
                    let durable = self.channel.is_durable();
                    mailbox.set_durable(&client_id, durable);
                    if durable {
                        self.session_changed = true;
                    } else if present {
                        // A persistent session resumed by a connection that ends it: the
                        // store forgets it now rather than keep it through a crash.
                        store.session_ended(&client_id);
                    }
                }
                let info = Arc::new(ClientInfo {
                    conn_id: self.conn_id,
                    client_id: Arc::clone(&client_id),
                    username: self.channel.username().map(Into::into),
                    peer: self.peer,
                    local: self.local,
                    transport: self.transport,
                    proto_ver: self.channel.version().level(),
                    keepalive: self.channel.keep_alive(),
                    clean_start,
                    expiry_interval: self.channel.session().map_or(0, |s| s.expiry_interval),
                    connected_at: clock::wall(),
                    mailbox: Arc::clone(&mailbox),
                    recv_msg: Default::default(),
                    send_msg: Default::default(),
                    inflight: Default::default(),
                    inflight_max: Default::default(),
                    subscriptions: Default::default(),
                    quic: self.quic.clone(),
                });
                self.broker.clients.insert(Arc::clone(&info));
                self.info = Some(info);
                self.mailbox = Some(mailbox);
                if !self.broker.limits().auto_subscribe.is_empty() {
                    let host = self.peer.ip().to_string();
                    self.channel.auto_subscribe(&host, self.peer.port());
                }
            }
            Err(code) => self.channel.reject(code),
        }
    }

    /// Decides the CONNECT's credentials (the authentication chain, which may wait on an
    /// HTTP service) and its will's topic; sets the ACL for the rest of the connection. A
    /// refusal is logged with the peer, counted, and answered only after
    /// [`AUTH_FAILURE_DELAY`], so guessing passwords is slow.
    async fn authenticate(&mut self, client_id: &str) -> Result<(), ReasonCode> {
        let auth = Arc::clone(self.broker.auth());
        let password = self.channel.take_password();
        let listener = format!("{}:default", self.transport);
        let now_secs = clock::wall()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let credentials = Credentials {
            client_id,
            username: self.channel.username(),
            password: password.as_deref(),
            peer: self.peer,
            // A CONNECT that named an Authentication Method gets here only once the
            // exchange proved the username (`enhanced_auth`).
            certified: self.channel.username_is_certified() || self.channel.auth_method().is_some(),
            listener: &listener,
            now_unix: now_secs,
        };
        let decided =
            match auth
                .banned()
                .find(client_id, credentials.username, self.peer.ip(), now_secs)
            {
                Some(_) => Err(Refusal::Banned),
                // Boxed: the chain's future (an HTTP request) would otherwise enlarge every
                // connection's task for its whole life.
                None => Box::pin(auth.authenticate(&credentials)).await,
            };
        let refused = match decided {
            Err(refusal) => {
                tracing::info!(
                    peer = %self.peer,
                    username = if auth.username_carries_token() {
                        "(token)"
                    } else {
                        credentials.username.unwrap_or("")
                    },
                    ?refusal,
                    "connection refused: {}",
                    match refusal {
                        Refusal::AnonymousNotAllowed if auth.has_sources() =>
                            "no username; set auth.allow_anonymous = true to accept anonymous clients",
                        Refusal::AnonymousNotAllowed =>
                            "not on loopback; set auth.password_file, or auth.allow_anonymous = true",
                        Refusal::BadCredentials => "bad username or password",
                        Refusal::NotAuthorized => "denied by an authentication source",
                        Refusal::Banned => "banned",
                    }
                );
                Some(refusal.reason_code())
            }
            Ok(_) => None,
        };
        // The connection's authorizer: none for a superuser or without rules; the rules its
        // source handed out before the ACL file's.
        let authorizer: Option<Arc<dyn Authorizer>> = match &decided {
            Ok(grant) if grant.superuser => None,
            Ok(grant) => match &grant.acl {
                Some(acl) => Some(Arc::new(ClientAuthorizer {
                    acl: Arc::clone(acl),
                    service: Arc::clone(&auth),
                })),
                None if auth.has_acl() => Some(Arc::clone(&auth) as Arc<dyn Authorizer>),
                None => None,
            },
            Err(_) => None,
        };
        let refused = refused.or_else(|| {
            let authorizer = authorizer.as_ref()?;
            let denied = self.channel.will_topic().is_some_and(|topic| {
                !authorizer.allows(client_id, credentials.username, Access::Publish, topic)
            });
            // Mosquitto refuses a CONNECT whose will the client may not publish.
            denied.then(|| {
                tracing::debug!(peer = %self.peer, "connection refused: will topic not allowed");
                ReasonCode::NOT_AUTHORIZED
            })
        });
        if let Some(code) = refused {
            self.failed_login().await;
            return Err(code);
        }
        if let Some(authorizer) = authorizer {
            self.channel.set_authorizer(authorizer);
        }
        Ok(())
    }

    /// A refused login: counted, and answered only after [`AUTH_FAILURE_DELAY`].
    async fn failed_login(&mut self) {
        self.broker
            .metrics
            .auth_failures
            .fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(AUTH_FAILURE_DELAY).await;
        self.tick();
    }

    /// Carries out actions up to a `Connect` or `Authenticate`, which it returns for the
    /// caller to await.
    fn carry_out_until_connect(&mut self) -> Option<Awaited> {
        while let Some(action) = self.channel.poll_action() {
            let now = self.now;
            match action {
                Action::Connect {
                    client_id,
                    clean_start,
                } => return Some(Awaited::Connect((client_id, clean_start))),
                Action::Authenticate(step) => return Some(Awaited::Authenticate(step)),
                Action::Delay { message, at, ack } => {
                    let refused = match self.broker.delay(message, at) {
                        Ok(ticket) => {
                            self.hold(ticket);
                            None
                        }
                        Err(_) => Some(crate::codec::ReasonCode::QUOTA_EXCEEDED),
                    };
                    if let Some(ack) = ack {
                        self.channel.acknowledge(ack, refused);
                    }
                }
                Action::Route { message, ack } => {
                    if let Some(info) = &self.info {
                        info.count_received();
                    }
                    // What routing stores and the record that a QoS 2 message was received
                    // commit together: a crash between them would route a resend twice.
                    let store = self.store.take();
                    let group = store.as_deref().map(Group::begin);
                    let routed = self.broker.route(message, now);
                    self.hold(routed.ticket);
                    if let Some(ack) = ack {
                        self.channel.acknowledge(ack, routed.refused);
                    }
                    if let (Some(group), Some(store)) = (group, store.as_deref()) {
                        self.record_changes_to(store);
                        self.hold(group.end());
                    }
                    self.store = store;
                }
                Action::Subscribe {
                    subscription,
                    send_retained,
                } => {
                    if let Some(mailbox) = &self.mailbox {
                        let client_id = self.channel.client_id();
                        self.broker.subscribe(
                            now,
                            client_id,
                            mailbox,
                            &subscription,
                            send_retained,
                        );
                    }
                    self.session_changed = true;
                }
                Action::Move { subscription, from } => {
                    if let Some(mailbox) = &self.mailbox {
                        self.broker.move_subscription(
                            self.channel.client_id(),
                            mailbox,
                            &subscription,
                            from,
                        );
                    }
                    self.session_changed = true;
                }
                Action::Unsubscribe { filter, flow } => {
                    self.broker
                        .unsubscribe(self.channel.client_id(), &filter, flow);
                    self.session_changed = true;
                }
                Action::CloseFlow(flow) => self.closed_flows.push(flow),
                Action::Close(close) => {
                    self.record_changes();
                    tracing::debug!(reason = %close.reason, initiator = ?close.initiator, "connection closed");
                    self.count_drops(0);
                    self.close_reason = Some(close.reason);
                    let client_id = Arc::clone(self.channel.client_id());
                    if let Some(info) = self.info.take() {
                        self.broker.clients.remove(&info, close.reason);
                        self.broker.connection_ended(now, &client_id, self.peer);
                    }
                    self.broker
                        .close_session(now, self.conn_id, &client_id, *close);
                    // A takeover asked for while we were closing is answered too.
                    let late = self
                        .mailbox
                        .take()
                        .and_then(|mailbox| mailbox.take_takeover(self.conn_id));
                    self.closed = true;
                    // The session is filed: a connection taking over need not wait for our
                    // last bytes to flush.
                    for ack in self.takeover_ack.take().into_iter().chain(late) {
                        let _ = ack.send(());
                    }
                }
            }
        }
        self.record_changes();
        if let Some(info) = &self.info {
            let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            info.inflight
                .store(count(self.channel.inflight()), Ordering::Relaxed);
            info.inflight_max
                .store(count(self.channel.inflight_window()), Ordering::Relaxed);
            let subscriptions = self.channel.session().map_or(0, |s| s.subscriptions.len());
            info.subscriptions
                .store(count(subscriptions), Ordering::Relaxed);
        }
        None
    }

    /// Hands the channel a packet the transport read on `flow`, or holds it while the
    /// broker's queue budget is over (see the module docs).
    pub fn handle_packet(&mut self, now: Instant, flow: Flow, packet: Packet) {
        // Before CONNECT is accepted nothing is published: nothing to hold.
        let connected = self.mailbox.is_some();
        let hold = connected
            && match &packet {
                // What drains queues and keeps the link alive goes at once, in any order:
                // PUBREL answers a PUBREC the channel already sent for a publish it took.
                Packet::PingReq
                | Packet::PubAck(_)
                | Packet::PubRec(_)
                | Packet::PubRel(_)
                | Packet::PubComp(_) => false,
                Packet::Publish(_) => !self.held.is_empty() || self.broker.budget.is_over(),
                // Anything else keeps its place behind the publishes held.
                _ => !self.held.is_empty(),
            };
        if !hold {
            self.channel.handle_flow_packet(now, flow, packet);
            return;
        }
        if matches!(packet, Packet::Disconnect(_)) {
            // A client saying goodbye gets what it sent before handled first, whatever the
            // budget (held input is bounded): its will must not fire, its QoS 0 not vanish.
            while let Some((flow, held)) = self.held.pop_front() {
                self.channel.handle_flow_packet(now, flow, held);
            }
            self.held = VecDeque::new();
            self.held_bytes = 0;
            self.blocked = false;
            self.channel.handle_flow_packet(now, flow, packet);
            return;
        }
        // The client is not silent: the broker is holding it.
        self.channel.handle_traffic(now);
        if self.held.is_empty() {
            self.broker
                .metrics
                .publisher_pauses
                .fetch_add(1, Ordering::Relaxed);
        }
        let bytes = match &packet {
            Packet::Publish(publish) => publish.topic.len() + publish.payload.len(),
            _ => 0,
        };
        if self.held_bytes >= HOLD_BYTES {
            if matches!(&packet, Packet::Publish(p) if p.qos == QoS::AtMostOnce) {
                self.broker
                    .metrics
                    .dropped_paused
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            self.blocked = true;
        }
        self.held_bytes += bytes;
        self.held.push_back((flow, packet));
    }

    /// Whether input is held (the budget is over, or was when it was read).
    pub fn is_holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether reading must stop: held input is at its bound.
    pub fn input_blocked(&self) -> bool {
        self.blocked
    }

    /// Hands the channel the oldest held packet if the budget allows; `false` if there is
    /// none or it does not.
    pub fn release_held(&mut self, now: Instant) -> bool {
        if self.held.is_empty() || self.broker.budget.is_over() {
            return false;
        }
        let Some((flow, packet)) = self.held.pop_front() else {
            return false;
        };
        if let Packet::Publish(publish) = &packet {
            self.held_bytes -= publish.topic.len() + publish.payload.len();
        }
        if self.held.is_empty() {
            self.held_bytes = 0;
            self.blocked = false;
            self.held = VecDeque::new();
        }
        self.channel.handle_flow_packet(now, flow, packet);
        true
    }
}

/// The actions whose answer may wait.
enum Awaited {
    Connect((Arc<str>, bool)),
    Authenticate(AuthStep),
}

impl Link {
    /// Judges one step of MQTT 5 enhanced authentication (SCRAM-SHA-256 against the password
    /// file's `$scram-sha-256$` lines) and answers the channel. A failure is logged with the
    /// peer, counted, and answered after [`AUTH_FAILURE_DELAY`], as a wrong password is.
    async fn enhanced_auth(&mut self, step: AuthStep) {
        let auth = Arc::clone(self.broker.auth());
        let judged = self.scram_step(&auth, &step);
        match judged {
            Ok(ScramAnswer::Continue(data)) => self.channel.auth_continue(data),
            Ok(ScramAnswer::Success { data, username }) => {
                tracing::debug!(%username, reauth = step.reauth, "SCRAM-SHA-256 authentication succeeded");
                self.channel.auth_succeed(Some(data), Some(username));
            }
            Err((code, why)) => {
                tracing::info!(
                    peer = %self.peer,
                    method = &*step.method,
                    reauth = step.reauth,
                    "authentication failed: {why}"
                );
                if code != crate::codec::ReasonCode::BAD_AUTHENTICATION_METHOD {
                    self.failed_login().await;
                }
                self.scram = None;
                // DISCONNECT has no 0x86: a failed re-authentication is 0x87 [MQTT-4.12.1-2].
                let code = if step.reauth {
                    crate::codec::ReasonCode::NOT_AUTHORIZED
                } else {
                    code
                };
                self.channel.auth_fail(code);
            }
        }
    }

    fn scram_step(
        &mut self,
        auth: &crate::auth::AuthService,
        step: &AuthStep,
    ) -> Result<ScramAnswer, (crate::codec::ReasonCode, String)> {
        use crate::auth::scram::{ClientFirst, ServerExchange, METHOD};
        use crate::codec::ReasonCode;
        if &*step.method != METHOD {
            return Err((
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                format!("unknown authentication method (only {METHOD} is offered)"),
            ));
        }
        let malformed =
            |err: crate::auth::scram::ScramError| (ReasonCode::NOT_AUTHORIZED, err.to_string());
        if !step.first {
            let exchange = self.scram.take().ok_or((
                ReasonCode::NOT_AUTHORIZED,
                "no exchange in progress".to_owned(),
            ))?;
            let username = exchange.username().to_owned();
            return match exchange.finish(&step.data) {
                Ok(server_final) => Ok(ScramAnswer::Success {
                    data: server_final.into(),
                    username,
                }),
                Err(crate::auth::scram::ScramError::InvalidProof) => Err((
                    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                    format!("bad username or password for {username:?}"),
                )),
                Err(err) => Err(malformed(err)),
            };
        }
        let first = ClientFirst::parse(&step.data).map_err(malformed)?;
        let Some((keys, known)) = auth.scram_keys(&first.username) else {
            return Err((
                ReasonCode::BAD_AUTHENTICATION_METHOD,
                format!("{METHOD} needs a password file with $scram-sha-256$ lines: set auth.password_file"),
            ));
        };
        // A re-authentication proves the same identity again; a certificate's identity
        // cannot be swapped for another by SCRAM.
        let bound = step.reauth || self.channel.username_is_certified();
        if bound && self.channel.username() != Some(first.username.as_str()) {
            return Err((
                ReasonCode::NOT_AUTHORIZED,
                format!("{METHOD} user {:?} is not the connection's", first.username),
            ));
        }
        if !step.reauth {
            let now_secs = clock::wall()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let client_id = self.channel.client_id();
            if auth
                .banned()
                .find(client_id, Some(&first.username), self.peer.ip(), now_secs)
                .is_some()
            {
                return Err((ReasonCode::BANNED, "banned".to_owned()));
            }
        }
        let mut nonce = [0u8; 18];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| (ReasonCode::UNSPECIFIED_ERROR, "no randomness".to_owned()))?;
        let nonce = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, nonce);
        let (exchange, server_first) =
            ServerExchange::start(&first, &nonce, keys, known).map_err(malformed)?;
        self.scram = Some(Box::new(exchange));
        Ok(ScramAnswer::Continue(server_first.into()))
    }
}

/// The shell's answer to a SCRAM step.
enum ScramAnswer {
    Continue(bytes::Bytes),
    Success {
        data: bytes::Bytes,
        username: String,
    },
}

/// A group of store writes that commit together; ended when dropped, so that a panic while
/// routing can never leave the store waiting on a group nobody ends.
struct Group<'a>(&'a dyn Store, bool);

impl<'a> Group<'a> {
    fn begin(store: &'a dyn Store) -> Self {
        store.begin_group();
        Self(store, false)
    }

    fn end(mut self) -> Ticket {
        self.1 = true;
        self.0.end_group()
    }
}

impl Drop for Group<'_> {
    fn drop(&mut self) {
        if !self.1 {
            self.0.end_group();
        }
    }
}

/// Resolves when the broker's queue budget is relieved, or after `HOLD_RECHECK` (a connection
/// holding input looks again then), boxed for a driver that keeps it across polls (made once
/// per wait, not per wake-up).
pub fn relief(
    budget: &Arc<QueueBudget>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    let budget = Arc::clone(budget);
    Box::pin(async move {
        tokio::select! {
            _ = budget.relieved() => {}
            _ = tokio::time::sleep(HOLD_RECHECK) => {}
        }
    })
}

impl Link {
    /// Gives back what a quiet connection's empty buffers and queues still hold.
    pub fn trim(&mut self) {
        self.channel.trim();
        if let Some(mailbox) = &self.mailbox {
            mailbox.trim();
        }
    }

    /// Moves deliveries from the mailbox into the channel while `room()` and the channel's
    /// window allow.
    pub fn pump_deliveries(&mut self, room: impl Fn() -> bool) {
        let Some(mailbox) = &self.mailbox else { return };
        let now = self.now;
        let mut offered = 0u64;
        // Taken in batches, one lock each; what the channel cannot take goes back.
        let mut batch: [Option<Delivery>; PUMP_BATCH] = Default::default();
        'pump: while self.channel.can_deliver() && room() {
            // No more than the window takes: QoS 1/2 deliveries past it would go back.
            let take = self.channel.delivery_room().min(PUMP_BATCH);
            let n = mailbox.pop_batch(&mut batch[..take]);
            if n == 0 {
                break;
            }
            for i in 0..n {
                if i > 0 && !(self.channel.can_deliver() && room()) {
                    mailbox.unpop(batch[i..n].iter_mut().filter_map(Option::take));
                    break 'pump;
                }
                if let Some(delivery) = batch[i].take() {
                    self.channel.deliver(now, delivery);
                    offered += 1;
                }
            }
        }
        self.count_drops(offered);
        self.record_changes();
    }

    /// Deliveries the channel dropped (expired, too large for the client) are counted as they
    /// happen, and not as delivered.
    fn count_drops(&mut self, offered: u64) {
        let dropped = std::mem::take(&mut self.channel.dropped);
        let denied = std::mem::take(&mut self.channel.denied);
        let metrics = &self.broker.metrics;
        if denied > 0 {
            metrics.acl_denied.fetch_add(denied, Ordering::Relaxed);
        }
        self.broker
            .count_dropped(dropped, DropReason::Undeliverable);
        let sent = offered.saturating_sub(dropped);
        if let (Some(info), true) = (&self.info, sent > 0) {
            info.count_sent(sent);
        }
        if sent > 0 {
            metrics
                .messages_delivered
                .fetch_add(sent, Ordering::Relaxed);
        }
    }
}
