//! Core micro-benchmarks: topic-filter matching against 10 k / 100 k subscriptions with
//! wildcards, the broker's fan-out of one publish to 1 / 100 / 10 k subscribers, and a
//! session's in-flight bookkeeping (one outgoing QoS 1 / QoS 2 message tracked and
//! acknowledged with a full window in flight), and a SUBSCRIBE's lookup in a retained store
//! of 10 k / 100 k messages (exact filter and `+`: cost follows the matches, not the store).
//!
//! `cargo bench --bench router`.

use petrel::core::topic::TopicName;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use petrel::broker::{Broker, Settings};
use petrel::codec::{Publish, QoS, SubscriptionOptions};
use petrel::core::message::Delivery;
use petrel::core::message::{AppMessage, Flow};
use petrel::core::retain::RetainedStore;
use petrel::core::router::SubscriptionTree;
use petrel::core::session::{Completed, Session, Subscription};
use petrel::core::topic::TopicFilter;

/// `n` subscriptions shaped like a fleet: exact topics, `+` in the middle and `#` tails.
fn fleet(n: usize) -> SubscriptionTree<u32, u32> {
    let mut tree = SubscriptionTree::new();
    for i in 0..n as u32 {
        let filter = match i % 4 {
            0 => format!("vehicles/car-{i}/telemetry/speed"),
            1 => format!("vehicles/+/telemetry/{}", i % 50),
            2 => format!("vehicles/car-{i}/#"),
            _ => format!("fleet/{}/+/status", i % 100),
        };
        tree.insert(&TopicFilter::parse(&filter, 0).unwrap(), i, i);
    }
    tree
}

fn bench_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("match");
    for n in [10_000usize, 100_000] {
        let tree = fleet(n);
        group.bench_function(BenchmarkId::new("subscriptions", n), |b| {
            let mut i = 0u32;
            b.iter(|| {
                i = i.wrapping_add(1);
                let topic = format!("vehicles/car-{}/telemetry/speed", i % n as u32);
                let mut hits = 0;
                tree.for_each_match(topic.as_str(), |_, _| true, |_, _| hits += 1);
                hits
            })
        });
    }
    group.finish();
}

fn message() -> Arc<AppMessage> {
    let publish = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "fan/out".into(),
        packet_id: None,
        properties: Default::default(),
        payload: Bytes::from_static(&[0x5a; 64]),
    };
    Arc::new(AppMessage::from_publish(
        TopicName::parse(publish.topic.clone(), 0).unwrap(),
        publish,
        None,
        Instant::now(),
    ))
}

fn bench_fan_out(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("fan_out");
    for n in [1usize, 100, 10_000] {
        let broker = Broker::new(Settings::minimal(1 << 20));
        let now = Instant::now();
        let mut mailboxes = Vec::new();
        runtime.block_on(async {
            for i in 0..n {
                let id: Arc<str> = Arc::from(format!("sub-{i}"));
                let (_, mailbox) = broker.open_session(now, &id, true, i as u64).await.unwrap();
                let subscription = Subscription {
                    filter: TopicFilter::parse("fan/#", 0).unwrap(),
                    options: SubscriptionOptions::default(),
                    id: None,
                    flow: Flow::CONTROL,
                };
                broker.subscribe(now, &id, &mailbox, &subscription, false);
                mailboxes.push(mailbox);
            }
        });
        let msg = message();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("subscribers", n), |b| {
            b.iter(|| {
                broker.publish(Arc::clone(&msg), now);
                for mailbox in &mailboxes {
                    mailbox.pop();
                }
            })
        });
    }
    group.finish();
}

fn bench_inflight(c: &mut Criterion) {
    const WINDOW: usize = 128;
    let mut group = c.benchmark_group("inflight");
    for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let delivery = Delivery {
            message: message(),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            flow: Flow::CONTROL,
            shared: None,
            stored: None,
        };
        let mut session = Session::new(Arc::from("bench"), 0);
        let mut window = std::collections::VecDeque::with_capacity(WINDOW);
        for _ in 0..WINDOW {
            window.push_back(session.track(delivery.clone()).unwrap());
        }
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("track_and_ack", format!("{qos:?}")), |b| {
            b.iter(|| {
                // The oldest is acknowledged (QoS 2: PUBREC then PUBCOMP), a new one sent.
                let id = window.pop_front().unwrap();
                if qos == QoS::ExactlyOnce {
                    session.received(id).unwrap();
                }
                assert!(session.complete(id, qos == QoS::ExactlyOnce) == Completed::Done(None));
                window.push_back(session.track(delivery.clone()).unwrap());
            })
        });
    }
    group.finish();
}

/// A retained message per vehicle and signal; a SUBSCRIBE to one topic, or to one vehicle's
/// signals under `+`, visits its matches only, whatever the store's size.
fn bench_retained_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("retained_lookup");
    for n in [10_000u32, 100_000] {
        let mut store = RetainedStore::new();
        for i in 0..n {
            store.insert(&format!("vehicles/car-{}/signal/{}", i / 10, i % 10), i);
        }
        let exact = TopicFilter::parse("vehicles/car-77/signal/3", 0).unwrap();
        group.bench_function(BenchmarkId::new("exact", n), |b| {
            b.iter(|| {
                let mut hits = 0;
                store.for_each_match(&exact, |_, _| hits += 1);
                hits
            })
        });
        let one_car = TopicFilter::parse("vehicles/car-77/signal/+", 0).unwrap();
        group.bench_function(BenchmarkId::new("one_level_plus", n), |b| {
            b.iter(|| {
                let mut hits = 0;
                store.for_each_match(&one_car, |_, _| hits += 1);
                hits
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_match,
    bench_fan_out,
    bench_inflight,
    bench_retained_lookup
);
criterion_main!(benches);
