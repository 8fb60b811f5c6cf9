//! Session-table tests in virtual time: sessions are opened and closed with made-up instants
//! and `handle_timers` is driven to the deadlines it reports.

use crate::core::topic::TopicName;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::codec::Publish;
use crate::codec::{QoS, SubscriptionOptions};
use crate::core::channel::Initiator;
use crate::core::hooks::{Hooks, Observation};

fn broker() -> Broker {
    Broker::new(Settings {
        // The dropping policy: these tests look at what a full queue does.
        queue_full: crate::broker::mailbox::QueueFull::DropNew,
        ..Settings::minimal(10)
    })
}

fn message(topic: &str, now: Instant) -> AppMessage {
    let publish = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from_static(b"will"),
    };
    AppMessage::from_publish(
        TopicName::parse(publish.topic.clone(), 0).unwrap(),
        publish,
        None,
        now,
    )
}

/// Opens a session for `id`, subscribes it to `filter`, and returns its mailbox.
async fn online(
    broker: &Broker,
    now: Instant,
    id: &Arc<str>,
    conn_id: u64,
    filter: &str,
) -> (Option<Session>, Arc<Mailbox>) {
    let (session, mailbox) = broker.open_session(now, id, false, conn_id).await.unwrap();
    let subscription = Subscription {
        filter: TopicFilter::parse(filter, 0).unwrap(),
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        },
        id: None,
        flow: Flow::CONTROL,
    };
    broker.subscribe(now, id, &mailbox, &subscription, false);
    (session, mailbox)
}

fn close(
    broker: &Broker,
    now: Instant,
    id: &Arc<str>,
    conn_id: u64,
    expiry: u32,
    will: Option<PendingWill>,
) {
    let mut session = Session::new(Arc::clone(id), expiry);
    session.subscribe(Subscription {
        filter: TopicFilter::parse("#", 0).unwrap(),
        options: SubscriptionOptions::default(),
        id: None,
        flow: Flow::CONTROL,
    });
    let close = Close {
        reason: ReasonCode::UNSPECIFIED_ERROR,
        initiator: Initiator::Transport,
        will,
        session: Some(session),
    };
    broker.close_session(now, conn_id, id, close);
}

