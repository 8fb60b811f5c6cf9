//! MQTT 5 enhanced authentication (§4.12): the AUTH exchange before CONNACK, re-authentication,
//! and the protocol errors around them. The shell's part (judging the data) is played here.

use super::*;
use crate::codec::Auth;

const METHOD: &str = "SCRAM-SHA-256";

fn auth(reason: ReasonCode, method: Option<&str>, data: &'static [u8]) -> Packet {
    let mut properties = Properties::default();
    properties.authentication_method = method.map(Into::into);
    properties.authentication_data = Some(Bytes::from_static(data));
    Packet::Auth(Auth { reason, properties })
}

fn connect_with_method(method: &str, data: &'static [u8]) -> Connect {
    let mut connect = connect(ProtocolVersion::V5, "c");
    connect.properties.authentication_method = Some(method.into());
    connect.properties.authentication_data = Some(Bytes::from_static(data));
    connect
}

/// The one action the channel asked for: an authentication step.
fn step(h: &mut Harness) -> AuthStep {
    let actions = h.actions();
    match <[Action; 1]>::try_from(actions) {
        Ok([Action::Authenticate(step)]) => step,
        Ok([other]) => panic!("expected an Authenticate action, got {other:?}"),
        Err(actions) => panic!("expected one Authenticate action, got {actions:?}"),
    }
}

