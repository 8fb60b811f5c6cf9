//! The QoS 0 datagram class (docs/datagram.md): negotiated per connection by a CONNECT User
//! Property, QoS 0 both ways as QUIC datagrams with copies and duplicate suppression; QoS 1/2,
//! large messages and clients that do not ask are unaffected; bad datagrams are dropped.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use petrel::client::{Event, Events, Message, QoS as CQoS};
use petrel::codec::{encode, Packet, ProtocolVersion, Publish, QoS};
use petrel::config::ListenerKind;
use petrel::transport::datagram::{self, Counters};

use super::*;
use crate::client::{connect, options, LONG};
use crate::common::unique;

fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn broker_counters(broker: &TransportBroker) -> &Counters {
    &broker.running.broker.metrics.quic_datagrams
}

/// Messages received until `n` arrived or [`LONG`] passed, then for [`QUIET`] more: payload
/// → (times received, QoS).
async fn collect(events: &mut Events, n: usize) -> BTreeMap<Bytes, (usize, CQoS)> {
    let mut got: BTreeMap<Bytes, (usize, CQoS)> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + LONG;
    let mut quiet_until = None;
    loop {
        let until = quiet_until.unwrap_or(deadline);
        let Ok(event) = tokio::time::timeout_at(until, events.recv()).await else {
            break;
        };
        if let Some(Event::Message(m)) = event {
            got.entry(m.payload.clone()).or_insert((0, m.qos)).0 += 1;
            if got.len() >= n && quiet_until.is_none() {
                quiet_until = Some(tokio::time::Instant::now() + QUIET);
            }
        }
    }
    got
}

