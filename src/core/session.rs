//! What survives a reconnect: a client's subscriptions, its unacknowledged outgoing messages
//! and the ids of inbound QoS 2 messages awaiting PUBREL.
//!
//! A `Session` is owned by exactly one place at a time: the connection serving the client, or
//! the broker's table of offline sessions. It holds no I/O handles; the broker pairs it with a
//! mailbox for deliveries that wait for a window.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use crate::codec::{PacketId, QoS, SubscriptionOptions};
use crate::core::message::{Delivery, Flow};
use crate::core::topic::TopicFilter;

/// Packet ids are small integers handed out in order: a multiplication spreads them over the
/// whole hash (the table uses its top bits too) without SipHash's cost.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One subscription as the session remembers it (the router holds a mirror).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: TopicFilter,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
    /// The flow that carried the SUBSCRIBE: deliveries go out there.
    pub flow: Flow,
}

/// Where a durable store keeps a queued delivery (its sequence number, unique store-wide):
/// set on a [`Delivery`] routed to a persistent session, so that the channel can say what
/// became of it.
pub type StoreKey = u64;

/// What happened to a persistent session's state that its durable record must follow, in
/// the order it happened ([`Channel::poll_change`](crate::core::channel::Channel)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A stored delivery was sent under packet id `id` (resends reuse it); `exactly_once`
    /// when it went at QoS 2, whose id must be on disk before the PUBLISH leaves.
    Sent {
        key: StoreKey,
        id: PacketId,
        exactly_once: bool,
    },
    /// The client's PUBREC for a stored QoS 2 delivery: PUBREL is next (and must not go
    /// before this is on disk: after it the client may deliver).
    Released { key: StoreKey, id: PacketId },
    /// A stored delivery is finished (acknowledged, or dropped): forget it.
    Done { key: StoreKey },
    /// An inbound QoS 2 message was accepted (PUBREC): a repeat must not be routed again.
    Held { flow: Flow, id: PacketId },
    /// Its PUBREL came: the id is free again.
    Freed { flow: Flow, id: PacketId },
}

impl Change {
    /// Whether the bytes written after this change may reach the client only once it is on
    /// disk (an acknowledgement the client acts on, or a QoS 2 packet id).
    pub fn gates_output(&self) -> bool {
        match self {
            Self::Sent { exactly_once, .. } => *exactly_once,
            Self::Released { .. } | Self::Held { .. } | Self::Freed { .. } => true,
            Self::Done { .. } => false,
        }
    }
}

/// What an acknowledgement did to an outgoing message ([`Session::complete`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// Finished; with the store key of a stored delivery.
    Done(Option<StoreKey>),
    /// No message in flight under that id (a late duplicate, or never sent).
    Unknown,
    /// The id is in flight in another QoS flow than the ack's.
    WrongFlow,
}

/// The state of one outgoing QoS 1/2 message.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// QoS 1 sent, waiting for PUBACK; or QoS 2 sent, waiting for PUBREC.
    Publish(Delivery),
    /// QoS 2 PUBREL sent (on this flow), waiting for PUBCOMP; with the store key of a
    /// stored delivery.
    Release(Flow, Option<StoreKey>),
}

impl Outgoing {
    pub fn flow(&self) -> Flow {
        match self {
            Self::Publish(delivery) => delivery.flow,
            Self::Release(flow, _) => *flow,
        }
    }
}

#[derive(Debug)]
pub struct Session {
    pub client_id: Arc<str>,
    /// Seconds the session outlives its connection (0: ends with the connection).
    pub expiry_interval: u32,
    /// Keyed by flow and the filter exactly as subscribed (including any `$share/group/`
    /// prefix): the same filter on two flows is two subscriptions.
    pub subscriptions: HashMap<(Flow, String), Subscription>,
    /// Outgoing messages in the order they were sent, with their packet ids (a map ordered by
    /// send sequence keeps the resend order of [MQTT-4.4.0-1]). Ids come from one counter for
    /// all flows, so they never collide and an ack is found whichever flow carries it.
    outgoing: VecDeque<Option<(PacketId, Outgoing)>>,
    /// The send sequence number of `outgoing[0]`.
    first_seq: u64,
    inflight: usize,
    ids_in_use: HashMap<PacketId, u64, BuildHasherDefault<IdHasher>>,
    next_packet_id: PacketId,
    next_seq: u64,
    /// Inbound QoS 2 packet ids (per flow: each stream is the client's own id space) for
    /// which PUBREC was sent and PUBREL not yet received.
    pub awaiting_release: HashSet<(Flow, PacketId)>,
    /// Filters whose subscription [`Session::rehome`] moved onto the control flow (its data
    /// flow died): the client's SUBSCRIBE of the same filter on a data flow takes such a
    /// subscription back in one step ([`Session::take_parked`]) instead of adding a second
    /// one beside it, which would deliver each message twice until the parked copy is gone.
    parked: Vec<String>,
}

