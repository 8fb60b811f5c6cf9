//! Single-stream mode: every packet on the control stream, as on a TCP socket; and interop
//! with clients on other transports.

use petrel::codec::PacketId;
use petrel::codec::{Ack, Packet, ProtocolVersion, QoS, ReasonCode};
use petrel::config::ListenerKind;
use rumqttc::QoS as V4QoS;

use super::{broker_with, id_of, QuicClient};
use crate::common::{publish, publish_struct, unique, V4};
use crate::transports::v4_options;

/// SUBSCRIBE and PUBLISH QoS 0, 1 and 2 on the control stream of one client, which is
/// subscribed to its own topic: the acks and the deliveries all come back on that stream.
async fn single_stream_round_trip(version: ProtocolVersion) {
    let broker = broker_with(|_| {}).await;
    let mut client = QuicClient::connect(&broker, version, &unique("quic-single")).await;
    let topic = unique("single");
    let control = &mut client.control;
    control.subscribe(1, &topic, QoS::ExactlyOnce).await;

    // QoS 0: the delivery only.
    control
        .send(&publish(&topic, QoS::AtMostOnce, None, b"q0"))
        .await;
    let got = control.expect_publish().await;
    assert_eq!((got.qos, &got.payload[..]), (QoS::AtMostOnce, &b"q0"[..]));

    // QoS 1: PUBACK and the delivery, in either order; then the client's PUBACK.
    control
        .send(&publish(&topic, QoS::AtLeastOnce, Some(11), b"q1"))
        .await;
    let mut acked = false;
    let mut delivered = None;
    while !acked || delivered.is_none() {
        match control.expect_packet().await {
            Packet::PubAck(ack) if !acked => {
                assert_eq!(
                    (ack.packet_id, ack.reason),
                    (PacketId(11), ReasonCode::SUCCESS)
                );
                acked = true;
            }
            Packet::Publish(p) if delivered.is_none() => {
                assert_eq!((p.qos, &p.payload[..]), (QoS::AtLeastOnce, &b"q1"[..]));
                delivered = Some(id_of(&p));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    control.puback(delivered.unwrap()).await;

    // QoS 2: the publisher's PUBREC / PUBREL / PUBCOMP interleaved with the subscriber's
    // PUBLISH / PUBREC / PUBREL / PUBCOMP, all on the one stream.
    control
        .send(&publish(&topic, QoS::ExactlyOnce, Some(12), b"q2"))
        .await;
    let (mut pubrec, mut delivery) = (false, None);
    while !pubrec || delivery.is_none() {
        match control.expect_packet().await {
            Packet::PubRec(ack) if !pubrec => {
                assert_eq!(
                    (ack.packet_id, ack.reason),
                    (PacketId(12), ReasonCode::SUCCESS)
                );
                pubrec = true;
            }
            Packet::Publish(p) if delivery.is_none() => {
                assert_eq!((p.qos, &p.payload[..]), (QoS::ExactlyOnce, &b"q2"[..]));
                delivery = Some(id_of(&p));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let delivery = delivery.unwrap();
    control
        .send(&Packet::PubRel(Ack::new(PacketId(12), ReasonCode::SUCCESS)))
        .await;
    control
        .send(&Packet::PubRec(Ack::new(delivery, ReasonCode::SUCCESS)))
        .await;
    let (mut pubcomp, mut pubrel) = (false, false);
    while !pubcomp || !pubrel {
        match control.expect_packet().await {
            Packet::PubComp(ack) if !pubcomp && ack.packet_id == 12 => pubcomp = true,
            Packet::PubRel(ack) if !pubrel && ack.packet_id == delivery => pubrel = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    control
        .send(&Packet::PubComp(Ack::new(delivery, ReasonCode::SUCCESS)))
        .await;
    // Exactly once: nothing more.
    control.expect_silence().await;

    control.disconnect().await;
    super::expect_app_close(&client.conn, 0).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_single_stream_v5_pubsub_qos_0_1_2() {
    single_stream_round_trip(ProtocolVersion::V5).await;
}

#[tokio::test]
async fn quic_single_stream_v311_pubsub_qos_0_1_2() {
    single_stream_round_trip(ProtocolVersion::V311).await;
}

/// A rumqttc TCP publisher reaches a QUIC subscriber, and a QUIC publisher reaches a rumqttc
/// TCP subscriber.
#[tokio::test]
async fn quic_interop_with_tcp_both_ways() {
    let broker = broker_with(|_| {}).await;
    let to_quic = unique("to-quic");
    let to_tcp = unique("to-tcp");
    let mut quic = QuicClient::v5(&broker, &unique("quic-interop")).await;
    quic.control.subscribe(1, &to_quic, QoS::AtLeastOnce).await;
    let (mut tcp, _) = V4::connect_with(v4_options(
        &broker,
        ListenerKind::Tcp,
        &unique("tcp-interop"),
    ))
    .await;
    tcp.subscribe(&to_tcp, V4QoS::AtLeastOnce).await;

    tcp.publish(&to_quic, V4QoS::AtLeastOnce, false, b"from tcp")
        .await;
    let got = quic.control.expect_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..], got.qos),
        (to_quic.as_str(), &b"from tcp"[..], QoS::AtLeastOnce)
    );
    quic.control.puback(id_of(&got)).await;

    quic.control
        .publish_acked(publish_struct(
            &to_tcp,
            QoS::AtLeastOnce,
            Some(7),
            b"from quic",
        ))
        .await;
    let got = tcp.next_publish().await;
    assert_eq!(
        (&got.payload[..], got.qos),
        (&b"from quic"[..], V4QoS::AtLeastOnce)
    );
    broker.shutdown().await;
}
