//! Property-based fuzzing of the channel state machine: a CONNECT, then any sequence of
//! packets a peer can send (every packet type the codec can decode, valid or not for the
//! moment), deliveries from the router, and jumps of virtual time. Whatever the order, the
//! channel must not panic, must write only packets that decode, must never send a packet
//! larger than the client's Maximum Packet Size, must keep its outbound window within the
//! client's Receive Maximum and its own `max_inflight`, and must write nothing once closed.
//!
//! A short run is part of `cargo test`; `cargo test --lib fuzz_long -- --ignored` runs the
//! same properties for many more cases (set `PROPTEST_CASES` to change either).

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::codec::tests::proptests::{connect as any_connect, packet as any_packet, version};
use crate::codec::Codec;
use crate::core::message::Flow;

#[derive(Debug, Clone)]
enum Step {
    /// A packet from the peer on the control flow.
    Packet(Packet),
    /// A packet on a data flow (QUIC multi-stream).
    FlowPacket(u8, Packet),
    /// A delivery from the router, when the channel can take one.
    Deliver(QoS, bool),
    /// Virtual time moves on by this many milliseconds, then due timers fire.
    Advance(u32),
    /// The client answers the broker's oldest unanswered outbound PUBLISH or PUBREL
    /// (PUBACK, PUBREC, PUBCOMP as its stage requires), as a well-behaved client does.
    AnswerOldest,
    /// The peer's transport closed.
    TransportClosed,
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce),
    ]
}

/// Topic names, mostly valid, from a small vocabulary so subscriptions and aliases meet.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => prop::sample::select(vec!["fuzz/0", "fuzz/1", "fuzz/2", "$delayed/1/fuzz/2", "$SYS/x"]),
        1 => prop::sample::select(vec!["", "fuzz/+", "#", "a/\u{0}", "$share/g/fuzz/1"]),
    ]
    .prop_map(str::to_owned)
}

/// Filters from a small vocabulary, so subscriptions, aliases and deliveries meet; a few
/// are invalid on purpose.
fn topic() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "fuzz/0",
        "fuzz/1",
        "fuzz/+",
        "fuzz/#",
        "#",
        "$SYS/x",
        "$share/g/fuzz/1",
        "$delayed/1/fuzz/2",
        "$exclusive/fuzz/3",
        "",
        "a/#/b",
        "fuzz/\u{0}",
    ])
    .prop_map(str::to_owned)
}

/// Packets a client sends, with packet ids small enough to meet the channel's own.
fn client_packet(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    let id = (1u16..6).prop_map(PacketId);
    let alias = prop::option::weighted(0.3, 0u16..6).prop_map(move |a| a.filter(|_| v5));
    let publish = (qos(), any::<bool>(), name(), id.clone(), alias, 0usize..200).prop_map(
        move |(qos, retain, topic, id, alias, len)| {
            let mut properties = Properties::default();
            if let Some(alias) = alias {
                properties.topic_alias = Some(alias);
            }
            Packet::Publish(Publish {
                dup: false,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload: Bytes::from(vec![b'p'; len]),
            })
        },
    );
    let ack = (0u8..4, id.clone()).prop_map(|(kind, packet_id)| {
        let ack = Ack {
            packet_id,
            reason: ReasonCode::SUCCESS,
            properties: Properties::default(),
        };
        match kind {
            0 => Packet::PubAck(ack),
            1 => Packet::PubRec(ack),
            2 => Packet::PubRel(ack),
            _ => Packet::PubComp(ack),
        }
    });
    let subscribe = (id.clone(), vec((topic(), qos()), 1..3)).prop_map(|(packet_id, filters)| {
        Packet::Subscribe(Subscribe {
            packet_id,
            properties: Properties::default(),
            filters: filters
                .into_iter()
                .map(|(f, qos)| {
                    let options = SubscriptionOptions {
                        qos,
                        ..Default::default()
                    };
                    (f, options)
                })
                .collect(),
        })
    });
    let unsubscribe = (id, vec(topic(), 1..3)).prop_map(|(packet_id, filters)| {
        Packet::Unsubscribe(Unsubscribe {
            packet_id,
            properties: Properties::default(),
            filters,
        })
    });
    prop_oneof![
        6 => publish,
        1 => ack,
        2 => subscribe,
        1 => unsubscribe,
        2 => Just(Packet::PingReq),
    ]
}

