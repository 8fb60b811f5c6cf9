//! EMQX's messaging extensions (issue 17): delayed publish (`$delayed/{seconds}/{topic}`) and
//! exclusive subscriptions (`$exclusive/{filter}`), over MQTT 3.1.1 and 5.0 with raw packets.
//! Timing assertions are outcomes only: nothing before the interval has passed, everything
//! after it, in due order.

use std::time::Duration;

use petrel::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

use crate::common::*;

use ProtocolVersion::{V311, V5};

#[tokio::test]
async fn delayed_publish_arrives_on_its_target_after_the_interval_in_due_order() {
    let broker = TestBroker::start().await;
    for version in [V311, V5] {
        let topic = unique("x/y");
        let (mut sub, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, &unique("s"))).await;
        sub.subscribe(1, &format!("{topic}/#"), QoS::AtLeastOnce)
            .await;
        let (mut publisher, _) =
            RawClient::connect_ok(broker.addr, connect_packet(version, &unique("p"))).await;
        let later = format!("$delayed/2/{topic}/later");
        let sooner = format!("$delayed/1/{topic}/sooner");
        let (reason, _) = publisher
            .publish_ack(publish_struct(&later, QoS::AtLeastOnce, Some(1), b"2"))
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        publisher
            .publish_acked(publish_struct(&sooner, QoS::ExactlyOnce, Some(2), b"1"))
            .await;
        // Not before its time.
        sub.expect_silence().await;
        let mut got = Vec::new();
        for _ in 0..2 {
            let publish = match sub.read(Duration::from_secs(5)).await {
                Read::Packet(packet) => match *packet {
                    Packet::Publish(publish) => publish,
                    other => panic!("expected PUBLISH, got {other:?}"),
                },
                other => panic!("{version:?}: no delayed message: {other:?}"),
            };
            if let Some(id) = publish.packet_id {
                sub.send(&Packet::PubAck(petrel::codec::Ack::new(
                    id,
                    ReasonCode::SUCCESS,
                )))
                .await;
            }
            got.push((publish.topic, publish.qos, publish.payload.to_vec()));
        }
        assert_eq!(
            got,
            [
                (format!("{topic}/sooner"), QoS::AtLeastOnce, b"1".to_vec()),
                (format!("{topic}/later"), QoS::AtLeastOnce, b"2".to_vec()),
            ],
            "{version:?}: due order, on the target topic, QoS kept (capped by the subscription)"
        );
        assert_eq!(broker.running.broker.delayed_count(), 0);
    }
}

#[tokio::test]
async fn delayed_retained_message_is_retained_on_its_target() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "p").await;
    let mut retained = publish_struct("$delayed/1/kept/t", QoS::AtLeastOnce, Some(1), b"r");
    retained.retain = true;
    publisher.publish_acked(retained).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut late, _) = RawClient::connect_v5(broker.addr, "late").await;
    late.subscribe(1, "kept/#", QoS::AtMostOnce).await;
    let got = late.expect_publish().await;
    assert_eq!((got.topic.as_str(), got.retain), ("kept/t", true));
}

#[tokio::test]
async fn v5_a_bad_delayed_topic_gets_0x90_and_is_dropped() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "s").await;
    sub.subscribe(1, "#", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "p").await;
    for (id, topic) in [
        "$delayed/x/t",
        "$delayed/4294968/t",
        "$delayed/5",
        "$delayed/1.5/t",
    ]
    .into_iter()
    .enumerate()
    {
        let (reason, _) = publisher
            .publish_ack(publish_struct(
                topic,
                QoS::AtLeastOnce,
                Some(id as u16 + 1),
                b"x",
            ))
            .await;
        assert_eq!(reason, ReasonCode::TOPIC_NAME_INVALID, "{topic}");
    }
    sub.expect_silence().await;
    assert_eq!(broker.running.broker.delayed_count(), 0);
}

#[tokio::test]
async fn v5_past_max_delayed_messages_a_publish_gets_0x97() {
    let broker = TestBroker::start_with(|c| c.delayed.max_delayed_messages = 1).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "p").await;
    let (first, _) = publisher
        .publish_ack(publish_struct(
            "$delayed/60/a",
            QoS::AtLeastOnce,
            Some(1),
            b"1",
        ))
        .await;
    let (second, _) = publisher
        .publish_ack(publish_struct(
            "$delayed/60/b",
            QoS::AtLeastOnce,
            Some(2),
            b"2",
        ))
        .await;
    assert_eq!(
        (first, second),
        (ReasonCode::SUCCESS, ReasonCode::QUOTA_EXCEEDED)
    );
    assert_eq!(broker.running.broker.delayed_count(), 1);
}

#[tokio::test]
async fn exclusive_subscription_is_held_by_one_client_until_released() {
    let broker = TestBroker::start().await;
    let (mut holder, _) = RawClient::connect_v5(broker.addr, "holder").await;
    assert_eq!(
        holder
            .subscribe_codes(1, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
    // Claiming again what one holds succeeds.
    assert_eq!(
        holder
            .subscribe_codes(2, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
    let (mut other5, _) = RawClient::connect_v5(broker.addr, "other5").await;
    let (mut other3, _) = RawClient::connect_v311(broker.addr, "other3").await;
    assert_eq!(
        other5
            .subscribe_codes(1, &["$exclusive/t/1", "t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::QUOTA_EXCEEDED, ReasonCode::GRANTED_QOS_1],
        "the filter without the prefix is unaffected"
    );
    assert_eq!(
        other3
            .subscribe_codes(1, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::UNSPECIFIED_ERROR],
        "3.1.1 hears 0x80"
    );
    // The holder receives on t/1.
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("t/1", QoS::AtMostOnce, None, b"m"))
        .await;
    assert_eq!(holder.expect_publish().await.topic, "t/1");
    assert_eq!(other5.expect_publish().await.topic, "t/1");

    // Unsubscribing lets go.
    assert_eq!(
        holder.unsubscribe(3, "$exclusive/t/1").await,
        [ReasonCode::SUCCESS]
    );
    assert_eq!(
        other3
            .subscribe_codes(2, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
    // So does the end of the holder's session.
    other3.disconnect().await;
    assert_eq!(
        other5
            .subscribe_codes(2, &["$exclusive/t/1"], QoS::AtLeastOnce)
            .await,
        [ReasonCode::GRANTED_QOS_1]
    );
}

#[tokio::test]
async fn exclusive_subscription_switched_off_is_refused() {
    let broker = TestBroker::start_with(|c| c.mqtt.exclusive_subscription = false).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "c").await;
    assert_eq!(
        client
            .subscribe_codes(1, &["$exclusive/t"], QoS::AtMostOnce)
            .await,
        [ReasonCode::TOPIC_FILTER_INVALID]
    );
}
