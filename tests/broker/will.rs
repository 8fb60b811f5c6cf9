//! `will_`: when the will is published, when not, delay, and its properties.

use std::time::Duration;

use bytes::Bytes;
use petrel::codec::{Connect, Disconnect, Packet, ProtocolVersion, QoS, ReasonCode};

use crate::common::*;

async fn watcher(addr: std::net::SocketAddr, filter: &str) -> RawClient {
    let (mut watcher, _) = RawClient::connect_v5(addr, &unique("watcher")).await;
    watcher.subscribe(1, filter, QoS::AtLeastOnce).await;
    watcher
}

fn with_will(version: ProtocolVersion, id: &str, topic: &str) -> Connect {
    let mut connect = connect_packet(version, id);
    connect.will = Some(will(topic, b"offline", QoS::AtLeastOnce));
    connect
}

#[tokio::test]
async fn will_published_on_socket_drop() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let mut options = V4::options(broker.addr, "dropper");
    options.set_last_will(rumqttc::LastWill::new(
        "wills/dropper",
        "offline",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (client, _) = V4::connect_with(options).await;
    drop(client); // aborts the event loop: the socket closes without DISCONNECT
    let got = watcher.expect_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("wills/dropper", &b"offline"[..])
    );
}

#[tokio::test]
async fn will_retained_when_asked() {
    let broker = TestBroker::start().await;
    let mut connect = with_will(ProtocolVersion::V311, "r", "wills/r");
    connect.will.as_mut().unwrap().retain = true;
    let (client, _) = RawClient::connect_ok(broker.addr, connect).await;
    drop(client);
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let got = watcher.expect_publish().await;
    assert!(got.retain && got.topic == "wills/r");
}

#[tokio::test]
async fn will_not_published_on_normal_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let (v311, _) = RawClient::connect_ok(
        broker.addr,
        with_will(ProtocolVersion::V311, "a", "wills/a"),
    )
    .await;
    v311.disconnect().await;
    let (v5, _) =
        RawClient::connect_ok(broker.addr, with_will(ProtocolVersion::V5, "b", "wills/b")).await;
    v5.disconnect().await;
    let mut options = V5::options(broker.addr, "c");
    options.set_last_will(v5p::LastWill::new(
        "wills/c",
        "offline",
        V5QoS::AtLeastOnce,
        false,
        None,
    ));
    let (client, _) = V5::connect_with(options).await;
    client.disconnect().await;
    watcher.expect_silence().await;
}

#[tokio::test]
async fn will_v5_disconnect_with_will_message_publishes_it() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let (mut client, _) = RawClient::connect_ok(
        broker.addr,
        with_will(ProtocolVersion::V5, "w4", "wills/w4"),
    )
    .await;
    client
        .send(&Packet::Disconnect(Disconnect::new(
            ReasonCode::DISCONNECT_WITH_WILL,
        )))
        .await;
    assert!(client.expect_closed().await.is_empty());
    assert_eq!(watcher.expect_publish().await.topic, "wills/w4");
}

#[tokio::test]
async fn will_delay_cancelled_by_reconnect_within_the_delay() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let delayed = |id: &str, clean_start: bool| {
        let mut connect = with_will(ProtocolVersion::V5, id, &format!("wills/{id}"));
        connect.clean_start = clean_start;
        connect.properties.session_expiry_interval = Some(60);
        connect
            .will
            .as_mut()
            .unwrap()
            .properties
            .will_delay_interval = Some(1);
        connect
    };
    // `back` drops and reconnects at once; `away` drops later and stays away.
    let (back, _) = RawClient::connect_ok(broker.addr, delayed("back", true)).await;
    drop(back);
    let (_back, connack) = RawClient::connect_ok(broker.addr, delayed("back", false)).await;
    assert!(connack.session_present);
    let (away, _) = RawClient::connect_ok(broker.addr, delayed("away", true)).await;
    drop(away);
    // `away`'s will comes after its delay; by then `back`'s delay (started earlier) has
    // passed too, and it must not have fired.
    let got = watcher.expect_publish().await;
    assert_eq!(got.topic, "wills/away");
    watcher.expect_silence().await;
}

#[tokio::test]
async fn will_delay_postpones_publication() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let mut connect = with_will(ProtocolVersion::V5, "late", "wills/late");
    connect.properties.session_expiry_interval = Some(60);
    connect
        .will
        .as_mut()
        .unwrap()
        .properties
        .will_delay_interval = Some(1);
    let (client, _) = RawClient::connect_ok(broker.addr, connect).await;
    let dropped_at = tokio::time::Instant::now();
    drop(client);
    watcher.expect_publish().await;
    assert!(
        dropped_at.elapsed() >= Duration::from_millis(900),
        "published after {:?}",
        dropped_at.elapsed()
    );
}

