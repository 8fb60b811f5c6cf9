//! A session's bounded queue of deliveries, shared by the router (producer) and whichever
//! connection currently serves the session (consumer), and the broker-wide budget of queued
//! bytes that every mailbox counts against.
//!
//! The mailbox outlives connections: while a persistent session is offline, deliveries queue
//! here and are drained on reconnect. The router never waits on it, and **a slow subscriber
//! costs only itself**: at `capacity` (`session.max_queued`, Mosquitto's
//! `max_queued_messages`) its queue overflows by its own policy, counted (`dropped`, the
//! broker's `dropped_queue_full`) and visible per client (`mqueue_dropped`):
//! - a QoS 0 delivery replaces the oldest QoS 0 delivery queued (EMQX drops the oldest);
//!   with none queued, it is dropped;
//! - a QoS 1/2 delivery also takes the place of the oldest QoS 0 one if there is any;
//!   otherwise the session's [`QueueFull`] policy applies (`session.queue_full`): `keep` (the
//!   default: durable by default) queues it anyway, bounded by the broker-wide budget below;
//!   `drop_new` (as Mosquitto) drops it; `disconnect` drops it and has the serving connection
//!   closed with 0x97 (Quota exceeded) so that the client learns it is losing messages.
//!
//! A QoS 1/2 message the broker acknowledged and queued for a persistent session is on disk
//! before it is queued (`Broker::push_delivery`); under `drop_new` or `disconnect` one dropped
//! here is forgotten by the store too — a counted, documented policy, not a silent loss.
//! Publishers are never slowed for one subscriber; under `keep`, many slow subscribers
//! together (or one that never reads, for long) can fill the budget, which then holds them.
//!
//! [`QueueBudget`] is what slows them instead, when the broker as a whole queues too much: every
//! push adds the delivery's size (its topic and payload plus the delivery record, counted in
//! each queue it sits in, as Mosquitto's `max_queued_bytes` does: an upper bound of the
//! memory) and every pop, drop or discarded mailbox takes it off — one atomic add or
//! subtraction, no lock. Above `broker.max_queued_bytes` the budget is *over*: connections
//! hold the PUBLISHes they read (see `Link::handle_packet`) until it falls below the
//! low-water mark (three quarters), then go on.
//!
//! The mailbox is also how the rest of the broker reaches the connection that serves it: one
//! registered waker (no channel, no waiter list: an idle connection costs a pointer here) is
//! woken by a push and by a **takeover** request, which names the connection it is for so a
//! stale request never reaches the next connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use serde::Deserialize;
use tokio::sync::{oneshot, Notify};

use crate::codec::QoS;
use crate::core::message::Delivery;

/// What a session's queue does with a QoS 1/2 delivery once it is full of QoS 1/2 ones
/// (`session.queue_full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueFull {
    /// Keep it beyond the capacity (a persistent session's copy is on disk as well): nothing
    /// the broker acknowledged is lost, and the bound is the broker-wide budget
    /// (`broker.max_queued_bytes`), past which publishers are held. The default: durable by
    /// default.
    #[default]
    Keep,
    /// Drop the new delivery and count it (Mosquitto's `max_queued_messages`).
    DropNew,
    /// Drop it, count it, and close the subscriber's connection with 0x97 (Quota exceeded).
    Disconnect,
}

/// What became of a pushed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued in the place of the oldest queued QoS 0 delivery, which was dropped.
    Replaced,
    Dropped,
}

/// The broker-wide count of queued bytes, against `broker.max_queued_bytes` (see the module
/// docs).
#[derive(Debug)]
pub struct QueueBudget {
    bytes: AtomicUsize,
    /// Over this, publishers are held (`usize::MAX`: never).
    high: usize,
    /// They go on once the count is at or below this.
    low: usize,
    over: AtomicBool,
    /// Woken when the count falls to the low-water mark while over.
    relieved: Notify,
    /// Going over is logged at `warn` once a minute at most (clients must not raise our
    /// warn rate), at `debug` in between.
    warned: super::LogEvery,
}

