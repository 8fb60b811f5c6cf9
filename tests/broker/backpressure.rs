//! `backpressure_`: a slow subscriber costs only itself (its queue overflows by its own
//! policy, counted), publishers are held only while the broker as a whole queues more than
//! `broker.max_queued_bytes`, and a held publisher is still answered and never closed for
//! keep-alive.

use std::sync::atomic::Ordering;
use std::time::Duration;

use petrel::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use petrel::config::QueueFull;

use crate::common::*;

/// Waits (bounded) until the broker's queued-bytes gauge is back to zero.
async fn queued_bytes_return_to_zero(broker: &TestBroker) {
    for _ in 0..100 {
        if broker.running.broker.budget.bytes() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "queued bytes stay at {}",
        broker.running.broker.budget.bytes()
    );
}

#[tokio::test]
async fn backpressure_a_slow_subscriber_costs_only_itself() {
    const PUBLISHERS: usize = 3;
    const N: u16 = 400;
    const TOTAL: usize = PUBLISHERS * N as usize;
    // Default session.max_queued (1000), queue_full = drop_new; a small window so the slow
    // subscriber's share is known: 10 in flight + 1000 queued.
    let broker = TestBroker::start_with(|c| {
        c.mqtt.max_inflight = 10;
        c.session.queue_full = QueueFull::DropNew;
    })
    .await;
    let addr = broker.addr;
    let (mut slow, _) = RawClient::connect_v5(addr, "slow").await;
    slow.subscribe(1, "fan/#", QoS::AtLeastOnce).await;
    let (mut fast, _) = RawClient::connect_v5(addr, "fast").await;
    fast.subscribe(1, "fan/#", QoS::AtLeastOnce).await;

    let fast = tokio::spawn(async move {
        let mut next = [1u16; PUBLISHERS];
        for _ in 0..TOTAL {
            let got = fast.expect_publish().await;
            let p: usize = got.topic["fan/".len()..].parse().unwrap();
            assert_eq!(
                got.payload[..],
                next[p].to_be_bytes(),
                "every message of publisher {p}, in order"
            );
            next[p] += 1;
            fast.puback(&got).await;
        }
        fast
    });
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            tokio::spawn(async move {
                let (mut c, _) = RawClient::connect_v5(addr, &format!("pub-{p}")).await;
                let topic = format!("fan/{p}");
                for i in 1..=N {
                    c.publish_acked(publish_struct(
                        &topic,
                        QoS::AtLeastOnce,
                        Some(i),
                        &i.to_be_bytes(),
                    ))
                    .await;
                    if i % 100 == 0 {
                        c.send(&Packet::PingReq).await;
                        assert!(
                            matches!(c.expect_packet().await, Packet::PingResp),
                            "PINGREQ answered"
                        );
                    }
                }
                c
            })
        })
        .collect();
    let mut connected = Vec::new();
    for publisher in publishers {
        connected.push(publisher.await.expect("every publish acknowledged"));
    }
    let mut fast = fast.await.expect("the fast subscriber gets every message");
    fast.expect_silence().await;

    let b = &broker.running.broker;
    assert_eq!(
        b.metrics.publisher_pauses.load(Ordering::Relaxed),
        0,
        "no publisher was held for the slow subscriber"
    );
    let dropped = b
        .clients
        .get("slow")
        .expect("the slow subscriber is still connected")
        .mailbox
        .dropped();
    assert!(
        dropped as usize >= TOTAL - 1010,
        "the slow queue overflowed: {dropped} dropped"
    );
    assert_eq!(
        b.metrics.dropped_queue_full.load(Ordering::Relaxed),
        dropped,
        "only the slow subscriber lost messages, all counted"
    );
    for (p, mut c) in connected.into_iter().enumerate() {
        c.send(&Packet::PingReq).await;
        assert!(
            matches!(c.expect_packet().await, Packet::PingResp),
            "publisher {p} still connected"
        );
    }

    // The slow subscriber finally reads: it gets what its queue kept, nothing more.
    let mut received = 0usize;
    while received <= TOTAL {
        match slow.read(Duration::from_millis(500)).await {
            Read::Packet(packet) => match *packet {
                Packet::Publish(got) => {
                    received += 1;
                    slow.puback(&got).await;
                }
                other => panic!("unexpected {other:?}"),
            },
            Read::TimedOut => break,
            Read::Closed => panic!("the slow subscriber was disconnected"),
        }
    }
    assert_eq!(received + dropped as usize, TOTAL);
    queued_bytes_return_to_zero(&broker).await;
}