#[tokio::test]
async fn will_published_when_session_ends_before_the_delay() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let mut connect = with_will(ProtocolVersion::V5, "short", "wills/short");
    connect.properties.session_expiry_interval = Some(0);
    connect
        .will
        .as_mut()
        .unwrap()
        .properties
        .will_delay_interval = Some(600);
    let (client, _) = RawClient::connect_ok(broker.addr, connect).await;
    drop(client);
    assert_eq!(watcher.expect_publish().await.topic, "wills/short");
}

#[tokio::test]
async fn will_properties_pass_through() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let properties = v5p::LastWillProperties {
        delay_interval: None,
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(300),
        content_type: Some("text/plain".into()),
        response_topic: Some("replies/here".into()),
        correlation_data: Some(Bytes::from_static(b"\x01\x02")),
        user_properties: vec![
            ("k1".into(), "v1".into()),
            ("k1".into(), "v2".into()),
            ("a".into(), "b".into()),
        ],
    };
    let mut options = V5::options(broker.addr, "props");
    options.set_last_will(v5p::LastWill::new(
        "wills/props",
        "bye",
        V5QoS::AtLeastOnce,
        false,
        Some(properties),
    ));
    let (client, _) = V5::connect_with(options).await;
    drop(client);
    let got = watcher.expect_publish().await;
    let p = &got.properties;
    assert_eq!(&got.payload[..], b"bye");
    assert_eq!(p.payload_format_indicator, Some(1));
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.response_topic.as_deref(), Some("replies/here"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
    let users: Vec<(&str, &str)> = p
        .user_properties
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(users, [("k1", "v1"), ("k1", "v2"), ("a", "b")]);
    assert!(
        matches!(p.message_expiry_interval, Some(1..=300)),
        "{:?}",
        p.message_expiry_interval
    );
}

#[tokio::test]
async fn will_message_expiry_counts_from_publication_not_connect() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let mut connect = with_will(ProtocolVersion::V5, "exp", "wills/exp");
    connect
        .will
        .as_mut()
        .unwrap()
        .properties
        .message_expiry_interval = Some(1);
    let (mut client, _) = RawClient::connect_ok(broker.addr, connect).await;
    // Stay connected longer than the will's expiry: its lifetime starts when it is published
    // [MQTT-3.1.3-9: "sent as the Publication Expiry Interval when the Server publishes"].
    tokio::time::sleep(Duration::from_millis(1300)).await;
    client.send(&Packet::PingReq).await;
    assert_eq!(client.expect_packet().await, Packet::PingResp);
    drop(client);
    let got = watcher.expect_publish().await;
    assert_eq!(got.topic, "wills/exp");
    assert_eq!(got.properties.message_expiry_interval, Some(1));
}

#[tokio::test]
async fn will_published_on_takeover_without_delay() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let connect = with_will(ProtocolVersion::V5, "taken", "wills/taken");
    let (mut old, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
    let (_new, _) = RawClient::connect_ok(broker.addr, connect).await;
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    assert_eq!(watcher.expect_publish().await.topic, "wills/taken");
    watcher.expect_silence().await;
}

#[tokio::test]
async fn will_with_delay_cancelled_by_takeover() {
    let broker = TestBroker::start().await;
    let mut watcher = watcher(broker.addr, "wills/+").await;
    let mut connect = with_will(ProtocolVersion::V5, "taken", "wills/taken");
    connect.properties.session_expiry_interval = Some(60);
    connect
        .will
        .as_mut()
        .unwrap()
        .properties
        .will_delay_interval = Some(1);
    let (mut old, _) = RawClient::connect_ok(broker.addr, connect.clone()).await;
    connect.clean_start = false;
    let (_new, connack) = RawClient::connect_ok(broker.addr, connect).await;
    assert!(connack.session_present);
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    // A positive control with the same delay that is not taken over.
    let mut control = with_will(ProtocolVersion::V5, "control", "wills/control");
    control.properties.session_expiry_interval = Some(60);
    control
        .will
        .as_mut()
        .unwrap()
        .properties
        .will_delay_interval = Some(1);
    let (control, _) = RawClient::connect_ok(broker.addr, control).await;
    drop(control);
    assert_eq!(watcher.expect_publish().await.topic, "wills/control");
    watcher.expect_silence().await;
}