impl QueueBudget {
    /// A budget of `max_bytes` (0: no budget, publishers are never held).
    pub fn new(max_bytes: u64) -> Self {
        let high = match usize::try_from(max_bytes) {
            Ok(0) | Err(_) => usize::MAX,
            Ok(n) => n,
        };
        Self {
            bytes: AtomicUsize::new(0),
            high,
            low: high / 4 * 3,
            over: AtomicBool::new(false),
            relieved: Notify::new(),
            warned: Default::default(),
        }
    }

    /// Bytes queued now, over every mailbox.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        let now = self.bytes.fetch_add(n, Ordering::Relaxed).wrapping_add(n);
        if now > self.high
            && !self.over.load(Ordering::Relaxed)
            && !self.over.swap(true, Ordering::Relaxed)
        {
            self.log_over(now);
        }
    }

    fn log_over(&self, queued_bytes: usize) {
        if !self.warned.due(super::clock::now()) {
            tracing::debug!(queued_bytes, "over broker.max_queued_bytes again");
            return;
        }
        tracing::warn!(
            queued_bytes,
            "deliveries queued over broker.max_queued_bytes: publishers are held until \
             subscribers drain them (raise broker.max_queued_bytes, or lower \
             session.max_queued)"
        );
    }

    fn sub(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.bytes.fetch_sub(n, Ordering::Relaxed).wrapping_sub(n);
        if now <= self.low && self.over.load(Ordering::Relaxed) {
            self.relieve();
        }
    }

    fn relieve(&self) {
        if self.over.swap(false, Ordering::Relaxed) {
            tracing::debug!(
                "deliveries queued back under broker.max_queued_bytes: publishers go on"
            );
            self.relieved.notify_waiters();
        }
    }

    /// Whether publishers are held. Looks at the count again, so a flag raised by a push
    /// that raced with the last pop never outlives the backlog.
    pub fn is_over(&self) -> bool {
        if !self.over.load(Ordering::Relaxed) {
            return false;
        }
        if self.bytes() <= self.low {
            self.relieve();
            return false;
        }
        true
    }

    /// Resolves once the budget is no longer over (at once if it is not).
    pub async fn relieved(&self) {
        let relieved = self.relieved.notified();
        tokio::pin!(relieved);
        // Registered before the check, so a relief in between is not missed.
        relieved.as_mut().enable();
        if !self.is_over() {
            return;
        }
        relieved.await;
    }
}

/// What a queued delivery counts against the budget.
fn cost(delivery: &Delivery) -> usize {
    std::mem::size_of::<Delivery>()
        + delivery.message.topic.as_str().len()
        + delivery.message.payload.len()
}

/// What a connection waiting on its mailbox is woken for.
#[derive(Debug)]
pub enum Signal {
    /// Deliveries are queued.
    Deliveries,
    /// Another connection claims the session: close (the session goes to the offline table as
    /// usual), then acknowledge.
    Takeover(oneshot::Sender<()>),
    /// An operator kicked the client.
    Kick,
    /// The queue overflowed under the `disconnect` policy: close with 0x97.
    QueueFull,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Delivery>,
    /// What the queued deliveries count against the budget.
    bytes: usize,
    /// QoS 0 deliveries in `queue` (none: an overflow need not look for one).
    qos0: usize,
    /// A takeover request for the connection with this id.
    takeover: Option<(u64, oneshot::Sender<()>)>,
    /// An operator's kick for the connection with this id.
    kick: Option<u64>,
    /// A QoS 1/2 delivery was dropped under the `disconnect` policy while online.
    overflowed: bool,
}

impl Inner {
    fn push_back(&mut self, delivery: Delivery) -> usize {
        let n = cost(&delivery);
        self.qos0 += usize::from(delivery.qos == QoS::AtMostOnce);
        self.bytes += n;
        self.queue.push_back(delivery);
        n
    }

    fn push_front(&mut self, delivery: Delivery) -> usize {
        let n = cost(&delivery);
        self.qos0 += usize::from(delivery.qos == QoS::AtMostOnce);
        self.bytes += n;
        self.queue.push_front(delivery);
        n
    }

