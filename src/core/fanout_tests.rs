//! Fan-out rules without tokio: subscriptions are put in a tree with plain handles and the
//! deliveries of one publish are inspected.

use crate::core::topic::TopicName;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::codec::{Publish, QoS};
use crate::core::topic::TopicFilter;

/// A subscriber's session as fan-out sees it.
#[derive(Debug)]
struct Handle {
    name: &'static str,
    online: bool,
}

fn handle(name: &'static str) -> Arc<Handle> {
    Arc::new(Handle { name, online: true })
}

fn message(topic: &str, qos: QoS, retain: bool, publisher: Option<&str>) -> Arc<AppMessage> {
    let publish = Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from_static(b"m"),
    };
    Arc::new(AppMessage::from_publish(
        TopicName::parse(publish.topic.clone(), 0).unwrap(),
        publish,
        publisher.map(Arc::from),
        Instant::now(),
    ))
}

fn subscribe(
    routes: &mut Subscribers<Handle>,
    who: &Arc<Handle>,
    flow: Flow,
    filter: &str,
    options: SubscriptionOptions,
    id: Option<u32>,
) {
    let filter = TopicFilter::parse(filter, 0).unwrap();
    let route = Subscriber {
        handle: Arc::clone(who),
        options,
        id,
        shared: filter.share_group().map(|_| Arc::new(filter.clone())),
    };
    let key = (Arc::from(who.name), flow);
    routes.insert(&filter, key, route);
}

fn qos(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..Default::default()
    }
}

/// (subscriber, flow, qos, retain, subscription ids) of each delivery, sorted.
fn deliveries(
    routes: &Subscribers<Handle>,
    message: &Arc<AppMessage>,
) -> Vec<(&'static str, u64, QoS, bool, Vec<u32>)> {
    let mut fanout = Fanout::default();
    fanout.collect(routes, message, |h| h.online);
    let mut out: Vec<_> = fanout
        .drain()
        .map(|(h, d)| {
            let mut ids = d.subscription_ids.clone();
            ids.sort();
            (h.name, d.flow.0, d.qos, d.retain, ids)
        })
        .collect();
    out.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    out
}

#[test]
fn overlapping_subscriptions_merge_into_one_delivery() {
    let mut routes = Subscribers::new();
    let a = handle("a");
    subscribe(
        &mut routes,
        &a,
        Flow::CONTROL,
        "t/#",
        qos(QoS::AtMostOnce),
        Some(1),
    );
    subscribe(
        &mut routes,
        &a,
        Flow::CONTROL,
        "t/+",
        qos(QoS::ExactlyOnce),
        Some(2),
    );
    subscribe(
        &mut routes,
        &a,
        Flow::CONTROL,
        "t/x",
        qos(QoS::AtLeastOnce),
        None,
    );
    let got = deliveries(&routes, &message("t/x", QoS::ExactlyOnce, false, None));
    assert_eq!(
        got,
        [("a", 0, QoS::ExactlyOnce, false, vec![1, 2])],
        "[MQTT-3.3.4-2, -3] one delivery, the highest QoS, every identifier"
    );
}

#[test]
fn the_granted_qos_caps_the_message_qos() {
    let mut routes = Subscribers::new();
    subscribe(
        &mut routes,
        &handle("a"),
        Flow::CONTROL,
        "t",
        qos(QoS::AtMostOnce),
        None,
    );
    let got = deliveries(&routes, &message("t", QoS::ExactlyOnce, false, None));
    assert_eq!(got, [("a", 0, QoS::AtMostOnce, false, vec![])]);
}

#[test]
fn no_local_skips_the_publisher_only() {
    let mut routes = Subscribers::new();
    let options = SubscriptionOptions {
        no_local: true,
        ..qos(QoS::AtLeastOnce)
    };
    subscribe(
        &mut routes,
        &handle("me"),
        Flow::CONTROL,
        "t",
        options,
        None,
    );
    subscribe(
        &mut routes,
        &handle("you"),
        Flow::CONTROL,
        "t",
        options,
        None,
    );
    let got = deliveries(&routes, &message("t", QoS::AtLeastOnce, false, Some("me")));
    assert_eq!(got, [("you", 0, QoS::AtLeastOnce, false, vec![])]);
}

