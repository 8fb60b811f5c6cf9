//! `pub_` / `sub_`: QoS flows, downgrade, wildcards, `$` topics, overlapping and shared
//! subscriptions, No Local, Retain As Published, (un)subscribe answers.

use petrel::codec::PacketId;
use std::collections::BTreeSet;

use petrel::codec::{
    Packet, Properties, ProtocolVersion, QoS, ReasonCode, Subscribe, SubscriptionOptions,
};

use crate::common::*;

async fn v4_end_to_end(qos: rumqttc::QoS) {
    let broker = TestBroker::start().await;
    let mut sub = V4::connect(broker.addr, "sub").await;
    sub.subscribe("qos/test", rumqttc::QoS::ExactlyOnce).await;
    let mut publisher = V4::connect(broker.addr, "pub").await;
    for i in 0..3u8 {
        publisher.publish("qos/test", qos, false, &[i]).await;
    }
    for i in 0..3u8 {
        let got = sub.next_publish().await;
        assert_eq!(
            (&got.topic[..], &got.payload[..], got.qos),
            ("qos/test", &[i][..], qos)
        );
    }
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn pub_qos0_end_to_end_v311() {
    v4_end_to_end(rumqttc::QoS::AtMostOnce).await;
}

#[tokio::test]
async fn pub_qos1_end_to_end_v311() {
    v4_end_to_end(rumqttc::QoS::AtLeastOnce).await;
}

#[tokio::test]
async fn pub_qos2_end_to_end_v311() {
    v4_end_to_end(rumqttc::QoS::ExactlyOnce).await;
}

async fn v5_end_to_end(qos: V5QoS) {
    let broker = TestBroker::start().await;
    let mut sub = V5::connect(broker.addr, "sub").await;
    sub.subscribe("qos/test", V5QoS::ExactlyOnce).await;
    let mut publisher = V5::connect(broker.addr, "pub").await;
    for i in 0..3u8 {
        publisher.publish("qos/test", qos, false, &[i]).await;
    }
    for i in 0..3u8 {
        let got = sub.next_publish().await;
        assert_eq!(
            (&got.topic[..], &got.payload[..], got.qos),
            (&b"qos/test"[..], &[i][..], qos)
        );
    }
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn pub_qos0_end_to_end_v5() {
    v5_end_to_end(V5QoS::AtMostOnce).await;
}

#[tokio::test]
async fn pub_qos1_end_to_end_v5() {
    v5_end_to_end(V5QoS::AtLeastOnce).await;
}

#[tokio::test]
async fn pub_qos2_end_to_end_v5() {
    v5_end_to_end(V5QoS::ExactlyOnce).await;
}

#[tokio::test]
async fn pub_mixed_versions_interoperate() {
    let broker = TestBroker::start().await;
    let mut v4 = V4::connect(broker.addr, "v4").await;
    v4.subscribe("mixed", rumqttc::QoS::AtLeastOnce).await;
    let mut v5 = V5::connect(broker.addr, "v5").await;
    v5.subscribe("mixed", V5QoS::AtLeastOnce).await;
    let (mut v31, _) =
        RawClient::connect_ok(broker.addr, connect_packet(ProtocolVersion::V31, "v31")).await;
    v31.publish_acked(publish_struct("mixed", QoS::AtLeastOnce, Some(1), b"all"))
        .await;
    assert_eq!(&v4.next_publish().await.payload[..], b"all");
    assert_eq!(&v5.next_publish().await.payload[..], b"all");
}

#[tokio::test]
async fn pub_qos_downgraded_to_subscription_maximum() {
    let broker = TestBroker::start().await;
    let (mut q0, _) = RawClient::connect_v5(broker.addr, "q0").await;
    q0.subscribe(1, "down", QoS::AtMostOnce).await;
    let (mut q1, _) = RawClient::connect_v311(broker.addr, "q1").await;
    q1.subscribe(1, "down", QoS::AtLeastOnce).await;
    let mut publisher = V4::connect(broker.addr, "pub").await;
    publisher
        .publish("down", rumqttc::QoS::ExactlyOnce, false, b"x")
        .await;
    let got = q0.expect_publish().await;
    assert_eq!((got.qos, got.packet_id), (QoS::AtMostOnce, None));
    let got = q1.expect_publish().await;
    assert_eq!(got.qos, QoS::AtLeastOnce);
    // And a QoS 0 message is never upgraded.
    publisher
        .publish("down", rumqttc::QoS::AtMostOnce, false, b"y")
        .await;
    q1.puback(&got).await;
    assert_eq!(q1.expect_publish().await.qos, QoS::AtMostOnce);
}

#[tokio::test]
async fn sub_plus_and_hash_wildcards_match_by_level() {
    let broker = TestBroker::start().await;
    let mut plus = V4::connect(broker.addr, "plus").await;
    plus.subscribe("a/+/c", rumqttc::QoS::AtMostOnce).await;
    let mut hash = V4::connect(broker.addr, "hash").await;
    hash.subscribe("x/#", rumqttc::QoS::AtMostOnce).await;
    let mut publisher = V4::connect(broker.addr, "pub").await;
    for topic in ["a/b/c", "a/b/d", "a/b/c/d", "a//c", "x", "x/y/z", "y/x"] {
        publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, topic.as_bytes())
            .await;
    }
    for expected in ["a/b/c", "a//c"] {
        assert_eq!(plus.next_publish().await.topic, expected);
    }
    plus.expect_no_publish().await;
    // `x/#` also matches the parent level `x` [MQTT-4.7.1-2].
    for expected in ["x", "x/y/z"] {
        assert_eq!(hash.next_publish().await.topic, expected);
    }
    hash.expect_no_publish().await;
}

#[tokio::test]
async fn sub_dollar_topics_not_matched_by_leading_wildcards() {
    let broker = TestBroker::start().await;
    let (mut wild, _) = RawClient::connect_v5(broker.addr, "wild").await;
    wild.subscribe(1, "#", QoS::AtMostOnce).await;
    wild.subscribe(2, "+/x", QoS::AtMostOnce).await;
    let (mut dollar, _) = RawClient::connect_v5(broker.addr, "dollar").await;
    dollar.subscribe(1, "$app/#", QoS::AtMostOnce).await;
    let (mut sys, _) = RawClient::connect_v5(broker.addr, "sys").await;
    sys.subscribe(1, "$SYS/#", QoS::AtMostOnce).await;

    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("$app/x", QoS::AtLeastOnce, Some(1), b"1"))
        .await;
    assert_eq!(
        dollar.expect_publish().await.topic,
        "$app/x",
        "an explicit `$` filter matches"
    );
    // Clients cannot inject into $SYS: refused with 0x87 and routed nowhere.
    publisher
        .send(&publish("$SYS/x", QoS::AtLeastOnce, Some(2), b"2"))
        .await;
    match publisher.expect_packet().await {
        Packet::PubAck(ack) => {
            assert_eq!(
                (ack.packet_id, ack.reason),
                (PacketId(2), ReasonCode::NOT_AUTHORIZED)
            )
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    publisher
        .publish_acked(publish_struct("plain/x", QoS::AtLeastOnce, Some(3), b"3"))
        .await;
    // `#` and `+/x` saw only the plain topic: `$` topics were skipped at the first level.
    let got = wild.expect_publish().await;
    assert_eq!(
        (
            got.topic.as_str(),
            got.properties.subscription_identifiers.len()
        ),
        ("plain/x", 0)
    );
    wild.expect_silence().await;
    sys.expect_silence().await;
}

#[tokio::test]
async fn sub_overlapping_subscriptions_deliver_once_with_highest_qos_and_all_ids() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    for (packet_id, filter, qos, sub_id) in [
        (1, "a/+", QoS::AtMostOnce, 1),
        (2, "a/#", QoS::AtLeastOnce, 2),
        (3, "a/b", QoS::AtMostOnce, 3),
    ] {
        let properties = Properties::from(petrel::codec::PropertySet {
            subscription_identifiers: vec![sub_id],
            ..Default::default()
        });
        sub.send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId(packet_id),
            properties,
            filters: vec![(filter.into(), qos_options(qos))],
        }))
        .await;
        assert!(matches!(sub.expect_packet().await, Packet::SubAck(_)));
    }
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("a/b", QoS::ExactlyOnce, Some(1), b"once"))
        .await;
    let got = sub.expect_publish().await;
    assert_eq!(got.qos, QoS::AtLeastOnce, "the highest granted QoS wins");
    let ids: BTreeSet<u32> = got
        .properties
        .subscription_identifiers
        .iter()
        .copied()
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]));
    assert_eq!(got.properties.subscription_identifiers.len(), 3);
    sub.expect_silence().await;

    // A message matching only one of them carries only that id.
    publisher
        .publish_acked(publish_struct("a/b/c", QoS::AtMostOnce, None, b"deep"))
        .await;
    sub.puback(&got).await;
    let got = sub.expect_publish().await;
    assert_eq!(got.properties.subscription_identifiers, vec![2]);
}