    /// Accounts for a delivery taken out of `queue`; returns its cost.
    fn taken(&mut self, delivery: &Delivery) -> usize {
        let n = cost(delivery);
        self.qos0 -= usize::from(delivery.qos == QoS::AtMostOnce);
        self.bytes -= n;
        n
    }

    /// Removes the oldest queued QoS 0 delivery; returns its cost.
    fn drop_oldest_qos0(&mut self) -> Option<usize> {
        if self.qos0 == 0 {
            return None;
        }
        let at = self.queue.iter().position(|d| d.qos == QoS::AtMostOnce)?;
        let dropped = self.queue.remove(at)?;
        Some(self.taken(&dropped))
    }

    /// Nothing more can be queued: full, and no QoS 0 delivery to make room.
    fn is_full(&self, capacity: usize) -> bool {
        self.queue.len() >= capacity && self.qos0 == 0
    }
}

#[derive(Debug)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    capacity: usize,
    policy: QueueFull,
    budget: Arc<QueueBudget>,
    /// The serving connection's task: woken by a push or a takeover request.
    waker: AtomicWaker,
    online: AtomicBool,
    /// Nothing more can be queued: a shared group passes this member over for the next one.
    full: AtomicBool,
    dropped: AtomicU64,
    /// The session's client id, once it is known to be persistent (`durable`).
    client_id: std::sync::OnceLock<Arc<str>>,
    /// QoS 1/2 deliveries are stored before they are queued (a persistent session, with a
    /// durable store).
    durable: AtomicBool,
}

