//! The async shell around the sans-IO core: the only place that spawns tasks, owns sockets and
//! reads the clock.
//!
//! `Broker` is the state every connection shares: the subscription tree (behind an `RwLock`,
//! written on (un)subscribe, read on publish), the retained store, and the table of sessions
//! (online, with a handle to the connection serving them, or offline, with the session itself
//! and the timers for its expiry and delayed will). Locks are `std::sync` and never held across
//! an `.await`. Lock order: sessions, then router, then a mailbox.
//!
//! - `mailbox`: a session's bounded delivery queue.
//! - `link`: a channel's ties to the broker, shared by every transport's driver.
//! - `driver`: the one connection driver loop, over a transport's `Wire`.
//! - `connection`: the byte-stream transports' `Wire` (TCP, TLS, WS, WSS).
//! - `listener`: accept loops.
//! - `quic`: the MQTT-over-QUIC `Wire` (control and data streams) and its stream tasks.
//! - `clock`: the one place that reads the time.
//! - `clients`: the table of connected clients for operators, with their link quality.
//! - `tcp_info`: the kernel's `TCP_INFO` of the TCP connections (sock_diag netlink), for it.

pub mod clients;
pub mod clock;
pub mod connection;
pub mod driver;
pub mod flapping;
pub mod link;
pub mod listener;
pub mod mailbox;
pub mod permits;
pub mod quic;
pub mod tcp_info;
pub mod view;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::auth::AuthService;
use crate::codec::{QoS, ReasonCode};
use crate::core::access::Admission;
use crate::core::channel::{AssignedClientId, Close, Limits, PendingWill};
use crate::core::delayed::DelayedQueue;
use crate::core::fanout::{self, Fanout, Scope, Subscriber, Subscribers};
use crate::core::hooks::{DropReason, Hooks, Observation, Refused, Ticket};
use crate::core::message::{AppMessage, Delivery, Flow};
use crate::core::registry::{EndReason, Event, Open, Registry};
use crate::core::retain::{RetainLimits, RetainedStore};
use crate::core::router::{Dispatch, SharedStrategy};
use crate::core::session::{Change, Outgoing, Session, Subscription};
use crate::core::topic::TopicFilter;
use mailbox::{Mailbox, Pushed, QueueBudget, QueueFull};

thread_local! {
    /// Each routing thread's fan-out buffers, so that routing allocates nothing once warm.
    static FANOUT: std::cell::RefCell<Fanout<Mailbox>> = std::cell::RefCell::default();
}

/// Counters, read by logs, tests and (later) `$SYS`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    /// Messages routed (published by clients, the API, wills, delayed), by QoS.
    pub messages_received: [AtomicU64; 3],
    /// Messages other nodes of the cluster sent here.
    pub messages_from_peers: AtomicU64,
    /// Cluster (`cluster::node`): messages offered to the other nodes, copies dropped as
    /// duplicates, QoS 0 messages dropped because NATS could not take them fast enough,
    /// messages replayed into sessions from the stream, sessions asked of other nodes and
    /// handed to them.
    pub peers_forwarded: AtomicU64,
    pub peers_duplicates: AtomicU64,
    pub peers_dropped: AtomicU64,
    pub peers_replayed: AtomicU64,
    pub peers_takeovers_asked: AtomicU64,
    pub peers_takeovers_answered: AtomicU64,
    pub messages_delivered: AtomicU64,
    /// Deliveries dropped for a full queue (see `messages_dropped` for the total).
    pub dropped_queue_full: AtomicU64,
    /// Deliveries dropped expired or too large for the client.
    pub dropped_undeliverable: AtomicU64,
    /// Messages that matched no subscription (not counted in `messages_dropped()`, as EMQX's
    /// `messages.dropped.no_subscribers`).
    pub dropped_no_subscribers: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Times a publishing connection paused because the deliveries queued broker-wide were
    /// over `broker.max_queued_bytes`.
    pub publisher_pauses: AtomicU64,
    /// QoS 0 publishes a paused connection dropped (it holds only a few; see `Link`).
    pub dropped_paused: AtomicU64,
    /// CONNECTs refused for their credentials or the anonymous policy.
    pub auth_failures: AtomicU64,
    /// Publishes, subscriptions and deliveries the ACL refused.
    pub acl_denied: AtomicU64,
    /// Persistent messages refused because the store was full or failing (0x97).
    pub store_refused: AtomicU64,
    /// Retained messages routed but not retained: past a `[retainer]` limit.
    pub retained_refused: AtomicU64,
    /// CONNECTs refused because `broker.max_sessions` sessions were held.
    pub sessions_refused: AtomicU64,
    /// Connections closed for not reading their output (`mqtt.max_outbound_buffer`).
    pub slow_readers_closed: AtomicU64,
    /// The most connections open at once.
    pub connections_max: AtomicU64,
    /// QUIC handshakes completed, and how many of them accepted 0-RTT data.
    pub quic_handshakes: AtomicU64,
    pub quic_0rtt_accepted: AtomicU64,
    /// QUIC clients that moved to a new address (and kept their connection).
    pub quic_migrations: AtomicU64,
    /// Times an accept loop paused for its listener's `max_conn_rate`.
    pub connections_rate_limited: AtomicU64,
    /// QUIC Retry packets sent (address validation).
    pub quic_retries: AtomicU64,
    /// QUIC stream tasks (readers, writers) not yet released: returns to its base when
    /// streams end, however many a connection opened.
    pub quic_stream_tasks: AtomicU64,
    /// Client ids banned by flapping detection.
    pub flapping_bans: AtomicU64,
    /// The QoS 0 datagram class over QUIC (docs/datagram.md), summed over connections.
    pub quic_datagrams: crate::transport::datagram::Counters,
}

