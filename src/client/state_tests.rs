//! `ClientState` in virtual time: packets in, outputs asserted, `now` advanced by hand.

use super::*;
use crate::codec::PacketId;
use bytes::Bytes;

const KEEP_ALIVE: Duration = Duration::from_secs(10);

fn state(multi_stream: bool) -> (ClientState, Instant) {
    let now = Instant::now();
    (
        ClientState::new(ProtocolVersion::V5, KEEP_ALIVE, 3, multi_stream, now),
        now,
    )
}

fn connack(session_present: bool, receive_maximum: Option<u16>) -> ConnAck {
    ConnAck {
        session_present,
        code: ReasonCode::SUCCESS,
        properties: Properties::from(crate::codec::PropertySet {
            receive_maximum,
            ..Default::default()
        }),
    }
}

fn request(n: u64, topic: &str, qos: QoS, now: Instant) -> PublishRequest {
    PublishRequest {
        request: RequestId(n),
        publish: Publish {
            dup: false,
            qos,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from(format!("m{n}")),
        },
        route: Route::Control,
        enqueued: now,
    }
}

fn drain(s: &mut ClientState) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn sent(outputs: &[Output]) -> Vec<(Route, Packet)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send(r, p) => Some((*r, p.clone())),
            _ => None,
        })
        .collect()
}

fn publish_ids(outputs: &[Output]) -> Vec<(u16, bool)> {
    sent(outputs)
        .into_iter()
        .filter_map(|(_, p)| match p {
            Packet::Publish(p) => Some((p.packet_id.unwrap().0, p.dup)),
            _ => None,
        })
        .collect()
}

fn delivered(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .filter(|o| matches!(o, Output::Deliver(..)))
        .count()
}

fn inbound(id: u16, qos: QoS) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: "t".into(),
        packet_id: Some(PacketId(id)),
        properties: Properties::default(),
        payload: Bytes::from_static(b"x"),
    })
}

#[test]
fn packet_ids_skip_ids_in_use_and_wrap_after_65535() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    s.publish(now, request(1, "t", QoS::AtLeastOnce, now))
        .unwrap();
    s.next_id = PacketId(u16::MAX);
    s.publish(now, request(2, "t", QoS::AtLeastOnce, now))
        .unwrap();
    // 1 is still in flight, so after 65535 comes 2.
    s.publish(now, request(3, "t", QoS::AtLeastOnce, now))
        .unwrap();
    assert_eq!(
        publish_ids(&drain(&mut s)),
        vec![(1, false), (u16::MAX, false), (2, false)]
    );
}

#[test]
fn the_servers_receive_maximum_bounds_the_window() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, Some(2))).unwrap();
    for n in 1..=3 {
        s.publish(now, request(n, "t", QoS::AtLeastOnce, now))
            .unwrap();
    }
    assert_eq!(publish_ids(&drain(&mut s)).len(), 2);
    assert_eq!((s.in_flight(), s.queued()), (2, 1));
    let later = now + Duration::from_millis(40);
    s.handle_packet(
        later,
        Route::Control,
        Packet::PubAck(Ack::new(PacketId(1), ReasonCode::SUCCESS)),
    )
    .unwrap();
    let out = drain(&mut s);
    assert_eq!(publish_ids(&out), vec![(3, false)], "the window opened");
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Done(RequestId(1), Ok(Completion::Published { latency, .. }))
            if *latency == Duration::from_millis(40)
    )));
}

