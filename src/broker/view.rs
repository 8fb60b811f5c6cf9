//! What operators read and do, as the broker's own operations: listings of sessions,
//! subscriptions, retained and delayed messages (walked under their locks, never on the
//! message path), kicking a client, deleting a retained or delayed message. The admin layer
//! (the `admin` module) reads the broker only through these.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::clients::ClientInfo;
use super::Broker;
use crate::codec::SubscriptionOptions;
use crate::core::message::AppMessage;

/// A session with no connection (persistent, waiting for its client).
#[derive(Debug, Clone)]
pub struct OfflineSession {
    pub client_id: Arc<str>,
    pub expiry_interval: u32,
    pub subscriptions: usize,
    pub inflight: usize,
    pub queued: usize,
    /// Deliveries its full queue dropped (`session.max_queued`).
    pub dropped: u64,
}

/// A session as operators see it: connected, or offline.
#[derive(Debug, Clone)]
pub enum SessionView {
    Online(Arc<ClientInfo>),
    Offline(OfflineSession),
}

impl SessionView {
    pub fn client_id(&self) -> &str {
        match self {
            Self::Online(info) => &info.client_id,
            Self::Offline(session) => &session.client_id,
        }
    }
}

/// A delayed message waiting for its time.
#[derive(Debug, Clone)]
pub struct DelayedView {
    pub id: u64,
    pub due: Instant,
    pub message: Arc<AppMessage>,
}

impl Broker {
    /// Every session: the connected clients, then the offline sessions.
    pub fn sessions_view(&self) -> Vec<SessionView> {
        let mut all: Vec<_> = self
            .clients
            .all()
            .into_iter()
            .map(SessionView::Online)
            .collect();
        let sessions = self.lock_sessions();
        all.extend(sessions.offline_with_handles().map(|(session, mailbox)| {
            SessionView::Offline(OfflineSession {
                client_id: Arc::clone(&session.client_id),
                expiry_interval: session.expiry_interval,
                subscriptions: session.subscriptions.len(),
                inflight: session.inflight(),
                queued: mailbox.len(),
                dropped: mailbox.dropped(),
            })
        }));
        all
    }

    /// One session by client id.
    pub fn session_view(&self, client_id: &str) -> Option<SessionView> {
        if let Some(info) = self.clients.get(client_id) {
            return Some(SessionView::Online(info));
        }
        let sessions = self.lock_sessions();
        let (session, mailbox) = sessions.offline_with_handle(client_id)?;
        Some(SessionView::Offline(OfflineSession {
            client_id: Arc::clone(&session.client_id),
            expiry_interval: session.expiry_interval,
            subscriptions: session.subscriptions.len(),
            inflight: session.inflight(),
            queued: mailbox.len(),
            dropped: mailbox.dropped(),
        }))
    }

    /// Kicks `client_id` (see `Channel::handle_kick`), or discards its offline session.
    /// `false` if it has neither.
    pub fn kick(&self, client_id: &str) -> bool {
        if let Some(info) = self.clients.get(client_id) {
            info.mailbox.request_kick(info.conn_id);
            return true;
        }
        let (discarded, wills) = {
            let mut sessions = self.lock_sessions();
            let discarded = sessions.discard(client_id);
            (discarded, self.carry_out(&mut sessions))
        };
        self.publish_wills(wills, super::clock::now());
        if discarded {
            self.timers_changed.notify_one();
        }
        discarded
    }

    /// Visits every subscription: the filter as subscribed, the client, its options.
    pub fn for_each_subscription(&self, mut visit: impl FnMut(&str, &str, SubscriptionOptions)) {
        self.router
            .read()
            .expect("router lock is never poisoned")
            .for_each(|filter, (client_id, _flow), subscriber| {
                visit(filter, client_id, subscriber.options);
            });
    }

    /// Distinct subscribed filters and shared subscriptions (see
    /// `SubscriptionTree::filter_counts`).
    pub fn filter_counts(&self) -> (usize, usize) {
        self.router
            .read()
            .expect("router lock is never poisoned")
            .filter_counts()
    }

    /// Subscriptions held (online and offline sessions).
    pub fn subscription_count(&self) -> usize {
        self.router
            .read()
            .expect("router lock is never poisoned")
            .len()
    }

    /// Visits every retained message with its topic (`$SYS` ones too).
    pub fn for_each_retained(&self, mut visit: impl FnMut(&str, &Arc<AppMessage>)) {
        self.retained
            .lock()
            .expect("retained lock is never poisoned")
            .retain(|topic, message| {
                visit(topic, message);
                true
            });
    }

    /// The retained message on `topic`.
    pub fn retained_message(&self, topic: &str) -> Option<Arc<AppMessage>> {
        self.retained
            .lock()
            .expect("retained lock is never poisoned")
            .get(topic)
            .cloned()
    }

    /// Deletes the retained message on `topic` (from the store first); `false` if none.
    pub fn delete_retained(&self, topic: &str) -> bool {
        let mut retained = self
            .retained
            .lock()
            .expect("retained lock is never poisoned");
        if retained.get(topic).is_none() {
            return false;
        }
        if let Some(store) = &self.hooks.store {
            store.retained_cleared(topic);
        }
        retained.remove(topic);
        true
    }

    /// Every delayed message waiting.
    pub fn delayed_view(&self) -> Vec<DelayedView> {
        let mut all = Vec::new();
        self.delayed
            .lock()
            .expect("delayed lock is never poisoned")
            .for_each(|id, due, message| {
                all.push(DelayedView {
                    id,
                    due,
                    message: Arc::clone(message),
                })
            });
        all.sort_by_key(|d| (d.due, d.id));
        all
    }

    /// Deletes the delayed message `id` (from the store too); `false` if none.
    pub fn delete_delayed(&self, id: u64) -> bool {
        let removed = self
            .delayed
            .lock()
            .expect("delayed lock is never poisoned")
            .remove(id);
        let Some((_, stored)) = removed else {
            return false;
        };
        self.delayed_admitted.fetch_sub(1, Ordering::Relaxed);
        if let (Some(store), Some(key)) = (&self.hooks.store, stored) {
            store.delayed_done(key);
        }
        true
    }
}