/// CONNECT with a method, one round trip of AUTH 0x18, success: returns the CONNACK.
fn authenticated(h: &mut Harness) -> ConnAck {
    h.channel.handle_packet(
        h.now,
        Packet::Connect(Box::new(connect_with_method(METHOD, b"first"))),
    );
    let first = step(h);
    assert_eq!(
        first,
        AuthStep {
            method: Arc::from(METHOD),
            data: Bytes::from_static(b"first"),
            first: true,
            reauth: false,
        }
    );
    h.channel.auth_continue(Bytes::from_static(b"server-first"));
    match h.packets().as_slice() {
        [Packet::Auth(a)] => {
            assert_eq!(a.reason, ReasonCode::CONTINUE_AUTHENTICATION);
            assert_eq!(a.properties.authentication_method.as_deref(), Some(METHOD));
            assert_eq!(
                a.properties.authentication_data.as_deref(),
                Some(&b"server-first"[..])
            );
        }
        other => panic!("expected AUTH 0x18, got {other:?}"),
    }
    h.packet(auth(
        ReasonCode::CONTINUE_AUTHENTICATION,
        Some(METHOD),
        b"final",
    ));
    let last = step(h);
    assert!(!last.first && !last.reauth);
    assert_eq!(last.data, Bytes::from_static(b"final"));
    h.channel.auth_succeed(
        Some(Bytes::from_static(b"server-final")),
        Some("user".into()),
    );
    assert!(matches!(h.actions().as_slice(), [Action::Connect { .. }]));
    assert_eq!(h.channel.username(), Some("user"));
    h.channel.accept(h.now, None);
    match h.packets().as_slice() {
        [Packet::ConnAck(connack)] => connack.clone(),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[test]
fn auth_exchange_then_connack_with_the_method_and_final_data() {
    let mut h = Harness::new(Limits::default());
    let connack = authenticated(&mut h);
    assert_eq!(connack.code, ReasonCode::SUCCESS);
    // [MQTT-4.12.0-5]: the successful CONNACK carries the method of CONNECT.
    assert_eq!(
        connack.properties.authentication_method.as_deref(),
        Some(METHOD)
    );
    assert_eq!(
        connack.properties.authentication_data.as_deref(),
        Some(&b"server-final"[..])
    );
    assert!(h.channel.is_connected());
    assert_eq!(h.channel.auth_method(), Some(METHOD));
}

#[test]
fn a_failed_exchange_is_a_connack_refusal_without_will() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect_with_method(METHOD, b"first");
    c.will = Some(Will {
        topic: "w".into(),
        payload: Bytes::from_static(b"x"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties::default(),
    });
    h.channel.handle_packet(h.now, Packet::Connect(Box::new(c)));
    step(&mut h);
    // [MQTT-4.12.0-4]: the server may reject at any point, with CONNACK >= 0x80.
    h.channel.auth_fail(ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    match h.packets().as_slice() {
        [Packet::ConnAck(c)] => assert_eq!(c.code, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        other => panic!("expected CONNACK 0x86, got {other:?}"),
    }
    let close = h.close();
    assert!(close.will.is_none() && close.session.is_none());
    assert!(h.channel.is_closed());
}

#[test]
fn an_unknown_method_is_refused_with_0x8c() {
    let mut h = Harness::new(Limits::default());
    h.channel.handle_packet(
        h.now,
        Packet::Connect(Box::new(connect_with_method("KERBEROS", b""))),
    );
    let asked = step(&mut h);
    assert_eq!(&*asked.method, "KERBEROS");
    h.channel.auth_fail(ReasonCode::BAD_AUTHENTICATION_METHOD);
    match h.packets().as_slice() {
        [Packet::ConnAck(c)] => assert_eq!(c.code, ReasonCode::BAD_AUTHENTICATION_METHOD),
        other => panic!("expected CONNACK 0x8C, got {other:?}"),
    }
}

#[test]
fn only_auth_or_disconnect_may_come_before_connack() {
    // [MQTT-3.1.2-30]
    let mut h = Harness::new(Limits::default());
    h.channel.handle_packet(
        h.now,
        Packet::Connect(Box::new(connect_with_method(METHOD, b"first"))),
    );
    step(&mut h);
    h.channel.auth_continue(Bytes::from_static(b"s"));
    h.packets();
    h.packet(Packet::PingReq);
    match h.packets().as_slice() {
        [Packet::ConnAck(c)] => assert_eq!(c.code, ReasonCode::PROTOCOL_ERROR),
        other => panic!("expected CONNACK 0x82, got {other:?}"),
    }
    assert_eq!(h.close().reason, ReasonCode::PROTOCOL_ERROR);

    // A DISCONNECT ends the attempt quietly.
    let mut h = Harness::new(Limits::default());
    h.channel.handle_packet(
        h.now,
        Packet::Connect(Box::new(connect_with_method(METHOD, b"first"))),
    );
    step(&mut h);
    h.channel.auth_continue(Bytes::from_static(b"s"));
    h.packets();
    h.packet(Packet::Disconnect(Disconnect::new(
        ReasonCode::NORMAL_DISCONNECTION,
    )));
    assert!(h.packets().is_empty());
    assert_eq!(h.close().initiator, Initiator::Client);
}

#[test]
fn wrong_reason_or_method_during_the_exchange_is_a_protocol_error() {
    for (reason, method) in [
        // [MQTT-4.12.0-3]: the answer to AUTH 0x18 is AUTH 0x18.
        (ReasonCode::RE_AUTHENTICATE, Some(METHOD)),
        (ReasonCode::SUCCESS, Some(METHOD)),
        // [MQTT-4.12.0-5]: the same method as CONNECT.
        (ReasonCode::CONTINUE_AUTHENTICATION, Some("PLAIN")),
        (ReasonCode::CONTINUE_AUTHENTICATION, None),
    ] {
        let mut h = Harness::new(Limits::default());
        h.channel.handle_packet(
            h.now,
            Packet::Connect(Box::new(connect_with_method(METHOD, b"first"))),
        );
        step(&mut h);
        h.channel.auth_continue(Bytes::from_static(b"s"));
        h.packets();
        h.packet(auth(reason, method, b"x"));
        match h.packets().as_slice() {
            [Packet::ConnAck(c)] => {
                assert_eq!(c.code, ReasonCode::PROTOCOL_ERROR, "{reason:?} {method:?}")
            }
            other => panic!("{reason:?} {method:?}: expected CONNACK 0x82, got {other:?}"),
        }
    }

    // An AUTH while the shell still decides (no AUTH of ours to answer) is one too.
    let mut h = Harness::new(Limits::default());
    h.channel.handle_packet(
        h.now,
        Packet::Connect(Box::new(connect_with_method(METHOD, b"first"))),
    );
    step(&mut h);
    h.packet(auth(
        ReasonCode::CONTINUE_AUTHENTICATION,
        Some(METHOD),
        b"x",
    ));
    assert!(h.channel.is_closed());
    // The shell's late answer changes nothing.
    h.channel.auth_continue(Bytes::from_static(b"s"));
    assert!(
        matches!(h.packets().as_slice(), [Packet::ConnAck(c)] if c.code == ReasonCode::PROTOCOL_ERROR)
    );
}

#[test]
fn an_exchange_that_outlasts_the_connect_timeout_is_refused() {
    let mut h = Harness::new(Limits::default());
    h.channel.handle_packet(
        h.now,
        Packet::Connect(Box::new(connect_with_method(METHOD, b"first"))),
    );
    step(&mut h);
    h.channel.auth_continue(Bytes::from_static(b"s"));
    h.packets();
    let deadline = h.channel.poll_timeout().expect("the connect deadline");
    assert_eq!(deadline, h.now + Limits::default().connect_timeout);
    h.advance_to_deadline();
    match h.packets().as_slice() {
        [Packet::ConnAck(c)] => assert_eq!(c.code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected CONNACK 0x87, got {other:?}"),
    }
    assert!(h.channel.is_closed());
}

#[test]
fn reauthentication_runs_beside_traffic_and_ends_with_auth_success() {
    let mut h = Harness::new(Limits::default());
    authenticated(&mut h);
    // [MQTT-4.12.1-1]: AUTH 0x19 with the same method starts it.
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"again"));
    let first = step(&mut h);
    assert!(first.first && first.reauth);
    assert_eq!(first.data, Bytes::from_static(b"again"));
    h.channel.auth_continue(Bytes::from_static(b"server-first"));
    assert!(
        matches!(h.packets().as_slice(), [Packet::Auth(a)] if a.reason == ReasonCode::CONTINUE_AUTHENTICATION)
    );
    // Other packets flow meanwhile, under the previous authentication.
    h.packet(Packet::PingReq);
    assert_eq!(h.packets(), vec![Packet::PingResp]);
    h.packet(auth(
        ReasonCode::CONTINUE_AUTHENTICATION,
        Some(METHOD),
        b"final",
    ));
    let last = step(&mut h);
    assert!(!last.first && last.reauth);
    h.channel
        .auth_succeed(Some(Bytes::from_static(b"server-final")), None);
    match h.packets().as_slice() {
        [Packet::Auth(a)] => {
            assert_eq!(a.reason, ReasonCode::SUCCESS);
            assert_eq!(a.properties.authentication_method.as_deref(), Some(METHOD));
            assert_eq!(
                a.properties.authentication_data.as_deref(),
                Some(&b"server-final"[..])
            );
        }
        other => panic!("expected AUTH 0x00, got {other:?}"),
    }
    assert!(h.channel.is_connected());
    assert_eq!(h.channel.username(), Some("user"));
    // And again, later.
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"third"));
    assert!(step(&mut h).first);
}

#[test]
fn a_failed_reauthentication_disconnects() {
    let mut h = Harness::new(Limits::default());
    authenticated(&mut h);
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"again"));
    step(&mut h);
    // [MQTT-4.12.1-2]: DISCONNECT with a reason code, then close.
    h.channel.auth_fail(ReasonCode::NOT_AUTHORIZED);
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::NOT_AUTHORIZED
        ))]
    );
    let close = h.close();
    assert_eq!(close.reason, ReasonCode::NOT_AUTHORIZED);
    assert_eq!(close.initiator, Initiator::Broker);
    assert!(close.session.is_some());
}

