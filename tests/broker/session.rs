//! `session_`: persistent sessions, offline queues, resends, QoS 2 exactly-once, expiry.

use petrel::codec::PacketId;
use std::sync::atomic::Ordering;

use petrel::codec::{Ack, Connect, Packet, ProtocolVersion, QoS, ReasonCode};

use crate::common::*;

fn persistent_v311(id: &str) -> Connect {
    let mut connect = connect_packet(ProtocolVersion::V311, id);
    connect.clean_start = false;
    connect
}

fn persistent_v5(id: &str, expiry: u32, clean_start: bool) -> Connect {
    let mut connect = connect_packet(ProtocolVersion::V5, id);
    connect.clean_start = clean_start;
    connect.properties.session_expiry_interval = Some(expiry);
    connect
}

#[tokio::test]
async fn session_v311_offline_messages_queued_and_delivered_on_reconnect() {
    let broker = TestBroker::start().await;
    let mut options = V4::options(broker.addr, "persistent");
    options.set_clean_session(false);
    let (mut sub, connack) = V4::connect_with(options.clone()).await;
    assert!(!connack.session_present);
    sub.subscribe("offline/+", rumqttc::QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let mut publisher = V4::connect(broker.addr, "pub").await;
    for i in 0..3u8 {
        publisher
            .publish(
                &format!("offline/{i}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                &[i],
            )
            .await;
    }
    publisher
        .publish("offline/0", rumqttc::QoS::AtMostOnce, false, b"q0")
        .await;

    let (mut sub, connack) = V4::connect_with(options).await;
    assert!(connack.session_present);
    for i in 0..3u8 {
        let got = sub.next_publish().await;
        assert_eq!(
            (got.topic.clone(), &got.payload[..]),
            (format!("offline/{i}"), &[i][..])
        );
        assert_eq!(got.qos, rumqttc::QoS::AtLeastOnce);
    }
    // The QoS 0 message was queued with the others (the subscription was kept).
    assert_eq!(&sub.next_publish().await.payload[..], b"q0");
}

#[tokio::test]
async fn session_unacknowledged_qos1_resent_with_dup_on_reconnect() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_ok(broker.addr, persistent_v311("resend")).await;
    sub.subscribe(1, "resend/t", QoS::AtLeastOnce).await;
    let (mut publisher, _) = RawClient::connect_v311(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct(
            "resend/t",
            QoS::AtLeastOnce,
            Some(1),
            b"again",
        ))
        .await;
    let first = sub.expect_publish().await;
    assert!(!first.dup);
    drop(sub); // no PUBACK

    let (mut sub, connack) = RawClient::connect_ok(broker.addr, persistent_v311("resend")).await;
    assert!(connack.session_present);
    let again = sub.expect_publish().await;
    assert!(again.dup, "a resend carries DUP [MQTT-3.3.1-1]");
    assert_eq!(again.packet_id, first.packet_id);
    assert_eq!(
        (again.topic.as_str(), &again.payload[..], again.qos),
        ("resend/t", &b"again"[..], QoS::AtLeastOnce)
    );
    sub.puback(&again).await;
    sub.disconnect().await;

    // Acknowledged now: a third connection gets nothing.
    let (mut sub, connack) = RawClient::connect_ok(broker.addr, persistent_v311("resend")).await;
    assert!(connack.session_present);
    sub.expect_silence().await;
}

#[tokio::test]
async fn session_unreleased_qos2_outgoing_resends_pubrel_on_reconnect() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_ok(broker.addr, persistent_v5("rel", 60, true)).await;
    sub.subscribe(1, "q2", QoS::ExactlyOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("q2", QoS::ExactlyOnce, Some(1), b"x"))
        .await;
    let got = sub.expect_publish().await;
    let id = got.packet_id.unwrap();
    sub.send(&Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        sub.expect_packet().await,
        Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS))
    );
    drop(sub); // no PUBCOMP

    let (mut sub, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("rel", 60, false)).await;
    assert!(connack.session_present);
    assert_eq!(
        sub.expect_packet().await,
        Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS))
    );
    sub.send(&Packet::PubComp(Ack::new(id, ReasonCode::SUCCESS)))
        .await;
    sub.expect_silence().await;
}

