//! The seams where the subsystems to come attach: traits the shell calls at the moments the
//! core decides something, so that storage, observability and clustering plug in beside the
//! broker instead of into it.
//!
//! - [`Observer`]: what happened, with reasons (connected, disconnected, subscribed,
//!   unsubscribed, session ended, deliveries dropped) — for `$SYS`, an HTTP API, Prometheus.
//! - [`Store`]: what must outlive the process (persistent sessions, their queued and in-flight
//!   deliveries, inbound QoS 2 state, retained messages) — for the durable store. The channel
//!   asks for the routing of a QoS 1/2 PUBLISH before it acknowledges it
//!   (`Action::Route { ack }`, answered by `Channel::acknowledge`), and the shell holds a
//!   connection's output until the store's [`Ticket`] for it is on disk.
//! - [`Peers`]: every message routed here, offered to other nodes — for clustering.
//!
//! Every seam is optional ([`Hooks`]); a broker without any pays one branch per call site.
//! Implementations must not block: they are called from connection tasks, some under the
//! sessions lock (`Store::session_filed`, `Store::session_ended`). A store's writes only
//! queue; its disk work happens on a thread of its own.

use std::sync::Arc;
use std::task::{Context, Poll};

use super::channel::{Initiator, PendingWill};
use super::message::{AppMessage, Delivery};
use super::registry::EndReason;
use super::session::{Change, Session, StoreKey};
use crate::codec::ReasonCode;

/// Why deliveries were dropped instead of sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The subscriber's queue was past its hard bound.
    QueueFull,
    /// Expired (Message Expiry Interval) before it could be sent, or larger than the client's
    /// Maximum Packet Size.
    Undeliverable,
}

/// Something that happened, as an observer is told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation<'a> {
    /// A CONNECT was accepted; `session_present` as in CONNACK.
    Connected {
        client_id: &'a str,
        session_present: bool,
    },
    /// A connection that had been accepted closed.
    Disconnected {
        client_id: &'a str,
        reason: ReasonCode,
        initiator: Initiator,
    },
    Subscribed {
        client_id: &'a str,
        filter: &'a str,
    },
    Unsubscribed {
        client_id: &'a str,
        filter: &'a str,
    },
    /// A session ended: closed with expiry 0, expired offline, or replaced by a clean start.
    SessionEnded {
        client_id: &'a str,
        reason: EndReason,
    },
    /// `count` deliveries were dropped.
    Dropped {
        count: u64,
        reason: DropReason,
    },
}

/// Told of everything in [`Observation`].
pub trait Observer: Send + Sync {
    fn observe(&self, observation: &Observation<'_>);
}

/// A place in the durable store's log: everything written up to it is on disk once
/// [`Store::poll_durable`] says so.
pub type Ticket = u64;

/// Why the store did not take a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Past `storage.max_bytes`.
    Full,
    /// The disk failed the last write.
    Failed,
}

/// The durable store: told of everything that must outlive the process, in order. Writes
/// return at once with a [`Ticket`]; what depends on a write (an acknowledgement the client
/// acts on) waits until [`Store::poll_durable`] says that ticket is on disk, so many writes
/// share one commit (group commit). Implementations: `storage::Embedded` (one node), later
/// the clustered store.
pub trait Store: Send + Sync {
    /// A fresh key for a delivery about to be queued for a persistent session.
    fn next_key(&self) -> StoreKey;
    /// A persistent session was opened or resumed, or its subscriptions changed.
    fn session_saved(&self, session: &Session) -> Ticket;
    /// A persistent session went offline, with the will it must publish after its delay.
    fn session_filed(&self, session: &Session, will: Option<&PendingWill>) -> Ticket;
    /// The pending will of `client_id`'s offline session was published.
    fn will_published(&self, _client_id: &str) -> Ticket {
        0
    }
    /// A session ended: nothing of it is kept.
    fn session_ended(&self, client_id: &str) -> Ticket;
    /// A delivery was queued for the persistent session `client_id` under `key`.
    fn queued(
        &self,
        client_id: &str,
        key: StoreKey,
        delivery: &Delivery,
    ) -> Result<Ticket, Refused>;
    /// The persistent session's state changed (see [`Change`]).
    fn changed(&self, client_id: &str, change: Change) -> Ticket;
    /// A `$delayed/` message is held under `key` until `at`.
    fn delayed_held(
        &self,
        key: StoreKey,
        message: &AppMessage,
        at: std::time::Instant,
    ) -> Result<Ticket, Refused>;
    /// The delayed message `key` was published.
    fn delayed_done(&self, key: StoreKey) -> Ticket;
    /// A retained message was set (a copy with a payload of its own).
    fn retained_set(&self, message: &AppMessage) -> Result<Ticket, Refused>;
    /// A retained message was cleared (an empty retained PUBLISH).
    fn retained_cleared(&self, topic: &str) -> Ticket;
    /// Writes until [`Store::end_group`] on this thread are committed together or not at
    /// all (a routed QoS 2 message and the record that it was received).
    fn begin_group(&self) {}
    /// Ends the group; returns its ticket (0: it wrote nothing). The writes made in the group
    /// returned ticket 0.
    fn end_group(&self) -> Ticket {
        0
    }
    /// Ready once everything up to `upto` is on disk; `Err` if a commit holding any ticket
    /// from `from` to `upto` failed.
    fn poll_durable(
        &self,
        cx: &mut Context<'_>,
        from: Ticket,
        upto: Ticket,
    ) -> Poll<Result<(), Refused>>;
}

/// Other nodes of a cluster: offered every message routed on this node (after local
/// fan-out), and told when this node's interest in a filter begins and ends.
pub trait Peers: Send + Sync {
    /// Sends `message` to the nodes that want it. A QoS 1/2 message is committed to the
    /// cluster under the returned [`Ticket`] (0: nothing to wait for), which the store's
    /// [`Store::poll_durable`] answers: the publisher's acknowledgement waits for it.
    /// `served`: the shared groups this node already gave it to (`local` strategy), which
    /// no other node may give it to again.
    fn forward(
        &self,
        message: &Arc<AppMessage>,
        served: &[Arc<super::topic::TopicFilter>],
    ) -> Result<Ticket, Refused>;
    /// The first subscription on `filter` (exactly this text, `$share/…` included) arrived
    /// (`true`), or its last left (`false`).
    fn interest(&self, _filter: &super::topic::TopicFilter, _subscribed: bool) {}
    /// Whether shared groups are dispatched by the peers (across nodes) rather than by the
    /// local fan-out.
    fn dispatches_shared(&self) -> bool {
        false
    }
    /// A CONNECT for `client_id` arrived: the work (if any) that brings its session here
    /// from another node, to finish before the session is looked up.
    fn claim(&self, _client_id: &Arc<str>) -> Option<Claim> {
        None
    }
}

/// What [`Peers::claim`] does before a session is looked up.
pub type Claim = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The seams a broker was built with; each is optional.
#[derive(Clone, Default)]
pub struct Hooks {
    pub observer: Option<Arc<dyn Observer>>,
    pub store: Option<Arc<dyn Store>>,
    pub peers: Option<Arc<dyn Peers>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("observer", &self.observer.is_some())
            .field("store", &self.store.is_some())
            .field("peers", &self.peers.is_some())
            .finish()
    }
}