fn step(version: ProtocolVersion) -> impl Strategy<Value = Step> {
    prop_oneof![
        120 => client_packet(version).prop_map(Step::Packet),
        5 => any_packet(version).prop_map(Step::Packet),
        10 => (1u8..4, client_packet(version)).prop_map(|(f, p)| Step::FlowPacket(f, p)),
        60 => (qos(), any::<bool>()).prop_map(|(q, r)| Step::Deliver(q, r)),
        60 => Just(Step::AnswerOldest),
        20 => (0u32..120_000).prop_map(Step::Advance),
        1 => Just(Step::TransportClosed),
    ]
}

/// A CONNECT the channel will mostly accept: the generated one, with a plain client id and
/// no authentication method most of the time (the rest of its fields stay arbitrary).
fn connect(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
    (any_connect(version), any::<u8>()).prop_map(|(packet, dice)| {
        let Packet::Connect(mut connect) = packet else {
            unreachable!("the generator makes CONNECTs")
        };
        if dice % 8 != 0 {
            connect.client_id = "fuzz".into();
            if let Some(set) = connect.properties.get_mut() {
                set.authentication_method = None;
                set.authentication_data = None;
            }
        }
        Packet::Connect(connect)
    })
}

fn delivery(n: usize, qos: QoS, retain: bool) -> Delivery {
    let topic = format!("fuzz/{}", n % 5);
    let name = TopicName::parse(topic.clone(), 0).expect("a valid topic");
    let publish = Publish {
        dup: false,
        qos,
        retain,
        topic,
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from(vec![b'x'; n % 300]),
    };
    Delivery {
        message: Arc::new(AppMessage::from_publish(
            name,
            publish,
            None,
            Instant::now(),
        )),
        qos,
        retain,
        subscription_ids: Vec::new(),
        flow: Flow::CONTROL,
        shared: None,
        stored: None,
    }
}

struct Run {
    channel: Channel,
    now: Instant,
    decoder: Codec,
    /// The client's Maximum Packet Size and Receive Maximum, once its CONNECT is accepted.
    peer_max_packet: u32,
    peer_receive_max: usize,
    max_inflight: usize,
    closed_at_step: Option<usize>,
    /// What the client owes the broker, oldest first: the PUBACK or PUBREC of a PUBLISH,
    /// the PUBCOMP of a PUBREL.
    owed: std::collections::VecDeque<Packet>,
}

impl Run {
    fn new(version: ProtocolVersion) -> Self {
        let now = Instant::now();
        let limits = Limits {
            // Small enough that the fuzzer reaches the limits.
            max_inflight: 8,
            receive_maximum: 4,
            topic_alias_maximum: 4,
            max_subscriptions: 6,
            max_packet_size: 4096,
            ..Limits::default()
        };
        let max_inflight = usize::from(limits.max_inflight);
        Self {
            channel: Channel::new(
                Arc::new(limits),
                now,
                AssignedClientId {
                    secret: 0xf022,
                    serial: 1,
                },
            ),
            now,
            decoder: Codec::with_version(version, u32::MAX),
            peer_max_packet: u32::MAX,
            peer_receive_max: usize::from(u16::MAX),
            max_inflight,
            closed_at_step: None,
            owed: Default::default(),
        }
    }

    /// Answers the channel's actions as the shell does, accepting every CONNECT.
    fn carry_out(&mut self) {
        while let Some(action) = self.channel.poll_action() {
            match action {
                Action::Connect { .. } => self.channel.accept(self.now, None),
                Action::Route { ack: Some(ack), .. } | Action::Delay { ack: Some(ack), .. } => {
                    self.channel.acknowledge(ack, None)
                }
                _ => {}
            }
        }
    }

