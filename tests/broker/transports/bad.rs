//! Bad input per transport: the wrong protocol on a port, WebSocket framing edge cases, and
//! handshakes that stall (bad-input item 30).

use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use petrel::codec::{Packet, ProtocolVersion, QoS};
use petrel::transport::ws::WsStream;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::*;
use crate::common::{
    assert_broker_healthy, connect_packet, publish, qos_options, subscribe_packet,
};

/// Opens a WebSocket to `path` offering `protocols`; returns the stream and the subprotocol
/// the broker answered with.
async fn ws_open(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
) -> Result<(WebSocketStream<TcpStream>, Option<String>), tungstenite::Error> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for protocol in protocols {
        request.headers_mut().append(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_str(protocol).unwrap(),
        );
    }
    let stream = tcp(addr).await;
    let (ws, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
            .await
            .expect("the upgrade ends in time")?;
    let chosen = response
        .headers()
        .get(SEC_WEBSOCKET_PROTOCOL)
        .map(|v| v.to_str().unwrap().to_owned());
    Ok((ws, chosen))
}

fn encoded(packets: &[Packet]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for packet in packets {
        encode(packet, ProtocolVersion::V5, &mut out);
    }
    out.to_vec()
}

fn connect_v5(client_id: &str) -> Packet {
    Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, client_id)))
}

/// The broker ends the WebSocket (close message, end of stream or error) within [`WAIT`].
async fn expect_ws_closed(ws: &mut WebSocketStream<TcpStream>) {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the broker closes the WebSocket in time");
}

#[tokio::test]
async fn tls_port_closes_plaintext_mqtt_and_stays_healthy() {
    let broker = TransportBroker::start().await;
    let mut stream = tcp(broker.addr(ListenerKind::Tls)).await;
    stream
        .write_all(&encoded(&[connect_v5(&unique("plain"))]))
        .await
        .unwrap();
    read_until_closed(&mut stream, WAIT).await;
    assert_broker_healthy(broker.addr(ListenerKind::Tcp)).await;
    let (v4, _) = V4::connect_with(v4_options(&broker, ListenerKind::Tls, &unique("after"))).await;
    v4.disconnect().await;
    broker.shutdown().await;
}

