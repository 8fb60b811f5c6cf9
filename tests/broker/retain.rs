//! `retain_`: retained messages on subscribe, clearing, Retain Handling, expiry.

use petrel::codec::PacketId;
use std::time::Duration;

use petrel::codec::{QoS, SubscriptionOptions};

use crate::common::*;

async fn publish_retained(
    addr: std::net::SocketAddr,
    topic: &str,
    payload: &[u8],
    expiry: Option<u32>,
) {
    let (mut publisher, _) = RawClient::connect_v5(addr, &unique("retainer")).await;
    let mut message = publish_struct(topic, QoS::AtLeastOnce, Some(1), payload);
    message.retain = true;
    message.properties.message_expiry_interval = expiry;
    publisher.publish_acked(message).await;
    publisher.disconnect().await;
}

#[tokio::test]
async fn retain_delivered_on_subscribe() {
    let broker = TestBroker::start().await;
    let mut publisher = V4::connect(broker.addr, "pub").await;
    publisher
        .publish("status/a", rumqttc::QoS::AtLeastOnce, true, b"online")
        .await;
    publisher
        .publish(
            "status/b",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"not retained",
        )
        .await;
    let mut sub = V4::connect(broker.addr, "sub").await;
    sub.subscribe("status/+", rumqttc::QoS::AtLeastOnce).await;
    let got = sub.next_publish().await;
    assert_eq!(
        (&got.topic[..], &got.payload[..], got.retain),
        ("status/a", &b"online"[..], true)
    );
    sub.expect_no_publish().await;
    assert_eq!(broker.running.broker.retained_count(), 1);
}

#[tokio::test]
async fn retain_replaced_by_newer_message() {
    let broker = TestBroker::start().await;
    publish_retained(broker.addr, "r", b"old", None).await;
    publish_retained(broker.addr, "r", b"new", None).await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "r", QoS::AtMostOnce).await;
    assert_eq!(&sub.expect_publish().await.payload[..], b"new");
    sub.expect_silence().await;
}

#[tokio::test]
async fn retain_cleared_by_empty_payload() {
    let broker = TestBroker::start().await;
    let mut publisher = V4::connect(broker.addr, "pub").await;
    publisher
        .publish("clear/me", rumqttc::QoS::AtLeastOnce, true, b"x")
        .await;
    assert_eq!(broker.running.broker.retained_count(), 1);
    publisher
        .publish("clear/me", rumqttc::QoS::AtLeastOnce, true, b"")
        .await;
    assert_eq!(broker.running.broker.retained_count(), 0);
    let mut sub = V4::connect(broker.addr, "sub").await;
    sub.subscribe("clear/#", rumqttc::QoS::AtLeastOnce).await;
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn retain_handling_0_1_2() {
    let broker = TestBroker::start().await;
    publish_retained(broker.addr, "rh", b"kept", None).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "c").await;
    let with = |retain_handling| SubscriptionOptions {
        qos: QoS::AtMostOnce,
        retain_handling,
        ..Default::default()
    };

    // 0: sent on every subscribe, new or not.
    for packet_id in [1, 2] {
        client.subscribe_with(packet_id, "rh", with(0)).await;
        let got = client.expect_publish().await;
        assert!(got.retain && &got.payload[..] == b"kept");
    }
    client.unsubscribe(3, "rh").await;
    // 1: only when the subscription is new.
    client.subscribe_with(4, "rh", with(1)).await;
    assert_eq!(&client.expect_publish().await.payload[..], b"kept");
    client.subscribe_with(5, "rh", with(1)).await;
    client.expect_silence().await;
    client.unsubscribe(6, "rh").await;
    // 2: never.
    client.subscribe_with(7, "rh", with(2)).await;
    client.expect_silence().await;
}

#[tokio::test]
async fn retain_not_sent_to_shared_subscriptions() {
    let broker = TestBroker::start().await;
    publish_retained(broker.addr, "jobs", b"kept", None).await;
    let (mut member, _) = RawClient::connect_v5(broker.addr, "member").await;
    member.subscribe(1, "$share/g/jobs", QoS::AtMostOnce).await;
    member.expect_silence().await;
}

#[tokio::test]
async fn retain_expired_message_not_delivered() {
    let broker = TestBroker::start().await;
    publish_retained(broker.addr, "short/lived", b"soon gone", Some(1)).await;
    publish_retained(broker.addr, "long/lived", b"stays", Some(600)).await;
    // Before the expiry it is delivered, with its remaining lifetime.
    let (mut early, _) = RawClient::connect_v5(broker.addr, "early").await;
    early.subscribe(1, "short/lived", QoS::AtMostOnce).await;
    let got = early.expect_publish().await;
    assert_eq!(got.properties.message_expiry_interval, Some(1));

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (mut late, _) = RawClient::connect_v5(broker.addr, "late").await;
    late.subscribe(1, "+/lived", QoS::AtMostOnce).await;
    let got = late.expect_publish().await;
    assert_eq!(
        got.topic, "long/lived",
        "only the unexpired message is delivered"
    );
    late.expect_silence().await;
}

#[tokio::test]
async fn retain_on_subscribe_carries_the_subscription_identifier_and_granted_qos() {
    let broker = TestBroker::start().await;
    publish_retained(broker.addr, "ids", b"kept", None).await;
    let (mut client, _) = RawClient::connect_v5(broker.addr, "c").await;
    let properties = petrel::codec::Properties::from(petrel::codec::PropertySet {
        subscription_identifiers: vec![7],
        ..Default::default()
    });
    client
        .send(&petrel::codec::Packet::Subscribe(
            petrel::codec::Subscribe {
                packet_id: PacketId(1),
                properties,
                filters: vec![("ids".into(), qos_options(QoS::AtMostOnce))],
            },
        ))
        .await;
    assert!(matches!(
        client.expect_packet().await,
        petrel::codec::Packet::SubAck(_)
    ));
    let got = client.expect_publish().await;
    assert_eq!(got.properties.subscription_identifiers, vec![7]);
    assert_eq!(
        got.qos,
        QoS::AtMostOnce,
        "QoS 1 retained message downgraded to the subscription"
    );
}