#[tokio::test]
async fn sub_overlapping_subscriptions_deliver_once_v311() {
    let broker = TestBroker::start().await;
    let mut sub = V4::connect(broker.addr, "sub").await;
    sub.subscribe("o/+", rumqttc::QoS::AtMostOnce).await;
    sub.subscribe("o/#", rumqttc::QoS::ExactlyOnce).await;
    let mut publisher = V4::connect(broker.addr, "pub").await;
    publisher
        .publish("o/x", rumqttc::QoS::ExactlyOnce, false, b"1")
        .await;
    assert_eq!(sub.next_publish().await.qos, rumqttc::QoS::ExactlyOnce);
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn sub_shared_subscription_round_robins_between_members() {
    let broker = TestBroker::start().await;
    let (mut m1, _) = RawClient::connect_v5(broker.addr, "m1").await;
    m1.subscribe(1, "$share/g/jobs", QoS::AtMostOnce).await;
    let (mut m2, _) = RawClient::connect_v5(broker.addr, "m2").await;
    m2.subscribe(1, "$share/g/jobs", QoS::AtMostOnce).await;
    let (mut plain, _) = RawClient::connect_v5(broker.addr, "plain").await;
    plain.subscribe(1, "jobs", QoS::AtMostOnce).await;

    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    const N: u8 = 10;
    for i in 0..N {
        publisher
            .publish_acked(publish_struct(
                "jobs",
                QoS::AtLeastOnce,
                Some(u16::from(i) + 1),
                &[i],
            ))
            .await;
    }
    for i in 0..N {
        assert_eq!(
            plain.expect_publish().await.payload[..],
            [i],
            "a plain subscriber gets every message"
        );
    }
    let mut got1 = BTreeSet::new();
    let mut got2 = BTreeSet::new();
    while got1.len() + got2.len() < usize::from(N) {
        tokio::select! {
            p = m1.expect_publish() => assert!(got1.insert(p.payload[0])),
            p = m2.expect_publish() => assert!(got2.insert(p.payload[0])),
        }
    }
    m1.expect_silence().await;
    m2.expect_silence().await;
    assert!(
        got1.is_disjoint(&got2),
        "each message goes to exactly one member: {got1:?} {got2:?}"
    );
    assert_eq!(got1.union(&got2).count(), usize::from(N));
    assert!(
        !got1.is_empty() && !got2.is_empty(),
        "both members get work: {got1:?} {got2:?}"
    );
}

#[tokio::test]
async fn sub_no_local_skips_own_messages() {
    let broker = TestBroker::start().await;
    let (mut me, _) = RawClient::connect_v5(broker.addr, "me").await;
    let options = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        no_local: true,
        ..Default::default()
    };
    me.subscribe_with(1, "chat", options).await;
    let (mut other, _) = RawClient::connect_v5(broker.addr, "other").await;
    other.subscribe(1, "chat", QoS::AtMostOnce).await;

    me.publish_acked(publish_struct("chat", QoS::AtLeastOnce, Some(1), b"mine"))
        .await;
    assert_eq!(&other.expect_publish().await.payload[..], b"mine");
    me.expect_silence().await;
    other
        .publish_acked(publish_struct("chat", QoS::AtLeastOnce, Some(1), b"theirs"))
        .await;
    assert_eq!(&me.expect_publish().await.payload[..], b"theirs");
}

