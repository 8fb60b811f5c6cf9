//! Fan-out: from one published message to one delivery per session and flow, with every
//! merge rule of overlapping subscriptions, and the retained messages a new subscription gets.
//!
//! Sans-IO and generic over the handle that reaches a subscriber (the shell's mailbox): the
//! shell holds the subscription tree under its lock, calls [`Fanout::collect`], and pushes
//! the deliveries it drains. The rules live here, once:
//! - No Local [MQTT-3.8.3-3]; Retain As Published [MQTT-3.3.1-12, -13];
//! - overlapping subscriptions of a session on one flow give one delivery with the highest
//!   granted QoS and every matching subscription identifier [MQTT-3.3.4-2, -3];
//! - a shared group delivers to one member, preferring members whose session is online;
//! - retained messages: an empty payload clears the topic [MQTT-3.3.1-6, -7]; expired ones are
//!   neither kept nor sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::message::{AppMessage, Delivery, Flow};
use super::retain::RetainedStore;
use super::router::{Dispatch, Groups, SubscriptionTree};
use super::session::Subscription;
use super::topic::TopicFilter;
use crate::codec::SubscriptionOptions;

/// Which subscriptions a message is collected for.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// Every matching subscription, one member of each matching shared group (one node).
    All,
    /// Plain subscriptions only: in a cluster, shared groups are dispatched across nodes.
    Plain,
    /// Plain subscriptions and the `local`-strategy groups with members here: what the
    /// publisher's node serves itself in a cluster.
    Origin,
    /// One member of this shared subscription's group, which the cluster chose for it.
    Group(&'a TopicFilter),
    /// The plain subscriptions of this client only (a message the cluster replays into a
    /// session that it missed).
    Client(&'a str),
}

/// Who holds a subscription: a client, on one of its flows.
pub type SubscriberKey = (Arc<str>, Flow);

/// A subscription as the router holds it: the handle that reaches the subscriber's session
/// and what the subscription asked for.
#[derive(Debug)]
pub struct Subscriber<M> {
    pub handle: Arc<M>,
    pub options: SubscriptionOptions,
    pub id: Option<u32>,
    /// The shared subscription's filter, for a member of a `$share/` group.
    pub shared: Option<Arc<TopicFilter>>,
}

/// The subscription tree the shell keeps: keyed by client id and flow, so a QUIC data
/// stream's subscriptions are its own.
pub type Subscribers<M> = SubscriptionTree<SubscriberKey, Subscriber<M>>;

/// Targets over which overlapping subscriptions are found by a scan; past this, by an index.
const SCAN_LIMIT: usize = 16;

/// Entries kept between publishes (about 64 KiB of targets); a rare huge fan-out does not keep
/// its buffers for the owner's lifetime.
const KEEP: usize = 1024;

/// The deliveries of one publish, in buffers reused from publish to publish so that routing
/// allocates nothing once warm. Empty between publishes (the deliveries are drained), so it
/// holds no message alive.
pub struct Fanout<M> {
    targets: Vec<(Arc<M>, Delivery)>,
    /// Keyed by the handle's address (one handle per session) and flow: no client controls
    /// these keys, so a fast unkeyed hash is safe.
    index: HashMap<(*const M, Flow), usize, rustc_hash::FxBuildHasher>,
    /// The shared groups the last collect picked a member of.
    served: Vec<Arc<TopicFilter>>,
}

impl<M> Default for Fanout<M> {
    fn default() -> Self {
        Self {
            targets: Vec::new(),
            index: HashMap::default(),
            served: Vec::new(),
        }
    }
}

impl<M> Fanout<M> {
    /// Collects one delivery per session and flow subscribed to `message`'s topic in
    /// `subscribers`; `online` tells which handles a shared group may pick (online, with room),
    /// passing over the others while any member qualifies.
    #[cfg(any(test, feature = "internals"))]
    pub fn collect(
        &mut self,
        subscribers: &Subscribers<M>,
        message: &Arc<AppMessage>,
        online: impl Fn(&M) -> bool,
    ) {
        self.collect_in(subscribers, message, Scope::All, online);
    }

    /// [`Self::collect`] over the subscriptions `scope` names.
    pub fn collect_in(
        &mut self,
        subscribers: &Subscribers<M>,
        message: &Arc<AppMessage>,
        scope: Scope<'_>,
        online: impl Fn(&M) -> bool,
    ) {
        let Self {
            targets,
            index,
            served,
        } = self;
        served.clear();
        // Only the publisher's node of a cluster needs to know (`Scope::Origin`).
        let note_served = matches!(scope, Scope::Origin);
        let mut indexed = false;
        let dispatch = Dispatch {
            topic: &message.topic,
            publisher: message.publisher.as_deref(),
        };
        let mut add = |(client, flow): &SubscriberKey, subscriber: &Subscriber<M>| {
            if let (true, Some(group)) = (note_served, &subscriber.shared) {
                served.push(Arc::clone(group));
            }
            if subscriber.options.no_local && message.publisher.as_deref() == Some(&**client) {
                return;
            }
            let qos = message.qos.min(subscriber.options.qos);
            let retain = subscriber.options.retain_as_published && message.retain;
            let key = (Arc::as_ptr(&subscriber.handle), *flow);
            let found = if indexed {
                index.get(&key).copied()
            } else {
                targets
                    .iter()
                    .position(|(h, d)| Arc::as_ptr(h) == key.0 && d.flow == key.1)
            };
            if let Some(i) = found {
                let delivery = &mut targets[i].1;
                delivery.qos = delivery.qos.max(qos);
                delivery.retain |= retain;
                delivery.subscription_ids.extend(subscriber.id);
                // Wanted by more than one of its subscriptions: not the group's alone.
                delivery.shared = None;
                return;
            }
            if indexed {
                index.insert(key, targets.len());
            } else if targets.len() >= SCAN_LIMIT {
                index.extend(
                    targets
                        .iter()
                        .enumerate()
                        .map(|(i, (h, d))| ((Arc::as_ptr(h), d.flow), i)),
                );
                index.insert(key, targets.len());
                indexed = true;
            }
            let delivery = Delivery {
                message: Arc::clone(message),
                qos,
                retain,
                subscription_ids: subscriber.id.into_iter().collect(),
                flow: *flow,
                shared: subscriber.shared.clone(),
                stored: None,
            };
            targets.push((Arc::clone(&subscriber.handle), delivery));
        };
        let eligible = |_: &SubscriberKey, subscriber: &Subscriber<M>| online(&subscriber.handle);
        match scope {
            Scope::All => subscribers.for_each_match_in(dispatch, Groups::All, eligible, add),
            Scope::Plain => subscribers.for_each_match_in(dispatch, Groups::None, eligible, add),
            Scope::Origin => subscribers.for_each_match_in(dispatch, Groups::Local, eligible, add),
            Scope::Client(client) => {
                subscribers.for_each_match_in(
                    dispatch,
                    Groups::None,
                    eligible,
                    |key, subscriber| {
                        if &*key.0 == client {
                            add(key, subscriber);
                        }
                    },
                );
            }
            Scope::Group(filter) => {
                if let Some((key, subscriber)) = subscribers.pick_shared(filter, dispatch, eligible)
                {
                    add(key, subscriber);
                }
            }
        }
    }

    /// Takes the collected deliveries; the buffers stay for the next publish.
    pub fn drain(&mut self) -> std::vec::Drain<'_, (Arc<M>, Delivery)> {
        self.index.clear();
        // Two overlapping subscriptions may carry the same identifier: the PUBLISH names each
        // matching identifier once [MQTT-3.3.4-4] (sorted; order is not significant). Done
        // once here rather than per match, so a client with thousands of overlapping
        // subscriptions costs n log n, not n squared.
        for (_, delivery) in &mut self.targets {
            if delivery.subscription_ids.len() > 1 {
                delivery.subscription_ids.sort_unstable();
                delivery.subscription_ids.dedup();
            }
        }
        self.targets.drain(..)
    }

    /// Gives back buffers grown past what is worth keeping (a no-op below that).
    /// The shared groups the last collect with `Scope::Origin` picked a member of (a member
    /// may still have been passed over, by No Local); empty after any other scope.
    pub fn served(&self) -> &[Arc<TopicFilter>] {
        &self.served
    }

    pub fn trim(&mut self) {
        self.targets.shrink_to(KEEP);
        self.index.shrink_to(KEEP);
        self.served.shrink_to(KEEP);
    }
}

