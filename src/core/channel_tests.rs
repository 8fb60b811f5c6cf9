//! Channel tests in virtual time: feed packets with made-up instants, advance `now` to the
//! channel's own deadline, and assert the packets and actions that come out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::codec::{Codec, Will};
use crate::core::message::Flow;

struct Harness {
    channel: Channel,
    now: Instant,
    version: ProtocolVersion,
    session: Option<Session>,
}

impl Harness {
    fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            channel: Channel::new(
                Arc::new(limits),
                now,
                AssignedClientId {
                    secret: 0x5eed,
                    serial: 1,
                },
            ),
            now,
            version: ProtocolVersion::V5,
            session: None,
        }
    }

    /// CONNECT and accept it, resuming `self.session` if one is parked there.
    fn connect(&mut self, connect: Connect) -> ConnAck {
        self.connect_and_resends(connect).0
    }

    /// CONNECT, accept, and return the CONNACK with whatever followed it (resends).
    fn connect_and_resends(&mut self, connect: Connect) -> (ConnAck, Vec<Packet>) {
        self.version = connect.protocol;
        self.channel
            .handle_packet(self.now, Packet::Connect(Box::new(connect)));
        match self.channel.poll_action() {
            Some(Action::Connect { .. }) => {}
            other => panic!("expected a Connect action, got {other:?}"),
        }
        self.channel.accept(self.now, self.session.take());
        let mut packets = self.packets();
        match packets.first() {
            Some(Packet::ConnAck(connack)) => {
                let connack = connack.clone();
                packets.remove(0);
                (connack, packets)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn packet(&mut self, packet: Packet) {
        self.channel.handle_packet(self.now, packet);
    }

    /// Decodes everything the channel has written since the last call.
    fn packets(&mut self) -> Vec<Packet> {
        let mut codec = Codec::with_version(self.version, u32::MAX);
        let out = self.channel.out();
        let mut packets = Vec::new();
        while let Some(packet) = codec.decode(out).expect("the channel writes valid packets") {
            packets.push(packet);
        }
        packets
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.channel.poll_action()).collect()
    }

    /// Advance virtual time to the channel's next deadline and fire it.
    fn advance_to_deadline(&mut self) {
        let deadline = self.channel.poll_timeout().expect("a deadline is armed");
        self.now = deadline;
        self.channel.handle_timeout(self.now);
    }

    fn close(&mut self) -> Close {
        let actions = self.actions();
        actions
            .into_iter()
            .find_map(|a| match a {
                Action::Close(close) => Some(*close),
                _ => None,
            })
            .expect("the channel closed")
    }
}

fn connect(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 0,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

fn publish(topic: &str, qos: QoS, id: Option<u16>) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: id,
        properties: Properties::default(),
        payload: Bytes::from_static(b"payload"),
    }
}

fn delivery(topic: &str, qos: QoS) -> Delivery {
    let message = Message::from_publish(publish(topic, qos, None), None, Instant::now());
    Delivery {
        message: Arc::new(message),
        qos,
        retain: false,
        subscription_ids: Vec::new(),
        flow: Flow::CONTROL,
    }
}

#[test]
fn keep_alive_expires_at_one_and_a_half_times_and_publishes_the_will() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, "ka");
    c.keep_alive = 10;
    c.will = Some(Will {
        topic: "will/ka".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    });
    let start = h.now;
    h.connect(c);
    // A PINGREQ at 9 s pushes the deadline to 9 + 15 s.
    h.now = start + Duration::from_secs(9);
    h.packet(Packet::PingReq);
    assert_eq!(h.packets(), vec![Packet::PingResp]);
    h.channel.handle_timeout(start + Duration::from_secs(15));
    assert!(
        !h.channel.is_closed(),
        "traffic at 9 s keeps the connection alive at 15 s"
    );
    h.advance_to_deadline();
    assert_eq!(h.now, start + Duration::from_secs(24));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::KEEP_ALIVE_TIMEOUT
        ))]
    );
    let close = h.close();
    assert_eq!(close.reason, ReasonCode::KEEP_ALIVE_TIMEOUT);
    assert_eq!(
        close.will.expect("the will is due").message.topic,
        "will/ka"
    );
}