impl Metrics {
    /// A connection opened.
    pub fn connection_opened(&self) {
        let now = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        self.connections_max.fetch_max(now, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Deliveries dropped, for every reason.
    pub fn messages_dropped(&self) -> u64 {
        self.dropped_queue_full.load(Ordering::Relaxed)
            + self.dropped_undeliverable.load(Ordering::Relaxed)
    }

    /// Messages received at every QoS.
    pub fn messages_received(&self) -> u64 {
        self.messages_received
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }
}

/// A `$SYS` value the broker published itself (no publisher): not counted as received, and
/// not written to the store (made afresh at every start).
fn is_own_sys(message: &AppMessage) -> bool {
    message.publisher.is_none() && message.topic.as_str().starts_with("$SYS/")
}

/// What routing a message came to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routed {
    /// The store's ticket for what routing stored (0: nothing): the publisher's
    /// acknowledgement waits until it is on disk.
    pub ticket: Ticket,
    /// Why (part of) it could not be taken: 0x97 when the store is full or failing.
    pub refused: Option<ReasonCode>,
}

impl Routed {
    fn stored(&mut self, ticket: Ticket) {
        self.ticket = self.ticket.max(ticket);
    }

    fn refuse(&mut self, refused: Refused) {
        if self.refused.is_none() {
            match refused {
                Refused::Full => tracing::warn!(
                    "store full (storage.max_bytes): a persistent message was refused (0x97)"
                ),
                Refused::Failed => {
                    tracing::warn!("store failing: a persistent message was refused (0x97)")
                }
            }
        }
        self.refused = Some(ReasonCode::QUOTA_EXCEEDED);
    }
}

/// Broker settings outside the protocol limits.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Arc<Limits>,
    /// Deliveries queued per session (online beyond the window, or offline).
    pub max_queued: usize,
    /// What a full session queue does with a QoS 1/2 delivery (`session.queue_full`).
    pub queue_full: QueueFull,
    /// Bytes queued over every session past which publishers are held
    /// (`broker.max_queued_bytes`; 0: no limit).
    pub max_queued_bytes: u64,
    /// How long a closing connection may take to flush before it is dropped.
    pub close_linger: Duration,
    pub quic: Arc<crate::transport::quic::QuicSettings>,
    /// Delayed messages held at once (0: no limit).
    pub max_delayed: usize,
    /// How shared groups pick a member: by group name, and for the rest.
    pub shared_strategy: SharedStrategy,
    pub group_strategies: HashMap<Box<str>, SharedStrategy>,
    /// Connections open at once, broker-wide (`broker.max_connections`).
    pub max_connections: usize,
    /// Connections open at once from one IP address (0: no limit).
    pub max_connections_per_address: usize,
    /// Bounds on the retained store (`[retainer]`).
    pub retain: RetainLimits,
    /// Sessions held, online and offline (`broker.max_sessions`, 0: no limit).
    pub max_sessions: usize,
    /// TCP keepalive on accepted sockets (`broker.tcp_keepalive`; `None`: off).
    pub tcp_keepalive: Option<listener::TcpKeepalive>,
}

#[cfg(any(test, feature = "internals"))]
impl Settings {
    /// Settings for tests and benchmarks: `max_queued` deliveries per session, no byte
    /// budget, everything else at its default.
    pub fn minimal(max_queued: usize) -> Self {
        Settings {
            limits: Arc::new(Limits::default()),
            max_queued,
            queue_full: Default::default(),
            max_queued_bytes: 0,
            close_linger: Duration::from_millis(100),
            quic: Default::default(),
            max_delayed: 0,
            shared_strategy: Default::default(),
            group_strategies: Default::default(),
            max_connections: 1000,
            max_connections_per_address: 0,
            retain: Default::default(),
            max_sessions: 0,
            tcp_keepalive: None,
        }
    }
}

/// A log line a client can trigger, at most once a minute (a remote must not set our warn
/// rate); the counters say how many were not logged.
#[derive(Debug, Default)]
pub(crate) struct LogEvery(Mutex<Option<Instant>>);