impl Mailbox {
    pub fn new(capacity: usize, policy: QueueFull, budget: Arc<QueueBudget>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            policy,
            budget,
            waker: AtomicWaker::new(),
            online: AtomicBool::new(true),
            full: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            client_id: std::sync::OnceLock::new(),
            durable: AtomicBool::new(false),
        }
    }

    /// Whether QoS 1/2 deliveries to `client_id`'s session are stored before they are queued.
    pub fn set_durable(&self, client_id: &Arc<str>, durable: bool) {
        if durable {
            let _ = self.client_id.set(Arc::clone(client_id));
        }
        self.durable.store(durable, Ordering::Relaxed);
    }

    /// The client id to store deliveries under, when they are stored.
    pub fn durable_client(&self) -> Option<&Arc<str>> {
        if self.durable.load(Ordering::Relaxed) {
            self.client_id.get()
        } else {
            None
        }
    }

    /// Queues deliveries read back from the store at start-up, whatever the bound (they
    /// were accepted before; the session's client drains them).
    pub fn restore(&self, deliveries: Vec<Delivery>) {
        let mut inner = self.lock();
        let mut added = 0;
        for delivery in deliveries {
            added += inner.push_back(delivery);
        }
        self.full
            .store(inner.is_full(self.capacity), Ordering::Relaxed);
        drop(inner);
        self.budget.add(added);
    }

    /// Queues a delivery under the policy in the module docs.
    pub fn push(&self, delivery: Delivery) -> Pushed {
        let qos0 = delivery.qos == QoS::AtMostOnce;
        let (pushed, added, removed, signal) = {
            let mut inner = self.lock();
            let (pushed, removed) =
                if inner.queue.len() < self.capacity || (!qos0 && self.policy == QueueFull::Keep) {
                    (Pushed::Queued, 0)
                } else if let Some(removed) = inner.drop_oldest_qos0() {
                    (Pushed::Replaced, removed)
                } else {
                    (Pushed::Dropped, 0)
                };
            let signal = pushed != Pushed::Dropped || self.note_overflow(&mut inner, qos0);
            let added = match pushed {
                Pushed::Dropped => 0,
                _ => inner.push_back(delivery),
            };
            self.full
                .store(inner.is_full(self.capacity), Ordering::Relaxed);
            (pushed, added, removed, signal)
        };
        if pushed != Pushed::Queued {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.budget.add(added);
        self.budget.sub(removed);
        // A plain drop has nothing for the connection (a never-reading subscriber's task is
        // not woken for each message it loses).
        if signal {
            self.waker.wake();
        }
        pushed
    }

    /// Drops `delivery` as a full queue would, without looking (the caller saw
    /// [`Mailbox::accepts`] say no).
    pub fn overflow(&self, delivery: &Delivery) {
        let mut inner = self.lock();
        let signal = self.note_overflow(&mut inner, delivery.qos == QoS::AtMostOnce);
        drop(inner);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if signal {
            self.waker.wake();
        }
    }

    /// Under the `disconnect` policy, a QoS 1/2 drop while online has the serving connection
    /// closed (`online` is read under the lock: see `set_online`). Whether it was.
    fn note_overflow(&self, inner: &mut Inner, qos0: bool) -> bool {
        let close = !qos0 && self.policy == QueueFull::Disconnect && self.is_online();
        inner.overflowed |= close;
        close
    }

    /// Takes the oldest queued delivery.
    pub fn pop(&self) -> Option<Delivery> {
        let mut slot = [None];
        self.pop_batch(&mut slot);
        let [delivery] = slot;
        delivery
    }

    /// Takes up to `out.len()` of the oldest deliveries, in order, under one lock; returns how
    /// many. Deliveries the caller cannot take after all go back with [`Mailbox::unpop`].
    pub fn pop_batch(&self, out: &mut [Option<Delivery>]) -> usize {
        let (n, removed) = {
            let mut inner = self.lock();
            let n = out.len().min(inner.queue.len());
            let mut removed = 0;
            for slot in &mut out[..n] {
                let delivery = inner.queue.pop_front().expect("n is within the queue");
                removed += inner.taken(&delivery);
                *slot = Some(delivery);
            }
            if n > 0 {
                self.full.store(false, Ordering::Relaxed);
            }
            (n, removed)
        };
        self.budget.sub(removed);
        n
    }

    /// Takes out the queued deliveries `take` selects, leaving the rest in order.
    pub fn take_where(&self, take: impl Fn(&Delivery) -> bool) -> Vec<Delivery> {
        let mut inner = self.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(inner.queue.len());
        let mut removed = 0;
        let queue = std::mem::take(&mut inner.queue);
        for delivery in queue {
            if take(&delivery) {
                removed += inner.taken(&delivery);
                taken.push(delivery);
            } else {
                kept.push_back(delivery);
            }
        }
        inner.queue = kept;
        self.full
            .store(inner.is_full(self.capacity), Ordering::Relaxed);
        drop(inner);
        self.budget.sub(removed);
        taken
    }

    /// Puts deliveries taken by [`Mailbox::pop_batch`] back at the front, in their order.
    pub fn unpop(&self, deliveries: impl DoubleEndedIterator<Item = Delivery>) {
        let mut inner = self.lock();
        let mut added = 0;
        for delivery in deliveries.rev() {
            added += inner.push_front(delivery);
        }
        self.full
            .store(inner.is_full(self.capacity), Ordering::Relaxed);
        drop(inner);
        self.budget.add(added);
    }

    /// Whether a delivery pushed now would be queued (not dropped): a shared group hands a
    /// message to a member that can take it.
    pub fn accepts(&self) -> bool {
        !self.full.load(Ordering::Relaxed)
    }

    /// Whether a QoS 1/2 delivery is queued even when the queue is full (`keep`).
    pub fn keeps_overflow(&self) -> bool {
        self.policy == QueueFull::Keep
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Polled by the connection `conn_id` that serves this mailbox: ready with a takeover
    /// request for it, or with `Deliveries` if `want_deliveries` and some are queued;
    /// otherwise its task is woken by the next push or request. Only the serving connection
    /// polls (one waker is kept).
    pub fn poll_signal(
        &self,
        cx: &mut Context<'_>,
        conn_id: u64,
        want_deliveries: bool,
    ) -> Poll<Signal> {
        // Registered before looking, so a push in between is not missed.
        self.waker.register(cx.waker());
        let mut inner = self.lock();
        if let Some(ack) = Self::take_request(&mut inner, conn_id) {
            return Poll::Ready(Signal::Takeover(ack));
        }
        if inner.kick.is_some_and(|id| id == conn_id) {
            inner.kick = None;
            return Poll::Ready(Signal::Kick);
        }
        if std::mem::take(&mut inner.overflowed) {
            return Poll::Ready(Signal::QueueFull);
        }
        if want_deliveries && !inner.queue.is_empty() {
            return Poll::Ready(Signal::Deliveries);
        }
        Poll::Pending
    }

    /// Asks connection `conn_id` to give the session up; `ack` is answered (or dropped) once
    /// it has. A newer request replaces an older one, whose requester then sees it dropped.
    pub fn request_takeover(&self, conn_id: u64, ack: oneshot::Sender<()>) {
        self.lock().takeover = Some((conn_id, ack));
        self.waker.wake();
    }

    /// Asks connection `conn_id` to close for an operator (see `Channel::handle_kick`).
    pub fn request_kick(&self, conn_id: u64) {
        self.lock().kick = Some(conn_id);
        self.waker.wake();
    }

    /// Takes a takeover request meant for `conn_id` (a closing connection answers it).
    pub fn take_takeover(&self, conn_id: u64) -> Option<oneshot::Sender<()>> {
        Self::take_request(&mut self.lock(), conn_id)
    }

    fn take_request(inner: &mut Inner, conn_id: u64) -> Option<oneshot::Sender<()>> {
        match inner.takeover.take() {
            Some((id, ack)) if id == conn_id => Some(ack),
            // Meant for a connection that has gone: the requester has moved on.
            _ => None,
        }
    }

    /// Gives back memory an empty queue still holds (an idle session keeps none).
    pub fn trim(&self) {
        let mut inner = self.lock();
        if inner.queue.is_empty() && inner.queue.capacity() > 0 {
            inner.queue = VecDeque::new();
        }
    }

    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Relaxed);
        if !online {
            // An overflow while online is the serving connection's to answer; the session's
            // next connection starts afresh. (`push` reads `online` under the lock.)
            self.lock().overflowed = false;
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("mailbox lock is never poisoned")
    }
}

