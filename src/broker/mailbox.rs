//! A session's bounded queue of deliveries, shared by the router (producer) and whichever
//! connection currently serves the session (consumer).
//!
//! The mailbox outlives connections: while a persistent session is offline, deliveries queue
//! here and are drained on reconnect. The router never waits on it. Deliveries are queued
//! beyond `capacity` (`session.max_queued`), up to a hard bound of `HARD_FACTOR` x
//! `capacity`, and such a push reports **pressure**: the publishing connection
//!   then stops reading until this mailbox has drained below half its capacity, for as long as
//!   the subscriber keeps taking messages (see `Link::is_paused`); one that takes none for a
//!   while counts as stalled and stops pushing back until it drains. A saturating publisher
//!   is thus slowed to its subscribers' pace instead of losing messages, while a subscriber
//!   that never reads costs a publisher at most one bounded wait. Beyond the hard bound
//!   deliveries are dropped and counted (as Mosquitto and EMQX drop when their queues are
//!   full), so memory stays bounded whatever clients do. QoS 0 is treated alike: a fast QoS 0
//!   publisher is slowed rather than have most of its messages dropped.
//!
//! The mailbox is also how the rest of the broker reaches the connection that serves it: one
//! registered waker (no channel, no waiter list: an idle connection costs a pointer here) is
//! woken by a push and by a **takeover** request, which names the connection it is for so a
//! stale request never reaches the next connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::{oneshot, Notify};

use crate::core::message::Delivery;

/// QoS 1/2 deliveries may queue up to this many times the capacity before being dropped.
const HARD_FACTOR: usize = 4;

/// What became of a pushed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Queued, but the mailbox is over capacity: the publisher should pause.
    Pressured,
    Dropped,
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
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Delivery>,
    /// A takeover request for the connection with this id.
    takeover: Option<(u64, oneshot::Sender<()>)>,
    /// An operator's kick for the connection with this id.
    kick: Option<u64>,
}

#[derive(Debug)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    capacity: usize,
    /// The serving connection's task: woken by a push or a takeover request.
    waker: AtomicWaker,
    /// The queue fell to half its capacity (wakes paused publishers).
    drained: Notify,
    online: AtomicBool,
    /// At the hard bound: a shared group passes this member over for the next one.
    full: AtomicBool,
    /// A publisher waited on this mailbox in vain; it stops pushing back until it drains.
    stalled: AtomicBool,
    dropped: AtomicU64,
    /// Deliveries taken so far: the progress a paused publisher watches.
    popped: AtomicU64,
    /// The session's client id, once it is known to be persistent (`durable`).
    client_id: std::sync::OnceLock<Arc<str>>,
    /// QoS 1/2 deliveries are stored before they are queued (a persistent session, with a
    /// durable store).
    durable: AtomicBool,
}