impl LogEvery {
    /// Whether to log now (and if so, the next one waits a minute).
    pub(crate) fn due(&self, now: Instant) -> bool {
        let mut last = self.0.lock().expect("log lock is never poisoned");
        if last.is_some_and(|at| now.saturating_duration_since(at) < Duration::from_secs(60)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

pub struct Broker {
    settings: Settings,
    /// The protocol limits new connections get (`settings.limits` until a reload replaces
    /// them; a connection keeps the ones it started with).
    limits: RwLock<Arc<Limits>>,
    router: RwLock<Subscribers<Mailbox>>,
    retained: Mutex<RetainedStore<Arc<AppMessage>>>,
    /// When a refused retained message was last logged (one line a minute at most).
    retain_logged: LogEvery,
    /// The same for the other broker-wide limits (sessions).
    limit_logged: LogEvery,
    sessions: Mutex<Registry<Arc<Mailbox>>>,
    /// `$delayed/` messages waiting for their time.
    delayed: Mutex<DelayedQueue>,
    /// Delayed messages admitted and not yet published (held against `max_delayed`).
    delayed_admitted: AtomicUsize,
    /// Who holds each `$exclusive/` filter (keyed without the prefix).
    exclusive: Mutex<HashMap<Box<str>, Arc<str>>>,
    timers_changed: Notify,
    next_conn_id: AtomicU64,
    /// Keys the client ids the broker assigns, so that they cannot be guessed.
    client_id_key: std::hash::RandomState,
    auth: Arc<AuthService>,
    hooks: Hooks,
    pub metrics: Metrics,
    /// The bytes queued in every mailbox, against `max_queued_bytes`.
    pub budget: Arc<QueueBudget>,
    /// Connected clients, for operators.
    pub clients: clients::Clients,
    /// The connection limits every listener takes a permit from at accept time.
    pub permits: Arc<permits::ConnectionLimits>,
    /// Connection ends by client id, for `flapping_detect`.
    flapping: Mutex<flapping::Flapping>,
}

impl Broker {
    pub fn new(settings: Settings) -> Self {
        let mut router = Subscribers::new();
        router.set_strategies(settings.shared_strategy, settings.group_strategies.clone());
        let permits = permits::ConnectionLimits::new(
            settings.max_connections,
            settings.max_connections_per_address,
        );
        let budget = Arc::new(QueueBudget::new(settings.max_queued_bytes));
        let mut registry = Registry::default();
        registry.set_max_sessions(settings.max_sessions);
        Self {
            budget,
            limits: RwLock::new(Arc::clone(&settings.limits)),
            settings,
            router: RwLock::new(router),
            retained: Mutex::new(RetainedStore::weighed(|m: &Arc<AppMessage>| {
                m.payload.len()
            })),
            retain_logged: LogEvery::default(),
            limit_logged: LogEvery::default(),
            sessions: Mutex::new(registry),
            delayed: Mutex::new(DelayedQueue::default()),
            delayed_admitted: AtomicUsize::new(0),
            exclusive: Mutex::new(HashMap::new()),
            timers_changed: Notify::new(),
            next_conn_id: AtomicU64::new(1),
            client_id_key: std::hash::RandomState::new(),
            auth: Arc::new(AuthService::default()),
            hooks: Hooks::default(),
            metrics: Metrics::default(),
            clients: clients::Clients::default(),
            permits,
            flapping: Mutex::new(flapping::Flapping::new(Default::default())),
        }
    }

    /// Whether a CONNECT for `client_id` would find something to take over, resume, wipe or
    /// cancel (a session, online or offline, or a will waiting).
    pub fn knows_client(&self, client_id: &str) -> bool {
        self.lock_sessions().knows(client_id)
    }

    /// The broker with these `flapping_detect` settings in place of the defaults.
    pub fn with_flapping(self, settings: flapping::FlappingSettings) -> Self {
        *self
            .flapping
            .lock()
            .expect("flapping lock is never poisoned") = flapping::Flapping::new(settings);
        self
    }

    /// An accepted connection of `client_id` (from `peer`) ended: a client id flapping is
    /// banned for `flapping_detect.ban_time`.
    pub fn connection_ended(&self, now: Instant, client_id: &str, peer: std::net::SocketAddr) {
        let ban_time = {
            let mut flapping = self
                .flapping
                .lock()
                .expect("flapping lock is never poisoned");
            if !flapping.disconnected(client_id, now) {
                return;
            }
            flapping.settings().ban_time
        };
        let at = clock::wall()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // Whole seconds, at least one (the banned list keeps seconds).
        let until = at + ban_time.as_secs_f64().ceil().max(1.0) as u64;
        let ban = crate::auth::banned::Ban {
            kind: crate::auth::banned::BanKind::Clientid,
            who: client_id.to_owned(),
            by: "flapping_detect".to_owned(),
            reason: "flapping".to_owned(),
            at,
            until: Some(until),
        };
        self.metrics.flapping_bans.fetch_add(1, Ordering::Relaxed);
        match self.auth.banned().add(ban) {
            Ok(_) => tracing::warn!(
                client_id,
                %peer,
                ?ban_time,
                "client id banned for flapping: connected and disconnected more than flapping_detect.max_count times within flapping_detect.window_time"
            ),
            Err(err) => tracing::warn!(client_id, %err, "cannot ban a flapping client id"),
        }
    }

    /// The broker with these authentication and authorization rules in place of the
    /// default (anonymous clients from loopback only, no ACL).
    pub fn with_auth(mut self, auth: Arc<AuthService>) -> Self {
        self.auth = auth;
        self
    }

    /// The broker with these seams (observer, store, peers) in place of none.
    pub fn with_hooks(mut self, hooks: Hooks) -> Self {
        self.hooks = hooks;
        self
    }

    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    pub fn auth(&self) -> &Arc<AuthService> {
        &self.auth
    }

    /// The protocol limits in force for new connections.
    pub fn limits(&self) -> Arc<Limits> {
        Arc::clone(&self.limits.read().expect("limits lock is never poisoned"))
    }

    /// New connections get these limits (a reload); connections already open keep theirs.
    pub fn set_limits(&self, limits: Arc<Limits>) {
        *self.limits.write().expect("limits lock is never poisoned") = limits;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A new session's delivery queue, under the session settings and the broker's budget.
    fn new_mailbox(&self) -> Arc<Mailbox> {
        Arc::new(Mailbox::new(
            self.settings.max_queued,
            self.settings.queue_full,
            Arc::clone(&self.budget),
        ))
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The client id connection `conn_id` gives its client if the client sends none.
    fn assignable_client_id(&self, conn_id: u64) -> AssignedClientId {
        use std::hash::BuildHasher as _;
        AssignedClientId {
            secret: self.client_id_key.hash_one(conn_id),
            serial: conn_id,
        }
    }

    /// Finds the session for a CONNECT: resumes an offline one, takes one over from another
    /// connection, or starts anew (the registry decides). Returns the session to resume
    /// (`None`: new) and the mailbox.
    pub async fn open_session(
        &self,
        now: Instant,
        client_id: &Arc<str>,
        clean_start: bool,
        conn_id: u64,
    ) -> Result<(Option<Session>, Arc<Mailbox>), ReasonCode> {
        // In a cluster, the session comes here first if another node holds it.
        if let Some(claim) = self.hooks.peers.as_ref().and_then(|p| p.claim(client_id)) {
            claim.await;
        }
        self.open_session_here(now, client_id, clean_start, conn_id)
            .await
    }

    /// [`Broker::open_session`] among this node's sessions only.
    async fn open_session_here(
        &self,
        now: Instant,
        client_id: &Arc<str>,
        clean_start: bool,
        conn_id: u64,
    ) -> Result<(Option<Session>, Arc<Mailbox>), ReasonCode> {
        // A takeover storm could keep stealing the slot back; a few rounds is plenty for any
        // honest client.
        for _ in 0..8 {
            let (ack_tx, ack_rx) = oneshot::channel();
            let opened = {
                let mut sessions = self.lock_sessions();
                let new_mailbox = || self.new_mailbox();
                match sessions.open(client_id, clean_start, conn_id, new_mailbox) {
                    Open::Busy { handle, conn_id } => {
                        // Asked under the sessions lock: the old connection either sees the
                        // request or has already filed the session offline.
                        handle.request_takeover(conn_id, ack_tx);
                        None
                    }
                    Open::Ready { session, handle } => {
                        // A request left for a connection that is gone (its requester gave
                        // up) is dropped.
                        handle.take_takeover(conn_id);
                        Some((session.map(|s| *s), handle, self.carry_out(&mut sessions)))
                    }
                    Open::Full => {
                        drop(sessions);
                        self.metrics
                            .sessions_refused
                            .fetch_add(1, Ordering::Relaxed);
                        if self.limit_logged.due(now) {
                            tracing::warn!(
                                %client_id,
                                max = self.settings.max_sessions,
                                "CONNECT refused (0x97): broker.max_sessions sessions are held \
                                 (logged once a minute)"
                            );
                        }
                        return Err(ReasonCode::QUOTA_EXCEEDED);
                    }
                }
            };
            if let Some((session, mailbox, wills)) = opened {
                self.publish_wills(wills, now);
                if let Some(observer) = &self.hooks.observer {
                    observer.observe(&Observation::Connected {
                        client_id,
                        session_present: session.is_some(),
                    });
                }
                return Ok((session, mailbox));
            }
            // The old connection closes and files its session offline before it answers; a
            // connection stuck on a dead socket is given up on after the linger time.
            if let Ok(Err(_)) = tokio::time::timeout(self.settings.close_linger * 2, ack_rx).await {
                // Dropped unanswered (a newer request replaced it): look again.
                tokio::task::yield_now().await;
            }
        }
        Err(ReasonCode::SERVER_BUSY)
    }

    /// Hands `client_id`'s session over to another node of the cluster, which a CONNECT
    /// reached: its connection here closes with 0x8E (Session taken over), and a persistent
    /// session leaves this node without ending, filed in the store (which the cluster
    /// shares) for the other node to read. Returns the store's ticket for that filing, for
    /// the caller to wait on before it answers (`Some(0)`: nothing stored), or `None` if no
    /// session of that client is here.
    pub async fn hand_over(&self, client_id: &Arc<str>, now: Instant) -> Option<Ticket> {
        if !self.knows_client(client_id) {
            return None;
        }
        let conn_id = self.next_conn_id();
        let (session, _mailbox) = self
            .open_session_here(now, client_id, false, conn_id)
            .await
            .ok()?;
        let mut ticket = 0;
        if let (Some(session), Some(store)) = (&session, &self.hooks.store) {
            if session.expiry_interval != 0 {
                // Reconnecting (elsewhere) cancelled any delayed will [MQTT-3.1.3-9].
                ticket = store.session_filed(session, None);
            }
        }
        self.lock_sessions().release(client_id, conn_id);
        if let Some(session) = &session {
            self.drop_subscriptions(client_id, session);
            self.release_exclusive(client_id, session.subscriptions.values().map(|s| &s.filter));
        }
        session.map(|_| ticket)
    }

    /// Waits until the store has committed everything up to `ticket`.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), Refused> {
        match &self.hooks.store {
            Some(store) if ticket != 0 => {
                std::future::poll_fn(|cx| store.poll_durable(cx, ticket, ticket)).await
            }
            _ => Ok(()),
        }
    }

    /// A retained message another node of the cluster set (`Some`) or cleared (`None`):
    /// kept here for this node's new subscriptions; the cluster's store already holds it.
    pub fn retained_from_peer(&self, topic: &str, message: Option<Arc<AppMessage>>) {
        fanout::store_retained(
            &mut self
                .retained
                .lock()
                .expect("retained lock is never poisoned"),
            topic,
            message,
        );
    }

    /// A connection ended: file its session offline (or end it) and deal with its will.
    pub fn close_session(
        &self,
        now: Instant,
        conn_id: u64,
        client_id: &Arc<str>,
        mut close: Close,
    ) {
        // A session taken over stays with its client; any other close redispatches.
        if let (Some(session), false) = (
            &mut close.session,
            close.reason == ReasonCode::SESSION_TAKEN_OVER,
        ) {
            self.redispatch(conn_id, client_id, session);
        }
        if let (Some(observer), true) = (&self.hooks.observer, close.session.is_some()) {
            observer.observe(&Observation::Disconnected {
                client_id,
                reason: close.reason,
                initiator: close.initiator,
            });
        }
        let wills = {
            let mut sessions = self.lock_sessions();
            let before = sessions.poll_timeout();
            if let (Some(store), Some(session)) = (&self.hooks.store, &close.session) {
                if session.expiry_interval != 0 && sessions.is_served_by(client_id, conn_id) {
                    store.session_filed(session, close.will.as_ref());
                }
            }
            sessions.close(now, conn_id, client_id, close);
            if sessions.poll_timeout() != before {
                self.timers_changed.notify_one();
            }
            self.carry_out(&mut sessions)
        };
        self.publish_wills(wills, now);
    }

    /// Fires every due session-expiry, will and delayed-publish timer; returns the next
    /// deadline.
    pub fn handle_timers(&self, now: Instant) -> Option<Instant> {
        let (wills, next) = {
            let mut sessions = self.lock_sessions();
            sessions.handle_timeout(now);
            (self.carry_out(&mut sessions), sessions.poll_timeout())
        };
        self.publish_wills(wills, now);
        let (due, next_delayed) = {
            let mut delayed = self.delayed.lock().expect("delayed lock is never poisoned");
            let due: Vec<_> = std::iter::from_fn(|| delayed.pop_due(now)).collect();
            (due, delayed.poll_timeout())
        };
        self.delayed_admitted
            .fetch_sub(due.len(), Ordering::Relaxed);
        for (message, stored) in due {
            // Routed (its deliveries stored) before the store forgets it: a crash in between
            // publishes it again rather than never.
            self.publish(message, now);
            if let (Some(store), Some(key)) = (&self.hooks.store, stored) {
                store.delayed_done(key);
            }
        }
        match (next, next_delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Holds a `$delayed/` message (admitted by `reserve_delayed`) until `at`. It is kept
    /// with a payload of its own: a slice of the read buffer it came in would keep that whole
    /// buffer alive for the delay.
    ///
    /// A QoS 1/2 message is stored first (returns the store's ticket, 0 if not stored); when
    /// the store refuses it, it is not held (nor counted against `max_delayed`).
    pub fn delay(&self, message: Arc<AppMessage>, at: Instant) -> Result<Ticket, Refused> {
        let kept = Arc::new(message.detached());
        let mut ticket = 0;
        let mut stored = None;
        if let (Some(store), false) = (&self.hooks.store, kept.qos == QoS::AtMostOnce) {
            let key = store.next_key();
            match store.delayed_held(key, &kept, at) {
                Ok(t) => {
                    ticket = t;
                    stored = Some(key);
                }
                Err(refused) => {
                    self.delayed_admitted.fetch_sub(1, Ordering::Relaxed);
                    self.metrics.store_refused.fetch_add(1, Ordering::Relaxed);
                    return Err(refused);
                }
            }
        }
        self.delayed
            .lock()
            .expect("delayed lock is never poisoned")
            .push(at, kept, stored);
        self.timers_changed.notify_one();
        Ok(ticket)
    }

    /// Delayed messages waiting.
    pub fn delayed_count(&self) -> usize {
        self.delayed
            .lock()
            .expect("delayed lock is never poisoned")
            .count()
    }

    /// EMQX's redispatch: what a leaving member of a shared group got through that group and
    /// has not acknowledged (QoS 1/2 in flight) or not yet been sent (queued in its mailbox)
    /// goes to another member that can take it, and leaves the session; with no other member
    /// it stays for the session's return.
    fn redispatch(&self, conn_id: u64, client_id: &Arc<str>, session: &mut Session) {
        // Most sessions have no shared subscription: no lock, no queue scan for them.
        let shared = session
            .subscriptions
            .values()
            .any(|s| s.filter.share_group().is_some());
        if !shared {
            return;
        }
        let unacknowledged: Vec<_> = session
            .outgoing()
            .filter_map(|(id, state)| match state {
                Outgoing::Publish(delivery) if delivery.shared.is_some() => {
                    Some((*id, delivery.clone()))
                }
                _ => None,
            })
            .collect();
        let mailbox = self
            .lock_sessions()
            .served_handle(client_id, conn_id)
            .map(Arc::clone);
        let queued = mailbox
            .as_ref()
            .map(|m| m.take_where(|d| d.shared.is_some()))
            .unwrap_or_default();
        if unacknowledged.is_empty() && queued.is_empty() {
            return;
        }
        let router = self.router.read().expect("router lock is never poisoned");
        for (id, delivery) in unacknowledged {
            if self.to_other_member(&router, client_id, delivery) {
                let key = session.abandon(id);
                self.forget(client_id, key);
            }
        }
        let stay: Vec<_> = queued
            .into_iter()
            .filter(|delivery| {
                let moved = self.to_other_member(&router, client_id, delivery.clone());
                if moved {
                    self.forget(client_id, delivery.stored);
                }
                !moved
            })
            .collect();
        drop(router);
        if let Some(mailbox) = mailbox {
            mailbox.unpop(stay.into_iter());
        }
    }

    /// Sends a shared delivery to a member of its group other than `client_id` that can take
    /// it; `false` if there is none (or it was dropped after all).
    fn to_other_member(
        &self,
        router: &Subscribers<Mailbox>,
        client_id: &Arc<str>,
        delivery: Delivery,
    ) -> bool {
        let Some(filter) = delivery.shared else {
            return false;
        };
        let message = delivery.message;
        let dispatch = Dispatch {
            topic: &message.topic,
            publisher: message.publisher.as_deref(),
        };
        let other = router.pick_shared(&filter, dispatch, |(member, _), subscriber| {
            member != client_id && subscriber.handle.is_online() && subscriber.handle.accepts()
        });
        let Some(((_, flow), subscriber)) = other else {
            return false;
        };
        let delivery = Delivery {
            qos: message.qos.min(subscriber.options.qos),
            message: Arc::clone(&message),
            retain: false,
            subscription_ids: subscriber.id.into_iter().collect(),
            flow: *flow,
            shared: Some(filter),
            stored: None,
        };
        match self.push_delivery(&subscriber.handle, delivery) {
            Ok((Pushed::Queued, _)) => true,
            Ok((Pushed::Replaced, _)) => {
                self.count_dropped(1, DropReason::QueueFull);
                true
            }
            Ok((Pushed::Dropped, _)) | Err(_) => false,
        }
    }

    /// The store forgets a delivery that left `client_id`'s session.
    fn forget(&self, client_id: &str, key: Option<crate::core::session::StoreKey>) {
        if let (Some(store), Some(key)) = (&self.hooks.store, key) {
            store.changed(client_id, Change::Done { key });
        }
    }

    /// Queues a delivery in a session's mailbox, stored first when the session is
    /// persistent and the delivery QoS 1/2. Returns the store's ticket for it (0: not
    /// stored).
    fn push_delivery(
        &self,
        mailbox: &Mailbox,
        mut delivery: Delivery,
    ) -> Result<(Pushed, Ticket), Refused> {
        let (Some(store), Some(client_id), false) = (
            &self.hooks.store,
            mailbox.durable_client(),
            delivery.qos == QoS::AtMostOnce,
        ) else {
            return Ok((mailbox.push(delivery), 0));
        };
        if !mailbox.accepts() && !mailbox.keeps_overflow() {
            // Full of QoS 1/2: dropped without a write and its undoing (and never queued
            // unwritten, should the queue drain meanwhile).
            mailbox.overflow(&delivery);
            return Ok((Pushed::Dropped, 0));
        }
        let key = store.next_key();
        delivery.stored = Some(key);
        let ticket = store.queued(client_id, key, &delivery)?;
        let pushed = mailbox.push(delivery);
        if pushed == Pushed::Dropped {
            store.changed(client_id, Change::Done { key });
        }
        Ok((pushed, ticket))
    }

    /// Lets go of the `$exclusive/` filters `client_id` holds among `filters`.
    fn release_exclusive<'a>(
        &self,
        client_id: &str,
        filters: impl Iterator<Item = &'a TopicFilter>,
    ) {
        let mut held = None;
        for filter in filters.filter(|f| f.is_exclusive()) {
            let held = held.get_or_insert_with(|| self.exclusive.lock().expect("never poisoned"));
            if held
                .get(filter.filter())
                .is_some_and(|holder| &**holder == client_id)
            {
                held.remove(filter.filter());
            }
        }
    }

    /// Carries out the registry's events under the sessions lock: an ended session's
    /// subscriptions leave the router. Returns the wills to publish once the lock is released.
    fn carry_out(&self, sessions: &mut Registry<Arc<Mailbox>>) -> Vec<PendingWill> {
        let mut wills = Vec::new();
        while let Some(event) = sessions.poll_event() {
            match event {
                Event::Ended {
                    client_id,
                    session,
                    reason,
                } => {
                    self.drop_subscriptions(&client_id, &session);
                    self.release_exclusive(
                        &client_id,
                        session.subscriptions.values().map(|s| &s.filter),
                    );
                    if let Some(store) = &self.hooks.store {
                        store.session_ended(&client_id);
                    }
                    if let Some(observer) = &self.hooks.observer {
                        observer.observe(&Observation::SessionEnded {
                            client_id: &client_id,
                            reason,
                        });
                    }
                    if reason == EndReason::Expired {
                        self.metrics
                            .sessions_expired
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%client_id, "session expired");
                    }
                }
                Event::Will(will) => {
                    if let (Some(store), Some(client_id)) =
                        (&self.hooks.store, will.message.publisher.as_deref())
                    {
                        store.will_published(client_id);
                    }
                    wills.push(will);
                }
            }
        }
        wills
    }

    fn publish_wills(&self, wills: Vec<PendingWill>, now: Instant) {
        for will in wills {
            self.publish(Arc::new(will.into_message(now)), now);
        }
    }

    /// Runs the session timers until `shutdown`.
    pub async fn run_timers(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.handle_timers(clock::now());
            let sleep = async {
                match next {
                    Some(at) => clock::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.timers_changed.notified() => {}
                _ = sleep => {}
            }
        }
    }

    fn drop_subscriptions(&self, client_id: &Arc<str>, session: &Session) {
        if session.subscriptions.is_empty() {
            return;
        }
        let mut router = self.router.write().expect("router lock is never poisoned");
        for subscription in session.subscriptions.values() {
            let removed = router.remove(
                &subscription.filter,
                &(Arc::clone(client_id), subscription.flow),
            );
            if removed.is_some() {
                self.interest(&router, &subscription.filter, false);
            }
        }
    }

    /// Tells the peers when `filter` gained its first subscriber or lost its last (called
    /// with the router locked, so that interest changes reach them in order).
    fn interest(&self, router: &Subscribers<Mailbox>, filter: &TopicFilter, subscribed: bool) {
        if let Some(peers) = &self.hooks.peers {
            if router.count_on(filter) == usize::from(subscribed) {
                peers.interest(filter, subscribed);
            }
        }
    }

    pub fn subscribe(
        &self,
        now: Instant,
        client_id: &Arc<str>,
        mailbox: &Arc<Mailbox>,
        subscription: &Subscription,
        send_retained: bool,
    ) {
        self.subscribe_route(client_id, mailbox, subscription);
        if let Some(observer) = &self.hooks.observer {
            observer.observe(&Observation::Subscribed {
                client_id,
                filter: subscription.filter.as_str(),
            });
        }
        if !send_retained {
            return;
        }
        let deliveries = fanout::retained_deliveries(
            &mut self
                .retained
                .lock()
                .expect("retained lock is never poisoned"),
            subscription,
            now,
        );
        let mut dropped = 0;
        for delivery in deliveries {
            if mailbox.push(delivery) != Pushed::Queued {
                dropped += 1;
            }
        }
        self.count_dropped(dropped, DropReason::QueueFull);
    }

    /// Puts a session's subscription into the router and takes the same filter's
    /// subscription on `from` out, under one lock: no message matches both, none neither.
    pub fn move_subscription(
        &self,
        client_id: &Arc<str>,
        mailbox: &Arc<Mailbox>,
        subscription: &Subscription,
        from: Flow,
    ) {
        self.subscribe_route_replacing(client_id, mailbox, subscription, Some(from));
    }

    /// Puts a session's subscription into the router.
    fn subscribe_route(
        &self,
        client_id: &Arc<str>,
        mailbox: &Arc<Mailbox>,
        subscription: &Subscription,
    ) {
        self.subscribe_route_replacing(client_id, mailbox, subscription, None);
    }

    fn subscribe_route_replacing(
        &self,
        client_id: &Arc<str>,
        mailbox: &Arc<Mailbox>,
        subscription: &Subscription,
        replacing: Option<Flow>,
    ) {
        let route = Subscriber {
            handle: Arc::clone(mailbox),
            options: subscription.options,
            id: subscription.id,
            shared: subscription
                .filter
                .share_group()
                .map(|_| Arc::new(subscription.filter.clone())),
        };
        let mut router = self.router.write().expect("router lock is never poisoned");
        let previous = router.insert(
            &subscription.filter,
            (Arc::clone(client_id), subscription.flow),
            route,
        );
        if previous.is_none() {
            self.interest(&router, &subscription.filter, true);
        }
        if let Some(from) = replacing.filter(|from| *from != subscription.flow) {
            if router
                .remove(&subscription.filter, &(Arc::clone(client_id), from))
                .is_some()
            {
                self.interest(&router, &subscription.filter, false);
            }
        }
    }

    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &TopicFilter, flow: Flow) {
        {
            let mut router = self.router.write().expect("router lock is never poisoned");
            if router
                .remove(filter, &(Arc::clone(client_id), flow))
                .is_some()
            {
                self.interest(&router, filter, false);
            }
        }
        self.release_exclusive(client_id, std::iter::once(filter));
        if let Some(observer) = &self.hooks.observer {
            observer.observe(&Observation::Unsubscribed {
                client_id,
                filter: filter.as_str(),
            });
        }
    }

    /// Routes a message the broker itself publishes (a will, a delayed message, the API's):
    /// it meets the same queues as a client's, under the same policy.
    pub fn publish(&self, message: Arc<AppMessage>, now: Instant) {
        self.route(message, now);
    }

    /// Counts a refusal by the store.
    fn count_refused(&self, routed: &Routed) {
        if routed.refused.is_some() {
            self.metrics.store_refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Routes a message to every matching subscription: one delivery per session and flow,
    /// with the highest granted QoS and every matching subscription identifier
    /// [MQTT-3.3.4-2, -3]. A full queue overflows by its own policy (see `mailbox`); routing
    /// never waits.
    ///
    /// Deliveries to persistent sessions are stored first; a retained message is stored
    /// before it replaces the old one. When the store refuses (full, failing), the retained
    /// message is not kept nor routed, a refused delivery is dropped, and the answer says
    /// 0x97 for the publisher.
    pub fn route(&self, message: Arc<AppMessage>, now: Instant) -> Routed {
        // The broker's own `$SYS` messages are not counted as received (as Mosquitto).
        if !is_own_sys(&message) {
            self.metrics.messages_received[message.qos as usize].fetch_add(1, Ordering::Relaxed);
        }
        let mut routed = Routed::default();
        if message.retain && !self.retain_admitted(&message, now) {
            // Routed, not retained: the publish itself was accepted, so the publisher's
            // PUBACK says success (as EMQX), not 0x97, which would invite a resend.
        } else if message.retain {
            match self.store_retained(&message) {
                Ok(ticket) => routed.stored(ticket),
                Err(refused) => {
                    routed.refuse(refused);
                    self.count_refused(&routed);
                    return routed;
                }
            }
        }
        if message.is_expired(now) {
            return routed;
        }
        let scope = match &self.hooks.peers {
            Some(peers) if peers.dispatches_shared() => Scope::Origin,
            _ => Scope::All,
        };
        let served = self.fan_out(&message, scope, &mut routed);
        if let Some(peers) = &self.hooks.peers {
            match peers.forward(&message, &served) {
                Ok(ticket) => routed.stored(ticket),
                Err(refused) => routed.refuse(refused),
            }
        }
        self.count_refused(&routed);
        routed
    }

    /// Routes a message another node of the cluster sent: to the plain subscriptions here
    /// (`Scope::Plain`), or to one member of the shared group the cluster chose for it
    /// (`Scope::Group`). It is not retained here (the cluster's store tells every node of
    /// retained messages) nor forwarded again. Deliveries to persistent sessions are stored;
    /// no publisher waits for them.
    pub fn route_remote(&self, message: Arc<AppMessage>, scope: Scope<'_>, now: Instant) {
        if message.is_expired(now) {
            return;
        }
        self.metrics
            .messages_from_peers
            .fetch_add(1, Ordering::Relaxed);
        let mut routed = Routed::default();
        let _ = self.fan_out(&message, scope, &mut routed);
        self.count_refused(&routed);
    }

    /// The filters of `client_id`'s session here, if it has one offline.
    pub fn offline_filters(&self, client_id: &str) -> Vec<TopicFilter> {
        self.lock_sessions()
            .offline_with_handle(client_id)
            .map(|(session, _)| {
                session
                    .subscriptions
                    .values()
                    .map(|s| s.filter.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Pushes `message` to every subscription `scope` matches (see [`Broker::route`]);
    /// returns the shared groups it gave the message to, for `Scope::Origin` (nothing is
    /// allocated when there are none).
    fn fan_out(
        &self,
        message: &Arc<AppMessage>,
        scope: Scope<'_>,
        routed: &mut Routed,
    ) -> Vec<Arc<TopicFilter>> {
        let mut served = Vec::new();
        let dropped = FANOUT.with_borrow_mut(|fanout| {
            {
                let router = self.router.read().expect("router lock is never poisoned");
                // A shared group picks among members that are online and can take it.
                fanout.collect_in(&router, message, scope, |m| m.is_online() && m.accepts());
            }
            if !fanout.served().is_empty() {
                served.extend(fanout.served().iter().cloned());
            }
            let mut dropped = 0;
            let mut matched = false;
            for (mailbox, delivery) in fanout.drain() {
                matched = true;
                match self.push_delivery(&mailbox, delivery) {
                    Ok((Pushed::Queued, ticket)) => routed.stored(ticket),
                    // The oldest QoS 0 delivery queued made room.
                    Ok((Pushed::Replaced, ticket)) => {
                        routed.stored(ticket);
                        dropped += 1;
                    }
                    Ok((Pushed::Dropped, _)) => dropped += 1,
                    Err(refused) => {
                        routed.refuse(refused);
                        dropped += 1;
                    }
                }
            }
            fanout.trim();
            // In a cluster, other nodes may want what no subscription here matched.
            if !matched && matches!(scope, Scope::All) {
                self.metrics
                    .dropped_no_subscribers
                    .fetch_add(1, Ordering::Relaxed);
            }
            dropped
        });
        if dropped > 0 {
            self.count_dropped(dropped, DropReason::QueueFull);
        }
        served
    }

    /// Counts deliveries dropped for `reason` and tells the observer.
    pub fn count_dropped(&self, count: u64, reason: DropReason) {
        if count == 0 {
            return;
        }
        let by_reason = match reason {
            DropReason::QueueFull => &self.metrics.dropped_queue_full,
            DropReason::Undeliverable => &self.metrics.dropped_undeliverable,
        };
        by_reason.fetch_add(count, Ordering::Relaxed);
        if let Some(observer) = &self.hooks.observer {
            observer.observe(&Observation::Dropped { count, reason });
        }
    }

    /// Whether `message` may be retained under `[retainer]`'s limits (clearing always may);
    /// a refusal is counted and logged, once a minute at most. Checked before the durable
    /// store is asked; concurrent publishers may overshoot a limit by one message each.
    fn retain_admitted(&self, message: &AppMessage, now: Instant) -> bool {
        if message.payload.is_empty() || is_own_sys(message) {
            return true;
        }
        let refusal = self
            .retained
            .lock()
            .expect("retained lock is never poisoned")
            .admits(&message.topic, message.payload.len(), &self.settings.retain)
            .err();
        let Some(refusal) = refusal else {
            return true;
        };
        self.metrics
            .retained_refused
            .fetch_add(1, Ordering::Relaxed);
        if self.retain_logged.due(now) {
            tracing::warn!(
                topic = %message.topic,
                refused = self.metrics.retained_refused.load(Ordering::Relaxed),
                "retained message routed but not retained: past {} (logged once a minute)",
                refusal.setting()
            );
        }
        false
    }

    /// Keeps (or clears) a retained message, in the store first; returns the store's ticket
    /// (0: no store).
    fn store_retained(&self, message: &AppMessage) -> Result<Ticket, Refused> {
        let entry = fanout::retained_entry(message);
        let mut ticket = 0;
        if let (Some(store), false) = (&self.hooks.store, is_own_sys(message)) {
            ticket = match &entry {
                Some(kept) => store.retained_set(kept)?,
                None => store.retained_cleared(&message.topic),
            };
        }
        fanout::store_retained(
            &mut self
                .retained
                .lock()
                .expect("retained lock is never poisoned"),
            &message.topic,
            entry,
        );
        Ok(ticket)
    }

    /// Puts back what a durable store held at start-up: retained messages, and persistent
    /// sessions offline with their subscriptions in the router, their queued deliveries in
    /// their mailboxes, and their expiry and will timers counted across the downtime (a
    /// session that expired meanwhile ends at the first timer turn, its will published).
    pub fn restore(&self, recovered: crate::storage::Recovered, now: Instant) {
        let crate::storage::Recovered {
            sessions,
            retained,
            expired,
            expired_retained,
            delayed,
            ..
        } = recovered;
        {
            let mut queue = self.delayed.lock().expect("delayed lock is never poisoned");
            for (key, left, message) in delayed {
                let at = now.checked_add(left).unwrap_or(now);
                queue.push(at, Arc::new(message), Some(key));
                self.delayed_admitted.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(store) = &self.hooks.store {
            for (client_id, key) in expired {
                store.changed(&client_id, Change::Done { key });
            }
            for topic in expired_retained {
                store.retained_cleared(&topic);
            }
        }
        {
            let mut store = self
                .retained
                .lock()
                .expect("retained lock is never poisoned");
            for message in retained {
                let topic = message.topic.as_str().to_owned();
                store.insert(&topic, Arc::new(message));
            }
        }
        for restored in sessions {
            let client_id = Arc::clone(&restored.session.client_id);
            if let Some(store) = &self.hooks.store {
                for &(flow, id) in &restored.inbound_rehomed {
                    store.changed(&client_id, Change::Freed { flow, id });
                    store.changed(
                        &client_id,
                        Change::Held {
                            flow: Flow::CONTROL,
                            id,
                        },
                    );
                }
            }
            tracing::debug!(
                %client_id,
                awaiting_release = ?restored.session.awaiting_release,
                inflight = restored.session.inflight(),
                queued = restored.queued.len(),
                "session restored"
            );
            let mailbox = self.new_mailbox();
            mailbox.set_durable(&client_id, true);
            mailbox.restore(restored.queued);
            for subscription in restored.session.subscriptions.values() {
                if subscription.filter.is_exclusive() {
                    self.claim_exclusive(subscription.filter.filter(), &client_id);
                }
                self.subscribe_route(&client_id, &mailbox, subscription);
            }
            let expires_at = restored.expires_in.map(|left| {
                now.checked_add(left)
                    .unwrap_or(now + Duration::from_secs(1 << 32))
            });
            let will = restored
                .will
                .map(|(will, left)| (will, now.checked_add(left).unwrap_or(now)));
            self.lock_sessions()
                .restore(restored.session, mailbox, expires_at, will);
        }
        self.timers_changed.notify_one();
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Registry<Arc<Mailbox>>> {
        self.sessions
            .lock()
            .expect("sessions lock is never poisoned")
    }

    /// Number of sessions known (online and offline).
    pub fn session_count(&self) -> usize {
        self.lock_sessions().count()
    }

    pub fn retained_count(&self) -> usize {
        self.retained
            .lock()
            .expect("retained lock is never poisoned")
            .count()
    }

    /// Topic and payload bytes of every retained message (held against
    /// `retainer.max_retained_bytes`).
    pub fn retained_bytes(&self) -> usize {
        self.retained
            .lock()
            .expect("retained lock is never poisoned")
            .bytes()
    }
}

/// The broker answers the channel's broker-wide questions from its shared state.
impl Admission for Broker {
    fn claim_exclusive(&self, filter: &str, client_id: &str) -> bool {
        let mut held = self
            .exclusive
            .lock()
            .expect("exclusive lock is never poisoned");
        match held.get(filter) {
            Some(holder) => &**holder == client_id,
            None => {
                held.insert(filter.into(), Arc::from(client_id));
                true
            }
        }
    }

    fn reserve_delayed(&self) -> bool {
        let max = self.settings.max_delayed;
        self.delayed_admitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok()
    }
}

#[cfg(test)]
mod tests;
