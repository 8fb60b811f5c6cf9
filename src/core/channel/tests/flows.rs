//! QUIC multi-stream flows (the EMQX mapping).

use super::*;
use crate::codec::PacketId;

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
        packet_id: PacketId(id),
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
    h.flow_packet(
        data,
        Packet::Publish(publish("t", QoS::AtLeastOnce, Some(9))),
    );
    h.flow_packet(data, subscribe_packet(3, "s/#"));
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
            packet_id: PacketId(2),
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

/// A persistent session that subscribed "s" on data flow 4, its connection gone, resumed by a
/// new connection (whose flows are new).
fn reconnected_after_subscribing_on_a_flow(client_id: &str) -> Harness {
    let mut h = Harness::new(Limits::default());
    let mut c = connect(ProtocolVersion::V5, client_id);
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
    h2
}

#[test]
fn reconnect_rehomes_subscriptions_of_the_old_connections_flows() {
    let mut h2 = reconnected_after_subscribing_on_a_flow("flows6");
    let actions = h2.actions();
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Unsubscribe { flow: Flow(4), .. })));
    assert!(actions
        .iter()
        .any(|a| matches!(a, Action::Subscribe { subscription, .. } if subscription.flow == Flow::CONTROL)));
}

#[test]
fn a_parked_subscription_subscribed_again_on_a_data_flow_moves_in_one_step() {
    // After a reconnect the session's data-flow subscription is parked on control; the
    // client subscribes the filter on a new stream, then unsubscribes the parked copy. Two
    // subscriptions side by side in between would deliver every message twice (QoS 2 too).
    let mut h2 = reconnected_after_subscribing_on_a_flow("flows-move");
    h2.actions();
    let data = Flow(12);
    h2.channel.open_flow(data);
    h2.channel
        .handle_flow_packet(h2.now, data, subscribe_packet(2, "s"));
    let actions = h2.actions();
    // The move first, in one router step; then (Retain Handling 0) the retained messages,
    // through the same subscription.
    assert!(
        matches!(actions.as_slice(), [Action::Move { subscription, from }, rest @ ..]
            if subscription.flow == data && *from == Flow::CONTROL
                && rest.iter().all(|a| matches!(a, Action::Subscribe { subscription, send_retained: true } if subscription.flow == data))),
        "{actions:?}"
    );
    let session = h2.channel.session.as_ref().unwrap();
    let flows: Vec<Flow> = session
        .subscriptions
        .keys()
        .filter(|(_, f)| f == "s")
        .map(|(flow, _)| *flow)
        .collect();
    assert_eq!(flows, vec![data], "one subscription, on the new stream");

    // The client's UNSUBSCRIBE of the parked copy finds nothing (and removes nothing).
    h2.packet(Packet::Unsubscribe(Unsubscribe {
        packet_id: PacketId(3),
        properties: Properties::default(),
        filters: vec!["s".into()],
    }));
    match h2.packets().as_slice() {
        [Packet::UnsubAck(ack)] => {
            assert_eq!(ack.reasons, vec![ReasonCode::NO_SUBSCRIPTION_EXISTED])
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    assert!(h2
        .channel
        .session
        .as_ref()
        .unwrap()
        .subscriptions
        .contains_key(&(data, "s".to_owned())));

    // A filter the client subscribes on control itself is its own, never taken by a move.
    h2.packet(subscribe_packet(4, "own"));
    let other = Flow(16);
    h2.channel.open_flow(other);
    h2.channel
        .handle_flow_packet(h2.now, other, subscribe_packet(5, "own"));
    let actions = h2.actions();
    assert!(!actions.iter().any(|a| matches!(a, Action::Move { .. })));
    assert_eq!(
        h2.channel
            .session
            .as_ref()
            .unwrap()
            .subscriptions
            .keys()
            .filter(|(_, f)| f == "own")
            .count(),
        2
    );
}

#[test]
fn datagram_flow_takes_qos0_deliveries_only_and_connack_confirms_it() {
    let mut h = Harness::new(Limits::default());
    h.channel
        .open_datagram_flow(("petrel-datagram".into(), "2".into()));
    let connack = h.connect(connect(ProtocolVersion::V5, "datagrams"));
    assert_eq!(
        connack.properties.user_properties,
        vec![("petrel-datagram".to_owned(), "2".to_owned())]
    );
    let data = Flow(4);
    h.channel.open_flow(data);
    let mut d = delivery("t", QoS::AtMostOnce);
    d.flow = data;
    h.channel.deliver(h.now, d.clone());
    d.qos = QoS::AtLeastOnce;
    h.channel.deliver(h.now, d);
    let by_datagram = data_packets(&mut h, Flow::DATAGRAM);
    assert!(
        matches!(&by_datagram[..], [Packet::Publish(p)] if p.qos == QoS::AtMostOnce),
        "{by_datagram:?}"
    );
    let on_data = data_packets(&mut h, data);
    assert!(
        matches!(&on_data[..], [Packet::Publish(p)] if p.qos == QoS::AtLeastOnce),
        "{on_data:?}"
    );
    assert!(h.packets().is_empty(), "nothing on the control flow");
}

#[test]
fn without_the_datagram_flow_connack_has_no_confirmation() {
    let mut h = Harness::new(Limits::default());
    let connack = h.connect(connect(ProtocolVersion::V5, "no-datagrams"));
    assert!(connack.properties.user_properties.is_empty());
    h.channel.deliver(h.now, delivery("t", QoS::AtMostOnce));
    assert_eq!(h.packets().len(), 1, "QoS 0 on the control flow");
}