#[tokio::test]
async fn sub_retain_as_published_keeps_the_retain_flag() {
    let broker = TestBroker::start().await;
    let (mut rap, _) = RawClient::connect_v5(broker.addr, "rap").await;
    let options = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        retain_as_published: true,
        ..Default::default()
    };
    rap.subscribe_with(1, "r", options).await;
    let (mut plain, _) = RawClient::connect_v5(broker.addr, "plain").await;
    plain.subscribe(1, "r", QoS::AtMostOnce).await;

    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    let mut message = publish_struct("r", QoS::AtLeastOnce, Some(1), b"kept");
    message.retain = true;
    publisher.publish_acked(message).await;
    assert!(
        rap.expect_publish().await.retain,
        "Retain As Published keeps RETAIN"
    );
    assert!(
        !plain.expect_publish().await.retain,
        "live messages go out with RETAIN 0 [MQTT-3.3.1-12]"
    );
}

#[tokio::test]
async fn sub_unsubscribe_stops_delivery() {
    let broker = TestBroker::start().await;
    let mut sub = V4::connect(broker.addr, "sub").await;
    sub.subscribe("u", rumqttc::QoS::AtLeastOnce).await;
    let mut publisher = V4::connect(broker.addr, "pub").await;
    publisher
        .publish("u", rumqttc::QoS::AtLeastOnce, false, b"1")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"1");
    sub.client.unsubscribe("u").await.unwrap();
    sub.next_incoming(|p| matches!(p, rumqttc::Packet::UnsubAck(_)).then_some(()))
        .await;
    publisher
        .publish("u", rumqttc::QoS::AtLeastOnce, false, b"2")
        .await;
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn sub_v5_unsuback_reports_no_subscription_existed() {
    let broker = TestBroker::start().await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "c").await;
    client.subscribe(1, "known", QoS::AtMostOnce).await;
    assert_eq!(
        client.unsubscribe(2, "unknown").await,
        vec![ReasonCode::NO_SUBSCRIPTION_EXISTED]
    );
    assert_eq!(
        client.unsubscribe(3, "known").await,
        vec![ReasonCode::SUCCESS]
    );
    assert_eq!(
        client.unsubscribe(4, "known").await,
        vec![ReasonCode::NO_SUBSCRIPTION_EXISTED]
    );
    // 3.1.1 UNSUBACK has no payload.
    let (mut old, _) = RawClient::connect_v311(broker.addr, "old").await;
    assert_eq!(old.unsubscribe(1, "unknown").await, vec![]);
}