#[tokio::test]
async fn backpressure_over_the_budget_publishers_are_held_yet_answered() {
    const N: u16 = 20;
    const BUDGET: u64 = 8 * 1024;
    let broker = TestBroker::start_with(|c| {
        c.broker.max_queued_bytes = BUDGET;
        c.mqtt.max_inflight = 4;
    })
    .await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "lagging").await;
    sub.subscribe(1, "big", QoS::AtLeastOnce).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "held");
    connect.keep_alive = 1;
    let (mut publisher, _) = RawClient::connect_ok(broker.addr, connect).await;
    let payload = |i: u16| {
        let mut p = vec![0u8; 1024];
        p[..2].copy_from_slice(&i.to_be_bytes());
        p
    };
    for i in 1..=N {
        publisher
            .send(&publish("big", QoS::AtLeastOnce, Some(i), &payload(i)))
            .await;
    }
    publisher.send(&Packet::PingReq).await;
    // 1 KiB each: the subscriber's window (4) and the budget's worth (8) are taken, then the
    // broker is over its budget and holds the rest, unacknowledged; PINGREQ still goes
    // through (the subscriber taking its window may relieve the budget once, for a moment).
    let mut acked = 0;
    let mut answered = false;
    loop {
        match publisher.read(QUIET).await {
            Read::Packet(packet) => match *packet {
                Packet::PubAck(_) => acked += 1,
                Packet::PingResp => answered = true,
                other => panic!("unexpected {other:?}"),
            },
            Read::TimedOut => break,
            Read::Closed => panic!("the held publisher was closed"),
        }
    }
    assert!(answered, "PINGREQ answered while held");
    assert!(acked < N, "the publisher is held ({acked} acknowledged)");
    let b = &broker.running.broker;
    assert!(b.metrics.publisher_pauses.load(Ordering::Relaxed) >= 1);
    assert!(b.budget.bytes() as u64 > BUDGET * 3 / 4);
    // Held for longer than 1.5 x its keep-alive without a word: the broker's own pause
    // does not count against it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publisher.send(&Packet::PingReq).await;
    match publisher.expect_packet().await {
        Packet::PingResp => {}
        Packet::PubAck(_) => panic!("still held: nothing drained"),
        other => panic!("unexpected {other:?}"),
    }

    // The subscriber catches up: the held publishes go on, and every one arrives in order.
    for i in 1..=N {
        let got = sub.expect_publish().await;
        assert_eq!(got.payload[..2], i.to_be_bytes());
        sub.puback(&got).await;
    }
    while acked < N {
        match publisher.expect_packet().await {
            Packet::PubAck(ack) => {
                assert_eq!(ack.reason, ReasonCode::SUCCESS);
                acked += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(broker.messages_dropped(), 0, "held, not dropped");
    sub.expect_silence().await;
    queued_bytes_return_to_zero(&broker).await;
}

#[tokio::test]
async fn backpressure_queue_full_disconnect_closes_only_the_subscriber_with_0x97() {
    let broker = TestBroker::start_with(|c| {
        c.session.max_queued = 5;
        c.session.queue_full = QueueFull::Disconnect;
        c.mqtt.max_inflight = 2;
    })
    .await;
    let (mut slow, _) = RawClient::connect_v5(broker.addr, "overflowing").await;
    slow.subscribe(1, "q", QoS::AtLeastOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "unaffected").await;
    // 2 in flight + 5 queued; the 8th overflows.
    for i in 1..=10u16 {
        publisher
            .publish_acked(publish_struct("q", QoS::AtLeastOnce, Some(i), b"x"))
            .await;
    }
    slow.expect_disconnect(ReasonCode::QUOTA_EXCEEDED).await;
    assert!(
        broker
            .running
            .broker
            .metrics
            .dropped_queue_full
            .load(Ordering::Relaxed)
            >= 1
    );
    publisher.send(&Packet::PingReq).await;
    assert!(matches!(publisher.expect_packet().await, Packet::PingResp));
}

#[tokio::test]
async fn backpressure_a_held_client_saying_goodbye_has_what_it_sent_handled_first() {
    let broker = TestBroker::start_with(|c| {
        c.broker.max_queued_bytes = 8 * 1024;
        c.mqtt.max_inflight = 4;
    })
    .await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "lagging").await;
    sub.subscribe(1, "big", QoS::AtLeastOnce).await;
    let (mut watcher, _) = RawClient::connect_v5(broker.addr, "watcher").await;
    watcher.subscribe(1, "wills", QoS::AtMostOnce).await;
    // A first publisher fills the budget while the subscriber does not read.
    let (mut filler, _) = RawClient::connect_v5(broker.addr, "filler").await;
    for i in 1..=20u16 {
        filler
            .send(&publish("big", QoS::AtLeastOnce, Some(i), &[1u8; 1024]))
            .await;
    }
    let b = &broker.running.broker;
    for _ in 0..100 {
        if b.metrics.publisher_pauses.load(Ordering::Relaxed) > 0 && b.budget.is_over() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(b.budget.is_over(), "the broker is over its budget");
    // A client with a will publishes while held, and says goodbye.
    let mut connect = connect_packet(ProtocolVersion::V5, "leaving");
    connect.will = Some(will("wills", b"gone", QoS::AtMostOnce));
    let (mut leaving, _) = RawClient::connect_ok(broker.addr, connect).await;
    for _ in 0..5 {
        leaving
            .send(&publish("big", QoS::AtMostOnce, None, &[2u8; 1024]))
            .await;
    }
    leaving.disconnect().await;
    watcher.expect_silence().await;
    // The subscriber catches up: the filler's 20 and the 5 sent before the goodbye.
    let (mut from_filler, mut from_leaving) = (0, 0);
    while from_filler + from_leaving < 25 {
        let got = sub.expect_publish().await;
        match got.payload[0] {
            1 => from_filler += 1,
            _ => from_leaving += 1,
        }
        if got.packet_id.is_some() {
            sub.puback(&got).await;
        }
    }
    assert_eq!((from_filler, from_leaving), (20, 5));
    watcher.expect_silence().await;
}
