//! A QUIC connection's life: connect timeout, stream credit, takeover, shutdown, migration,
//! 0-RTT resumption and persistent sessions.

use petrel::codec::PacketId;
use std::time::Duration;

use petrel::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use petrel::config::ListenerKind;

use super::{
    broker_with, client_endpoint, dial, expect_app_close, id_of, quic_addr, subscribe_packet,
    QuicClient, QuicStream,
};
use crate::common::{
    connect_packet, publish, publish_struct, qos_options, unique, will, RawClient, WAIT,
};
use crate::transports::TransportBroker;

async fn tcp_client(broker: &TransportBroker, prefix: &str) -> RawClient {
    RawClient::connect_v5(broker.addr(ListenerKind::Tcp), &unique(prefix))
        .await
        .0
}

#[tokio::test]
async fn quic_connection_without_control_stream_closed_after_connect_timeout() {
    let broker = broker_with(|c| c.mqtt.connect_timeout = Duration::from_millis(300)).await;
    let endpoint = client_endpoint(&broker);
    let conn = dial(&endpoint, quic_addr(&broker)).await;
    // No stream is ever opened: the broker gives up with "Maximum connect time".
    expect_app_close(&conn, ReasonCode::MAXIMUM_CONNECT_TIME.0).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_streams_beyond_max_streams_are_not_granted() {
    let broker = broker_with(|c| c.quic.max_streams = 3).await;
    let topic = unique("credit");
    let mut client = QuicClient::v5(&broker, &unique("quic-credit")).await;
    let mut d1 = client.data_stream().await;
    let mut d2 = client.data_stream().await;
    d1.subscribe(1, &topic, QoS::AtLeastOnce).await;
    d2.subscribe(1, &unique("other"), QoS::AtLeastOnce).await;

    // A fourth stream: the broker grants no credit for it, or, if quinn lets it open,
    // never answers on it.
    match tokio::time::timeout(crate::common::QUIET, client.conn.open_bi()).await {
        Err(_) => {}
        Ok(opened) => {
            let (send, recv) = opened.expect("the connection is open");
            let mut extra = QuicStream::new(send, recv, ProtocolVersion::V5);
            extra
                .send(&subscribe_packet(
                    1,
                    &unique("extra"),
                    qos_options(QoS::AtMostOnce),
                ))
                .await;
            extra.expect_silence().await;
        }
    }

    // The connection still works.
    client.control.send(&Packet::PingReq).await;
    assert!(matches!(
        client.control.expect_packet().await,
        Packet::PingResp
    ));
    let mut publisher = tcp_client(&broker, "credit-pub").await;
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"ok"))
        .await;
    let got = d1.expect_publish().await;
    d1.puback(id_of(&got)).await;

    // Ending a data stream gives its credit back: a new stream opens and is served.
    d2.send.finish().unwrap();
    assert!(matches!(d2.read(WAIT).await, super::StreamRead::Finished));
    let mut d3 = client.data_stream().await;
    d3.subscribe(7, &unique("third"), QoS::AtMostOnce).await;
    broker.shutdown().await;
}

