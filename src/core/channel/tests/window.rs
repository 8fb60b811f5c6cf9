//! The outbound in-flight window following the path (`core::window`), driven in virtual time
//! by a client a fixed round trip away that acknowledges everything.

use std::collections::{HashSet, VecDeque};

use super::*;

const TICK: Duration = Duration::from_millis(5);

/// What a run saw.
struct Run {
    /// Payload sequence numbers in the order the PUBLISHes reached the client.
    received: Vec<u32>,
    /// Messages offered to the channel.
    offered: u32,
    /// The window after each tick.
    windows: Vec<usize>,
    /// How long each message waited before the channel took it, by sequence number.
    waited: Vec<Duration>,
}

fn numbered(seq: u32, qos: QoS) -> Delivery {
    let mut d = delivery("w", qos);
    let mut publish = publish("w", qos, None);
    publish.payload = Bytes::copy_from_slice(&seq.to_be_bytes());
    let topic = TopicName::parse("w".to_owned(), 0).unwrap();
    d.message = Arc::new(AppMessage::from_publish(
        topic,
        publish,
        None,
        Instant::now(),
    ));
    d
}

/// A v5 client `rtt` away: `arrivals(tick)` messages join the queue each 5 ms tick for
/// `ticks` ticks, then the queue drains. The client answers a PUBLISH one round trip after
/// it went out (PUBACK, or PUBREC) and a PUBREL one round trip after it (PUBCOMP). Checks on
/// every tick that the window stays within `min..=max`, that the in-flight count stays within
/// the window it was sent under, and that no packet id in flight is given to another PUBLISH.
fn run(
    min: u16,
    max: u16,
    qos: QoS,
    rtt: Duration,
    ticks: u32,
    arrivals: impl Fn(u32) -> u32,
) -> Run {
    let mut h = Harness::new(Limits {
        min_inflight: min,
        max_inflight: max,
        ..Limits::default()
    });
    h.connect(connect(ProtocolVersion::V5, "path"));
    let mut to_channel: VecDeque<(Instant, Packet)> = VecDeque::new();
    let mut queue: VecDeque<(u32, Instant)> = VecDeque::new();
    let mut ids_in_flight: HashSet<PacketId> = HashSet::new();
    let mut r = Run {
        received: Vec::new(),
        offered: 0,
        windows: Vec::new(),
        waited: Vec::new(),
    };
    // Bounded: the drain after the last arrival ends once everything is acknowledged.
    for tick in 0..ticks + 20_000 {
        h.now += TICK;
        if tick < ticks {
            for _ in 0..arrivals(tick) {
                queue.push_back((r.offered, h.now));
                r.offered += 1;
            }
        } else if queue.is_empty() && to_channel.is_empty() {
            break;
        }
        // The client's answers, in the order it sent them.
        while to_channel.front().is_some_and(|(at, _)| *at <= h.now) {
            let (_, packet) = to_channel.pop_front().unwrap();
            match &packet {
                Packet::PubAck(a) | Packet::PubComp(a) => {
                    assert!(ids_in_flight.remove(&a.packet_id));
                }
                _ => {}
            }
            h.packet(packet);
        }
        while !queue.is_empty() && h.channel.can_deliver() {
            let (seq, at) = queue.pop_front().unwrap();
            r.waited.push(h.now - at);
            h.channel.deliver(h.now, numbered(seq, qos));
        }
        for packet in h.packets() {
            match packet {
                Packet::Publish(p) => {
                    let id = p.packet_id.expect("QoS 1/2");
                    assert!(!p.dup, "nothing is resent on a path that loses nothing");
                    assert!(ids_in_flight.insert(id), "id {id:?} reused while in flight");
                    r.received
                        .push(u32::from_be_bytes(p.payload[..4].try_into().unwrap()));
                    let ack = Ack::new(id, ReasonCode::SUCCESS);
                    let answer = if qos == QoS::ExactlyOnce {
                        Packet::PubRec(ack)
                    } else {
                        Packet::PubAck(ack)
                    };
                    to_channel.push_back((h.now + rtt, answer));
                }
                Packet::PubRel(a) => {
                    to_channel.push_back((h.now + rtt, Packet::PubComp(a)));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let window = h.channel.inflight_window();
        assert!(
            window >= usize::from(min) && window <= usize::from(max),
            "{window}"
        );
        assert!(h.channel.inflight() <= usize::from(max));
        assert_eq!(ids_in_flight.len(), h.channel.inflight());
        r.windows.push(window);
    }
    assert!(queue.is_empty() && to_channel.is_empty(), "the run drained");
    assert_eq!(h.channel.inflight(), 0);
    r
}

/// Every message reached the client once, in the order offered.
fn assert_in_order(r: &Run) {
    assert_eq!(
        r.received.len(),
        r.offered as usize,
        "nothing lost or repeated"
    );
    assert!(
        r.received.iter().enumerate().all(|(i, &s)| s as usize == i),
        "nothing reordered"
    );
}

#[test]
fn a_long_path_grows_the_window_until_nothing_waits() {
    // 200 msg/s over a 560 ms satellite round trip: QoS 1 needs 112 ids, QoS 2 (two round
    // trips per id) 224; a fixed window of 32 would carry 57 or 29 messages a second.
    let rtt = Duration::from_millis(560);
    for (qos, needed) in [(QoS::AtLeastOnce, 112), (QoS::ExactlyOnce, 224)] {
        let r = run(32, 1024, qos, rtt, 2000, |_| 1);
        assert_in_order(&r);
        let peak = *r.windows.iter().max().unwrap();
        assert!(peak >= needed, "{qos:?}: the window reached {peak}");
        assert!(peak <= 1024);
        // Starting at 32 it grows per round trip (x3 per 1.12 s hold for QoS 2): by 7 s it has grown and the
        // queue drained, and from then on no message waits for it as long as a round trip.
        let late = r.waited[1400..].iter().max().unwrap();
        assert!(*late < rtt, "{qos:?}: a message waited {late:?}");
    }
}

#[test]
fn the_window_never_passes_its_maximum_and_shrinks_back_to_its_minimum() {
    let rtt = Duration::from_millis(300);
    // 400 msg/s for 2 s (240 ids needed, past the maximum of 100: the queue grows), then
    // 10 msg/s for 20 s (the queue drains, then the demand is small).
    let r = run(16, 100, QoS::ExactlyOnce, rtt, 4400, |t| {
        if t < 400 {
            2
        } else {
            u32::from(t % 20 == 0)
        }
    });
    assert_in_order(&r);
    assert_eq!(
        r.windows[399], 100,
        "held at the maximum while the demand exceeds it"
    );
    // 10 msg/s over two 300 ms round trips needs 6 ids: back to the minimum, not below it.
    assert_eq!(*r.windows.last().unwrap(), 16);
}

#[test]
fn a_short_path_keeps_the_starting_window() {
    let r = run(32, 1024, QoS::AtLeastOnce, TICK, 2000, |_| 1);
    assert_in_order(&r);
    assert!(r.windows.iter().all(|&w| w == 32));
}

#[test]
fn equal_bounds_fix_the_window() {
    // `min_inflight = max_inflight`: the fixed window of before, whatever the path.
    let r = run(
        128,
        128,
        QoS::ExactlyOnce,
        Duration::from_millis(560),
        1000,
        |_| 1,
    );
    assert_in_order(&r);
    assert!(r.windows.iter().all(|&w| w == 128));
}

#[test]
fn the_clients_receive_maximum_caps_the_window() {
    let mut h = Harness::new(Limits {
        min_inflight: 4,
        max_inflight: 1024,
        ..Limits::default()
    });
    let mut c = connect(ProtocolVersion::V5, "small");
    c.properties.receive_maximum = Some(3);
    h.connect(c);
    assert_eq!(h.channel.inflight_window(), 3);
}