#[test]
fn unacknowledged_messages_are_resent_with_dup_after_a_reconnect() {
    let (mut s, now) = state(true);
    s.handle_connack(now, &connack(false, None)).unwrap();
    let mut r1 = request(1, "a", QoS::AtLeastOnce, now);
    r1.route = Route::Data(0);
    s.publish(now, r1).unwrap();
    s.publish(now, request(2, "b", QoS::ExactlyOnce, now))
        .unwrap();
    s.publish(now, request(3, "c", QoS::ExactlyOnce, now))
        .unwrap();
    drain(&mut s);
    // Message 3 reached the server (PUBREC), the PUBREL was lost with the connection.
    s.handle_packet(
        now,
        Route::Control,
        Packet::PubRec(Ack::new(PacketId(3), ReasonCode::SUCCESS)),
    )
    .unwrap();
    drain(&mut s);
    s.handle_connection_lost();

    let later = now + Duration::from_secs(1);
    s.handle_connack(later, &connack(true, None)).unwrap();
    let out = sent(&drain(&mut s));
    let summary: Vec<(Route, u8, u16, bool)> = out
        .iter()
        .map(|(r, p)| match p {
            Packet::Publish(p) => (*r, 3, p.packet_id.unwrap().0, p.dup),
            Packet::PubRel(a) => (*r, 6, a.packet_id.0, false),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    // In order, all on control (where the server parked the old streams' state).
    assert_eq!(
        summary,
        vec![
            (Route::Control, 3, 1, true),
            (Route::Control, 3, 2, true),
            (Route::Control, 6, 3, false)
        ]
    );
}

#[test]
fn a_new_session_completes_released_qos2_and_resends_the_rest() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    s.publish(now, request(1, "a", QoS::ExactlyOnce, now))
        .unwrap();
    s.publish(now, request(2, "b", QoS::ExactlyOnce, now))
        .unwrap();
    s.handle_packet(
        now,
        Route::Control,
        Packet::PubRec(Ack::new(PacketId(1), ReasonCode::SUCCESS)),
    )
    .unwrap();
    drain(&mut s);
    s.handle_connection_lost();
    s.handle_connack(now, &connack(false, None)).unwrap();
    let out = drain(&mut s);
    assert_eq!(publish_ids(&out), vec![(2, true)]);
    assert!(out
        .iter()
        .any(|o| matches!(o, Output::Done(RequestId(1), Ok(_)))));
}

#[test]
fn inbound_qos2_is_delivered_once_until_pubrel() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    s.handle_packet(now, Route::Data(1), inbound(7, QoS::ExactlyOnce))
        .unwrap();
    let out = drain(&mut s);
    assert_eq!(delivered(&out), 1);
    assert!(matches!(
        &sent(&out)[..],
        [(Route::Data(1), Packet::PubRec(a))] if a.packet_id == 7
    ));
    // The server resends (its PUBREC was lost, or after a reconnect on another stream).
    s.handle_packet(now, Route::Control, inbound(7, QoS::ExactlyOnce))
        .unwrap();
    let out = drain(&mut s);
    assert_eq!(delivered(&out), 0, "never delivered twice");
    assert_eq!(sent(&out).len(), 1, "but acknowledged again");
    s.handle_packet(
        now,
        Route::Control,
        Packet::PubRel(Ack::new(PacketId(7), ReasonCode::SUCCESS)),
    )
    .unwrap();
    let out = drain(&mut s);
    assert!(matches!(
        &sent(&out)[..],
        [(Route::Control, Packet::PubComp(a))] if a.reason == ReasonCode::SUCCESS
    ));
    // The id is free again: a new message with it is new.
    s.handle_packet(now, Route::Control, inbound(7, QoS::ExactlyOnce))
        .unwrap();
    assert_eq!(delivered(&drain(&mut s)), 1);
}

#[test]
fn inbound_qos2_state_survives_a_reconnect_with_the_session() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    s.handle_packet(now, Route::Control, inbound(9, QoS::ExactlyOnce))
        .unwrap();
    s.handle_connection_lost();
    s.handle_connack(now, &connack(true, None)).unwrap();
    s.handle_packet(now, Route::Control, inbound(9, QoS::ExactlyOnce))
        .unwrap();
    assert_eq!(delivered(&drain(&mut s)), 1);
}

#[test]
fn the_offline_buffer_is_bounded_and_flushed_on_connect() {
    let (mut s, now) = state(false);
    for n in 1..=3 {
        s.publish(now, request(n, "t", QoS::AtLeastOnce, now))
            .unwrap();
    }
    assert_eq!(
        s.publish(now, request(4, "t", QoS::AtLeastOnce, now)),
        Err(Failure::OfflineBufferFull)
    );
    assert!(drain(&mut s).is_empty(), "nothing is sent while offline");
    s.handle_connack(now, &connack(false, None)).unwrap();
    assert_eq!(publish_ids(&drain(&mut s)).len(), 3);
}

#[test]
fn subscriptions_are_restored_when_the_session_is_lost_and_moved_when_kept() {
    let (mut s, now) = state(true);
    s.handle_connack(now, &connack(false, None)).unwrap();
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..SubscriptionOptions::default()
    };
    s.subscribe(
        now,
        RequestId(1),
        vec![("cmd/#".into(), options)],
        Properties::default(),
        Route::Data(2),
    )
    .unwrap();
    let id = match &sent(&drain(&mut s))[..] {
        [(Route::Data(2), Packet::Subscribe(sub))] => sub.packet_id,
        other => panic!("{other:?}"),
    };
    let suback = |id| {
        Packet::SubAck(crate::codec::SubAck {
            packet_id: id,
            properties: Properties::default(),
            reasons: vec![ReasonCode::GRANTED_QOS_1],
        })
    };
    s.handle_packet(now, Route::Data(2), suback(id)).unwrap();
    drain(&mut s);

    // Session lost: subscribe again on the same slot.
    s.handle_connection_lost();
    s.handle_connack(now, &connack(false, None)).unwrap();
    let restore = sent(&drain(&mut s));
    assert!(matches!(
        &restore[..],
        [(Route::Data(2), Packet::Subscribe(_))]
    ));

    // Session kept: the server parked it on control; subscribe on the data stream, then
    // unsubscribe the parked copy once SUBACK is in.
    s.handle_connection_lost();
    s.handle_connack(now, &connack(true, None)).unwrap();
    let moved = sent(&drain(&mut s));
    let id = match &moved[..] {
        [(Route::Data(2), Packet::Subscribe(sub))] => {
            assert_eq!(sub.filters[0].1.retain_handling, 2);
            sub.packet_id
        }
        other => panic!("{other:?}"),
    };
    s.handle_packet(now, Route::Data(2), suback(id)).unwrap();
    assert!(matches!(
        &sent(&drain(&mut s))[..],
        [(Route::Control, Packet::Unsubscribe(u))] if u.filters == vec!["cmd/#".to_owned()]
    ));
}

