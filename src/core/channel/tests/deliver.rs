//! Outbound PUBLISH: the window, resends, outbound aliases, expiry, Maximum Packet Size.

use super::*;

#[test]
fn outgoing_window_honours_the_client_receive_maximum() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, "win");
    c.properties.receive_maximum = Some(2);
    h.connect(c);
    let mut sent = 0;
    while h.channel.can_deliver() && sent < 10 {
        h.channel.deliver(h.now, delivery("t", QoS::AtLeastOnce));
        sent += 1;
    }
    assert_eq!(
        sent, 2,
        "the window closes after the client's Receive Maximum"
    );
    let ids: Vec<PacketId> = h
        .packets()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => p.packet_id,
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 2);
    h.packet(Packet::PubAck(Ack::new(ids[0], ReasonCode::SUCCESS)));
    assert!(h.channel.can_deliver(), "a PUBACK reopens the window");
}

#[test]
fn unacknowledged_messages_are_resent_with_dup_on_reconnect() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V311, "resend");
    c.clean_start = false;
    h.connect(c.clone());
    h.channel.deliver(h.now, delivery("a", QoS::AtLeastOnce));
    h.channel.deliver(h.now, delivery("b", QoS::ExactlyOnce));
    let first = h.packets();
    assert_eq!(first.len(), 2);
    // PUBREC for the QoS 2 message, then the connection drops before PUBCOMP.
    let Packet::Publish(qos2) = &first[1] else {
        panic!("expected PUBLISH")
    };
    h.packet(Packet::PubRec(Ack::new(
        qos2.packet_id.unwrap(),
        ReasonCode::SUCCESS,
    )));
    h.packets();
    h.channel.handle_transport_closed();
    let session = h.close().session.expect("the session survives");

    let mut h2 = Harness::new(Limits::default());
    h2.session = Some(session);
    let (connack, resent) = h2.connect_and_resends(c);
    assert!(connack.session_present);
    match (&resent[0], &resent[1]) {
        (Packet::Publish(p), Packet::PubRel(rel)) => {
            assert!(p.dup, "[MQTT-4.4.0-1] resent with DUP");
            assert_eq!(p.topic, "a");
            assert_eq!(rel.packet_id, qos2.packet_id.unwrap());
        }
        other => panic!("expected PUBLISH dup then PUBREL, got {other:?}"),
    }
}

#[test]
fn outbound_topic_alias_replaces_the_topic_after_first_use() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, "out-alias");
    c.properties.topic_alias_maximum = Some(1);
    h.connect(c);
    for topic in ["a/b", "a/b", "c"] {
        h.channel.deliver(h.now, delivery(topic, QoS::AtMostOnce));
    }
    let sent: Vec<(String, Option<u16>)> = h
        .packets()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((p.topic, p.properties.topic_alias)),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        vec![
            ("a/b".into(), Some(1)),
            (String::new(), Some(1)),
            ("c".into(), None)
        ],
        "one alias allowed: the second topic goes out in full"
    );
}

/// The aliases we teach the client are held for the connection too: within
/// `max_topic_alias_bytes`, then topics go out in full (known aliases still serve).
#[test]
fn outbound_topic_aliases_stay_within_the_byte_budget() {
    let mut h = Harness::new(Limits {
        max_topic_alias_bytes: 2 * (32 + 3),
        ..Limits::default()
    });
    let mut c = connect(ProtocolVersion::V5, "out-alias-bytes");
    c.properties.topic_alias_maximum = Some(100);
    h.connect(c);
    for topic in ["a/1", "a/2", "a/3", "a/1", "a/3"] {
        h.channel.deliver(h.now, delivery(topic, QoS::AtMostOnce));
    }
    let sent: Vec<(String, Option<u16>)> = h
        .packets()
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((p.topic, p.properties.topic_alias)),
            _ => None,
        })
        .collect();
    assert_eq!(
        sent,
        vec![
            ("a/1".into(), Some(1)),
            ("a/2".into(), Some(2)),
            ("a/3".into(), None),
            (String::new(), Some(1)),
            ("a/3".into(), None),
        ]
    );
}

#[test]
fn message_expiry_is_decremented_and_expired_messages_are_dropped() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "exp"));
    let mut p = publish("t", QoS::AtMostOnce, None);
    p.properties.message_expiry_interval = Some(10);
    let message = Arc::new(AppMessage::from_publish(
        TopicName::parse(p.topic.clone(), 0).unwrap(),
        p,
        None,
        h.now,
    ));
    let d = Delivery {
        message,
        qos: QoS::AtMostOnce,
        retain: false,
        subscription_ids: vec![4],
        flow: Flow::CONTROL,
        shared: None,
        stored: None,
    };
    h.now += Duration::from_secs(3);
    h.channel.deliver(h.now, d.clone());
    match h.packets().as_slice() {
        [Packet::Publish(p)] => {
            assert_eq!(p.properties.message_expiry_interval, Some(7));
            assert_eq!(p.properties.subscription_identifiers, vec![4]);
        }
        other => panic!("expected one PUBLISH, got {other:?}"),
    }
    h.now += Duration::from_secs(8);
    h.channel.deliver(h.now, d);
    assert!(
        h.packets().is_empty(),
        "expired messages are never delivered"
    );
    assert_eq!(h.channel.dropped, 1);
}

#[test]
fn too_large_deliveries_are_dropped_for_that_client() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, "small");
    // Room for the CONNACK (24 bytes), not for the delivery.
    c.properties.maximum_packet_size = Some(30);
    h.connect(c);
    h.channel.deliver(
        h.now,
        delivery("a/very/long/topic/name/indeed", QoS::AtLeastOnce),
    );
    assert!(h.packets().is_empty());
    assert_eq!(h.channel.dropped, 1);
    assert!(
        h.channel.can_deliver(),
        "a dropped message does not take a window slot"
    );
}
