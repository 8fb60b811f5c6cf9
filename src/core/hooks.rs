//! The seams where the subsystems to come attach: traits the shell calls at the moments the
//! core decides something, so that storage, observability and clustering plug in beside the
//! broker instead of into it.
//!
//! - [`Observer`]: what happened, with reasons (connected, disconnected, subscribed,
//!   unsubscribed, session ended, deliveries dropped) — for `$SYS`, an HTTP API, Prometheus.
//! - [`Store`]: what must outlive the process (a session filed offline or ended, a retained
//!   message set or cleared) — for the durable store. Acknowledging a PUBLISH only after its
//!   commit will be a decision the channel asks for and the shell answers asynchronously, like
//!   a CONNECT's session (`Action::Connect`); that part comes with the store itself.
//! - [`Peers`]: every message routed here, offered to other nodes — for clustering.
//!
//! Every seam is optional ([`Hooks`]); a broker without any pays one branch per call site.
//! Implementations must not block: they are called from connection tasks, some under the
//! sessions lock (`Store::session_filed`, `Store::session_ended`).

use std::sync::Arc;

use super::channel::Initiator;
use super::message::AppMessage;
use super::registry::EndReason;
use super::session::Session;
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

/// Told of what a durable store must record. Every method defaults to nothing.
pub trait Store: Send + Sync {
    /// A session went offline and is kept until it expires.
    fn session_filed(&self, _session: &Session) {}
    /// A session ended; nothing of it is kept.
    fn session_ended(&self, _client_id: &str) {}
    /// A retained message was set (a copy with a payload of its own).
    fn retained_set(&self, _message: &AppMessage) {}
    /// A retained message was cleared (an empty retained PUBLISH).
    fn retained_cleared(&self, _topic: &str) {}
}

/// Offered every message routed on this node, after local fan-out.
pub trait Peers: Send + Sync {
    fn forward(&self, message: &Arc<AppMessage>);
}

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