#[tokio::test]
async fn sub_invalid_filters_get_0x8f_and_valid_ones_are_granted() {
    let broker = TestBroker::start().await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "c").await;
    let bad = [
        "a/#/b",
        "a+",
        "#/",
        "+#",
        "a/b#",
        // An empty filter makes the whole SUBSCRIBE malformed: tests/broker/conformance.rs.
        "$share/g",
        "$share//t",
        "$share/g+/t",
    ];
    let mut filters: Vec<(String, SubscriptionOptions)> = bad
        .iter()
        .map(|f| (f.to_string(), qos_options(QoS::AtLeastOnce)))
        .collect();
    filters.push(("ok/+/#".into(), qos_options(QoS::AtLeastOnce)));
    client
        .send(&Packet::Subscribe(Subscribe {
            packet_id: PacketId(9),
            properties: Properties::default(),
            filters,
        }))
        .await;
    let Packet::SubAck(suback) = client.expect_packet().await else {
        panic!("expected SUBACK")
    };
    let mut expected = vec![ReasonCode::TOPIC_FILTER_INVALID; bad.len()];
    expected.push(ReasonCode::GRANTED_QOS_1);
    assert_eq!(suback.reasons, expected);
    // The connection is still fine.
    client.send(&Packet::PingReq).await;
    assert_eq!(client.expect_packet().await, Packet::PingResp);

    // 3.1.1 reports every failure as 0x80.
    let (mut old, _) = RawClient::connect_v311(broker.addr, "old").await;
    let suback = old
        .subscribe_with(1, "a/#/b", qos_options(QoS::AtMostOnce))
        .await;
    assert_eq!(suback.reasons, vec![ReasonCode(0x80)]);
}

#[tokio::test]
async fn sub_shared_subscription_skips_offline_members() {
    let broker = TestBroker::start().await;
    let mut away = connect_packet(ProtocolVersion::V5, "away");
    away.properties.session_expiry_interval = Some(60);
    let (mut m1, _) = RawClient::connect_ok(broker.addr, away).await;
    m1.subscribe(1, "$share/g/jobs", QoS::AtLeastOnce).await;
    let (mut m2, _) = RawClient::connect_v5(broker.addr, "present").await;
    m2.subscribe(1, "$share/g/jobs", QoS::AtLeastOnce).await;
    m1.disconnect().await; // its session (and shared subscription) stays, offline

    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    for i in 0..4u8 {
        publisher
            .publish_acked(publish_struct(
                "jobs",
                QoS::AtLeastOnce,
                Some(u16::from(i) + 1),
                &[i],
            ))
            .await;
    }
    for i in 0..4u8 {
        let got = m2.expect_publish().await;
        assert_eq!(
            got.payload[..],
            [i],
            "the online member gets the work while the other is away"
        );
        m2.puback(&got).await;
    }
}

#[tokio::test]
async fn sub_resubscribe_replaces_the_subscription() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "re", QoS::AtMostOnce).await;
    sub.subscribe(2, "re", QoS::ExactlyOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("re", QoS::ExactlyOnce, Some(1), b"x"))
        .await;
    let got = sub.expect_publish().await;
    assert_eq!(got.qos, QoS::ExactlyOnce, "the new options apply");
    sub.expect_silence().await;
    assert_eq!(sub.unsubscribe(3, "re").await, vec![ReasonCode::SUCCESS]);
    publisher
        .publish_acked(publish_struct("re", QoS::AtMostOnce, None, b"y"))
        .await;
    sub.expect_silence().await;
}