impl Drop for Mailbox {
    /// A discarded session's queue leaves the budget.
    fn drop(&mut self) {
        let bytes = self.inner.get_mut().map_or(0, |inner| inner.bytes);
        self.budget.sub(bytes);
    }
}

impl crate::core::registry::SessionHandle for Arc<Mailbox> {
    fn set_online(&self, online: bool) {
        Mailbox::set_online(self, online);
    }
}

#[cfg(test)]
mod tests {
    use crate::core::topic::TopicName;
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::codec::{Publish, QoS};
    use crate::core::message::{AppMessage, Flow};

    fn delivery(qos: QoS) -> Delivery {
        let publish = Publish {
            dup: false,
            qos,
            retain: false,
            topic: "t".into(),
            packet_id: None,
            properties: Default::default(),
            payload: Bytes::from_static(b"x"),
        };
        let message = Arc::new(AppMessage::from_publish(
            TopicName::parse(publish.topic.clone(), 0).unwrap(),
            publish,
            None,
            Instant::now(),
        ));
        Delivery {
            message,
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            flow: Flow::CONTROL,
            shared: None,
            stored: None,
        }
    }

    fn mailbox(capacity: usize, policy: QueueFull) -> (Mailbox, Arc<QueueBudget>) {
        let budget = Arc::new(QueueBudget::new(0));
        (Mailbox::new(capacity, policy, Arc::clone(&budget)), budget)
    }

    #[test]
    fn keep_queues_qos1_past_the_capacity_and_counts_it_in_the_budget() {
        let (m, budget) = mailbox(2, QueueFull::Keep);
        for _ in 0..5 {
            assert_eq!(m.push(delivery(QoS::AtLeastOnce)), Pushed::Queued);
        }
        assert_eq!(m.len(), 5, "nothing acknowledged is dropped");
        assert!(
            !m.accepts(),
            "full for the shared-subscription choice all the same"
        );
        assert_eq!(
            m.push(delivery(QoS::AtMostOnce)),
            Pushed::Dropped,
            "QoS 0 still drops"
        );
        assert_eq!(m.dropped(), 1);
        let held = budget.bytes();
        assert!(held > 0);
        while m.pop().is_some() {}
        assert_eq!(budget.bytes(), 0);
    }

