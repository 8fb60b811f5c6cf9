//! Multi-stream mode: data streams with their own subscriptions, acks on the stream of the
//! packet, deliveries on the stream of the subscription, and failures that end one stream.

use petrel::codec::PacketId;
use petrel::codec::{Ack, Packet, ProtocolVersion, QoS, ReasonCode, SubscriptionOptions};
use quinn::VarInt;

use super::{broker_with, id_of, QuicClient, QuicStream};
use crate::common::{connect_packet, publish, publish_struct, qos_options, unique, RawClient};
use crate::transports::TransportBroker;

/// A raw v5 TCP client publishing to the broker.
async fn tcp_publisher(broker: &TransportBroker) -> RawClient {
    RawClient::connect_v5(
        broker.addr(petrel::config::ListenerKind::Tcp),
        &unique("tcp-pub"),
    )
    .await
    .0
}

#[tokio::test]
async fn quic_multi_stream_acks_and_deliveries_follow_their_streams() {
    // A window of one: the second delivery waits for the first one's PUBACK on D1.
    let broker = broker_with(|c| c.mqtt.max_inflight = 1).await;
    let mut client = QuicClient::v5(&broker, &unique("quic-multi")).await;
    let topic = unique("multi");
    let mut d1 = client.data_stream().await;
    let mut d2 = client.data_stream().await;
    assert_eq!((client.control.index(), d1.index(), d2.index()), (0, 1, 2));

    d1.subscribe(1, &topic, QoS::AtLeastOnce).await;
    d2.publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"one"))
        .await;
    let first = d1.expect_publish().await;
    assert_eq!(
        (first.topic.as_str(), &first.payload[..], first.qos),
        (topic.as_str(), &b"one"[..], QoS::AtLeastOnce)
    );
    // Not on the control stream nor on the publishing stream.
    super::expect_silence_on(&mut [&mut client.control, &mut d2]).await;

    // The window is full: the second message waits...
    d2.publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(2), b"two"))
        .await;
    d1.expect_silence().await;
    // ...until the first is acknowledged on D1.
    d1.puback(id_of(&first)).await;
    let second = d1.expect_publish().await;
    assert_eq!(&second.payload[..], b"two");
    assert!(!second.dup);
    d1.puback(id_of(&second)).await;
    // And the window keeps turning.
    d2.publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(3), b"three"))
        .await;
    assert_eq!(&d1.expect_publish().await.payload[..], b"three");
    client.control.expect_silence().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_qos2_on_data_streams_completes_on_those_streams() {
    let broker = broker_with(|_| {}).await;
    let topic = unique("qos2");
    let mut sub = QuicClient::v5(&broker, &unique("quic-qos2-sub")).await;
    let mut sub_data = sub.data_stream().await;
    sub_data.subscribe(1, &topic, QoS::ExactlyOnce).await;

    let mut publisher = QuicClient::v5(&broker, &unique("quic-qos2-pub")).await;
    let mut pub_data = publisher.data_stream().await;
    let packet = publish(&topic, QoS::ExactlyOnce, Some(9), b"once");
    pub_data.send(&packet).await;
    pub_data.expect_ack(PacketId(9), "PUBREC").await;
    // A resend before PUBREL is acknowledged again, never routed twice.
    let Packet::Publish(mut dup) = packet else {
        unreachable!()
    };
    dup.dup = true;
    pub_data.send(&Packet::Publish(dup)).await;
    pub_data.expect_ack(PacketId(9), "PUBREC").await;
    pub_data
        .send(&Packet::PubRel(Ack::new(PacketId(9), ReasonCode::SUCCESS)))
        .await;
    pub_data.expect_ack(PacketId(9), "PUBCOMP").await;
    publisher.control.expect_silence().await;

    // The subscriber's side of QoS 2 runs on its data stream too.
    let got = sub_data.expect_publish().await;
    assert_eq!(
        (got.qos, &got.payload[..]),
        (QoS::ExactlyOnce, &b"once"[..])
    );
    let id = id_of(&got);
    sub_data
        .send(&Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)))
        .await;
    sub_data.expect_ack(id, "PUBREL").await;
    sub_data
        .send(&Packet::PubComp(Ack::new(id, ReasonCode::SUCCESS)))
        .await;
    // Exactly one delivery.
    super::expect_silence_on(&mut [&mut sub_data, &mut sub.control]).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_data_stream_opened_before_connect_waits_for_connack() {
    let broker = broker_with(|_| {}).await;
    let topic = unique("early-stream");
    let endpoint = super::client_endpoint(&broker);
    let conn = super::dial(&endpoint, super::quic_addr(&broker)).await;
    let mut control = QuicStream::open(&conn, ProtocolVersion::V5).await;
    let mut data = QuicStream::open(&conn, ProtocolVersion::V5).await;
    // The data stream speaks first: the broker learns of both streams, but reads neither
    // the SUBSCRIBE nor answers it before CONNECT is accepted.
    data.send(&super::subscribe_packet(
        5,
        &topic,
        qos_options(QoS::AtLeastOnce),
    ))
    .await;
    data.expect_silence().await;
    control
        .send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V5,
            &unique("quic-early-stream"),
        ))))
        .await;
    let connack = control.expect_connack().await;
    assert_eq!(connack.code, ReasonCode::SUCCESS);
    match data.expect_packet().await {
        Packet::SubAck(suback) => {
            assert_eq!(suback.packet_id, 5);
            assert_eq!(suback.reasons, vec![ReasonCode::GRANTED_QOS_1]);
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The subscription works, on that stream.
    let mut publisher = tcp_publisher(&broker).await;
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"hi"))
        .await;
    let got = data.expect_publish().await;
    assert_eq!(&got.payload[..], b"hi");
    control.expect_silence().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_same_filter_on_two_streams_is_two_subscriptions() {
    let broker = broker_with(|_| {}).await;
    let topic = unique("twice");
    let mut client = QuicClient::v5(&broker, &unique("quic-twice")).await;
    let mut d1 = client.data_stream().await;
    let mut d2 = client.data_stream().await;
    let mut d3 = client.data_stream().await;
    d1.subscribe(1, &topic, QoS::AtLeastOnce).await;
    d2.subscribe(1, &topic, QoS::AtMostOnce).await;

    let mut publisher = tcp_publisher(&broker).await;
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"x"))
        .await;
    let on_d1 = d1.expect_publish().await;
    assert_eq!(
        (on_d1.qos, &on_d1.payload[..]),
        (QoS::AtLeastOnce, &b"x"[..])
    );
    d1.puback(id_of(&on_d1)).await;
    let on_d2 = d2.expect_publish().await;
    assert_eq!(
        (on_d2.qos, &on_d2.payload[..]),
        (QoS::AtMostOnce, &b"x"[..])
    );
    client.control.expect_silence().await;

    // Subscriptions belong to their stream: unsubscribing elsewhere finds none.
    assert_eq!(
        d3.unsubscribe(2, &topic).await,
        vec![ReasonCode::NO_SUBSCRIPTION_EXISTED]
    );
    assert_eq!(
        client.control.unsubscribe(3, &topic).await,
        vec![ReasonCode::NO_SUBSCRIPTION_EXISTED]
    );
    assert_eq!(d1.unsubscribe(4, &topic).await, vec![ReasonCode::SUCCESS]);
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(2), b"y"))
        .await;
    assert_eq!(&d2.expect_publish().await.payload[..], b"y");
    super::expect_silence_on(&mut [&mut d1, &mut client.control]).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_pingreq_answered_on_control_stream_only() {
    let broker = broker_with(|_| {}).await;
    let mut client = QuicClient::v5(&broker, &unique("quic-ping")).await;
    let mut data = client.data_stream().await;
    data.send(&Packet::PingReq).await;
    super::expect_silence_on(&mut [&mut data, &mut client.control]).await;
    client.control.send(&Packet::PingReq).await;
    assert!(matches!(
        client.control.expect_packet().await,
        Packet::PingResp
    ));
    // The PINGREQ did not cost the data stream its life.
    data.subscribe(1, &unique("after-ping"), QoS::AtMostOnce)
        .await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_malformed_data_stream_is_closed_alone() {
    let broker = broker_with(|_| {}).await;
    let topic = unique("survivor");
    let mut client = QuicClient::v5(&broker, &unique("quic-garbage")).await;
    let mut bad = client.data_stream().await;
    // Packet type 0 is reserved [MQTT-2.1.3].
    bad.send_raw(&[0x00, 0x00, 0xde, 0xad]).await;
    let end = bad.expect_reset_or_end().await;
    assert!(!end.is_empty());

    client.control.send(&Packet::PingReq).await;
    assert!(matches!(
        client.control.expect_packet().await,
        Packet::PingResp
    ));
    let mut good = client.data_stream().await;
    good.subscribe(1, &topic, QoS::AtLeastOnce).await;
    good.publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"alive"))
        .await;
    assert_eq!(&good.expect_publish().await.payload[..], b"alive");
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_control_packet_on_data_stream_closes_that_stream_alone() {
    let broker = broker_with(|_| {}).await;
    let topic = unique("stray");
    let mut client = QuicClient::v5(&broker, &unique("quic-stray")).await;
    let mut stray = client.data_stream().await;
    // CONNECT belongs on the control stream only.
    stray
        .send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V5,
            "stray",
        ))))
        .await;
    stray.expect_reset_or_end().await;
    // Whatever the client still writes on the closed stream is not acted on.
    stray
        .send(&super::subscribe_packet(
            1,
            &topic,
            SubscriptionOptions::default(),
        ))
        .await;
    client.control.expect_silence().await;
    let mut publisher = tcp_publisher(&broker).await;
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"nobody"))
        .await;
    client.control.expect_silence().await;
    // The connection lives on.
    client.control.send(&Packet::PingReq).await;
    assert!(matches!(
        client.control.expect_packet().await,
        Packet::PingResp
    ));
    broker.shutdown().await;
}