#[test]
fn keep_alive_pings_after_silence_and_declares_a_silent_server_dead() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    assert_eq!(s.poll_timeout(), Some(now + KEEP_ALIVE));
    let t1 = now + KEEP_ALIVE;
    s.handle_timeout(t1, false).unwrap();
    assert!(matches!(
        &sent(&drain(&mut s))[..],
        [(Route::Control, Packet::PingReq)]
    ));
    // No answer within half a keep-alive is the verdict; stalled, it waits.
    assert_eq!(s.poll_timeout(), Some(t1 + KEEP_ALIVE / 2));
    let t2 = t1 + KEEP_ALIVE / 2;
    s.handle_timeout(t2, true).unwrap();
    let t3 = t2 + KEEP_ALIVE / 2;
    assert_eq!(
        s.handle_timeout(t3, false),
        Err(StateError::KeepAliveTimeout)
    );
    // An answer in time clears it.
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    s.handle_timeout(now + KEEP_ALIVE, false).unwrap();
    s.handle_packet(now + KEEP_ALIVE, Route::Control, Packet::PingResp)
        .unwrap();
    assert_eq!(s.handle_timeout(now + KEEP_ALIVE * 2, false), Ok(()));
}

#[test]
fn a_publisher_that_never_stops_sending_still_pings_and_finds_the_server_dead() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    drain(&mut s);
    // QoS 0 publishes every 100 ms for a keep-alive and more: nothing comes back.
    let mut t = now;
    let mut pinged = None;
    for i in 0..(KEEP_ALIVE.as_millis() / 100 + 5) as u64 {
        t = now + Duration::from_millis(100 * i);
        if s.poll_timeout().is_some_and(|d| d <= t) {
            s.handle_timeout(t, false).unwrap();
        }
        s.publish(t, request(i, "t", QoS::AtMostOnce, t)).unwrap();
        if pinged.is_none()
            && sent(&drain(&mut s))
                .iter()
                .any(|(_, p)| matches!(p, Packet::PingReq))
        {
            pinged = Some(t);
        }
    }
    let pinged = pinged.expect("a PINGREQ although publishes keep going out");
    assert!(pinged >= now + KEEP_ALIVE && pinged < t);
    let verdict = s.poll_timeout().unwrap();
    assert_eq!(verdict, pinged + KEEP_ALIVE / 2);
    assert_eq!(
        s.handle_timeout(verdict, false),
        Err(StateError::KeepAliveTimeout)
    );
}

#[test]
fn server_misbehaviour_is_an_error_not_a_panic() {
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    assert!(s.handle_connack(now, &connack(false, None)).is_err());
    assert!(s
        .handle_packet(now, Route::Control, Packet::PingReq)
        .is_err());
    let mut aliased = inbound(1, QoS::AtLeastOnce);
    if let Packet::Publish(p) = &mut aliased {
        p.topic.clear();
    }
    assert!(s.handle_packet(now, Route::Control, aliased).is_err());
    // Acks for unknown ids are answered or ignored, never fatal.
    s.handle_packet(
        now,
        Route::Control,
        Packet::PubAck(Ack::new(PacketId(55), ReasonCode::SUCCESS)),
    )
    .unwrap();
    s.handle_packet(
        now,
        Route::Control,
        Packet::PubRec(Ack::new(PacketId(56), ReasonCode::SUCCESS)),
    )
    .unwrap();
}