impl Session {
    pub fn new(client_id: Arc<str>, expiry_interval: u32) -> Self {
        Self {
            client_id,
            expiry_interval,
            subscriptions: HashMap::new(),
            outgoing: VecDeque::new(),
            first_seq: 0,
            inflight: 0,
            ids_in_use: HashMap::default(),
            next_packet_id: PacketId(1),
            next_seq: 0,
            awaiting_release: HashSet::new(),
            parked: Vec::new(),
        }
    }

    /// Gives back what empty in-flight tables still hold (see `Channel::trim`).
    pub fn trim(&mut self) {
        if self.outgoing.is_empty() && self.outgoing.capacity() > 0 {
            self.outgoing = VecDeque::new();
            self.first_seq = self.next_seq;
        }
        if self.ids_in_use.is_empty() {
            self.ids_in_use.shrink_to_fit();
        }
        if self.awaiting_release.is_empty() {
            self.awaiting_release.shrink_to_fit();
        }
    }

    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// Outgoing QoS 1/2 messages awaiting their acknowledgement, in send order, with their
    /// packet ids.
    pub fn outgoing(&self) -> impl Iterator<Item = &(PacketId, Outgoing)> {
        self.outgoing.iter().flatten()
    }

    fn slot(&mut self, seq: u64) -> Option<&mut Option<(PacketId, Outgoing)>> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.outgoing.get_mut(index)
    }

    /// Frees the entry of `seq` and trims finished entries from the front, so the queue
    /// holds at most the span from the oldest unacknowledged message to the newest.
    fn release(&mut self, seq: u64) {
        if let Some(slot) = self.slot(seq) {
            if slot.take().is_some() {
                self.inflight -= 1;
            }
        }
        while matches!(self.outgoing.front(), Some(None)) {
            self.outgoing.pop_front();
            self.first_seq += 1;
        }
    }

    /// The state of the outgoing message in flight under `id`, if any.
    pub fn outgoing_state(&self, id: PacketId) -> Option<&Outgoing> {
        let seq = *self.ids_in_use.get(&id)?;
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        let (_, state) = self.outgoing.get(index)?.as_ref()?;
        Some(state)
    }

    /// Records an outgoing QoS 1/2 delivery under a fresh packet id. `None` if all 65,535 ids
    /// are in use (the caller's window keeps that from happening).
    pub fn track(&mut self, delivery: Delivery) -> Option<PacketId> {
        debug_assert!(delivery.qos != QoS::AtMostOnce);
        if self.ids_in_use.len() >= usize::from(u16::MAX) {
            return None;
        }
        let id = loop {
            let id = self.next_packet_id;
            self.next_packet_id = id.next();
            if !self.ids_in_use.contains_key(&id) {
                break id;
            }
        };
        self.push_outgoing(id, Outgoing::Publish(delivery));
        Some(id)
    }

    /// Appends an outgoing message in send order under `id` (not in use).
    fn push_outgoing(&mut self, id: PacketId, state: Outgoing) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.outgoing.is_empty() {
            self.first_seq = seq;
        }
        self.ids_in_use.insert(id, seq);
        self.outgoing.push_back(Some((id, state)));
        self.inflight += 1;
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2, after PUBREL): forgets the id when it is in the
    /// state the ack completes; says whether it was, unknown, or in flight in another QoS flow
    /// (PUBACK for QoS 2, PUBCOMP before PUBREC), which is the client's protocol error. One
    /// lookup for both answers: this is on every acknowledgement's path.
    pub fn complete(&mut self, id: PacketId, qos2: bool) -> Completed {
        let Some(&seq) = self.ids_in_use.get(&id) else {
            return Completed::Unknown;
        };
        let (expected, key) = match self.slot(seq) {
            Some(Some((_, Outgoing::Publish(d)))) => (!qos2 && d.qos == QoS::AtLeastOnce, d.stored),
            Some(Some((_, Outgoing::Release(_, key)))) => (qos2, *key),
            _ => return Completed::Unknown,
        };
        if !expected {
            return Completed::WrongFlow;
        }
        self.release(seq);
        self.ids_in_use.remove(&id);
        Completed::Done(key)
    }

    /// PUBREC: the QoS 2 message moves to the release phase. Returns the flow to send PUBREL
    /// on if the id was awaiting PUBREC or already releasing (a repeated PUBREC is answered
    /// again), with the store key of a stored delivery that moved just now.
    pub fn received(&mut self, id: PacketId) -> Option<(Flow, Option<StoreKey>)> {
        let seq = *self.ids_in_use.get(&id)?;
        let (_, state) = self.slot(seq)?.as_mut()?;
        match state {
            Outgoing::Publish(d) if d.qos == QoS::ExactlyOnce => {
                let (flow, key) = (d.flow, d.stored);
                *state = Outgoing::Release(flow, key);
                Some((flow, key))
            }
            Outgoing::Publish(_) => None,
            Outgoing::Release(flow, _) => Some((*flow, None)),
        }
    }

    /// PUBREC with a failure reason, or a message that can no longer be sent: finished
    /// without a release. Returns the store key of a stored delivery.
    pub fn abandon(&mut self, id: PacketId) -> Option<StoreKey> {
        let seq = self.ids_in_use.remove(&id)?;
        let key = match self.slot(seq) {
            Some(Some((_, Outgoing::Publish(d)))) => d.stored,
            Some(Some((_, Outgoing::Release(_, key)))) => *key,
            _ => None,
        };
        self.release(seq);
        key
    }

    /// Puts back an outgoing message a durable store kept, under the packet id it was sent
    /// with, before the session is resumed (it is resent with DUP then). `false` if the id is
    /// already in use (a corrupted store; the caller queues the delivery anew).
    pub fn restore_outgoing(&mut self, id: PacketId, state: Outgoing) -> bool {
        if id.0 == 0 || self.ids_in_use.contains_key(&id) {
            return false;
        }
        self.push_outgoing(id, state);
        self.next_packet_id = id.next();
        true
    }

    /// Adds or replaces a subscription; returns whether it existed.
    pub fn subscribe(&mut self, sub: Subscription) -> bool {
        if sub.flow.is_control() {
            // The client subscribed on the control flow itself: its own now, not parked.
            self.unpark(sub.filter.as_str());
        }
        let key = (sub.flow, sub.filter.as_str().to_owned());
        self.subscriptions.insert(key, sub).is_some()
    }

    pub fn unsubscribe(&mut self, flow: Flow, filter: &str) -> Option<Subscription> {
        if flow.is_control() {
            self.unpark(filter);
        }
        self.subscriptions.remove(&(flow, filter.to_owned()))
    }

    /// Whether `filter` was parked; it is not any more.
    fn unpark(&mut self, filter: &str) -> bool {
        let Some(i) = self.parked.iter().position(|f| f == filter) else {
            return false;
        };
        self.parked.swap_remove(i);
        if self.parked.is_empty() {
            self.parked = Vec::new();
        }
        true
    }

    /// Removes and returns the subscription of `filter` that [`Session::rehome`] parked on
    /// the control flow, if there is one.
    pub fn take_parked(&mut self, filter: &str) -> Option<Subscription> {
        if !self.unpark(filter) {
            return None;
        }
        self.subscriptions
            .remove(&(Flow::CONTROL, filter.to_owned()))
    }

    /// A flow is gone (its stream died, or the connection did): its subscriptions, in-flight
    /// messages and QoS 2 state move to the control flow, so nothing is lost. Returns the
    /// subscriptions that left `flow`: each with `Some(new)` if it now lives on the control
    /// flow, `None` if the control flow already had the same filter (which wins).
    pub fn rehome(&mut self, flow: Flow) -> Vec<(Subscription, Option<Subscription>)> {
        if flow.is_control() {
            return Vec::new();
        }
        let keys: Vec<(Flow, String)> = self
            .subscriptions
            .keys()
            .filter(|(f, _)| *f == flow)
            .cloned()
            .collect();
        let mut moved = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(old) = self.subscriptions.remove(&key) else {
                continue;
            };
            let new = match self.subscriptions.entry((Flow::CONTROL, key.1)) {
                std::collections::hash_map::Entry::Occupied(_) => None,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let new = Subscription {
                        flow: Flow::CONTROL,
                        ..old.clone()
                    };
                    self.parked.push(slot.key().1.clone());
                    slot.insert(new.clone());
                    Some(new)
                }
            };
            moved.push((old, new));
        }
        for (_, state) in self.outgoing.iter_mut().flatten() {
            match state {
                Outgoing::Publish(d) if d.flow == flow => d.flow = Flow::CONTROL,
                Outgoing::Release(f, _) if *f == flow => *f = Flow::CONTROL,
                _ => {}
            }
        }
        let released: Vec<(Flow, PacketId)> = self
            .awaiting_release
            .iter()
            .filter(|(f, _)| *f == flow)
            .copied()
            .collect();
        for key in released {
            self.awaiting_release.remove(&key);
            self.awaiting_release.insert((Flow::CONTROL, key.1));
        }
        moved
    }

    /// Every data flow this session refers to (after a reconnect they are all gone).
    pub fn data_flows(&self) -> Vec<Flow> {
        let mut flows: Vec<Flow> = self
            .subscriptions
            .keys()
            .map(|(f, _)| *f)
            .chain(self.outgoing().map(|(_, o)| o.flow()))
            .chain(self.awaiting_release.iter().map(|(f, _)| *f))
            .filter(|f| !f.is_control())
            .collect();
        flows.sort_unstable();
        flows.dedup();
        flows
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use super::*;
    use crate::core::message::AppMessage;
    use crate::core::topic::TopicName;
    use bytes::Bytes;
    use std::sync::Arc;

    fn delivery(qos: QoS) -> Delivery {
        Delivery {
            message: Arc::new(AppMessage {
                topic: TopicName::parse("t".into(), 0).unwrap(),
                payload: Bytes::from_static(b"x"),
                qos,
                retain: false,
                properties: Default::default(),
                publisher: None,
                expires_at: None,
            }),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            flow: Flow::CONTROL,
            shared: None,
            stored: None,
        }
    }

    #[test]
    fn qos1_is_tracked_until_puback() {
        let mut s = Session::new("c".into(), 0);
        let id = s.track(delivery(QoS::AtLeastOnce)).unwrap();
        assert_eq!(s.inflight(), 1);
        assert!(
            s.complete(id, true) != Completed::Done(None),
            "PUBCOMP does not complete a QoS 1 message"
        );
        assert!(s.complete(id, false) == Completed::Done(None));
        assert_eq!(s.inflight(), 0);
        assert!(
            s.complete(id, false) != Completed::Done(None),
            "a second PUBACK is unknown"
        );
    }

    #[test]
    fn qos2_goes_through_release_before_completion() {
        let mut s = Session::new("c".into(), 0);
        let id = s.track(delivery(QoS::ExactlyOnce)).unwrap();
        assert!(
            s.complete(id, true) != Completed::Done(None),
            "PUBCOMP before PUBREC is out of order"
        );
        assert_eq!(s.received(id), Some((Flow::CONTROL, None)));
        assert!(matches!(
            s.outgoing().next(),
            Some((_, Outgoing::Release(Flow::CONTROL, None)))
        ));
        assert!(s.complete(id, true) == Completed::Done(None));
        assert_eq!(s.inflight(), 0);
    }

    #[test]
    fn packet_ids_skip_ids_in_use_and_wrap() {
        let mut s = Session::new("c".into(), 0);
        s.next_packet_id = PacketId(u16::MAX);
        let a = s.track(delivery(QoS::AtLeastOnce)).unwrap();
        let b = s.track(delivery(QoS::AtLeastOnce)).unwrap();
        assert_eq!((a, b), (PacketId(u16::MAX), PacketId(1)));
        s.next_packet_id = PacketId(u16::MAX);
        let c = s.track(delivery(QoS::AtLeastOnce)).unwrap();
        assert_eq!(c, 2, "ids in use are skipped and 0 is never used");
    }
}
