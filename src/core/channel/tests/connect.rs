//! CONNECT and CONNACK: keep-alive negotiation, client ids, the first-packet rules, identity.

use super::*;

#[test]
fn server_keep_alive_caps_v5_keep_alive() {
    let limits = Limits {
        max_keepalive: 30,
        ..Limits::default()
    };
    let mut h = Harness::new(limits);
    let mut c = connect(ProtocolVersion::V5, "cap");
    c.keep_alive = 600;
    let connack = h.connect(c);
    assert_eq!(connack.properties.server_keep_alive, Some(30));
    let start = h.now;
    h.advance_to_deadline();
    assert_eq!(h.now, start + Duration::from_secs(45));
}

#[test]
fn client_id_rules_differ_by_version() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V311, "");
    c.clean_start = false;
    h.channel.handle_packet(h.now, Packet::Connect(Box::new(c)));
    h.version = ProtocolVersion::V311;
    match h.packets().as_slice() {
        [Packet::ConnAck(ack)] => assert_eq!(ack.code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
        other => panic!("expected a refusal, got {other:?}"),
    }

    let mut h = Harness::new(Limits::default());
    h.channel.handle_packet(
        h.now,
        Packet::Connect(Box::new(connect(ProtocolVersion::V31, ""))),
    );
    h.version = ProtocolVersion::V31;
    assert!(matches!(h.packets().as_slice(), [Packet::ConnAck(a)] if a.code.is_failure()));

    let mut h = Harness::new(Limits::default());
    let connack = h.connect(connect(ProtocolVersion::V5, ""));
    let assigned = connack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("[MQTT-3.2.2-16]");
    assert!(!assigned.is_empty());
}

#[test]
fn second_connect_and_first_packet_rules() {
    let mut h = Harness::new(Limits::default());
    h.packet(Packet::PingReq);
    assert!(
        h.channel.is_closed(),
        "[MQTT-3.1.0-1] first packet must be CONNECT"
    );

    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "twice"));
    h.packet(Packet::Connect(Box::new(connect(
        ProtocolVersion::V5,
        "twice",
    ))));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::PROTOCOL_ERROR
        ))]
    );
}

#[test]
fn the_transports_peer_username_replaces_the_connect_username() {
    let mut h = Harness::new(Limits::default());
    h.channel.set_peer_username("petrel-client".into());
    let mut c = connect(ProtocolVersion::V311, "mtls");
    c.username = Some("claimed".into());
    let connack = h.connect(c);
    assert_eq!(connack.code, ReasonCode::SUCCESS);
    assert_eq!(h.channel.username(), Some("petrel-client"));

    let mut plain = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, "plain");
    c.username = Some("claimed".into());
    plain.connect(c);
    assert_eq!(plain.channel.username(), Some("claimed"));
}

/// A 3.1.1 client cannot be told a Server Keep Alive, so the ceiling holds on the broker's
/// side: keep-alive 0 (none) and one above `max_keepalive` both time out at 1.5 times the
/// ceiling, and the CONNACK is the plain 3.1.1 one.
#[test]
fn v3_keep_alive_is_capped_on_the_broker_side() {
    for asked in [0, 600] {
        let mut h = Harness::new(Limits {
            max_keepalive: 30,
            ..Limits::default()
        });
        let mut c = connect(ProtocolVersion::V311, "v3cap");
        c.keep_alive = asked;
        let connack = h.connect(c);
        assert_eq!(connack.code, ReasonCode::SUCCESS);
        let start = h.now;
        h.advance_to_deadline();
        assert_eq!(h.now, start + Duration::from_secs(45), "asked {asked}");
        assert!(h.channel.is_closed());
        assert_eq!(h.close().reason, ReasonCode::KEEP_ALIVE_TIMEOUT);
    }
    // Below the ceiling the client's own value holds.
    let mut h = Harness::new(Limits {
        max_keepalive: 30,
        ..Limits::default()
    });
    let mut c = connect(ProtocolVersion::V311, "v3ok");
    c.keep_alive = 10;
    h.connect(c);
    let start = h.now;
    h.advance_to_deadline();
    assert_eq!(h.now, start + Duration::from_secs(15));
}

/// A client that sends and never reads: the shell reports the backlog after each turn; past
/// the ceiling (never below one delivery above the high-water mark) the channel closes with
/// 0x97 and publishes the will, as for any abnormal close.
#[test]
fn output_backlog_past_the_ceiling_closes_with_quota_exceeded() {
    let limits = Limits {
        max_outbound_buffer: 64 * 1024,
        max_packet_size: 16 * 1024,
        ..Limits::default()
    };
    let ceiling = limits.outbound_ceiling();
    assert_eq!(
        ceiling,
        DELIVERY_BACKLOG + 16 * 1024 + 64 * 1024,
        "raised to fit one delivery"
    );
    let mut h = Harness::new(limits);
    let mut c = connect(ProtocolVersion::V5, "deaf");
    c.will = Some(Will {
        topic: "will/deaf".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    h.connect(c);
    assert!(!h.channel.handle_backlog(ceiling));
    assert!(!h.channel.is_closed());
    assert!(h.channel.handle_backlog(ceiling + 1));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::QUOTA_EXCEEDED
        ))]
    );
    let close = h.close();
    assert_eq!(close.reason, ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(close.initiator, Initiator::Broker);
    assert!(close.will.is_some());
    // Zero is no limit.
    let unlimited = Limits {
        max_outbound_buffer: 0,
        ..Limits::default()
    };
    assert_eq!(unlimited.outbound_ceiling(), usize::MAX);
    // The default: 4 MiB.
    assert_eq!(Limits::default().outbound_ceiling(), 4 * 1024 * 1024);
}

/// What a resumed session resends at CONNACK is written at once, whatever the client's
/// reading speed: it is allowed on top of the ceiling, so a reconnecting slow reader is not
/// taken for one that never reads (the allowance is bounded by the in-flight window).
#[test]
fn resends_at_connack_do_not_count_against_the_output_ceiling() {
    let limits = Limits {
        max_outbound_buffer: 1,
        max_packet_size: 128 * 1024,
        ..Limits::default()
    };
    let ceiling = limits.outbound_ceiling();
    let mut h = Harness::new(limits.clone());
    let mut c = connect(ProtocolVersion::V311, "resume-big");
    c.clean_start = false;
    h.connect(c.clone());
    for _ in 0..20 {
        let mut d = delivery("big", QoS::AtLeastOnce);
        let mut message = (*d.message).clone();
        message.payload = Bytes::from(vec![0u8; 100 * 1024]);
        d.message = Arc::new(message);
        h.channel.deliver(h.now, d);
        h.packets();
    }
    h.channel.handle_transport_closed();
    let session = h.close().session.expect("the session survives");

    let mut h2 = Harness::new(limits);
    h2.session = Some(session);
    h2.version = ProtocolVersion::V311;
    h2.channel
        .handle_packet(h2.now, Packet::Connect(Box::new(c)));
    assert!(matches!(
        h2.channel.poll_action(),
        Some(Action::Connect { .. })
    ));
    let parked = h2.session.take();
    h2.channel.accept(h2.now, parked);
    let backlog = h2.channel.out().len();
    assert!(backlog > ceiling, "the resends alone pass the ceiling");
    assert!(!h2.channel.handle_backlog(backlog));
    // The CONNACK before the resends is not part of the allowance.
    assert!(!h2.channel.handle_backlog(backlog + ceiling - 4));
    assert!(h2.channel.handle_backlog(backlog + ceiling + 1));
}