#[test]
fn connect_timeout_closes_a_silent_connection() {
    let limits = Limits {
        connect_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut h = Harness::new(limits);
    let start = h.now;
    h.advance_to_deadline();
    assert_eq!(h.now, start + Duration::from_millis(300));
    assert!(h.channel.is_closed());
    assert!(
        h.packets().is_empty(),
        "nothing is sent to a client that never spoke"
    );
}

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
fn broker_receive_maximum_is_enforced_on_inbound_qos2() {
    let limits = Limits {
        receive_maximum: 2,
        ..Limits::default()
    };
    let mut h = Harness::new(limits);
    h.connect(connect(ProtocolVersion::V5, "rm"));
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(1))));
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(2))));
    assert_eq!(h.packets().len(), 2, "two PUBRECs");
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(3))));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
        ))]
    );
    assert!(h.channel.is_closed());
}

#[test]
fn inbound_qos2_is_routed_once_even_when_resent() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V311, "eo"));
    h.packet(Packet::Publish(publish("t", QoS::ExactlyOnce, Some(7))));
    let mut again = publish("t", QoS::ExactlyOnce, Some(7));
    again.dup = true;
    h.packet(Packet::Publish(again));
    let routes = h
        .actions()
        .into_iter()
        .filter(|a| matches!(a, Action::Route(_)))
        .count();
    assert_eq!(routes, 1);
    assert_eq!(
        h.packets(),
        vec![
            Packet::PubRec(Ack::new(7, ReasonCode::SUCCESS)),
            Packet::PubRec(Ack::new(7, ReasonCode::SUCCESS))
        ]
    );
    h.packet(Packet::PubRel(Ack::new(7, ReasonCode::SUCCESS)));
    assert_eq!(
        h.packets(),
        vec![Packet::PubComp(Ack::new(7, ReasonCode::SUCCESS))]
    );
}

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
    let ids: Vec<u16> = h
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
fn topic_alias_rules_on_ingress() {
    let mut h = Harness::new(Limits {
        topic_alias_maximum: 5,
        ..Limits::default()
    });
    h.connect(connect(ProtocolVersion::V5, "alias"));
    let mut define = publish("long/topic", QoS::AtMostOnce, None);
    define.properties.topic_alias = Some(3);
    h.packet(Packet::Publish(define));
    let mut reuse = publish("", QoS::AtMostOnce, None);
    reuse.properties.topic_alias = Some(3);
    h.packet(Packet::Publish(reuse));
    let topics: Vec<String> = h
        .actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Route(m) => Some(m.topic.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(topics, vec!["long/topic", "long/topic"]);

    let mut too_big = publish("x", QoS::AtMostOnce, None);
    too_big.properties.topic_alias = Some(6);
    h.packet(Packet::Publish(too_big));
    assert_eq!(
        h.packets(),
        vec![Packet::Disconnect(Disconnect::new(
            ReasonCode::TOPIC_ALIAS_INVALID
        ))]
    );
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

#[test]
fn message_expiry_is_decremented_and_expired_messages_are_dropped() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "exp"));
    let mut p = publish("t", QoS::AtMostOnce, None);
    p.properties.message_expiry_interval = Some(10);
    let message = Arc::new(Message::from_publish(p, None, h.now));
    let d = Delivery {
        message,
        qos: QoS::AtMostOnce,
        retain: false,
        subscription_ids: vec![4],
        flow: Flow::CONTROL,
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
    c.properties.maximum_packet_size = Some(20);
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

#[test]
fn normal_disconnect_discards_the_will_and_0x04_keeps_it() {
    for (reason, expect_will) in [
        (ReasonCode::NORMAL_DISCONNECTION, false),
        (ReasonCode::DISCONNECT_WITH_WILL, true),
    ] {
        let mut h = Harness::new(Limits::default());
        let mut c = connect(ProtocolVersion::V5, "will");
        let will_props = Properties::from(crate::codec::PropertySet {
            will_delay_interval: Some(30),
            ..Default::default()
        });
        c.will = Some(Will {
            topic: "w".into(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: will_props,
        });
        h.connect(c);
        h.packet(Packet::Disconnect(Disconnect::new(reason)));
        let close = h.close();
        assert_eq!(close.will.is_some(), expect_will, "reason {reason:?}");
        if let Some(will) = close.will {
            assert_eq!(will.delay, 30);
            assert_eq!(
                will.message.properties.will_delay_interval, None,
                "the delay is not forwarded"
            );
        }
    }
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
fn subscribe_grants_capped_qos_and_reports_retained_per_retain_handling() {
    let mut h = Harness::new(Limits {
        maximum_qos: QoS::AtLeastOnce,
        ..Limits::default()
    });
    h.connect(connect(ProtocolVersion::V5, "sub"));
    let options = |rh| SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        retain_handling: rh,
        ..Default::default()
    };
    let subscribe = |id, rh| {
        Packet::Subscribe(Subscribe {
            packet_id: id,
            properties: Properties::default(),
            filters: vec![("a/+".into(), options(rh)), ("a/#/b".into(), options(rh))],
        })
    };
    h.packet(subscribe(1, 1));
    h.packet(subscribe(2, 1));
    let acks: Vec<Vec<ReasonCode>> = h
        .packets()
        .into_iter()
        .filter_map(|p| match p {
            Packet::SubAck(s) => Some(s.reasons),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        vec![vec![ReasonCode::GRANTED_QOS_1, ReasonCode::TOPIC_FILTER_INVALID]; 2]
    );
    let retained: Vec<bool> = h
        .actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Subscribe { send_retained, .. } => Some(send_retained),
            _ => None,
        })
        .collect();
    assert_eq!(
        retained,
        vec![true, false],
        "Retain Handling 1 sends retained only for a new subscription"
    );
}

// --- QUIC multi-stream flows (the EMQX mapping) ---

fn data_packets(h: &mut Harness, flow: Flow) -> Vec<Packet> {
    let mut codec = Codec::with_version(h.version, u32::MAX);
    let mut packets = Vec::new();
    h.channel.drain_flow_output(|f, out| {
        if f == flow {
            while let Some(p) = codec.decode(out).unwrap() {
                packets.push(p);
            }
        }
    });
    packets
}

fn subscribe_packet(id: u16, filter: &str) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: id,
        properties: Properties::default(),
        filters: vec![(
            filter.into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
    })
}