    fn tagged(qos: QoS, tag: u32) -> Delivery {
        let mut d = delivery(qos);
        d.subscription_ids = vec![tag];
        d
    }

    fn tags(m: &Mailbox) -> Vec<u32> {
        std::iter::from_fn(|| m.pop())
            .map(|d| d.subscription_ids[0])
            .collect()
    }

    #[test]
    fn a_full_queue_drops_its_oldest_qos0_first_then_new_qos1() {
        let (m, _) = mailbox(4, QueueFull::DropNew);
        assert_eq!(m.push(tagged(QoS::AtMostOnce, 1)), Pushed::Queued);
        assert_eq!(m.push(tagged(QoS::AtLeastOnce, 2)), Pushed::Queued);
        assert_eq!(m.push(tagged(QoS::AtMostOnce, 3)), Pushed::Queued);
        assert_eq!(m.push(tagged(QoS::AtLeastOnce, 4)), Pushed::Queued);
        // Full: QoS 0 and QoS 1 alike take the oldest QoS 0's place.
        assert_eq!(m.push(tagged(QoS::AtMostOnce, 5)), Pushed::Replaced);
        assert_eq!(m.push(tagged(QoS::ExactlyOnce, 6)), Pushed::Replaced);
        assert!(m.accepts(), "QoS 0 (5) can still make room");
        assert_eq!(m.push(tagged(QoS::AtLeastOnce, 7)), Pushed::Replaced);
        assert!(!m.accepts(), "only QoS 1/2 queued: nothing fits");
        assert_eq!(m.push(tagged(QoS::AtMostOnce, 8)), Pushed::Dropped);
        assert_eq!(m.push(tagged(QoS::AtLeastOnce, 9)), Pushed::Dropped);
        assert_eq!(m.dropped(), 5);
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(
            matches!(m.poll_signal(&mut cx, 1, false), Poll::Pending),
            "drop_new does not disconnect"
        );
        assert_eq!(tags(&m), [2, 4, 6, 7], "the rest keep their order");
        assert!(m.accepts());
    }

    #[test]
    fn the_disconnect_policy_signals_the_online_connection_only() {
        let (m, _) = mailbox(1, QueueFull::Disconnect);
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        m.push(delivery(QoS::AtLeastOnce));
        assert_eq!(m.push(delivery(QoS::AtMostOnce)), Pushed::Dropped);
        assert!(
            matches!(m.poll_signal(&mut cx, 1, false), Poll::Pending),
            "a QoS 0 drop is not worth a disconnect"
        );
        assert_eq!(m.push(delivery(QoS::AtLeastOnce)), Pushed::Dropped);
        assert!(matches!(
            m.poll_signal(&mut cx, 1, false),
            Poll::Ready(Signal::QueueFull)
        ));
        assert!(matches!(m.poll_signal(&mut cx, 1, false), Poll::Pending));
        // The store's shortcut (it saw `accepts` say no) follows the same policy.
        assert!(!m.accepts());
        m.overflow(&delivery(QoS::ExactlyOnce));
        assert_eq!(m.dropped(), 3);
        assert!(matches!(
            m.poll_signal(&mut cx, 1, false),
            Poll::Ready(Signal::QueueFull)
        ));
        m.push(delivery(QoS::AtLeastOnce));
        m.set_online(false);
        m.push(delivery(QoS::AtLeastOnce));
        m.set_online(true);
        assert!(
            matches!(m.poll_signal(&mut cx, 2, false), Poll::Pending),
            "the next connection starts afresh"
        );
    }