#[test]
fn retain_as_published_keeps_the_flag_only_when_asked() {
    let mut routes = Subscribers::new();
    let keep = SubscriptionOptions {
        retain_as_published: true,
        ..qos(QoS::AtMostOnce)
    };
    subscribe(&mut routes, &handle("keep"), Flow::CONTROL, "t", keep, None);
    subscribe(
        &mut routes,
        &handle("plain"),
        Flow::CONTROL,
        "t",
        qos(QoS::AtMostOnce),
        None,
    );
    let got = deliveries(&routes, &message("t", QoS::AtMostOnce, true, None));
    assert_eq!(
        got,
        [
            ("keep", 0, QoS::AtMostOnce, true, vec![]),
            ("plain", 0, QoS::AtMostOnce, false, vec![]),
        ]
    );
}

#[test]
fn each_flow_of_a_session_gets_its_own_delivery() {
    let mut routes = Subscribers::new();
    let a = handle("a");
    subscribe(
        &mut routes,
        &a,
        Flow::CONTROL,
        "m/#",
        qos(QoS::AtLeastOnce),
        None,
    );
    subscribe(
        &mut routes,
        &a,
        Flow(4),
        "m/#",
        qos(QoS::AtLeastOnce),
        Some(7),
    );
    let got = deliveries(&routes, &message("m/x", QoS::AtLeastOnce, false, None));
    assert_eq!(
        got,
        [
            ("a", 0, QoS::AtLeastOnce, false, vec![]),
            ("a", 4, QoS::AtLeastOnce, false, vec![7]),
        ]
    );
}

#[test]
fn many_subscribers_merge_the_same_way_through_the_index() {
    // Past the scan limit the merge goes through the index: every subscriber still gets one
    // delivery with both identifiers.
    let mut routes = Subscribers::new();
    let names: Vec<&'static str> = (0..40)
        .map(|i| &*Box::leak(format!("s{i:02}").into_boxed_str()))
        .collect();
    for name in &names {
        let h = handle(name);
        subscribe(
            &mut routes,
            &h,
            Flow::CONTROL,
            "f/#",
            qos(QoS::AtMostOnce),
            Some(1),
        );
        subscribe(
            &mut routes,
            &h,
            Flow::CONTROL,
            "f/+",
            qos(QoS::AtLeastOnce),
            Some(2),
        );
    }
    let got = deliveries(&routes, &message("f/x", QoS::AtLeastOnce, false, None));
    assert_eq!(got.len(), 40);
    assert!(got.iter().all(|d| d.2 == QoS::AtLeastOnce && d.4 == [1, 2]));
}

#[test]
fn a_shared_group_delivers_to_one_online_member() {
    let mut routes = Subscribers::new();
    let offline = Arc::new(Handle {
        name: "offline",
        online: false,
    });
    subscribe(
        &mut routes,
        &offline,
        Flow::CONTROL,
        "$share/g/t",
        qos(QoS::AtLeastOnce),
        None,
    );
    subscribe(
        &mut routes,
        &handle("online"),
        Flow::CONTROL,
        "$share/g/t",
        qos(QoS::AtLeastOnce),
        None,
    );
    for _ in 0..4 {
        let got = deliveries(&routes, &message("t", QoS::AtLeastOnce, false, None));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "online");
    }
}

#[test]
fn the_buffers_are_empty_between_publishes() {
    let mut routes = Subscribers::new();
    subscribe(
        &mut routes,
        &handle("a"),
        Flow::CONTROL,
        "t",
        qos(QoS::AtMostOnce),
        None,
    );
    let mut fanout = Fanout::default();
    let m = message("t", QoS::AtMostOnce, false, None);
    fanout.collect(&routes, &m, |h| h.online);
    assert_eq!(fanout.drain().count(), 1);
    fanout.trim();
    assert_eq!(
        Arc::strong_count(&m),
        1,
        "no delivery keeps the message alive"
    );
}