#[tokio::test]
async fn offline_session_expires_on_time_and_its_subscriptions_go() {
    let b = broker();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("expiring");
    online(&b, t0, &id, 1, "#").await;
    close(&b, t0, &id, 1, 60, None);
    assert_eq!(b.session_count(), 1);

    // Messages queue for the offline session until it expires.
    let (_, watcher) = online(&b, t0, &Arc::from("watcher"), 2, "#").await;
    b.publish(Arc::new(message("x", t0)), t0);
    assert_eq!(watcher.len(), 1);

    let next = b.handle_timers(t0 + Duration::from_secs(59));
    assert_eq!(
        next,
        Some(t0 + Duration::from_secs(60)),
        "nothing due before the expiry"
    );
    assert_eq!(b.session_count(), 2);
    assert_eq!(b.handle_timers(t0 + Duration::from_secs(60)), None);
    assert_eq!(b.session_count(), 1, "the expired session is gone");
    assert_eq!(b.metrics.sessions_expired.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn reconnecting_before_expiry_resumes_the_session() {
    let b = broker();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("resumer");
    online(&b, t0, &id, 1, "#").await;
    close(&b, t0, &id, 1, 60, None);
    let (session, _) = online(&b, t0 + Duration::from_secs(30), &id, 3, "#").await;
    assert!(session.is_some(), "the session is resumed");
    b.handle_timers(t0 + Duration::from_secs(120));
    assert_eq!(
        b.session_count(),
        1,
        "a resumed session is not expired by the old timer"
    );
}

#[tokio::test]
async fn delayed_will_fires_at_the_delay_or_is_cancelled_by_reconnect() {
    let b = broker();
    let t0 = Instant::now();
    let (_, watcher) = online(&b, t0, &Arc::from("watcher"), 1, "will/#").await;

    let id: Arc<str> = Arc::from("willing");
    online(&b, t0, &id, 2, "nothing").await;
    close(
        &b,
        t0,
        &id,
        2,
        100,
        Some(PendingWill {
            message: message("will/a", t0),
            delay: 10,
            expiry_interval: None,
        }),
    );
    b.handle_timers(t0 + Duration::from_secs(9));
    assert_eq!(watcher.len(), 0, "not before the delay");
    b.handle_timers(t0 + Duration::from_secs(10));
    assert_eq!(watcher.len(), 1, "published at the delay");

    let id2: Arc<str> = Arc::from("returning");
    online(&b, t0, &id2, 3, "nothing").await;
    close(
        &b,
        t0,
        &id2,
        3,
        100,
        Some(PendingWill {
            message: message("will/b", t0),
            delay: 10,
            expiry_interval: None,
        }),
    );
    online(&b, t0 + Duration::from_secs(5), &id2, 4, "nothing").await;
    b.handle_timers(t0 + Duration::from_secs(50));
    assert_eq!(
        watcher.len(),
        1,
        "[MQTT-3.1.3-9] reconnecting in time cancels the will"
    );
}

#[tokio::test]
async fn will_is_published_when_the_session_ends_before_the_delay() {
    let b = broker();
    let t0 = Instant::now();
    let (_, watcher) = online(&b, t0, &Arc::from("watcher"), 1, "will/#").await;
    let id: Arc<str> = Arc::from("short");
    online(&b, t0, &id, 2, "nothing").await;
    close(
        &b,
        t0,
        &id,
        2,
        5,
        Some(PendingWill {
            message: message("will/c", t0),
            delay: 60,
            expiry_interval: None,
        }),
    );
    b.handle_timers(t0 + Duration::from_secs(5));
    assert_eq!(
        watcher.len(),
        1,
        "session expiry at 5 s publishes the will despite a 60 s delay"
    );
}

#[tokio::test]
async fn full_mailbox_drops_and_counts_without_affecting_others() {
    let b = broker();
    let t0 = Instant::now();
    let (_, slow) = online(&b, t0, &Arc::from("slow"), 1, "t").await;
    let (_, other) = online(&b, t0, &Arc::from("other"), 2, "t").await;
    // QoS 1: queued up to max_queued (10), then dropped (drop_new) and counted.
    for _ in 0..15 {
        b.route(Arc::new(message("t", t0)), t0);
        other.pop();
    }
    assert_eq!(slow.len(), 10, "bounded by session.max_queued");
    assert_eq!((slow.dropped(), b.metrics.messages_dropped()), (5, 5));
    assert_eq!(other.dropped(), 0);
    // A delayed message fires into the full queue (no publisher to slow): the same policy.
    assert!(b.reserve_delayed());
    b.delay(Arc::new(message("t", t0)), t0 + Duration::from_secs(1))
        .unwrap();
    b.handle_timers(t0 + Duration::from_secs(1));
    assert_eq!(slow.len(), 10);
    assert_eq!(slow.dropped(), 6);
    assert_eq!(other.len(), 1, "the other subscriber has it");
    while slow.pop().is_some() {}
    drop((slow, other));
}

#[tokio::test]
async fn queued_bytes_follow_the_queues_back_to_zero() {
    let b = broker();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("gone");
    let (_, mailbox) = online(&b, t0, &id, 1, "#").await;
    for _ in 0..5 {
        b.route(Arc::new(message("t", t0)), t0);
    }
    assert!(b.budget.bytes() > 0);
    mailbox.pop();
    close(&b, t0, &id, 1, 0, None);
    drop(mailbox);
    assert_eq!(
        b.budget.bytes(),
        0,
        "an ended session's queue leaves the budget"
    );
}

#[tokio::test]
async fn the_same_filter_on_two_flows_yields_two_deliveries() {
    let b = broker();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("multi");
    let (_, mailbox) = online(&b, t0, &id, 1, "m/#").await;
    let on_flow = Subscription {
        filter: TopicFilter::parse("m/#", 0).unwrap(),
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        },
        id: Some(7),
        flow: Flow(4),
    };
    b.subscribe(t0, &id, &mailbox, &on_flow, false);
    b.publish(Arc::new(message("m/x", t0)), t0);
    let mut flows: Vec<(Flow, Vec<u32>)> = std::iter::from_fn(|| mailbox.pop())
        .map(|d| (d.flow, d.subscription_ids))
        .collect();
    flows.sort();
    assert_eq!(flows, vec![(Flow::CONTROL, vec![]), (Flow(4), vec![7])]);
    b.unsubscribe(&id, &on_flow.filter, Flow(4));
    b.publish(Arc::new(message("m/y", t0)), t0);
    assert_eq!(mailbox.len(), 1, "unsubscribing one flow leaves the other");
}

#[tokio::test]
async fn moving_a_subscription_to_another_flow_delivers_once_on_the_new_flow() {
    let b = broker();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("mover");
    // `online` subscribes "m/#" on the control flow (as a parked subscription would be).
    let (_, mailbox) = online(&b, t0, &id, 1, "m/#").await;
    let moved = Subscription {
        filter: TopicFilter::parse("m/#", 0).unwrap(),
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        },
        id: None,
        flow: Flow(4),
    };
    b.move_subscription(&id, &mailbox, &moved, Flow::CONTROL);
    b.publish(Arc::new(message("m/x", t0)), t0);
    let flows: Vec<Flow> = std::iter::from_fn(|| mailbox.pop())
        .map(|d| d.flow)
        .collect();
    assert_eq!(flows, vec![Flow(4)], "once, on the new flow");
    b.unsubscribe(&id, &moved.filter, Flow::CONTROL);
    b.publish(Arc::new(message("m/y", t0)), t0);
    assert_eq!(
        mailbox.len(),
        1,
        "the control flow had nothing left to remove"
    );
}