#[tokio::test]
async fn tcp_port_closes_a_tls_client_hello() {
    let broker = TransportBroker::start().await;
    let config = tls_client(&broker.ca_path(), None);
    let attempt = tls(broker.addr(ListenerKind::Tcp), config).await;
    assert!(
        attempt.is_err(),
        "a TLS handshake with the TCP listener must fail"
    );
    assert_broker_healthy(broker.addr(ListenerKind::Tcp)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn ws_several_packets_in_one_frame_are_all_handled() {
    let broker = TransportBroker::start().await;
    let (ws, chosen) = ws_open(broker.addr(ListenerKind::Ws), "/mqtt", &["mqtt"])
        .await
        .unwrap();
    assert_eq!(chosen.as_deref(), Some("mqtt"));
    let mut raw = Raw::new(WsStream::new(ws), ProtocolVersion::V5);
    let topic = unique("ws-batch");
    let frame = encoded(&[
        connect_v5(&unique("ws-batch")),
        subscribe_packet(1, &topic, qos_options(QoS::AtLeastOnce)),
        publish(&topic, QoS::AtLeastOnce, Some(7), b"one frame"),
    ]);
    // Through the adapter, one write and one flush make one binary message.
    raw.stream.write_all(&frame).await.unwrap();
    raw.stream.flush().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(raw.next().await.expect("the broker answers every packet"));
    }
    assert!(matches!(got[0], Packet::ConnAck(_)), "{got:?}");
    assert!(matches!(got[1], Packet::SubAck(_)), "{got:?}");
    assert!(
        got.iter()
            .any(|p| matches!(p, Packet::PubAck(a) if a.packet_id == 7)),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|p| matches!(p, Packet::Publish(p) if &p.payload[..] == b"one frame")),
        "{got:?}"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn ws_packet_split_across_frames_is_reassembled() {
    let broker = TransportBroker::start().await;
    let (mut ws, _) = ws_open(broker.addr(ListenerKind::Ws), "/mqtt", &["mqtt"])
        .await
        .unwrap();
    let bytes = encoded(&[connect_v5(&unique("ws-split"))]);
    for piece in [&bytes[..1], &bytes[1..5], &bytes[5..]] {
        ws.send(Message::Binary(piece.to_vec())).await.unwrap();
    }
    let mut raw = Raw::new(WsStream::new(ws), ProtocolVersion::V5);
    assert!(matches!(raw.next().await, Some(Packet::ConnAck(_))));
    broker.shutdown().await;
}

#[tokio::test]
async fn ws_text_frame_closes_the_connection() {
    let broker = TransportBroker::start().await;
    let (mut ws, _) = ws_open(broker.addr(ListenerKind::Ws), "/mqtt", &["mqtt"])
        .await
        .unwrap();
    ws.send(Message::Binary(encoded(&[connect_v5(&unique("ws-text"))])))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(_))) => {}
        other => panic!("expected CONNACK in a binary message, got {other:?}"),
    }
    ws.send(Message::Text("{\"not\": \"mqtt\"}".into()))
        .await
        .unwrap();
    expect_ws_closed(&mut ws).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn ws_frame_above_max_packet_size_closes_the_connection() {
    let broker = TransportBroker::start_with(|c| c.mqtt.max_packet_size = 1024).await;
    let (mut ws, _) = ws_open(broker.addr(ListenerKind::Ws), "/mqtt", &["mqtt"])
        .await
        .unwrap();
    ws.send(Message::Binary(encoded(&[connect_v5(&unique("ws-big"))])))
        .await
        .unwrap();
    match ws.next().await {
        Some(Ok(Message::Binary(_))) => {}
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // Some bytes of a PUBLISH header, then padding: the frame alone is over the limit.
    let mut frame = vec![0x30, 0x7F];
    frame.resize(4096, 0);
    let _ = ws.send(Message::Binary(frame)).await;
    expect_ws_closed(&mut ws).await;
    assert_broker_healthy(broker.addr(ListenerKind::Tcp)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn ws_missing_subprotocol_is_accepted_and_offered_ones_are_answered() {
    let broker = TransportBroker::start().await;
    let addr = broker.addr(ListenerKind::Ws);
    let (ws, chosen) = ws_open(addr, "/mqtt", &[]).await.unwrap();
    assert_eq!(chosen, None);
    let mut raw = Raw::new(WsStream::new(ws), ProtocolVersion::V5);
    raw.send(&connect_v5(&unique("ws-noproto"))).await;
    assert!(matches!(raw.next().await, Some(Packet::ConnAck(_))));
    for (offered, answer) in [("mqttv3.1", "mqttv3.1"), ("chat, mqtt-v5", "mqtt-v5")] {
        let (_, chosen) = ws_open(addr, "/mqtt", &[offered]).await.unwrap();
        assert_eq!(chosen.as_deref(), Some(answer), "offered {offered}");
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn ws_wrong_path_or_foreign_subprotocol_is_refused() {
    let broker = TransportBroker::start().await;
    let addr = broker.addr(ListenerKind::Ws);
    for (path, protocols, status) in [
        ("/other", &["mqtt"][..], StatusCode::NOT_FOUND),
        ("/mqtt", &["chat"][..], StatusCode::BAD_REQUEST),
    ] {
        match ws_open(addr, path, protocols).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), status, "{path}")
            }
            Err(other) => panic!("expected an HTTP refusal for {path}, got {other:?}"),
            Ok(_) => panic!("the upgrade to {path} {protocols:?} was accepted"),
        }
    }
    broker.shutdown().await;
}

#[tokio::test]
async fn wss_carries_several_packets_per_frame_too() {
    let broker = TransportBroker::start().await;
    let stream = tls(
        broker.addr(ListenerKind::Wss),
        tls_client(&broker.ca_path(), None),
    )
    .await
    .unwrap();
    let request = format!(
        "wss://localhost:{}/mqtt",
        broker.addr(ListenerKind::Wss).port()
    );
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(request, stream))
        .await
        .unwrap()
        .unwrap();
    let mut raw = Raw::new(WsStream::new(ws), ProtocolVersion::V5);
    let topic = unique("wss-batch");
    let frame = encoded(&[
        connect_v5(&unique("wss-batch")),
        subscribe_packet(1, &topic, qos_options(QoS::AtMostOnce)),
    ]);
    raw.stream.write_all(&frame).await.unwrap();
    raw.stream.flush().await.unwrap();
    assert!(matches!(raw.next().await, Some(Packet::ConnAck(_))));
    assert!(matches!(raw.next().await, Some(Packet::SubAck(_))));
    broker.shutdown().await;
}

const SHORT: Duration = Duration::from_millis(300);

async fn broker_with_short_handshakes() -> TransportBroker {
    TransportBroker::start_with(|c| {
        for listener in &mut c.listeners {
            listener.handshake_timeout = SHORT;
        }
    })
    .await
}

/// Connects, sends `bytes`, and checks the broker hangs up after the handshake timeout (and
/// not before it), long before the MQTT connect timeout.
async fn expect_stall_closed(addr: SocketAddr, bytes: &[u8]) {
    let started = Instant::now();
    let mut stream = tcp(addr).await;
    stream.write_all(bytes).await.unwrap();
    read_until_closed(&mut stream, WAIT).await;
    let waited = started.elapsed();
    assert!(
        waited >= SHORT - Duration::from_millis(50),
        "closed after only {waited:?}"
    );
}

#[tokio::test]
async fn tls_handshake_stall_is_closed_after_handshake_timeout() {
    let broker = broker_with_short_handshakes().await;
    expect_stall_closed(broker.addr(ListenerKind::Tls), b"").await;
    // Half a ClientHello record header is a stall too.
    expect_stall_closed(broker.addr(ListenerKind::Wss), &[0x16, 0x03, 0x01]).await;
    assert_broker_healthy(broker.addr(ListenerKind::Tcp)).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn ws_upgrade_stall_is_closed_after_handshake_timeout() {
    let broker = broker_with_short_handshakes().await;
    expect_stall_closed(
        broker.addr(ListenerKind::Ws),
        b"GET /mqtt HTTP/1.1\r\nHost: x\r\n",
    )
    .await;
    // WSS: the TLS handshake completes, then the upgrade never comes.
    let started = Instant::now();
    let mut stream = tls(
        broker.addr(ListenerKind::Wss),
        tls_client(&broker.ca_path(), None),
    )
    .await
    .unwrap();
    read_until_closed(&mut stream, WAIT).await;
    assert!(started.elapsed() >= SHORT - Duration::from_millis(50));
    broker.shutdown().await;
}