#[test]
fn flow_acks_and_subacks_go_back_on_the_flow_that_carried_the_packet() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "flows"));
    let data = Flow(4);
    h.channel.open_flow(data);
    h.channel.handle_flow_packet(
        h.now,
        data,
        Packet::Publish(publish("t", QoS::AtLeastOnce, Some(9))),
    );
    h.channel
        .handle_flow_packet(h.now, data, subscribe_packet(3, "s/#"));
    assert!(h.packets().is_empty(), "nothing on the control flow");
    let on_data = data_packets(&mut h, data);
    assert!(matches!(&on_data[0], Packet::PubAck(a) if a.packet_id == 9));
    assert!(matches!(&on_data[1], Packet::SubAck(a) if a.packet_id == 3));
    let subscribed_flow = h.actions().into_iter().find_map(|a| match a {
        Action::Subscribe { subscription, .. } => Some(subscription.flow),
        _ => None,
    });
    assert_eq!(subscribed_flow, Some(data));
}

#[test]
fn deliveries_go_out_on_their_flow_and_fall_back_to_control() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "flows2"));
    let data = Flow(8);
    h.channel.open_flow(data);
    let mut d = delivery("t", QoS::AtLeastOnce);
    d.flow = data;
    h.channel.deliver(h.now, d.clone());
    assert_eq!(data_packets(&mut h, data).len(), 1);
    assert!(h.packets().is_empty());
    d.flow = Flow(12); // never opened
    h.channel.deliver(h.now, d);
    assert_eq!(
        h.packets().len(),
        1,
        "an unknown flow's delivery goes on the control flow"
    );
}