#[test]
fn reauthentication_protocol_errors_disconnect_with_0x82() {
    for (name, reason, method) in [
        // [MQTT-4.12.1-1]: the method CONNECT used, nothing else.
        ("another method", ReasonCode::RE_AUTHENTICATE, Some("PLAIN")),
        ("no method", ReasonCode::RE_AUTHENTICATE, None),
        // Only 0x19 starts one; 0x18 without our AUTH and 0x00 from a client are errors.
        (
            "unasked continue",
            ReasonCode::CONTINUE_AUTHENTICATION,
            Some(METHOD),
        ),
        ("client success", ReasonCode::SUCCESS, Some(METHOD)),
    ] {
        let mut h = Harness::new(Limits::default());
        authenticated(&mut h);
        h.packet(auth(reason, method, b"x"));
        assert_eq!(
            h.packets(),
            vec![Packet::Disconnect(Disconnect::new(
                ReasonCode::PROTOCOL_ERROR
            ))],
            "{name}"
        );
        assert!(h.channel.is_closed(), "{name}");
    }

    // A second 0x19 while one runs: one exchange at a time.
    let mut h = Harness::new(Limits::default());
    authenticated(&mut h);
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"x"));
    step(&mut h);
    h.channel.auth_continue(Bytes::from_static(b"s"));
    h.packets();
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"x"));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::PROTOCOL_ERROR
        ))]
    );
}

#[test]
fn a_reauthentication_must_finish_within_the_connect_timeout() {
    let mut h = Harness::new(Limits::default());
    authenticated(&mut h);
    h.now += Duration::from_secs(100);
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"x"));
    step(&mut h);
    h.channel.auth_continue(Bytes::from_static(b"s"));
    h.packets();
    assert_eq!(
        h.channel.poll_timeout(),
        Some(h.now + Limits::default().connect_timeout)
    );
    h.advance_to_deadline();
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::NOT_AUTHORIZED
        ))]
    );
}

#[test]
fn auth_without_a_method_in_connect_is_a_protocol_error() {
    // [MQTT-4.12.0-7]
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "c"));
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"x"));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::PROTOCOL_ERROR
        ))]
    );

    // On a 3.1.1 connection the codec refuses AUTH from its first byte; were one to reach
    // the channel, it is a protocol error all the same (and no v5 DISCONNECT is written).
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V311, "c"));
    h.packet(auth(ReasonCode::RE_AUTHENTICATE, Some(METHOD), b"x"));
    assert!(h.packets().is_empty());
    assert_eq!(h.close().reason, ReasonCode::PROTOCOL_ERROR);
    let mut codec = Codec::with_version(ProtocolVersion::V311, 1024);
    assert!(matches!(
        codec.decode(&mut bytes::BytesMut::from(&[0xF0, 0x00][..])),
        Err(DecodeError::Malformed(_))
    ));

    // AUTH before CONNECT: [MQTT-3.1.0-1].
    let mut h = Harness::new(Limits::default());
    h.packet(auth(
        ReasonCode::CONTINUE_AUTHENTICATION,
        Some(METHOD),
        b"x",
    ));
    assert!(h.packets().is_empty());
    assert_eq!(h.close().reason, ReasonCode::PROTOCOL_ERROR);

    // Authentication Data without a method (§3.1.2.11.10).
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, "c");
    c.properties.authentication_data = Some(Bytes::from_static(b"x"));
    h.channel.handle_packet(h.now, Packet::Connect(Box::new(c)));
    assert!(
        matches!(h.packets().as_slice(), [Packet::ConnAck(c)] if c.code == ReasonCode::PROTOCOL_ERROR)
    );
}