    /// Checks what the channel wrote since the last call.
    fn check_output(&mut self, at: usize) -> Result<(), TestCaseError> {
        let out = self.channel.out();
        if let Some(closed) = self.closed_at_step {
            prop_assert!(
                out.is_empty() || closed == at,
                "wrote {} bytes at step {at}, after closing at step {closed}",
                out.len()
            );
        }
        loop {
            let before = out.len();
            match self.decoder.decode(out) {
                Ok(Some(packet)) => {
                    let size = before - out.len();
                    let ack = |packet_id| Ack {
                        packet_id,
                        reason: ReasonCode::SUCCESS,
                        properties: Properties::default(),
                    };
                    match &packet {
                        Packet::Publish(p) => match (p.qos, p.packet_id) {
                            (QoS::AtLeastOnce, Some(id)) => {
                                self.owed.push_back(Packet::PubAck(ack(id)))
                            }
                            (QoS::ExactlyOnce, Some(id)) => {
                                self.owed.push_back(Packet::PubRec(ack(id)))
                            }
                            _ => {}
                        },
                        Packet::PubRel(a) => self.owed.push_back(Packet::PubComp(ack(a.packet_id))),
                        _ => {}
                    }
                    prop_assert!(
                        size as u64 <= u64::from(self.peer_max_packet),
                        "a {size}-byte {packet:?} exceeds the client's maximum {}",
                        self.peer_max_packet
                    );
                }
                Ok(None) => break,
                Err(e) => return Err(TestCaseError::fail(format!("the channel wrote {e}"))),
            }
        }
        prop_assert!(out.is_empty(), "a partial packet was left in the output");
        self.channel.trim();
        let inflight = self.channel.inflight();
        prop_assert!(
            inflight <= self.max_inflight.min(self.peer_receive_max),
            "{inflight} in flight past the window"
        );
        if self.channel.is_closed() && self.closed_at_step.is_none() {
            self.closed_at_step = Some(at);
        }
        Ok(())
    }
}

fn run(version: ProtocolVersion, connect: Packet, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut run = Run::new(version);
    if let Packet::Connect(c) = &connect {
        if version.is_v5() {
            if let Some(max) = c.properties.maximum_packet_size {
                run.peer_max_packet = max;
            }
            if let Some(max) = c.properties.receive_maximum {
                run.peer_receive_max = usize::from(max);
            }
        }
    }
    run.channel.handle_packet(run.now, connect);
    run.carry_out();
    run.check_output(0)?;
    for (i, step) in steps.into_iter().enumerate() {
        let at = i + 1;
        match step {
            Step::Packet(packet) => run.channel.handle_packet(run.now, packet),
            Step::FlowPacket(flow, packet) => {
                run.channel
                    .handle_flow_packet(run.now, Flow(u64::from(flow)), packet)
            }
            Step::Deliver(qos, retain) => {
                if run.channel.is_connected() && run.channel.can_deliver() {
                    run.channel.deliver(run.now, delivery(at, qos, retain));
                }
            }
            Step::Advance(ms) => {
                run.now += Duration::from_millis(u64::from(ms));
                // Fire every timer now due; each firing must move the deadline on.
                for _ in 0..64 {
                    match run.channel.poll_timeout() {
                        Some(deadline) if deadline <= run.now => {
                            run.channel.handle_timeout(run.now)
                        }
                        _ => break,
                    }
                }
            }
            Step::AnswerOldest => {
                if let Some(answer) = run.owed.pop_front() {
                    run.channel.handle_packet(run.now, answer);
                }
            }
            Step::TransportClosed => run.channel.handle_transport_closed(),
        }
        run.carry_out();
        run.check_output(at)?;
    }
    Ok(())
}

fn case() -> impl Strategy<Value = (ProtocolVersion, Packet, Vec<Step>)> {
    version().prop_flat_map(|v| (Just(v), connect(v), vec(step(v), 0..60)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_packet_sequence_keeps_the_channel_sound((v, connect, steps) in case()) {
        run(v, connect, steps)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    /// The long run: `cargo test --lib fuzz_long -- --ignored`.
    #[test]
    #[ignore = "long fuzzing run; cargo test --lib fuzz_long -- --ignored"]
    fn fuzz_long_any_packet_sequence_keeps_the_channel_sound((v, connect, steps) in case()) {
        run(v, connect, steps)?;
    }
}
