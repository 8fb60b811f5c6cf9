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
    /// Actions taken out to answer a Route's acknowledgement, kept for `actions()`.
    seen: Vec<Action>,
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
            seen: Vec::new(),
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

    /// Handles a packet, answering a routed PUBLISH's acknowledgement as the shell does
    /// (routed, nothing refused).
    fn packet(&mut self, packet: Packet) {
        self.channel.handle_packet(self.now, packet);
        self.answer_routes();
    }

    /// As `packet`, on a data flow.
    fn flow_packet(&mut self, flow: Flow, packet: Packet) {
        self.channel.handle_flow_packet(self.now, flow, packet);
        self.answer_routes();
    }

    fn answer_routes(&mut self) {
        while let Some(action) = self.channel.poll_action() {
            if let Action::Route { ack: Some(ack), .. } = &action {
                self.channel.acknowledge(*ack, None);
            }
            self.seen.push(action);
        }
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
        let mut actions = std::mem::take(&mut self.seen);
        actions.extend(std::iter::from_fn(|| self.channel.poll_action()));
        actions
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
        packet_id: id.map(PacketId),
        properties: Properties::default(),
        payload: Bytes::from_static(b"payload"),
    }
}

fn delivery(topic: &str, qos: QoS) -> Delivery {
    let topic_name = TopicName::parse(topic.to_owned(), 0).unwrap();
    let message =
        AppMessage::from_publish(topic_name, publish(topic, qos, None), None, Instant::now());
    Delivery {
        message: Arc::new(message),
        qos,
        retain: false,
        subscription_ids: Vec::new(),
        flow: Flow::CONTROL,
        shared: None,
        stored: None,
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

mod auth;
mod connect;
mod deliver;
mod flows;
mod fuzz;
mod publish;
mod subscribe;
mod window;
