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
//! - `connection`: the driver loop for byte-stream transports.
//! - `listener`: accept loops.
//! - `quic`: the MQTT-over-QUIC driver (control and data streams).
//! - `clock`: the one place that reads the time.

pub mod clock;
pub mod connection;
pub mod link;
pub mod listener;
pub mod mailbox;
pub mod quic;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthService;
use crate::codec::{ReasonCode, SubscriptionOptions};
use crate::config::{Config, ListenerKind};
use crate::core::channel::{Close, Limits, PendingWill};
use crate::core::message::{Delivery, Flow, Message};
use crate::core::retain::RetainedStore;
use crate::core::router::SubscriptionTree;
use crate::core::session::{Session, Subscription};
use crate::core::timers::TimerTable;
use crate::core::topic::TopicFilter;
use crate::transport::certs::DevCerts;
use anyhow::Context as _;
use mailbox::{Mailbox, Pushed};

/// What `route` builds per publish, kept per thread so that routing allocates nothing once
/// warm: the deliveries to push, and (for fan-out) an index of them by session and flow.
/// Empty between calls (the deliveries are moved out), so it holds no message alive.
#[derive(Default)]
struct RouteScratch {
    targets: Vec<(Arc<Mailbox>, Delivery)>,
    /// Keyed by the mailbox's address (one mailbox per session) and flow: no client controls
    /// these keys, so a fast unkeyed hash is safe.
    index: HashMap<(*const Mailbox, Flow), usize, rustc_hash::FxBuildHasher>,
}

/// Entries a thread's route scratch keeps between publishes (about 64 KiB of targets).
const SCRATCH_KEEP: usize = 1024;

thread_local! {
    static ROUTE_SCRATCH: std::cell::RefCell<RouteScratch> = std::cell::RefCell::default();
}

/// Who holds a subscription: a client, on one of its flows.
type SubscriberKey = (Arc<str>, Flow);

/// A subscription as the router holds it.
#[derive(Debug)]
struct Route {
    mailbox: Arc<Mailbox>,
    options: SubscriptionOptions,
    id: Option<u32>,
}

#[derive(Debug)]
enum SlotState {
    /// Served by the connection with this id (reached through the slot's mailbox).
    Online { conn_id: u64 },
    /// Boxed: most slots are online, and the table holds one per client.
    Offline { session: Box<Session> },
}

#[derive(Debug)]
struct Slot {
    mailbox: Arc<Mailbox>,
    state: SlotState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TimerKey {
    Expire(Arc<str>),
    Will(Arc<str>),
}

#[derive(Debug, Default)]
struct Sessions {
    slots: HashMap<Arc<str>, Slot>,
    wills: HashMap<Arc<str>, PendingWill>,
    timers: TimerTable<TimerKey>,
}

/// Counters, read by logs, tests and (later) `$SYS`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    pub messages_received: AtomicU64,
    pub messages_delivered: AtomicU64,
    /// Deliveries dropped: mailbox full, expired, or too large for the client.
    pub messages_dropped: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// Times a publishing connection paused because a subscriber's queue was over capacity.
    pub publisher_pauses: AtomicU64,
    /// CONNECTs refused for their credentials or the anonymous policy.
    pub auth_failures: AtomicU64,
    /// Publishes, subscriptions and deliveries the ACL refused.
    pub acl_denied: AtomicU64,
}

/// Broker settings outside the protocol limits.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Arc<Limits>,
    /// Deliveries queued per session (online beyond the window, or offline).
    pub max_queued: usize,
    /// How long a closing connection may take to flush before it is dropped.
    pub close_linger: Duration,
    pub quic: Arc<crate::config::QuicSettings>,
}

pub struct Broker {
    settings: Settings,
    /// Keyed by client id and flow: a QUIC data stream's subscriptions are its own.
    router: RwLock<SubscriptionTree<SubscriberKey, Route>>,
    retained: Mutex<RetainedStore<Arc<Message>>>,
    sessions: Mutex<Sessions>,
    timers_changed: Notify,
    next_conn_id: AtomicU64,
    auth: Arc<AuthService>,
    pub metrics: Metrics,
}