/// The retained message to keep for `message`, or `None` when it clears its topic
/// [MQTT-3.3.1-6, -7]. A kept message gets a payload allocation of its own instead of
/// pinning the read buffer it arrived in; call this outside the retained store's lock.
pub fn retained_entry(message: &AppMessage) -> Option<Arc<AppMessage>> {
    (!message.payload.is_empty()).then(|| Arc::new(message.detached()))
}

/// Stores (or clears) `topic`'s retained message, as [`retained_entry`] decided.
pub fn store_retained(
    store: &mut RetainedStore<Arc<AppMessage>>,
    topic: &str,
    entry: Option<Arc<AppMessage>>,
) {
    match entry {
        Some(kept) => store.insert(topic, kept),
        None => store.remove(topic),
    };
}

/// The retained messages a new subscription receives, each at the lower of its own and the
/// granted QoS, with the subscription's identifier and the retain flag set; expired ones are
/// removed from the store instead.
pub fn retained_deliveries(
    store: &mut RetainedStore<Arc<AppMessage>>,
    subscription: &Subscription,
    now: Instant,
) -> Vec<Delivery> {
    let mut deliveries = Vec::new();
    let mut expired = Vec::new();
    store.for_each_match(&subscription.filter, |topic, message| {
        if message.is_expired(now) {
            expired.push(topic.to_owned());
        } else {
            deliveries.push(Delivery {
                message: Arc::clone(message),
                qos: message.qos.min(subscription.options.qos),
                retain: true,
                subscription_ids: subscription.id.into_iter().collect(),
                flow: subscription.flow,
                shared: None,
                stored: None,
            });
        }
    });
    for topic in expired {
        store.remove(&topic);
    }
    deliveries
}

#[cfg(test)]
#[path = "fanout_tests.rs"]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests;