/// Records what the seams are told, as one line each.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<String>>);

impl Recorder {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl crate::core::hooks::Observer for Recorder {
    fn observe(&self, observation: &Observation<'_>) {
        self.push(format!("{observation:?}"));
    }
}

impl crate::core::hooks::Store for Recorder {
    fn next_key(&self) -> crate::core::session::StoreKey {
        0
    }

    fn session_saved(&self, session: &Session) -> Ticket {
        self.push(format!("saved {}", session.client_id));
        0
    }

    fn session_filed(&self, session: &Session, _will: Option<&PendingWill>) -> Ticket {
        self.push(format!("filed {}", session.client_id));
        0
    }

    fn session_ended(&self, client_id: &str) -> Ticket {
        self.push(format!("ended {client_id}"));
        0
    }

    fn queued(
        &self,
        client_id: &str,
        _key: crate::core::session::StoreKey,
        delivery: &Delivery,
    ) -> Result<Ticket, crate::core::hooks::Refused> {
        self.push(format!("queued {client_id} {}", delivery.message.topic));
        Ok(0)
    }

    fn changed(&self, client_id: &str, change: crate::core::session::Change) -> Ticket {
        self.push(format!("changed {client_id} {change:?}"));
        0
    }

    fn delayed_held(
        &self,
        _key: crate::core::session::StoreKey,
        message: &AppMessage,
        _at: Instant,
    ) -> Result<Ticket, crate::core::hooks::Refused> {
        self.push(format!("delayed {}", message.topic));
        Ok(0)
    }

    fn delayed_done(&self, _key: crate::core::session::StoreKey) -> Ticket {
        0
    }

    fn retained_set(&self, message: &AppMessage) -> Result<Ticket, crate::core::hooks::Refused> {
        self.push(format!("retained {}", message.topic));
        Ok(0)
    }

    fn retained_cleared(&self, topic: &str) -> Ticket {
        self.push(format!("cleared {topic}"));
        0
    }