#[test]
fn pubcomp_packet_id_not_found_after_a_resent_pubrel_completes_the_publish() {
    // The server released the message; only its PUBCOMP was lost with the connection. The
    // resent PUBREL is answered with 0x92, which MQTT 5 §4.3.3 makes no error in recovery.
    let (mut s, now) = state(false);
    s.handle_connack(now, &connack(false, None)).unwrap();
    s.publish(now, request(1, "q2", QoS::ExactlyOnce, now))
        .unwrap();
    drain(&mut s);
    s.handle_packet(
        now,
        Route::Control,
        Packet::PubRec(Ack::new(PacketId(1), ReasonCode::SUCCESS)),
    )
    .unwrap();
    drain(&mut s);
    s.handle_connection_lost();
    s.handle_connack(now, &connack(true, None)).unwrap();
    drain(&mut s);
    s.handle_packet(
        now,
        Route::Control,
        Packet::PubComp(Ack::new(
            PacketId(1),
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
        )),
    )
    .unwrap();
    let done: Vec<bool> = drain(&mut s)
        .iter()
        .filter_map(|o| match o {
            Output::Done(_, result) => Some(result.is_ok()),
            _ => None,
        })
        .collect();
    assert_eq!(done, vec![true], "completed, not failed");
}

/// A server's QoS 2 receiver as MQTT 5 §4.3.3 has it (and as Petrel's channel does): a new
/// PUBLISH is routed and PUBREC'd, a resend of an id awaiting PUBREL is PUBREC'd without
/// routing [MQTT-4.3.3-10], PUBREL frees the id and is answered by PUBCOMP, 0x92 when the id
/// is unknown [MQTT-4.3.3-11].
#[derive(Default)]
struct Qos2Receiver {
    awaiting_release: HashSet<PacketId>,
    routed: usize,
}

impl Qos2Receiver {
    fn answer(&mut self, packet: &Packet) -> Option<Packet> {
        match packet {
            Packet::Publish(p) => {
                let id = p.packet_id.unwrap();
                if self.awaiting_release.insert(id) {
                    self.routed += 1;
                }
                Some(Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)))
            }
            Packet::PubRel(a) => {
                let reason = if self.awaiting_release.remove(&a.packet_id) {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                Some(Packet::PubComp(Ack::new(a.packet_id, reason)))
            }
            _ => None,
        }
    }
}

/// Runs the exchange of one QoS 2 publish between `s` and `server`. The `lose`-th packet on
/// the wire (counting both directions from 0) is lost with the connection, which then
/// reconnects with the session kept; `lose` past the exchange loses nothing. Returns the
/// publish's completion.
fn qos2_exchange(lose: &[usize]) -> (Result<Completion, Failure>, usize) {
    let (mut s, now) = state(false);
    let mut server = Qos2Receiver::default();
    s.handle_connack(now, &connack(false, None)).unwrap();
    s.publish(now, request(1, "q2", QoS::ExactlyOnce, now))
        .unwrap();
    let mut wire = 0;
    let mut done = None;
    // Bounded: a correct exchange needs 4 packets plus 2 per loss.
    for _ in 0..32 {
        let mut progressed = false;
        for output in drain(&mut s) {
            match output {
                Output::Send(_, packet) => {
                    progressed = true;
                    wire += 1;
                    if lose.contains(&(wire - 1)) {
                        s.handle_connection_lost();
                        s.handle_connack(now, &connack(true, None)).unwrap();
                        break;
                    }
                    let Some(answer) = server.answer(&packet) else {
                        continue;
                    };
                    wire += 1;
                    if lose.contains(&(wire - 1)) {
                        s.handle_connection_lost();
                        s.handle_connack(now, &connack(true, None)).unwrap();
                        break;
                    }
                    s.handle_packet(now, Route::Control, answer).unwrap();
                }
                Output::Done(RequestId(1), result) => done = Some(result),
                other => panic!("unexpected {other:?}"),
            }
        }
        if !progressed {
            break;
        }
    }
    assert_eq!(s.in_flight(), 0, "nothing left in flight (lost {lose:?})");
    (
        done.unwrap_or_else(|| panic!("no completion (lost {lose:?})")),
        server.routed,
    )
}

#[test]
fn qos2_publish_completes_whichever_packet_a_reconnect_lost() {
    // The blackouts of docs/lossy-links.md: the connection dies with one of PUBLISH, PUBREC,
    // PUBREL or PUBCOMP in the air (or two of them, across two reconnects), the session
    // survives, and the publish must complete, once, never fail.
    let mut cases: Vec<Vec<usize>> = vec![vec![]];
    cases.extend((0..4).map(|k| vec![k]));
    for first in 0..4 {
        for second in first + 1..8 {
            cases.push(vec![first, second]);
        }
    }
    for lose in cases {
        let (result, routed) = qos2_exchange(&lose);
        assert!(
            matches!(
                result,
                Ok(Completion::Published {
                    reason: ReasonCode::SUCCESS,
                    ..
                })
            ),
            "lost packets {lose:?}: {result:?}"
        );
        assert_eq!(routed, 1, "lost packets {lose:?}: routed {routed} times");
    }
}