#[test]
fn an_empty_retained_payload_clears_the_topic() {
    let mut store = RetainedStore::new();
    let kept = message("r", QoS::AtLeastOnce, true, None);
    store_retained(&mut store, "r", retained_entry(&kept));
    assert_eq!(store.count(), 1);
    let mut empty = (*kept).clone();
    empty.payload = Bytes::new();
    assert!(retained_entry(&empty).is_none());
    store_retained(&mut store, "r", retained_entry(&empty));
    assert!(store.is_empty(), "[MQTT-3.3.1-6, -7]");
}

#[test]
fn a_new_subscription_gets_live_retained_messages_and_expired_ones_go() {
    let now = Instant::now();
    let mut store = RetainedStore::new();
    store.insert("r/live", message("r/live", QoS::ExactlyOnce, true, None));
    let mut old = (*message("r/old", QoS::AtMostOnce, true, None)).clone();
    old.expires_at = Some(now - Duration::from_secs(1));
    store.insert("r/old", Arc::new(old));
    let subscription = Subscription {
        filter: TopicFilter::parse("r/#", 0).unwrap(),
        options: qos(QoS::AtLeastOnce),
        id: Some(9),
        flow: Flow(8),
    };
    let got = retained_deliveries(&mut store, &subscription, now);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.topic, "r/live");
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert!(got[0].retain);
    assert_eq!(got[0].subscription_ids.to_vec(), [9]);
    assert_eq!(got[0].flow, Flow(8));
    assert_eq!(store.count(), 1, "the expired message was removed");
}

/// Overlapping subscriptions of one client that share an identifier: the delivery carries it
/// once [MQTT-3.3.4-4]; distinct identifiers are all there, once each.
#[test]
fn overlapping_subscriptions_do_not_repeat_an_identifier() {
    let mut routes = Subscribers::new();
    let a = handle("a");
    for (filter, id) in [("t/#", 7), ("t/+", 7), ("t/x", 3), ("+/x", 7), ("#", 3)] {
        subscribe(
            &mut routes,
            &a,
            Flow::CONTROL,
            filter,
            qos(QoS::AtMostOnce),
            Some(id),
        );
    }
    let mut fanout = Fanout::default();
    fanout.collect(
        &routes,
        &message("t/x", QoS::AtMostOnce, false, None),
        |h| h.online,
    );
    let got: Vec<Vec<u32>> = fanout
        .drain()
        .map(|(_, d)| d.subscription_ids.clone())
        .collect();
    assert_eq!(got, vec![vec![3, 7]]);
}

#[test]
fn a_cluster_s_publisher_node_serves_plain_and_local_groups_only() {
    use crate::core::router::SharedStrategy;
    let mut routes = Subscribers::new();
    routes.set_strategies(
        SharedStrategy::RoundRobin,
        [("near".into(), SharedStrategy::Local)]
            .into_iter()
            .collect(),
    );
    let any = qos(QoS::AtLeastOnce);
    subscribe(&mut routes, &handle("plain"), Flow::CONTROL, "t", any, None);
    subscribe(
        &mut routes,
        &handle("rr"),
        Flow::CONTROL,
        "$share/far/t",
        any,
        None,
    );
    subscribe(
        &mut routes,
        &handle("local"),
        Flow::CONTROL,
        "$share/near/t",
        any,
        None,
    );
    let message = message("t", QoS::AtLeastOnce, false, None);
    let mut fanout = Fanout::default();
    fanout.collect_in(&routes, &message, Scope::Origin, |h| h.online);
    let served: Vec<&str> = fanout.served().iter().map(|f| f.as_str()).collect();
    assert_eq!(served, ["$share/near/t"]);
    let mut got: Vec<&str> = fanout.drain().map(|(h, _)| h.name).collect();
    got.sort();
    assert_eq!(
        got,
        ["local", "plain"],
        "the round-robin group is the cluster's"
    );
    fanout.collect_in(&routes, &message, Scope::Plain, |h| h.online);
    assert!(fanout.served().is_empty());
    let got: Vec<&str> = fanout.drain().map(|(h, _)| h.name).collect();
    assert_eq!(got, ["plain"]);
}