    fn poll_durable(
        &self,
        _cx: &mut std::task::Context<'_>,
        _from: Ticket,
        _upto: Ticket,
    ) -> std::task::Poll<Result<(), crate::core::hooks::Refused>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl crate::core::hooks::Peers for Recorder {
    fn forward(
        &self,
        message: &Arc<AppMessage>,
        _served: &[Arc<TopicFilter>],
    ) -> Result<crate::core::hooks::Ticket, crate::core::hooks::Refused> {
        self.push(format!("forward {}", message.topic));
        Ok(0)
    }

    fn interest(&self, filter: &crate::core::topic::TopicFilter, subscribed: bool) {
        self.push(format!("interest {} {subscribed}", filter.as_str()));
    }
}

fn hooked() -> (Broker, Arc<Recorder>, Arc<Recorder>, Arc<Recorder>) {
    let (observer, store, peers) = <(Arc<Recorder>, Arc<Recorder>, Arc<Recorder>)>::default();
    let hooks = Hooks {
        observer: Some(Arc::clone(&observer) as _),
        store: Some(Arc::clone(&store) as _),
        peers: Some(Arc::clone(&peers) as _),
    };
    (broker().with_hooks(hooks), observer, store, peers)
}

#[tokio::test]
async fn the_observer_hears_the_session_lifecycle_with_reasons() {
    let (b, observer, _, _) = hooked();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("seen");
    online(&b, t0, &id, 1, "a/#").await;
    close(&b, t0, &id, 1, 60, None);
    online(&b, t0, &id, 2, "a/#").await;
    close(&b, t0, &id, 2, 0, None);
    assert_eq!(
        observer.take(),
        [
            r#"Connected { client_id: "seen", session_present: false }"#,
            r#"Subscribed { client_id: "seen", filter: "a/#" }"#,
            r#"Disconnected { client_id: "seen", reason: 0x80 (Unspecified error), initiator: Transport }"#,
            r#"Connected { client_id: "seen", session_present: true }"#,
            r#"Subscribed { client_id: "seen", filter: "a/#" }"#,
            r#"Disconnected { client_id: "seen", reason: 0x80 (Unspecified error), initiator: Transport }"#,
            r#"SessionEnded { client_id: "seen", reason: Closed }"#,
        ]
    );
}

#[tokio::test]
async fn the_store_hears_sessions_filed_and_ended_and_retained_changes() {
    let (b, _, store, _) = hooked();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("kept");
    online(&b, t0, &id, 1, "nothing").await;
    close(&b, t0, &id, 1, 10, None);
    b.handle_timers(t0 + Duration::from_secs(10));
    let mut retained = message("r/1", t0);
    retained.retain = true;
    b.publish(Arc::new(retained.clone()), t0);
    retained.payload = Bytes::new();
    b.publish(Arc::new(retained), t0);
    assert_eq!(
        store.take(),
        ["filed kept", "ended kept", "retained r/1", "cleared r/1"]
    );
}

#[tokio::test]
async fn a_late_close_from_a_taken_over_connection_files_nothing() {
    let (b, _, store, _) = hooked();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("late");
    online(&b, t0, &id, 1, "x").await;
    close(&b, t0, &id, 1, 60, None);
    online(&b, t0, &id, 2, "x").await;
    store.take();
    close(&b, t0, &id, 1, 60, None);
    assert!(
        store.take().is_empty(),
        "connection 1 no longer serves the session"
    );
}

#[tokio::test]
async fn peers_are_offered_every_live_message_and_drops_are_observed() {
    let (b, observer, _, peers) = hooked();
    let t0 = Instant::now();
    let (_, slow) = online(&b, t0, &Arc::from("slow"), 1, "t").await;
    observer.take();
    for _ in 0..11 {
        b.route(Arc::new(message("t", t0)), t0);
    }
    let mut expired = message("t", t0);
    expired.expires_at = Some(t0);
    b.route(Arc::new(expired), t0 + Duration::from_secs(1));
    assert_eq!(slow.len(), 10);
    let forwarded = peers.take();
    assert_eq!(
        forwarded
            .iter()
            .filter(|e| e.starts_with("forward"))
            .count(),
        11,
        "the expired message is not forwarded: {forwarded:?}"
    );
    assert_eq!(
        observer.take(),
        [r#"Dropped { count: 1, reason: QueueFull }"#]
    );
}

#[tokio::test]
async fn a_shared_group_passes_a_full_member_over_for_the_next() {
    let b = broker();
    let t0 = Instant::now();
    let (_, full) = online(&b, t0, &Arc::from("full"), 1, "$share/g/t").await;
    let (_, other) = online(&b, t0, &Arc::from("other"), 2, "$share/g/t").await;
    // Fill "full" to its bound (max_queued) while "other" keeps draining.
    while full.accepts() {
        b.route(Arc::new(message("t", t0)), t0);
        while other.pop().is_some() {}
    }
    assert_eq!(full.len(), 10);
    for _ in 0..10 {
        b.route(Arc::new(message("t", t0)), t0);
    }
    assert_eq!(
        other.len(),
        10,
        "every message went to the member that could take it"
    );
    assert_eq!(b.metrics.messages_dropped(), 0);
    full.pop();
    assert!(full.accepts(), "room again once it takes one");
}

#[tokio::test]
async fn peers_hear_a_filter_s_first_and_last_subscriber_only() {
    let (b, _, _, peers) = hooked();
    let t0 = Instant::now();
    let (a, b_) = (Arc::from("a"), Arc::from("b"));
    online(&b, t0, &a, 1, "x/+").await;
    online(&b, t0, &b_, 2, "x/+").await;
    online(&b, t0, &Arc::from("c"), 3, "$share/g/x/+").await;
    let filter = TopicFilter::parse("x/+", 0).unwrap();
    b.unsubscribe(&a, &filter, Flow::CONTROL);
    b.unsubscribe(&b_, &filter, Flow::CONTROL);
    let heard: Vec<String> = peers
        .take()
        .into_iter()
        .filter(|e| e.starts_with("interest"))
        .collect();
    assert_eq!(
        heard,
        [
            "interest x/+ true",
            "interest $share/g/x/+ true",
            "interest x/+ false"
        ]
    );
}

#[tokio::test]
async fn a_cluster_s_messages_meet_plain_subscriptions_or_the_chosen_group_only() {
    let (b, _, _, _) = hooked();
    let t0 = Instant::now();
    let (_, plain) = online(&b, t0, &Arc::from("plain"), 1, "t").await;
    let (_, member) = online(&b, t0, &Arc::from("member"), 2, "$share/g/t").await;
    let group = TopicFilter::parse("$share/g/t", 0).unwrap();
    b.route_remote(Arc::new(message("t", t0)), Scope::Plain, t0);
    assert_eq!((plain.len(), member.len()), (1, 0));
    b.route_remote(Arc::new(message("t", t0)), Scope::Group(&group), t0);
    assert_eq!((plain.len(), member.len()), (1, 1));
}

#[tokio::test]
async fn a_session_handed_over_leaves_filed_and_without_its_subscriptions() {
    let (b, _, store, peers) = hooked();
    let t0 = Instant::now();
    let id: Arc<str> = Arc::from("mover");
    // (`close` files the session with a subscription on `#`.)
    online(&b, t0, &id, 1, "#").await;
    close(&b, t0, &id, 1, 60, None);
    store.take();
    peers.take();
    assert!(b.hand_over(&id, t0).await.is_some());
    assert!(!b.knows_client(&id));
    assert!(store.take().contains(&"filed mover".to_string()));
    assert!(
        peers.take().contains(&"interest # false".to_string()),
        "its routes went with it"
    );
    assert!(
        b.hand_over(&id, t0).await.is_none(),
        "nothing left to hand over"
    );
}