/// A second connection with the same client id takes the session over: the first hears
/// DISCONNECT 0x8E on its control stream and its QUIC connection closes with error 0x8E.
async fn takeover_by(second_over_quic: bool) {
    let broker = broker_with(|_| {}).await;
    let id = unique("quic-taken");
    let mut first = QuicClient::v5(&broker, &id).await;
    if second_over_quic {
        let mut second = QuicClient::v5(&broker, &id).await;
        first
            .control
            .expect_disconnect(ReasonCode::SESSION_TAKEN_OVER)
            .await;
        expect_app_close(&first.conn, ReasonCode::SESSION_TAKEN_OVER.0).await;
        second.control.send(&Packet::PingReq).await;
        assert!(matches!(
            second.control.expect_packet().await,
            Packet::PingResp
        ));
    } else {
        let (mut second, _) = RawClient::connect_v5(broker.addr(ListenerKind::Tcp), &id).await;
        first
            .control
            .expect_disconnect(ReasonCode::SESSION_TAKEN_OVER)
            .await;
        expect_app_close(&first.conn, ReasonCode::SESSION_TAKEN_OVER.0).await;
        second.send(&Packet::PingReq).await;
        assert!(matches!(second.expect_packet().await, Packet::PingResp));
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_takeover_by_quic_disconnects_0x8e() {
    takeover_by(true).await;
}

#[tokio::test]
async fn quic_takeover_by_tcp_disconnects_0x8e() {
    takeover_by(false).await;
}

#[tokio::test]
async fn quic_shutdown_sends_server_shutting_down() {
    let broker = broker_with(|_| {}).await;
    let mut client = QuicClient::v5(&broker, &unique("quic-shutdown")).await;
    let shutdown = tokio::spawn(broker.shutdown());
    client
        .control
        .expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN)
        .await;
    expect_app_close(&client.conn, ReasonCode::SERVER_SHUTTING_DOWN.0).await;
    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown ends in time")
        .unwrap();
}

#[tokio::test]
async fn quic_migration_keeps_connection_and_subscriptions() {
    let broker = broker_with(|_| {}).await;
    let topic = unique("migrate");
    let mut client = QuicClient::v5(&broker, &unique("quic-migrate")).await;
    client.control.subscribe(1, &topic, QoS::AtLeastOnce).await;

    let before = client.endpoint.local_addr().unwrap();
    client
        .endpoint
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    assert_ne!(client.endpoint.local_addr().unwrap(), before);

    let mut publisher = tcp_client(&broker, "migrate-pub").await;
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"moved"))
        .await;
    let got = client.control.expect_publish().await;
    assert_eq!(&got.payload[..], b"moved");
    client.control.puback(id_of(&got)).await;
    client
        .control
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(2), b"mine"))
        .await;
    let own = client.control.expect_publish().await;
    assert_eq!(&own.payload[..], b"mine");
    assert!(
        client.conn.close_reason().is_none(),
        "the same connection carried it all"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_migration_across_reuseport_endpoints_keeps_connection() {
    // Four endpoints on one port: the kernel hashes each new client address to one of four
    // sockets, so over eight moves the connection's packets almost surely arrive at sockets
    // whose endpoint does not own it, and must be routed to the one that does (by connection
    // ID) instead of being answered with a stateless reset.
    let broker = broker_with(|c| c.quic.endpoints = 4).await;
    let topic = unique("migrate-many");
    let mut client = QuicClient::v5(&broker, &unique("quic-migrate-many")).await;
    client.control.subscribe(1, &topic, QoS::AtLeastOnce).await;
    for n in 0..8u16 {
        client
            .endpoint
            .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        let payload = format!("move {n}");
        client
            .control
            .publish_acked(publish_struct(
                &topic,
                QoS::AtLeastOnce,
                Some(n + 2),
                payload.as_bytes(),
            ))
            .await;
        let got = client.control.expect_publish().await;
        assert_eq!(&got.payload[..], payload.as_bytes());
        client.control.puback(id_of(&got)).await;
    }
    assert!(
        client.conn.close_reason().is_none(),
        "the same connection carried it all: {:?}",
        client.conn.close_reason()
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_zero_rtt_connect_and_publish_in_early_data() {
    let broker = broker_with(|_| {}).await;
    let addr = quic_addr(&broker);
    let topic = unique("early");
    let mut sub = tcp_client(&broker, "early-sub").await;
    sub.subscribe(1, &topic, QoS::AtLeastOnce).await;

    let endpoint = client_endpoint(&broker);
    let id = unique("quic-0rtt");
    // A full handshake first, to be given a session ticket.
    {
        let conn = dial(&endpoint, addr).await;
        let mut control = QuicStream::open(&conn, ProtocolVersion::V5).await;
        control
            .send(&Packet::Connect(Box::new(connect_packet(
                ProtocolVersion::V5,
                &id,
            ))))
            .await;
        assert_eq!(control.expect_connack().await.code, ReasonCode::SUCCESS);
        control.disconnect().await;
        expect_app_close(&conn, 0).await;
    }

    // Resumed: CONNECT and a QoS 1 PUBLISH go out in early data, before the handshake.
    let connecting = endpoint.connect(addr, "localhost").unwrap();
    let Ok((conn, accepted)) = connecting.into_0rtt() else {
        panic!("no 0-RTT: the client holds no usable session ticket");
    };
    let mut control = QuicStream::open(&conn, ProtocolVersion::V5).await;
    let mut flight = control.encode(&Packet::Connect(Box::new(connect_packet(
        ProtocolVersion::V5,
        &id,
    ))));
    flight.extend_from_slice(&control.encode(&publish(
        &topic,
        QoS::AtLeastOnce,
        Some(1),
        b"early",
    )));
    control.send_raw(&flight).await;
    assert_eq!(control.expect_connack().await.code, ReasonCode::SUCCESS);
    control.expect_ack(PacketId(1), "PUBACK").await;
    assert!(
        tokio::time::timeout(WAIT, accepted)
            .await
            .expect("the handshake completes in time"),
        "the broker accepted the early data"
    );
    let got = sub.expect_publish().await;
    assert_eq!(&got.payload[..], b"early");
    sub.send(&Packet::PubAck(petrel::codec::Ack::new(
        id_of(&got),
        ReasonCode::SUCCESS,
    )))
    .await;
    // Exactly once.
    sub.expect_silence().await;
    broker.shutdown().await;
}

/// A v5 persistent session over QUIC: subscribed (on the control stream, or on a data
/// stream), the connection dies without DISCONNECT (the will goes out), a message is queued,
/// and the client comes back over QUIC to find its session and the message.
async fn persistent_session(subscribe_on_data_stream: bool) {
    let broker = broker_with(|_| {}).await;
    let topic = unique("persist");
    let will_topic = unique("persist-will");
    let id = unique("quic-persist");
    let mut watcher = tcp_client(&broker, "persist-watch").await;
    watcher.subscribe(1, &will_topic, QoS::AtLeastOnce).await;

    let mut connect = connect_packet(ProtocolVersion::V5, &id);
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    connect.will = Some(will(&will_topic, b"gone", QoS::AtLeastOnce));
    let (mut client, connack) = QuicClient::connect_with(&broker, connect.clone()).await;
    assert_eq!(
        (connack.code, connack.session_present),
        (ReasonCode::SUCCESS, false)
    );
    if subscribe_on_data_stream {
        let mut data = client.data_stream().await;
        data.subscribe(1, &topic, QoS::AtLeastOnce).await;
    } else {
        client.control.subscribe(1, &topic, QoS::AtLeastOnce).await;
    }
    // Abrupt: no DISCONNECT.
    client.conn.close(0u32.into(), b"");
    let got = watcher.expect_publish().await;
    assert_eq!(&got.payload[..], b"gone");

    let mut publisher = tcp_client(&broker, "persist-pub").await;
    publisher
        .publish_acked(publish_struct(&topic, QoS::AtLeastOnce, Some(1), b"queued"))
        .await;

    // Back over QUIC. A data stream opened (and written) before CONNECT must not be taken
    // for the old connection's stream of the same index.
    connect.will = None;
    let endpoint = client_endpoint(&broker);
    let conn = dial(&endpoint, quic_addr(&broker)).await;
    let mut control = QuicStream::open(&conn, ProtocolVersion::V5).await;
    let mut data = QuicStream::open(&conn, ProtocolVersion::V5).await;
    let elsewhere = unique("elsewhere");
    data.send(&subscribe_packet(
        3,
        &elsewhere,
        qos_options(QoS::AtMostOnce),
    ))
    .await;
    data.expect_silence().await;
    control.send(&Packet::Connect(Box::new(connect))).await;
    let connack = control.expect_connack().await;
    assert_eq!(
        (connack.code, connack.session_present),
        (ReasonCode::SUCCESS, true)
    );
    let queued = control.expect_publish().await;
    assert_eq!(
        (queued.topic.as_str(), &queued.payload[..]),
        (topic.as_str(), &b"queued"[..])
    );
    control.puback(id_of(&queued)).await;
    match data.expect_packet().await {
        Packet::SubAck(suback) => assert_eq!(suback.packet_id, 3),
        other => panic!("expected only the SUBACK on the new data stream, got {other:?}"),
    }
    super::expect_silence_on(&mut [&mut data, &mut control]).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn quic_persistent_session_resumes_after_abrupt_close() {
    persistent_session(false).await;
}

#[tokio::test]
async fn quic_persistent_session_data_stream_subscription_resumes_on_control() {
    persistent_session(true).await;
}

#[tokio::test]
async fn quic_retry_address_validation_still_connects() {
    // With `quic.retry`, every new client is first sent a Retry and must come back with the
    // token before any handshake work; a broken validation path would never connect.
    let broker = broker_with(|c| c.quic.retry = true).await;
    let topic = unique("quic-retry");
    let mut client = QuicClient::v5(&broker, &unique("quic-retry")).await;
    client.control.subscribe(1, &topic, QoS::AtLeastOnce).await;
    client
        .control
        .publish_acked(publish_struct(
            &topic,
            QoS::AtLeastOnce,
            Some(2),
            b"validated",
        ))
        .await;
    let delivered = client.control.expect_publish().await;
    assert_eq!(&delivered.payload[..], b"validated");
    broker.shutdown().await;
}

/// The control stream is read and written by the connection's own task (no stream task):
/// however it ends while the client is idle — finished (FIN), stopped (STOP_SENDING) or
/// carrying a malformed packet — the broker notices at once, closes the connection and
/// publishes the will; a malformed packet closes with 0x81 as the QUIC error code.
#[tokio::test]
async fn quic_control_stream_ending_ends_the_connection_with_its_will() {
    let broker = broker_with(|_| {}).await;
    for how in ["finish", "stop", "malformed"] {
        let topic = unique(&format!("control-end-{how}"));
        let mut watcher = tcp_client(&broker, "control-end-watch").await;
        watcher.subscribe(1, &topic, QoS::AtLeastOnce).await;
        let mut connect = connect_packet(ProtocolVersion::V5, &unique("control-end"));
        connect.will = Some(will(&topic, how.as_bytes(), QoS::AtLeastOnce));
        let (mut client, connack) = QuicClient::connect_with(&broker, connect).await;
        assert_eq!(connack.code, ReasonCode::SUCCESS, "{how}: {connack:?}");
        // Idle and known to be served before the control stream ends.
        client.control.send(&Packet::PingReq).await;
        assert!(matches!(
            client.control.expect_packet().await,
            Packet::PingResp
        ));
        match how {
            "finish" => client.control.send.finish().unwrap(),
            "stop" => client
                .control
                .recv
                .stop(quinn::VarInt::from_u32(0))
                .unwrap(),
            // A remaining length of five bytes.
            _ => {
                client
                    .control
                    .send_raw(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01])
                    .await
            }
        }
        if how == "malformed" {
            expect_app_close(&client.conn, ReasonCode::MALFORMED_PACKET.0).await;
        } else {
            super::conn_closed(&client.conn).await;
        }
        let got = watcher.expect_publish().await;
        assert_eq!(got.topic, topic, "{how}");
        assert_eq!(&got.payload[..], how.as_bytes(), "{how}: the will");
    }
    broker.shutdown().await;
}