impl Mailbox {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            waker: AtomicWaker::new(),
            drained: Notify::new(),
            online: AtomicBool::new(true),
            full: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            popped: AtomicU64::new(0),
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
        inner.queue.extend(deliveries);
        if inner.queue.len() >= self.capacity * HARD_FACTOR {
            self.full.store(true, Ordering::Relaxed);
        }
    }

    /// Queues a delivery under the policy in the module docs.
    pub fn push(&self, delivery: Delivery) -> Pushed {
        let pushed = {
            let mut inner = self.lock();
            let len = inner.queue.len();
            if len >= self.capacity * HARD_FACTOR {
                None
            } else {
                inner.queue.push_back(delivery);
                if len + 1 >= self.capacity * HARD_FACTOR {
                    self.full.store(true, Ordering::Relaxed);
                }
                Some(len + 1)
            }
        };
        match pushed {
            None => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Pushed::Dropped
            }
            Some(len) => {
                self.waker.wake();
                if len > self.capacity && !self.stalled.load(Ordering::Relaxed) {
                    Pushed::Pressured
                } else {
                    Pushed::Queued
                }
            }
        }
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
        let (n, before) = {
            let mut inner = self.lock();
            let before = inner.queue.len();
            let n = out.len().min(before);
            for (slot, delivery) in out.iter_mut().zip(inner.queue.drain(..n)) {
                *slot = Some(delivery);
            }
            if n > 0 {
                self.full.store(false, Ordering::Relaxed);
            }
            (n, before)
        };
        if n > 0 {
            self.popped.fetch_add(n as u64, Ordering::Relaxed);
            let low = self.low_water();
            if before > low && before - n <= low {
                self.stalled.store(false, Ordering::Relaxed);
                self.drained.notify_waiters();
            }
        }
        n
    }

    /// Takes out the queued deliveries `take` selects, leaving the rest in order.
    pub fn take_where(&self, take: impl Fn(&Delivery) -> bool) -> Vec<Delivery> {
        let mut inner = self.lock();
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(inner.queue.len());
        for delivery in inner.queue.drain(..) {
            if take(&delivery) {
                taken.push(delivery);
            } else {
                kept.push_back(delivery);
            }
        }
        inner.queue = kept;
        if inner.queue.len() < self.capacity * HARD_FACTOR {
            self.full.store(false, Ordering::Relaxed);
        }
        taken
    }

    /// Puts deliveries taken by [`Mailbox::pop_batch`] back at the front, in their order.
    pub fn unpop(&self, deliveries: impl DoubleEndedIterator<Item = Delivery>) {
        let mut inner = self.lock();
        let mut returned = 0u64;
        for delivery in deliveries.rev() {
            inner.queue.push_front(delivery);
            returned += 1;
        }
        if inner.queue.len() >= self.capacity * HARD_FACTOR {
            self.full.store(true, Ordering::Relaxed);
        }
        drop(inner);
        self.popped.fetch_sub(returned, Ordering::Relaxed);
    }

    fn low_water(&self) -> usize {
        self.capacity / 2
    }

    /// Whether a delivery pushed now would be queued (not dropped at the hard bound): a
    /// shared group hands a message to a member that can take it.
    pub fn accepts(&self) -> bool {
        !self.full.load(Ordering::Relaxed)
    }

    /// Whether a paused publisher may go on.
    pub fn is_relieved(&self) -> bool {
        self.stalled.load(Ordering::Relaxed) || self.len() <= self.low_water()
    }

    /// Resolves once the queue has drained to half its capacity (at once if it has).
    pub async fn relieved(&self) {
        let drained = self.drained.notified();
        tokio::pin!(drained);
        // Registered before the check, so a drain in between is not missed.
        drained.as_mut().enable();
        if self.is_relieved() {
            return;
        }
        drained.await;
    }

    /// A publisher gave up waiting: stop pushing back until the queue drains.
    pub fn mark_stalled(&self) {
        self.stalled.store(true, Ordering::Relaxed);
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
    }

    pub fn popped(&self) -> u64 {
        self.popped.load(Ordering::Relaxed)
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("mailbox lock is never poisoned")
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

    #[test]
    fn past_capacity_pushes_back_until_the_hard_bound_then_drops() {
        let m = Mailbox::new(4);
        for _ in 0..4 {
            assert_eq!(m.push(delivery(QoS::AtLeastOnce)), Pushed::Queued);
        }
        assert_eq!(m.push(delivery(QoS::AtMostOnce)), Pushed::Pressured);
        for _ in 5..16 {
            assert_eq!(m.push(delivery(QoS::AtLeastOnce)), Pushed::Pressured);
        }
        assert_eq!(
            m.push(delivery(QoS::ExactlyOnce)),
            Pushed::Dropped,
            "hard bound"
        );
        assert_eq!((m.len(), m.dropped()), (16, 1));
        assert!(!m.is_relieved());
        while m.len() > 2 {
            m.pop();
        }
        assert!(m.is_relieved(), "relieved at half the capacity");
        assert_eq!(m.popped(), 14);
    }

    #[test]
    fn a_stalled_mailbox_stops_pushing_back_until_it_drains() {
        let m = Mailbox::new(2);
        m.push(delivery(QoS::AtLeastOnce));
        m.push(delivery(QoS::AtLeastOnce));
        assert_eq!(m.push(delivery(QoS::AtLeastOnce)), Pushed::Pressured);
        m.mark_stalled();
        assert!(m.is_relieved());
        assert_eq!(m.push(delivery(QoS::AtLeastOnce)), Pushed::Queued);
        while m.pop().is_some() {}
        assert_eq!(m.push(delivery(QoS::AtLeastOnce)), Pushed::Queued);
        m.push(delivery(QoS::AtLeastOnce));
        assert_eq!(
            m.push(delivery(QoS::AtLeastOnce)),
            Pushed::Pressured,
            "pushes back again"
        );
    }

    #[test]
    fn a_batch_is_taken_in_order_and_what_is_put_back_comes_first() {
        let m = Mailbox::new(8);
        let ids: Vec<u32> = (1..=5).collect();
        for &id in &ids {
            let mut d = delivery(QoS::AtLeastOnce);
            d.subscription_ids = vec![id];
            m.push(d);
        }
        let mut batch: [Option<Delivery>; 3] = Default::default();
        assert_eq!(m.pop_batch(&mut batch), 3);
        assert_eq!(m.popped(), 3);
        let taken: Vec<u32> = batch
            .iter()
            .flatten()
            .map(|d| d.subscription_ids[0])
            .collect();
        assert_eq!(taken, [1, 2, 3]);
        // The first was used; the other two go back in front of 4 and 5.
        m.unpop(batch[1..].iter_mut().filter_map(Option::take));
        assert_eq!(m.popped(), 1);
        let rest: Vec<u32> = std::iter::from_fn(|| m.pop())
            .map(|d| d.subscription_ids[0])
            .collect();
        assert_eq!(rest, [2, 3, 4, 5]);
        let mut empty: [Option<Delivery>; 2] = Default::default();
        assert_eq!(m.pop_batch(&mut empty), 0);
    }

    #[test]
    fn a_takeover_request_reaches_only_the_connection_it_names() {
        let m = Mailbox::new(4);
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
    async fn relieved_wakes_when_the_queue_drains_to_half() {
        let m = Arc::new(Mailbox::new(4));
        for _ in 0..8 {
            m.push(delivery(QoS::AtLeastOnce));
        }
        let waiter = tokio::spawn({
            let m = Arc::clone(&m);
            async move { m.relieved().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        for _ in 0..6 {
            m.pop();
        }
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
            .await
            .expect("the waiter wakes")
            .unwrap();
    }
}