#[tokio::test]
async fn session_qos2_inbound_exactly_once_across_reconnect() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = RawClient::connect_v5(broker.addr, "sub").await;
    sub.subscribe(1, "once", QoS::ExactlyOnce).await;

    let (mut publisher, _) =
        RawClient::connect_ok(broker.addr, persistent_v5("q2pub", 60, true)).await;
    publisher
        .send(&publish("once", QoS::ExactlyOnce, Some(7), b"exactly"))
        .await;
    assert_eq!(
        publisher.expect_packet().await,
        Packet::PubRec(Ack::new(PacketId(7), ReasonCode::SUCCESS))
    );
    drop(publisher); // no PUBREL

    let (mut publisher, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("q2pub", 60, false)).await;
    assert!(connack.session_present);
    let mut dup = publish_struct("once", QoS::ExactlyOnce, Some(7), b"exactly");
    dup.dup = true;
    publisher.send(&Packet::Publish(dup)).await;
    assert_eq!(
        publisher.expect_packet().await,
        Packet::PubRec(Ack::new(PacketId(7), ReasonCode::SUCCESS))
    );

    let got = sub.expect_publish().await;
    assert_eq!(&got.payload[..], b"exactly");
    sub.send(&Packet::PubRec(Ack::new(
        got.packet_id.unwrap(),
        ReasonCode::SUCCESS,
    )))
    .await;
    assert!(matches!(sub.expect_packet().await, Packet::PubRel(_)));

    publisher
        .send(&Packet::PubRel(Ack::new(PacketId(7), ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        publisher.expect_packet().await,
        Packet::PubComp(Ack::new(PacketId(7), ReasonCode::SUCCESS))
    );
    // Released: a second PUBREL is for an unknown id.
    publisher
        .send(&Packet::PubRel(Ack::new(PacketId(7), ReasonCode::SUCCESS)))
        .await;
    assert_eq!(
        publisher.expect_packet().await,
        Packet::PubComp(Ack::new(
            PacketId(7),
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        ))
    );
    sub.expect_silence().await;
}

#[tokio::test]
async fn session_v5_expiry_ends_the_session() {
    let broker = TestBroker::start().await;
    let (mut client, _) = RawClient::connect_ok(broker.addr, persistent_v5("brief", 1, true)).await;
    client.subscribe(1, "t", QoS::AtLeastOnce).await;
    client.disconnect().await;
    // Within the interval the session is still there.
    let (client, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("brief", 1, false)).await;
    assert!(connack.session_present);
    client.disconnect().await;

    let metrics = &broker.running.broker.metrics;
    tokio::time::timeout(WAIT, async {
        while metrics.sessions_expired.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the session expires within the wait");
    assert_eq!(broker.running.broker.session_count(), 0);
    let (mut client, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("brief", 1, false)).await;
    assert!(!connack.session_present);
    // The subscription went with the session.
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("t", QoS::AtLeastOnce, Some(1), b"x"))
        .await;
    client.expect_silence().await;
}

#[tokio::test]
async fn session_v5_expiry_zero_ends_with_the_connection() {
    let broker = TestBroker::start().await;
    let (mut client, _) = RawClient::connect_ok(broker.addr, persistent_v5("gone", 0, false)).await;
    client.subscribe(1, "t", QoS::AtLeastOnce).await;
    client.disconnect().await;
    assert_eq!(broker.running.broker.session_count(), 0);
    let (_client, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("gone", 0, false)).await;
    assert!(!connack.session_present);
}

#[tokio::test]
async fn session_clean_start_discards_old_session() {
    let broker = TestBroker::start().await;
    let (mut client, _) = RawClient::connect_ok(broker.addr, persistent_v5("cs", 60, true)).await;
    client.subscribe(1, "t", QoS::AtLeastOnce).await;
    client.disconnect().await;
    let (mut publisher, _) = RawClient::connect_v5(broker.addr, "pub").await;
    publisher
        .publish_acked(publish_struct("t", QoS::AtLeastOnce, Some(1), b"queued"))
        .await;

    let (mut client, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("cs", 60, true)).await;
    assert!(!connack.session_present);
    client.expect_silence().await; // the queued message went with the old session
    publisher
        .publish_acked(publish_struct("t", QoS::AtLeastOnce, Some(2), b"live"))
        .await;
    client.expect_silence().await; // and so did the subscription
}

#[tokio::test]
async fn session_v311_clean_session_discards_old_session() {
    let broker = TestBroker::start().await;
    let mut options = V4::options(broker.addr, "cs311");
    options.set_clean_session(false);
    let (mut sub, _) = V4::connect_with(options.clone()).await;
    sub.subscribe("t", rumqttc::QoS::AtLeastOnce).await;
    sub.disconnect().await;
    options.set_clean_session(true);
    let (mut sub, connack) = V4::connect_with(options).await;
    assert!(!connack.session_present);
    let mut publisher = V4::connect(broker.addr, "pub").await;
    publisher
        .publish("t", rumqttc::QoS::AtLeastOnce, false, b"x")
        .await;
    sub.expect_no_publish().await;
}

#[tokio::test]
async fn session_v5_expiry_capped_by_configured_maximum() {
    let broker =
        TestBroker::start_with(|c| c.session.max_expiry = std::time::Duration::from_secs(100))
            .await;
    let (_long, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("long", 1000, true)).await;
    assert_eq!(
        connack.properties.session_expiry_interval,
        Some(100),
        "the broker says what it grants"
    );
    let (_short, connack) =
        RawClient::connect_ok(broker.addr, persistent_v5("short", 50, true)).await;
    assert_eq!(
        connack.properties.session_expiry_interval, None,
        "an accepted value is not echoed"
    );
}

#[tokio::test]
async fn session_v311_persistent_session_expires_after_configured_v3_expiry() {
    let broker =
        TestBroker::start_with(|c| c.session.v3_expiry = std::time::Duration::from_secs(1)).await;
    let (client, _) = RawClient::connect_ok(broker.addr, persistent_v311("v3exp")).await;
    client.disconnect().await;
    let (client, connack) = RawClient::connect_ok(broker.addr, persistent_v311("v3exp")).await;
    assert!(connack.session_present, "kept within the expiry");
    client.disconnect().await;
    let metrics = &broker.running.broker.metrics;
    tokio::time::timeout(WAIT, async {
        while metrics.sessions_expired.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the session expires within the wait");
    let (_client, connack) = RawClient::connect_ok(broker.addr, persistent_v311("v3exp")).await;
    assert!(!connack.session_present);
}