/// The client aborts a data stream that carried a QoS 1 subscription (RESET_STREAM, or
/// STOP_SENDING, or both): what was in flight on it is resent on the control stream with DUP,
/// and later messages for the subscription arrive there too (EMQX would drop them).
async fn abandoned_stream_rehomes_to_control(reset: bool, stop: bool) {
    let broker = broker_with(|_| {}).await;
    let topic = unique("rehome");
    let mut client = QuicClient::v5(&broker, &unique("quic-rehome")).await;
    let mut data = client.data_stream().await;
    data.subscribe(1, &topic, QoS::AtLeastOnce).await;
    let mut publisher = tcp_publisher(&broker).await;
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"first"))
        .await;
    let first = data.expect_publish().await;
    assert!(!first.dup);
    // Not acknowledged: the stream goes away with it in flight.
    if reset {
        data.send.reset(VarInt::from_u32(0)).unwrap();
    }
    if stop {
        data.recv.stop(VarInt::from_u32(0)).unwrap();
    }
    let resent = client.control.expect_publish().await;
    assert_eq!(
        (&resent.payload[..], resent.dup, resent.packet_id),
        (&b"first"[..], true, first.packet_id)
    );
    client.control.puback(id_of(&resent)).await;

    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(2), b"second"))
        .await;
    let second = client.control.expect_publish().await;
    assert_eq!(
        (&second.payload[..], second.dup, second.topic.as_str()),
        (&b"second"[..], false, topic.as_str())
    );
    client.control.puback(id_of(&second)).await;
    client.control.expect_silence().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_reset_data_stream_rehomes_its_subscription_to_control() {
    abandoned_stream_rehomes_to_control(true, false).await;
}

#[tokio::test]
async fn quic_stopped_data_stream_rehomes_its_subscription_to_control() {
    abandoned_stream_rehomes_to_control(false, true).await;
}

#[tokio::test]
async fn quic_aborted_data_stream_rehomes_its_subscription_to_control() {
    abandoned_stream_rehomes_to_control(true, true).await;
}