    #[test]
    fn the_budget_counts_every_queued_byte_and_holds_between_its_marks() {
        let one = cost(&delivery(QoS::AtLeastOnce));
        // Over past 4 deliveries, relieved at 3.
        let budget = Arc::new(QueueBudget::new(4 * one as u64));
        let a = Mailbox::new(8, QueueFull::DropNew, Arc::clone(&budget));
        let b = Mailbox::new(1, QueueFull::DropNew, Arc::clone(&budget));
        for _ in 0..4 {
            a.push(delivery(QoS::AtLeastOnce));
        }
        assert!(!budget.is_over(), "at the budget, not over it");
        b.push(delivery(QoS::AtMostOnce));
        assert!(budget.is_over());
        assert_eq!(budget.bytes(), 5 * one);
        b.push(delivery(QoS::AtMostOnce));
        assert_eq!(
            budget.bytes(),
            5 * one,
            "a replaced delivery leaves the count"
        );
        a.pop();
        assert!(budget.is_over(), "above the low-water mark");
        let mut batch: [Option<Delivery>; 2] = Default::default();
        a.pop_batch(&mut batch);
        assert!(!budget.is_over(), "at three quarters: relieved");
        a.unpop(batch.into_iter().flatten());
        assert_eq!(budget.bytes(), 4 * one);
        assert_eq!(a.take_where(|_| true).len(), 3);
        drop(b);
        assert_eq!(budget.bytes(), 0, "a discarded mailbox leaves the budget");
        a.restore(vec![delivery(QoS::AtLeastOnce)]);
        drop(a);
        assert_eq!(budget.bytes(), 0);
    }

    #[test]
    fn a_batch_is_taken_in_order_and_what_is_put_back_comes_first() {
        let (m, _) = mailbox(8, QueueFull::DropNew);
        let ids: Vec<u32> = (1..=5).collect();
        for &id in &ids {
            let mut d = delivery(QoS::AtLeastOnce);
            d.subscription_ids = vec![id];
            m.push(d);
        }
        let mut batch: [Option<Delivery>; 3] = Default::default();
        assert_eq!(m.pop_batch(&mut batch), 3);
        let taken: Vec<u32> = batch
            .iter()
            .flatten()
            .map(|d| d.subscription_ids[0])
            .collect();
        assert_eq!(taken, [1, 2, 3]);
        // The first was used; the other two go back in front of 4 and 5.
        m.unpop(batch[1..].iter_mut().filter_map(Option::take));
        let rest: Vec<u32> = std::iter::from_fn(|| m.pop())
            .map(|d| d.subscription_ids[0])
            .collect();
        assert_eq!(rest, [2, 3, 4, 5]);
        let mut empty: [Option<Delivery>; 2] = Default::default();
        assert_eq!(m.pop_batch(&mut empty), 0);
    }

    #[test]
    fn a_takeover_request_reaches_only_the_connection_it_names() {
        let (m, _) = mailbox(4, QueueFull::DropNew);
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let (ack, mut answered) = oneshot::channel();
        m.request_takeover(1, ack);
        assert!(
            m.poll_signal(&mut cx, 2, true).is_pending(),
            "not for connection 2"
        );
        assert!(
            matches!(
                answered.try_recv(),
                Err(oneshot::error::TryRecvError::Closed)
            ),
            "a stale request is dropped, so its requester looks again"
        );
        let (ack, _answered) = oneshot::channel();
        m.request_takeover(1, ack);
        m.push(delivery(QoS::AtLeastOnce));
        assert!(matches!(
            m.poll_signal(&mut cx, 1, true),
            Poll::Ready(Signal::Takeover(_))
        ));
        assert!(matches!(
            m.poll_signal(&mut cx, 1, true),
            Poll::Ready(Signal::Deliveries)
        ));
        assert!(
            m.poll_signal(&mut cx, 1, false).is_pending(),
            "a full window waits"
        );
    }

    #[tokio::test]
    async fn relieved_wakes_when_the_budget_falls_to_its_low_water_mark() {
        let one = cost(&delivery(QoS::AtLeastOnce));
        let budget = Arc::new(QueueBudget::new(4 * one as u64));
        let m = Mailbox::new(8, QueueFull::DropNew, Arc::clone(&budget));
        for _ in 0..8 {
            m.push(delivery(QoS::AtLeastOnce));
        }
        let waiter = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.relieved().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        for _ in 0..5 {
            m.pop();
        }
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
    }
}
