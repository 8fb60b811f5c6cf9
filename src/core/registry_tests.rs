//! The session lifecycle in virtual time, without tokio: sessions are opened and closed at
//! made-up instants and `handle_timeout` is driven to the deadlines the registry reports.

use crate::core::topic::TopicName;
use std::cell::Cell;
use std::rc::Rc;

use bytes::Bytes;

use super::*;
use crate::codec::{Publish, QoS, ReasonCode};
use crate::core::channel::Initiator;
use crate::core::message::AppMessage;

/// A handle that records whether the registry marked its session online.
#[derive(Debug, Clone, Default)]
struct Handle(Rc<Cell<bool>>);

impl SessionHandle for Handle {
    fn set_online(&self, online: bool) {
        self.0.set(online);
    }
}

fn id(name: &str) -> Arc<str> {
    Arc::from(name)
}

fn will(topic: &str, delay: u32) -> PendingWill {
    let publish = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from_static(b"gone"),
    };
    PendingWill {
        message: AppMessage::from_publish(
            TopicName::parse(publish.topic.clone(), 0).unwrap(),
            publish,
            None,
            Instant::now(),
        ),
        delay,
        expiry_interval: None,
    }
}

fn closing(client_id: &Arc<str>, expiry: u32, will: Option<PendingWill>) -> Close {
    Close {
        reason: ReasonCode::UNSPECIFIED_ERROR,
        initiator: Initiator::Transport,
        will,
        session: Some(Session::new(Arc::clone(client_id), expiry)),
    }
}

fn ready(open: Open<Handle>) -> (Option<Session>, Handle) {
    match open {
        Open::Ready { session, handle } => (session.map(|s| *s), handle),
        Open::Busy { conn_id, .. } => panic!("served by connection {conn_id}"),
        Open::Full => panic!("refused as full"),
    }
}

fn events(registry: &mut Registry<Handle>) -> Vec<String> {
    std::iter::from_fn(|| registry.poll_event())
        .map(|event| match event {
            Event::Ended {
                client_id, reason, ..
            } => format!("ended {client_id} {reason:?}"),
            Event::Will(will) => format!("will {}", will.message.topic),
        })
        .collect()
}

#[test]
fn a_new_client_gets_a_new_online_session() {
    let mut registry = Registry::default();
    let (session, handle) = ready(registry.open(&id("a"), false, 1, Handle::default));
    assert!(session.is_none());
    assert!(handle.0.get(), "marked online");
    assert_eq!(registry.count(), 1);
    assert!(events(&mut registry).is_empty());
}

#[test]
fn a_served_session_is_busy_until_its_connection_files_it() {
    let mut registry = Registry::default();
    let a = id("a");
    ready(registry.open(&a, false, 1, Handle::default));
    match registry.open(&a, false, 2, Handle::default) {
        Open::Busy { conn_id, .. } => assert_eq!(conn_id, 1),
        Open::Ready { .. } | Open::Full => panic!("took the session without a handover"),
    }
    let t0 = Instant::now();
    registry.close(t0, 1, &a, closing(&a, 60, None));
    let (session, handle) = ready(registry.open(&a, false, 2, Handle::default));
    assert!(session.is_some(), "resumed after the handover");
    assert!(handle.0.get());
}

#[test]
fn a_close_from_a_connection_that_no_longer_serves_changes_nothing() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 60, None));
    ready(registry.open(&a, false, 2, Handle::default));
    // A late close from connection 1 must not file connection 2's session.
    registry.close(t0, 1, &a, closing(&a, 0, Some(will("w", 0))));
    assert!(events(&mut registry).is_empty());
    assert!(matches!(
        registry.open(&a, false, 3, Handle::default),
        Open::Busy { conn_id: 2, .. }
    ));
}

#[test]
fn expiry_zero_ends_the_session_and_publishes_the_will_at_once() {
    let mut registry = Registry::default();
    let a = id("a");
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(Instant::now(), 1, &a, closing(&a, 0, Some(will("w/a", 30))));
    assert_eq!(events(&mut registry), ["ended a Closed", "will w/a"]);
    assert!(registry.is_empty());
    assert_eq!(registry.poll_timeout(), None);
}

#[test]
fn an_offline_session_expires_at_its_interval() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    let (_, handle) = ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 60, None));
    assert!(!handle.0.get(), "marked offline");
    assert_eq!(registry.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    registry.handle_timeout(t0 + Duration::from_secs(59));
    assert_eq!(registry.count(), 1);
    registry.handle_timeout(t0 + Duration::from_secs(60));
    assert_eq!(events(&mut registry), ["ended a Expired"]);
    assert!(registry.is_empty());
    assert_eq!(registry.poll_timeout(), None);
}

#[test]
fn an_unlimited_session_never_expires() {
    let mut registry = Registry::default();
    let a = id("a");
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(Instant::now(), 1, &a, closing(&a, u32::MAX, None));
    assert_eq!(registry.poll_timeout(), None);
    assert_eq!(registry.count(), 1);
}

#[test]
fn resuming_cancels_the_expiry_timer() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 60, None));
    let (session, _) = ready(registry.open(&a, false, 2, Handle::default));
    assert!(session.is_some());
    registry.handle_timeout(t0 + Duration::from_secs(120));
    assert!(events(&mut registry).is_empty());
    assert_eq!(registry.count(), 1);
}