impl Broker {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            router: RwLock::new(SubscriptionTree::new()),
            retained: Mutex::new(RetainedStore::new()),
            sessions: Mutex::new(Sessions::default()),
            timers_changed: Notify::new(),
            next_conn_id: AtomicU64::new(1),
            auth: Arc::new(AuthService::default()),
            metrics: Metrics::default(),
        }
    }

    /// The broker with these authentication and authorization rules in place of the
    /// default (anonymous clients from loopback only, no ACL).
    pub fn with_auth(mut self, auth: Arc<AuthService>) -> Self {
        self.auth = auth;
        self
    }

    pub fn auth(&self) -> &Arc<AuthService> {
        &self.auth
    }

    pub fn limits(&self) -> &Arc<Limits> {
        &self.settings.limits
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Finds the session for a CONNECT: resumes an offline one, takes one over from another
    /// connection, or starts anew. Returns the session to resume (`None`: new) and the mailbox.
    pub async fn open_session(
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
            {
                let mut sessions = self.lock_sessions();
                let mut will_now = None;
                if let Some(Slot {
                    mailbox,
                    state: SlotState::Online { conn_id: old, .. },
                }) = sessions.slots.get(client_id)
                {
                    // Asked under the sessions lock: the old connection either sees the
                    // request or has already filed the session offline.
                    mailbox.request_takeover(*old, ack_tx);
                } else {
                    // [MQTT-3.1.3-9]: reconnecting in time cancels a delayed will; a clean start
                    // ends the old session, which publishes it at once.
                    sessions
                        .timers
                        .cancel(&TimerKey::Will(Arc::clone(client_id)));
                    if let Some(will) = sessions.wills.remove(client_id) {
                        if clean_start {
                            will_now = Some(will);
                        }
                    }
                    let result = self.claim_slot(&mut sessions, client_id, clean_start, conn_id);
                    drop(sessions);
                    if let Some(will) = will_now {
                        self.publish(Arc::new(will.into_message(now)), now);
                    }
                    return Ok(result);
                }
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

    fn claim_slot(
        &self,
        sessions: &mut Sessions,
        client_id: &Arc<str>,
        clean_start: bool,
        conn_id: u64,
    ) -> (Option<Session>, Arc<Mailbox>) {
        sessions
            .timers
            .cancel(&TimerKey::Expire(Arc::clone(client_id)));
        let online = SlotState::Online { conn_id };
        let previous = sessions.slots.remove(client_id);
        let (session, mailbox) = match previous {
            Some(Slot {
                mailbox,
                state: SlotState::Offline { session },
            }) if !clean_start => (Some(*session), mailbox),
            Some(Slot {
                state: SlotState::Offline { session },
                ..
            }) => {
                self.drop_subscriptions(client_id, &session);
                (None, Arc::new(Mailbox::new(self.settings.max_queued)))
            }
            _ => (None, Arc::new(Mailbox::new(self.settings.max_queued))),
        };
        mailbox.set_online(true);
        // A request left for a connection that is gone (its requester gave up) is dropped.
        mailbox.take_takeover(conn_id);
        sessions.slots.insert(
            Arc::clone(client_id),
            Slot {
                mailbox: Arc::clone(&mailbox),
                state: online,
            },
        );
        (session, mailbox)
    }

    /// A connection ended: file its session offline (or end it) and deal with its will.
    pub fn close_session(&self, now: Instant, conn_id: u64, client_id: &Arc<str>, close: Close) {
        let mut publish_now = None;
        {
            let mut sessions = self.lock_sessions();
            let ours = matches!(
                sessions.slots.get(client_id),
                Some(Slot { state: SlotState::Online { conn_id: c, .. }, .. }) if *c == conn_id
            );
            if !ours {
                // Never registered (refused CONNECT): only a will could be due, and a refused
                // CONNECT has none.
                return;
            }
            let Some(session) = close.session else {
                sessions.slots.remove(client_id);
                return;
            };
            let expiry = session.expiry_interval;
            if expiry == 0 {
                self.drop_subscriptions(client_id, &session);
                sessions.slots.remove(client_id);
                publish_now = close.will;
            } else {
                if let Some(slot) = sessions.slots.get_mut(client_id) {
                    slot.mailbox.set_online(false);
                    slot.state = SlotState::Offline {
                        session: Box::new(session),
                    };
                }
                if expiry != u32::MAX {
                    let at = now + Duration::from_secs(u64::from(expiry));
                    sessions
                        .timers
                        .schedule(TimerKey::Expire(Arc::clone(client_id)), at);
                }
                if let Some(will) = close.will {
                    let delay = will.delay;
                    if delay == 0 {
                        publish_now = Some(will);
                    } else {
                        let at = now + Duration::from_secs(u64::from(delay.min(expiry)));
                        sessions
                            .timers
                            .schedule(TimerKey::Will(Arc::clone(client_id)), at);
                        sessions.wills.insert(Arc::clone(client_id), will);
                    }
                }
                self.timers_changed.notify_one();
            }
        }
        if let Some(will) = publish_now {
            self.publish(Arc::new(will.into_message(now)), now);
        }
    }

    /// Fires every due session-expiry and will timer; returns the next deadline.
    pub fn handle_timers(&self, now: Instant) -> Option<Instant> {
        let mut wills = Vec::new();
        let next = {
            let mut sessions = self.lock_sessions();
            while let Some(key) = sessions.timers.pop_due(now) {
                match key {
                    TimerKey::Will(id) => wills.extend(sessions.wills.remove(&id)),
                    TimerKey::Expire(id) => {
                        if let Some(Slot {
                            state: SlotState::Offline { session },
                            ..
                        }) = sessions.slots.remove(&id)
                        {
                            self.drop_subscriptions(&id, &session);
                            self.metrics
                                .sessions_expired
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(client_id = %id, "session expired");
                        }
                        // The session ended before the will delay: publish it now.
                        sessions.timers.cancel(&TimerKey::Will(Arc::clone(&id)));
                        wills.extend(sessions.wills.remove(&id));
                    }
                }
            }
            sessions.timers.next_deadline()
        };
        for will in wills {
            self.publish(Arc::new(will.into_message(now)), now);
        }
        next
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
            router.remove(
                &subscription.filter,
                &(Arc::clone(client_id), subscription.flow),
            );
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
        let route = Route {
            mailbox: Arc::clone(mailbox),
            options: subscription.options,
            id: subscription.id,
        };
        self.router
            .write()
            .expect("router lock is never poisoned")
            .insert(
                &subscription.filter,
                (Arc::clone(client_id), subscription.flow),
                route,
            );
        if !send_retained {
            return;
        }
        let mut matches = Vec::new();
        let mut expired = Vec::new();
        {
            let retained = self
                .retained
                .lock()
                .expect("retained lock is never poisoned");
            retained.for_each_match(&subscription.filter, |topic, message| {
                if message.is_expired(now) {
                    expired.push(topic.to_owned());
                } else {
                    matches.push(Arc::clone(message));
                }
            });
        }
        if !expired.is_empty() {
            let mut retained = self
                .retained
                .lock()
                .expect("retained lock is never poisoned");
            for topic in expired {
                retained.remove(&topic);
            }
        }
        for message in matches {
            let qos = message.qos.min(subscription.options.qos);
            let delivery = Delivery {
                message,
                qos,
                retain: true,
                subscription_ids: subscription.id.into_iter().collect(),
                flow: subscription.flow,
            };
            if mailbox.push(delivery) == Pushed::Dropped {
                self.metrics
                    .messages_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn unsubscribe(&self, client_id: &Arc<str>, filter: &TopicFilter, flow: Flow) {
        self.router
            .write()
            .expect("router lock is never poisoned")
            .remove(filter, &(Arc::clone(client_id), flow));
    }

    /// Routes a message the broker itself publishes (a will), with no one to push back on.
    pub fn publish(&self, message: Arc<Message>, now: Instant) {
        self.route(message, now, &mut Vec::new());
    }

    /// Routes a message to every matching subscription: one delivery per session and flow,
    /// with the highest granted QoS and every matching subscription identifier
    /// [MQTT-3.3.4-2, -3]. Mailboxes that push back (see `mailbox`) are added to `pressured`.
    pub fn route(&self, message: Arc<Message>, now: Instant, pressured: &mut Vec<Arc<Mailbox>>) {
        self.metrics
            .messages_received
            .fetch_add(1, Ordering::Relaxed);
        if message.retain {
            self.store_retained(&message);
        }
        if message.is_expired(now) {
            return;
        }
        ROUTE_SCRATCH.with_borrow_mut(|scratch| {
            self.collect_targets(&message, scratch);
            for (mailbox, delivery) in scratch.targets.drain(..) {
                match mailbox.push(delivery) {
                    Pushed::Queued => {}
                    Pushed::Pressured => pressured.push(mailbox),
                    Pushed::Dropped => {
                        self.metrics
                            .messages_dropped
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            scratch.index.clear();
            // A rare huge fan-out does not keep its buffers for the thread's lifetime.
            scratch.targets.shrink_to(SCRATCH_KEEP);
            scratch.index.shrink_to(SCRATCH_KEEP);
        });
    }

    /// Fills `scratch.targets` with one delivery per session and flow matching `message`.
    fn collect_targets(&self, message: &Arc<Message>, scratch: &mut RouteScratch) {
        let RouteScratch { targets, index } = scratch;
        // Overlapping subscriptions of one session are found by a scan while there are few
        // targets, by an index once there are many (fan-out).
        let mut indexed = false;
        let router = self.router.read().expect("router lock is never poisoned");
        router.for_each_match(
            &message.topic,
            |_, route| route.mailbox.is_online(),
            |(client, flow), route| {
                // [MQTT-3.8.3-3] No Local.
                if route.options.no_local && message.publisher.as_deref() == Some(&**client) {
                    return;
                }
                let qos = message.qos.min(route.options.qos);
                // [MQTT-3.3.1-12, -13] Retain As Published.
                let retain = route.options.retain_as_published && message.retain;
                let key = (Arc::as_ptr(&route.mailbox), *flow);
                let found = if indexed {
                    index.get(&key).copied()
                } else {
                    targets
                        .iter()
                        .position(|(m, d)| Arc::as_ptr(m) == key.0 && d.flow == key.1)
                };
                match found {
                    Some(i) => {
                        let delivery = &mut targets[i].1;
                        delivery.qos = delivery.qos.max(qos);
                        delivery.retain |= retain;
                        delivery.subscription_ids.extend(route.id);
                    }
                    None => {
                        if indexed {
                            index.insert(key, targets.len());
                        } else if targets.len() >= 16 {
                            index.extend(
                                targets
                                    .iter()
                                    .enumerate()
                                    .map(|(i, (m, d))| ((Arc::as_ptr(m), d.flow), i)),
                            );
                            index.insert(key, targets.len());
                            indexed = true;
                        }
                        let delivery = Delivery {
                            message: Arc::clone(message),
                            qos,
                            retain,
                            subscription_ids: route.id.into_iter().collect(),
                            flow: *flow,
                        };
                        targets.push((Arc::clone(&route.mailbox), delivery));
                    }
                }
            },
        );
    }

    fn store_retained(&self, message: &Arc<Message>) {
        // [MQTT-3.3.1-6], [MQTT-3.3.1-7]: an empty retained payload clears the topic.
        // Otherwise the message may be kept for the broker's lifetime: it gets a payload
        // allocation of its own instead of pinning the read buffer it arrived in.
        let kept = (!message.payload.is_empty()).then(|| Arc::new(message.detached()));
        let mut retained = self
            .retained
            .lock()
            .expect("retained lock is never poisoned");
        match kept {
            Some(kept) => retained.insert(&message.topic, kept),
            None => retained.remove(&message.topic),
        };
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions
            .lock()
            .expect("sessions lock is never poisoned")
    }

    /// Number of sessions known (online and offline).
    pub fn session_count(&self) -> usize {
        self.lock_sessions().slots.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained
            .lock()
            .expect("retained lock is never poisoned")
            .len()
    }
}

/// The development certificate under `<data_dir>/certs/`, made on first use. Its CA is logged
/// so that clients can be pointed at it.
fn dev_certs_in(data_dir: &std::path::Path) -> anyhow::Result<DevCerts> {
    let dir = data_dir.join("certs");
    let dev = DevCerts::ensure(&dir).with_context(|| {
        format!(
            "cannot set up development certificates in {}",
            dir.display()
        )
    })?;
    tracing::info!(
        ca = %dev.ca.display(),
        "TLS listeners without `cert` use the development certificate; trust this CA in clients"
    );
    Ok(dev)
}

/// A started broker: its listeners' addresses and the handle to stop it.
pub struct RunningBroker {
    pub broker: Arc<Broker>,
    listeners: Vec<(ListenerKind, SocketAddr)>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl RunningBroker {
    /// Binds every configured listener and starts serving.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let settings = config.settings();
        let auth = AuthService::load(&config.auth)
            .map_err(|err| anyhow::anyhow!("authentication: {err}"))?;
        tracing::info!("authentication: {}", auth.describe());
        let broker = Arc::new(Broker::new(settings).with_auth(Arc::new(auth)));
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let mut listeners = Vec::new();
        let mut dev_certs = None;
        for listener in &config.listeners {
            let mut listener = listener.clone();
            if listener.kind.uses_tls() && listener.tls.cert.is_none() {
                let dev = match &dev_certs {
                    Some(dev) => dev,
                    None => dev_certs.insert(dev_certs_in(&config.broker.data_dir)?),
                };
                listener.tls.cert = Some(dev.cert.clone());
                listener.tls.key = Some(dev.key.clone());
            }
            match listener::spawn(&broker, &listener, &tracker, &shutdown).await {
                Ok(addr) => listeners.push((listener.kind, addr)),
                Err(err) => {
                    shutdown.cancel();
                    return Err(err);
                }
            }
        }
        tracker.spawn(Arc::clone(&broker).run_timers(shutdown.clone()));
        Ok(Self {
            broker,
            listeners,
            shutdown,
            tracker,
        })
    }

    pub fn listeners(&self) -> &[(ListenerKind, SocketAddr)] {
        &self.listeners
    }

    /// The first listener of `kind`.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| *a)
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, tells every client (v5: DISCONNECT 0x8B) and waits for the tasks.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        let linger = self.broker.settings.close_linger + Duration::from_secs(1);
        if tokio::time::timeout(linger, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
    }
}

#[cfg(test)]
mod tests;