#[test]
fn unsubscribe_on_another_flow_finds_no_subscription() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "flows3"));
    let (a, b) = (Flow(4), Flow(8));
    h.channel.open_flow(a);
    h.channel.open_flow(b);
    h.channel
        .handle_flow_packet(h.now, a, subscribe_packet(1, "x"));
    h.channel.handle_flow_packet(
        h.now,
        b,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            properties: Properties::default(),
            filters: vec!["x".into()],
        }),
    );
    match data_packets(&mut h, b).as_slice() {
        [Packet::UnsubAck(ack)] => {
            assert_eq!(ack.reasons, vec![ReasonCode::NO_SUBSCRIPTION_EXISTED])
        }
        other => panic!("expected UNSUBACK on flow b, got {other:?}"),
    }
}

#[test]
fn data_flow_rejects_control_packets_and_ignores_pings() {
    let mut h = Harness::new(Limits::default());
    let data = Flow(4);
    h.channel.open_flow(data);
    h.channel.handle_flow_packet(h.now, data, Packet::PingReq);
    assert!(
        matches!(h.actions().as_slice(), [Action::CloseFlow(f)] if *f == data),
        "a data flow before CONNACK is refused"
    );

    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "flows4"));
    h.channel.open_flow(data);
    h.channel.handle_flow_packet(h.now, data, Packet::PingReq);
    assert!(
        data_packets(&mut h, data).is_empty() && h.packets().is_empty(),
        "PINGREQ on a data flow gets no answer"
    );
    h.channel.handle_flow_packet(
        h.now,
        data,
        Packet::Disconnect(Disconnect::new(ReasonCode::SUCCESS)),
    );
    assert!(h
        .actions()
        .iter()
        .any(|a| matches!(a, Action::CloseFlow(f) if *f == data)));
    assert!(h.channel.is_connected(), "the connection lives on");
}

#[test]
fn a_dead_flow_hands_its_subscriptions_and_in_flight_messages_to_control() {
    let mut h = Harness::new(Limits::default());
    h.connect(connect(ProtocolVersion::V5, "flows5"));
    let data = Flow(4);
    h.channel.open_flow(data);
    h.channel
        .handle_flow_packet(h.now, data, subscribe_packet(1, "s"));
    h.actions();
    let mut d = delivery("s", QoS::AtLeastOnce);
    d.flow = data;
    h.channel.deliver(h.now, d);
    let sent = data_packets(&mut h, data);
    let Some(Packet::Publish(first)) = sent.last() else {
        panic!("expected the PUBLISH on the data flow")
    };

    h.channel.handle_flow_closed(h.now, data);
    let actions = h.actions();
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Unsubscribe { flow, .. } if *flow == data)));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Subscribe { subscription, .. } if subscription.flow == Flow::CONTROL)));
    match h.packets().as_slice() {
        [Packet::Publish(again)] => {
            assert!(again.dup);
            assert_eq!(again.packet_id, first.packet_id);
        }
        other => panic!("expected the in-flight PUBLISH resent on control, got {other:?}"),
    }
    h.packet(Packet::PubAck(Ack::new(
        first.packet_id.unwrap(),
        ReasonCode::SUCCESS,
    )));
    assert_eq!(
        h.channel.session.as_ref().unwrap().inflight(),
        0,
        "acked on control"
    );
}

#[test]
fn reconnect_rehomes_subscriptions_of_the_old_connections_flows() {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, "flows6");
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    h.connect(c.clone());
    h.channel.open_flow(Flow(4));
    h.channel
        .handle_flow_packet(h.now, Flow(4), subscribe_packet(1, "s"));
    h.channel.handle_transport_closed();
    let session = h.close().session.unwrap();

    let mut h2 = Harness::new(Limits::default());
    h2.session = Some(session);
    h2.connect(c);
    let actions = h2.actions();
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Unsubscribe { flow: Flow(4), .. })));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Subscribe { subscription, .. } if subscription.flow == Flow::CONTROL)));
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