#[tokio::test]
async fn quic_datagram_qos0_delivered_once_each_by_datagram_qos12_by_stream() {
    let broker = broker_with(|_| {}).await;
    let (sub, mut sub_events) =
        connect(options(&broker, ListenerKind::Quic, "dg-sub").datagrams(2)).await;
    let topic = unique("dg/t");
    sub.subscribe(&format!("{topic}/#"), CQoS::ExactlyOnce)
        .await
        .unwrap();
    let (publisher, _pub_events) = connect(options(&broker, ListenerKind::Tcp, "dg-pub")).await;
    const N: usize = 200;
    for i in 0..N {
        publisher
            .publish(Message::new(format!("{topic}/0"), format!("q0-{i}")))
            .await
            .unwrap();
    }
    for (qos, name) in [(CQoS::AtLeastOnce, "q1"), (CQoS::ExactlyOnce, "q2")] {
        for i in 0..5 {
            publisher
                .publish(Message::new(format!("{topic}/{name}"), format!("{name}-{i}")).qos(qos))
                .await
                .unwrap();
        }
    }
    let got = collect(&mut sub_events, N + 10).await;
    assert_eq!(got.len(), N + 10, "every message arrives");
    for (payload, (times, qos)) in &got {
        assert_eq!(*times, 1, "{payload:?} received {times} times");
        let want = match &payload[..2] {
            b"q0" => CQoS::AtMostOnce,
            b"q1" => CQoS::AtLeastOnce,
            _ => CQoS::ExactlyOnce,
        };
        assert_eq!(*qos, want);
    }
    let stats = sub.stats();
    // QoS 0 came by datagram (each once), QoS 1/2 by stream.
    assert_eq!(stats.datagram_messages, N as u64, "{stats:?}");
    // Two copies each on loopback: every second one is suppressed.
    assert!(stats.datagrams_received > N as u64, "{stats:?}");
    assert_eq!(
        stats.datagram_duplicates,
        stats.datagrams_received - N as u64,
        "{stats:?}"
    );
    let counters = broker_counters(&broker);
    assert!(counter(&counters.sent) >= 2 * N as u64);
    assert_eq!(counter(&counters.invalid), 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_datagram_client_publishes_qos0_by_datagram() {
    let broker = broker_with(|_| {}).await;
    let (sub, mut sub_events) = connect(options(&broker, ListenerKind::Tcp, "dg-tcp-sub")).await;
    let topic = unique("dg/up");
    sub.subscribe(&topic, CQoS::AtMostOnce).await.unwrap();
    let (publisher, _e) =
        connect(options(&broker, ListenerKind::Quic, "dg-up-pub").datagrams(3)).await;
    const N: usize = 100;
    for i in 0..N {
        publisher
            .publish(Message::new(topic.clone(), format!("up-{i}")))
            .await
            .unwrap();
    }
    let got = collect(&mut sub_events, N).await;
    assert_eq!(got.len(), N, "every message arrives");
    assert!(got.values().all(|(times, _)| *times == 1), "{got:?}");
    assert!(publisher.stats().datagrams_sent >= N as u64);
    let counters = broker_counters(&broker);
    assert_eq!(counter(&counters.delivered), N as u64);
    assert!(counter(&counters.duplicates) > 0, "three copies each");
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_datagram_large_messages_fall_back_to_the_stream() {
    let broker = broker_with(|_| {}).await;
    let (sub, mut events) =
        connect(options(&broker, ListenerKind::Quic, "dg-large").datagrams(2)).await;
    let topic = unique("dg/large");
    sub.subscribe(&topic, CQoS::AtMostOnce).await.unwrap();
    let large = Bytes::from(vec![b'x'; 8000]);
    sub.publish(Message::new(topic.clone(), large.clone()))
        .await
        .unwrap();
    sub.publish(Message::new(topic.clone(), "small"))
        .await
        .unwrap();
    let got = collect(&mut events, 2).await;
    assert_eq!(got.get(&large).map(|g| g.0), Some(1));
    assert_eq!(got.get(&Bytes::from_static(b"small")).map(|g| g.0), Some(1));
    let stats = sub.stats();
    assert_eq!(stats.datagram_messages, 1, "only the small one: {stats:?}");
    assert!(counter(&broker_counters(&broker).fallbacks) >= 1);
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_datagram_not_asked_nothing_changes() {
    let broker = broker_with(|_| {}).await;
    // Petrel's client without the option.
    let (sub, mut events) = connect(options(&broker, ListenerKind::Quic, "dg-no")).await;
    let topic = unique("dg/no");
    sub.subscribe(&topic, CQoS::AtMostOnce).await.unwrap();
    sub.publish(Message::new(topic.clone(), "plain"))
        .await
        .unwrap();
    let got = collect(&mut events, 1).await;
    assert_eq!(got.len(), 1);
    let stats = sub.stats();
    assert_eq!((stats.datagrams_sent, stats.datagrams_received), (0, 0));
    // A raw EMQX-mapping client: no confirmation in CONNACK, QoS 0 on its stream.
    let (mut raw, connack) =
        QuicClient::connect_with(&broker, connect_packet(ProtocolVersion::V5, &unique("raw")))
            .await;
    assert_eq!(connack.code, ReasonCode::SUCCESS);
    assert!(connack.properties.user_properties.is_empty(), "{connack:?}");
    raw.control.subscribe(1, &topic, QoS::AtMostOnce).await;
    sub.publish(Message::new(topic.clone(), "to-raw"))
        .await
        .unwrap();
    let publish = raw.control.expect_publish().await;
    assert_eq!(&publish.payload[..], b"to-raw");
    assert_eq!(counter(&broker_counters(&broker).sent), 0);
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_datagram_broker_caps_copies_and_drops_bad_datagrams() {
    let broker = broker_with(|c| c.quic.datagram_copies = 1).await;
    let mut connect = connect_packet(ProtocolVersion::V5, &unique("raw-dg"));
    connect
        .properties
        .user_properties
        .push((datagram::USER_PROPERTY.into(), "4".into()));
    let (mut raw, connack) = QuicClient::connect_with(&broker, connect).await;
    assert_eq!(connack.code, ReasonCode::SUCCESS);
    assert_eq!(
        connack.properties.user_properties,
        vec![(datagram::USER_PROPERTY.to_owned(), "1".to_owned())]
    );
    let topic = unique("dg/raw");
    raw.control.subscribe(1, &topic, QoS::AtMostOnce).await;
    let publish = |qos: QoS, payload: &'static [u8]| {
        let mut out = BytesMut::new();
        let packet = Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.clone(),
            packet_id: (qos != QoS::AtMostOnce).then_some(PacketId(7)),
            properties: Properties::default(),
            payload: Bytes::from_static(payload),
        });
        encode(&packet, ProtocolVersion::V5, &mut out);
        out
    };
    let framed = |seq: u32, packet: &[u8]| {
        let mut out = BytesMut::new();
        datagram::frame(seq, packet, &mut out);
        out.freeze()
    };
    // Garbage, an unknown kind, a QoS 1 PUBLISH, a PINGREQ, trailing bytes: all dropped.
    let mut trailing = publish(QoS::AtMostOnce, b"trailing").to_vec();
    trailing.push(0);
    let bad = [
        Bytes::from_static(b"\x01"),
        Bytes::from_static(b"\x07\x00\x00\x00\x00\x30\x00"),
        framed(1, &publish(QoS::AtLeastOnce, b"q1")),
        framed(2, &[0xC0, 0x00]),
        framed(3, &trailing),
    ];
    for d in bad {
        raw.conn.send_datagram(d).unwrap();
    }
    // Then a good one, twice (a copy): published once, as a QoS 0 PUBLISH of the connection.
    let good = framed(4, &publish(QoS::AtMostOnce, b"good"));
    raw.conn.send_datagram(good.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await; // a different QUIC packet
    raw.conn.send_datagram(good).unwrap();
    // It comes back to us as a datagram (we subscribed): read it there.
    let back = tokio::time::timeout(WAIT, raw.conn.read_datagram())
        .await
        .expect("a datagram in time")
        .unwrap();
    let (_, packet) = datagram::parse(&back).unwrap();
    assert!(packet.ends_with(b"good"));
    let counters = broker_counters(&broker);
    let deadline = tokio::time::Instant::now() + WAIT;
    while counter(&counters.duplicates) == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counter(&counters.invalid), 5);
    assert_eq!(counter(&counters.delivered), 1);
    assert_eq!(counter(&counters.duplicates), 1);
    // Still connected, and nothing came on the stream.
    raw.control.expect_silence().await;
    raw.control
        .publish_acked(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: unique("dg/alive"),
            packet_id: Some(PacketId(9)),
            properties: Properties::default(),
            payload: Bytes::from_static(b"alive"),
        })
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_datagram_disabled_by_config_is_not_confirmed() {
    let broker = broker_with(|c| c.quic.datagrams = false).await;
    let (sub, mut events) =
        connect(options(&broker, ListenerKind::Quic, "dg-off").datagrams(2)).await;
    let topic = unique("dg/off");
    sub.subscribe(&topic, CQoS::AtMostOnce).await.unwrap();
    sub.publish(Message::new(topic.clone(), "x")).await.unwrap();
    let got = collect(&mut events, 1).await;
    assert_eq!(got.len(), 1);
    let stats = sub.stats();
    assert_eq!((stats.datagrams_sent, stats.datagrams_received), (0, 0));
    broker.shutdown().await;
}

/// The class is asked for again on every connection, a 0-RTT reconnect included (the
/// server's datagram transport parameter is remembered with its ticket, RFC 9221 §3).
#[tokio::test]
async fn quic_datagram_class_survives_a_0rtt_reconnect() {
    let broker = broker_with(|_| {}).await;
    let id = unique("dg-0rtt");
    let opts = options(&broker, ListenerKind::Quic, "unused")
        .client_id(&id)
        .persistent(60)
        .datagrams(2)
        .reconnect(Some(petrel::client::Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            jitter: 0.5,
        }));
    let (client, mut events) = connect(opts).await;
    // Taken over from TCP, which then leaves: the client reconnects with its ticket.
    let mut takeover = connect_packet(ProtocolVersion::V5, &id);
    takeover.clean_start = false;
    takeover.properties.session_expiry_interval = Some(60);
    let (mut raw, _) =
        crate::common::RawClient::connect_ok(broker.addr(ListenerKind::Tcp), takeover).await;
    raw.send(&Packet::Disconnect(Disconnect::new(ReasonCode::SUCCESS)))
        .await;
    let zero_rtt = loop {
        if let Event::Connected { zero_rtt, .. } = crate::client::next_event(&mut events).await {
            break zero_rtt;
        }
    };
    assert!(zero_rtt, "the reconnect used 0-RTT");
    let topic = unique("dg/0rtt");
    client.subscribe(&topic, CQoS::AtMostOnce).await.unwrap();
    client
        .publish(Message::new(topic.clone(), "after"))
        .await
        .unwrap();
    let got = collect(&mut events, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(client.stats().datagram_messages, 1, "{:?}", client.stats());
    broker.shutdown().await;
}

/// The datagram class with a stream per topic: the datagram reader and the data streams
/// share one event queue, made at CONNECT for the datagrams, before CONNACK; data streams
/// opened after CONNACK must still be read (a regression: the version they wait for was
/// never published to a queue that had no reader yet, and their SUBSCRIBEs went unanswered).
#[tokio::test]
async fn quic_datagram_class_with_a_stream_per_topic_serves_data_streams() {
    let broker = broker_with(|_| {}).await;
    let (sub, mut sub_events) = connect(
        options(&broker, ListenerKind::Quic, "dg-topic-sub")
            .datagrams(2)
            .streams(petrel::client::QuicStreams::per_topic()),
    )
    .await;
    let topic = unique("dg/per-topic");
    for t in 0..3 {
        tokio::time::timeout(
            LONG,
            sub.subscribe(&format!("{topic}/{t}"), CQoS::ExactlyOnce),
        )
        .await
        .expect("SUBACK on a data stream in time")
        .unwrap();
    }
    let (publisher, _pub_events) =
        connect(options(&broker, ListenerKind::Tcp, "dg-topic-pub")).await;
    for t in 0..3 {
        publisher
            .publish(Message::new(format!("{topic}/{t}"), format!("q0-{t}")))
            .await
            .unwrap();
        publisher
            .publish(Message::new(format!("{topic}/{t}"), format!("q2-{t}")).qos(CQoS::ExactlyOnce))
            .await
            .unwrap();
    }
    let got = collect(&mut sub_events, 6).await;
    assert_eq!(got.len(), 6, "every message arrives: {got:?}");
    assert!(got.values().all(|(times, _)| *times == 1), "{got:?}");
    sub.disconnect().await.unwrap();
    publisher.disconnect().await.unwrap();
    broker.shutdown().await;
}