#[test]
fn a_delayed_will_fires_at_its_delay() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 100, Some(will("w/a", 10))));
    assert!(events(&mut registry).is_empty(), "not before the delay");
    assert_eq!(registry.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    registry.handle_timeout(t0 + Duration::from_secs(10));
    assert_eq!(events(&mut registry), ["will w/a"]);
    assert_eq!(registry.count(), 1, "the session outlives its will");
}

#[test]
fn reconnecting_in_time_cancels_a_delayed_will() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 100, Some(will("w/a", 10))));
    ready(registry.open(&a, false, 2, Handle::default));
    registry.handle_timeout(t0 + Duration::from_secs(200));
    assert!(
        events(&mut registry).is_empty(),
        "[MQTT-3.1.3-9] reconnecting in time cancels the will"
    );
}

#[test]
fn a_clean_start_ends_the_old_session_and_publishes_its_will() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 100, Some(will("w/a", 10))));
    let (session, _) = ready(registry.open(&a, true, 2, Handle::default));
    assert!(session.is_none(), "clean start discards the session");
    assert_eq!(events(&mut registry), ["ended a CleanStart", "will w/a"]);
    assert_eq!(registry.poll_timeout(), None, "no timer is left behind");
}

#[test]
fn the_session_ending_first_publishes_the_will_early() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 5, Some(will("w/a", 60))));
    registry.handle_timeout(t0 + Duration::from_secs(5));
    let mut seen = events(&mut registry);
    seen.sort();
    assert_eq!(seen, ["ended a Expired", "will w/a"]);
    registry.handle_timeout(t0 + Duration::from_secs(60));
    assert!(events(&mut registry).is_empty(), "published once");
}

#[test]
fn a_refused_connect_leaves_no_session() {
    let mut registry = Registry::default();
    let a = id("a");
    ready(registry.open(&a, false, 1, Handle::default));
    let close = Close {
        session: None,
        ..closing(&a, 60, Some(will("w", 0)))
    };
    registry.close(Instant::now(), 1, &a, close);
    assert!(registry.is_empty());
    assert!(events(&mut registry).is_empty());
}

#[test]
fn discarding_an_offline_session_ends_it_with_its_will_and_timers() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 60, Some(will("w/a", 30))));
    assert_eq!(registry.offline_with_handles().count(), 1);
    assert!(registry.offline_with_handle("a").is_some());
    assert!(registry.discard("a"));
    assert_eq!(events(&mut registry), ["will w/a", "ended a Discarded"]);
    assert!(registry.is_empty());
    assert_eq!(registry.poll_timeout(), None, "no timer left behind");
    assert!(!registry.discard("a"), "nothing left to discard");
}

#[test]
fn an_online_session_is_not_discarded() {
    let mut registry = Registry::default();
    let a = id("a");
    ready(registry.open(&a, false, 1, Handle::default));
    assert!(!registry.discard("a"));
    assert_eq!(registry.count(), 1);
    assert!(registry.offline_with_handle("a").is_none());
    assert!(events(&mut registry).is_empty());
}

/// `max_sessions` counts online and offline sessions; past it only a CONNECT that needs a new
/// session is refused (resuming, taking over and clean-starting a held one still work), and a
/// refusal changes nothing.
#[test]
fn max_sessions_refuses_only_new_sessions() {
    let mut registry = Registry::default();
    registry.set_max_sessions(2);
    let (a, b, c) = (id("a"), id("b"), id("c"));
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    ready(registry.open(&b, false, 2, Handle::default));
    // `a` goes offline but is still held.
    registry.close(t0, 1, &a, closing(&a, 60, None));
    assert!(matches!(
        registry.open(&c, true, 3, Handle::default),
        Open::Full
    ));
    assert_eq!(registry.count(), 2);
    assert!(events(&mut registry).is_empty());
    // The held ones come back, with or without clean start.
    let (session, _) = ready(registry.open(&a, false, 4, Handle::default));
    assert!(session.is_some());
    registry.close(t0, 4, &a, closing(&a, 0, None));
    // `a` ended with its connection: room for `c`.
    ready(registry.open(&c, true, 5, Handle::default));
    assert!(matches!(
        registry.open(&b, true, 6, Handle::default),
        Open::Busy { .. }
    ));
    assert_eq!(registry.count(), 2);
}

#[test]
fn a_released_session_leaves_without_ending_and_its_will_goes_with_it() {
    let mut registry = Registry::default();
    let a = id("a");
    let t0 = Instant::now();
    ready(registry.open(&a, false, 1, Handle::default));
    registry.close(t0, 1, &a, closing(&a, 60, Some(will("w/a", 30))));
    // Resumed by connection 2 (as a cluster's hand-over does), then released.
    ready(registry.open(&a, false, 2, Handle::default));
    assert!(
        !registry.release("a", 1),
        "only the serving connection releases"
    );
    assert!(registry.release("a", 2));
    assert!(events(&mut registry).is_empty(), "no will, no end");
    assert!(registry.is_empty());
    assert_eq!(registry.poll_timeout(), None, "no timer left behind");
    assert!(!registry.release("a", 2));
}
