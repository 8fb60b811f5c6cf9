//! 0-RTT replay safety, through a UDP relay between a quinn client and the broker that can
//! hold the client's packets back by kind. The client's first flight (Initial and 0-RTT
//! packets, the CONNECT among them) goes through; its Handshake packet (the Finished that
//! completes the broker's handshake) and 1-RTT packets are held until the test releases
//! them. Meanwhile the broker has the early CONNECT and an incomplete handshake: what a
//! replayed flight gives it, since a replayer cannot make the Finished.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use petrel::codec::{Connect, Packet, ProtocolVersion, QoS, ReasonCode};
use petrel::config::ListenerKind;
use quinn::{Connection, Endpoint};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::load;
use crate::common::{connect_packet, publish_struct, unique, will, RawClient, QUIET, WAIT};
use crate::quic::{broker_with, client_endpoint, dial, quic_addr, QuicStream, StreamRead};
use crate::transports::TransportBroker;

// ---------------------------------------------------------------------------------------------
// The relay

/// The QUIC packet kinds in a datagram (coalesced packets walked by their length fields).
#[derive(Debug, Default, PartialEq, Eq)]
struct Kinds {
    zero_rtt: bool,
    /// A Handshake or 1-RTT packet: what completes (or follows) the handshake.
    after_handshake: bool,
}

fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let first = *bytes.first()?;
    let len = 1usize << (first >> 6);
    let mut value = u64::from(first & 0x3f);
    for b in bytes.get(1..len)? {
        value = (value << 8) | u64::from(*b);
    }
    Some((usize::try_from(value).ok()?, len))
}

fn kinds(datagram: &[u8]) -> Kinds {
    let mut kinds = Kinds::default();
    let mut i = 0;
    // Bounded: each round moves past one packet, or stops.
    while let Some(&first) = datagram.get(i) {
        if first == 0 {
            break; // padding (the fixed bit 0x40 may be greased, RFC 9287: not a test)
        }
        if first & 0x80 == 0 {
            kinds.after_handshake = true; // short header: 1-RTT, to the datagram's end
            break;
        }
        let kind = (first >> 4) & 3;
        match kind {
            1 => kinds.zero_rtt = true,
            2 => kinds.after_handshake = true,
            3 => break, // Retry
            _ => {}
        }
        let mut j = i + 5;
        let Some(&dcid) = datagram.get(j) else { break };
        j += 1 + usize::from(dcid);
        let Some(&scid) = datagram.get(j) else { break };
        j += 1 + usize::from(scid);
        if kind == 0 {
            let Some((token, n)) = datagram.get(j..).and_then(varint) else {
                break;
            };
            j += n + token;
        }
        let Some((length, n)) = datagram.get(j..).and_then(varint) else {
            break;
        };
        i = j + n + length;
    }
    kinds
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing goes to the broker yet: the client writes its 0-RTT data before any answer.
    Gate,
    /// Initial and 0-RTT packets go through; Handshake and 1-RTT ones are held.
    HoldHandshake,
    Open,
}

struct Relay {
    addr: SocketAddr,
    mode: mpsc::UnboundedSender<Mode>,
    /// Whether the client has sent 0-RTT packets.
    early: watch::Receiver<bool>,
    /// The client's first flight, as sent before the broker answered.
    first_flight: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(broker: SocketAddr) -> Self {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(broker).await.unwrap();
        let addr = front.local_addr().unwrap();
        let (mode_tx, mut mode_rx) = mpsc::unbounded_channel();
        let (early_tx, early) = watch::channel(false);
        let first_flight = Arc::new(Mutex::new(Vec::new()));
        let flight = Arc::clone(&first_flight);
        let task = tokio::spawn(async move {
            let mut mode = Mode::Gate;
            let mut held: Vec<Vec<u8>> = Vec::new();
            let mut client: Option<SocketAddr> = None;
            let mut from_client = vec![0u8; 65536];
            let mut from_broker = vec![0u8; 65536];
            loop {
                tokio::select! {
                    next = mode_rx.recv() => {
                        let Some(next) = next else { return };
                        mode = next;
                        let keep = |d: &Vec<u8>| mode == Mode::HoldHandshake && kinds(d).after_handshake;
                        let (still, go): (Vec<_>, Vec<_>) = held.drain(..).partition(keep);
                        held = still;
                        for datagram in go {
                            let _ = back.send(&datagram).await;
                        }
                    }
                    got = front.recv_from(&mut from_client) => {
                        let Ok((n, from)) = got else { return };
                        client = Some(from);
                        let datagram = from_client[..n].to_vec();
                        let k = kinds(&datagram);
                        if k.zero_rtt {
                            let _ = early_tx.send(true);
                        }
                        let hold = match mode {
                            Mode::Gate => {
                                flight.lock().unwrap().push(datagram.clone());
                                true
                            }
                            Mode::HoldHandshake => k.after_handshake,
                            Mode::Open => false,
                        };
                        if hold {
                            held.push(datagram);
                        } else {
                            let _ = back.send(&datagram).await;
                        }
                    }
                    got = back.recv(&mut from_broker) => {
                        let Ok(n) = got else { return };
                        if let Some(client) = client {
                            let _ = front.send_to(&from_broker[..n], client).await;
                        }
                    }
                }
            }
        });
        Self {
            addr,
            mode: mode_tx,
            early,
            first_flight,
            task,
        }
    }

    fn set(&self, mode: Mode) {
        self.mode.send(mode).unwrap();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An endpoint holding a session ticket from the broker (one full handshake done).
async fn ticketed_endpoint(broker: &TransportBroker) -> Endpoint {
    let endpoint = client_endpoint(broker);
    let conn = dial(&endpoint, quic_addr(broker)).await;
    let mut control = QuicStream::open(&conn, ProtocolVersion::V5).await;
    control
        .send(&Packet::Connect(Box::new(connect_packet(
            ProtocolVersion::V5,
            &unique("ticket"),
        ))))
        .await;
    assert_eq!(control.expect_connack().await.code, ReasonCode::SUCCESS);
    control.disconnect().await;
    let _ = tokio::time::timeout(WAIT, conn.closed()).await;
    endpoint
}

/// Resumes with 0-RTT through `relay`, sending `connect` in early data, and lets the first
/// flight through while the client's Finished is held.
async fn early_connect(
    endpoint: &Endpoint,
    relay: &Relay,
    connect: Connect,
) -> (Connection, quinn::ZeroRttAccepted, QuicStream) {
    let connecting = endpoint.connect(relay.addr, "localhost").unwrap();
    let Ok((conn, accepted)) = connecting.into_0rtt() else {
        panic!("no 0-RTT: the client holds no usable session ticket");
    };
    let mut control = QuicStream::open(&conn, ProtocolVersion::V5).await;
    control.send(&Packet::Connect(Box::new(connect))).await;
    let mut early = relay.early.clone();
    tokio::time::timeout(WAIT, early.wait_for(|sent| *sent))
        .await
        .expect("the client sends its CONNECT in 0-RTT")
        .unwrap();
    relay.set(Mode::HoldHandshake);
    (conn, accepted, control)
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn the_relay_tells_packet_kinds_apart() {
    // Long headers: Initial (token length 0, length 1) then 0-RTT then Handshake.
    let initial = [0xc0, 0, 0, 0, 1, 1, 0xaa, 0, 0, 1, 0xff];
    let zero_rtt = [0xd0, 0, 0, 0, 1, 0, 0, 1, 0xff];
    let handshake = [0xe0, 0, 0, 0, 1, 0, 0, 1, 0xff];
    assert_eq!(kinds(&initial), Kinds::default());
    let coalesced = [&initial[..], &zero_rtt[..]].concat();
    assert_eq!(
        kinds(&coalesced),
        Kinds {
            zero_rtt: true,
            after_handshake: false
        }
    );
    let with_finished = [&initial[..], &handshake[..], &[0, 0, 0][..]].concat();
    assert!(kinds(&with_finished).after_handshake);
    assert!(kinds(&[0x40, 1, 2, 3]).after_handshake, "a short header");
    let greased = [0x90, 0, 0, 0, 1, 0, 0, 1, 0xff];
    assert!(kinds(&greased).zero_rtt, "0-RTT with the fixed bit greased");
}

#[tokio::test]
async fn harden_zero_rtt_takeover_waits_for_the_handshake_and_a_replay_does_nothing() {
    let broker = broker_with(|_| {}).await;
    let metrics = &broker.running.broker.metrics;
    let tcp = broker.addr(ListenerKind::Tcp);
    let id = unique("zrtt-owner");
    let topic = unique("zrtt");
    // The live session a replayed CONNECT would take over.
    let (mut old, _) = RawClient::connect_v5(tcp, &id).await;
    old.subscribe(1, &topic, QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect_v5(tcp, &unique("zrtt-pub")).await;

    let endpoint = ticketed_endpoint(&broker).await;
    let early_before = load(&metrics.quic_0rtt_accepted);
    let relay = Relay::start(quic_addr(&broker)).await;
    let (conn, accepted, mut control) =
        early_connect(&endpoint, &relay, connect_packet(ProtocolVersion::V5, &id)).await;

    // The broker has the CONNECT, not the client's Finished: the old session is untouched.
    assert!(
        matches!(control.read(QUIET).await, StreamRead::TimedOut),
        "no CONNACK before the handshake completes"
    );
    publisher
        .publish_acked(publish_struct(
            &topic,
            QoS::AtMostOnce,
            None,
            b"still yours",
        ))
        .await;
    let got = old.expect_publish().await;
    assert_eq!(
        &got.payload[..],
        b"still yours",
        "the old session still delivers"
    );

    // The Finished arrives: the takeover happens as usual.
    relay.set(Mode::Open);
    let connack = control.expect_connack().await;
    assert_eq!(connack.code, ReasonCode::SUCCESS);
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    assert!(
        tokio::time::timeout(WAIT, accepted).await.unwrap(),
        "the early data was accepted"
    );
    super::eventually("the broker counts the 0-RTT connection", || {
        load(&metrics.quic_0rtt_accepted) == early_before + 1
    })
    .await;

    // A replay of the same first flight, from another address: whatever the broker makes of
    // it (its single-use ticket refuses the early data, or the CONNECT waits for a Finished
    // that never comes), the session just taken over stays with its client.
    let replayer = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let flight = relay.first_flight.lock().unwrap().clone();
    assert!(!flight.is_empty());
    for datagram in &flight {
        replayer
            .send_to(datagram, quic_addr(&broker))
            .await
            .unwrap();
    }
    control.expect_silence().await;
    assert!(
        conn.close_reason().is_none(),
        "the connection is still open"
    );
    control.subscribe(2, &topic, QoS::AtMostOnce).await;
    publisher
        .publish_acked(publish_struct(
            &topic,
            QoS::AtMostOnce,
            None,
            b"after replay",
        ))
        .await;
    assert_eq!(&control.expect_publish().await.payload[..], b"after replay");
    assert_eq!(
        load(&metrics.quic_0rtt_accepted),
        early_before + 1,
        "the replay was not accepted as a second 0-RTT connection"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn harden_zero_rtt_connect_for_a_new_client_id_acts_before_the_handshake() {
    // Nothing to take over, wipe or publish: CONNACK comes in one round trip, while the
    // client's Finished is still held.
    let broker = broker_with(|_| {}).await;
    let endpoint = ticketed_endpoint(&broker).await;
    let relay = Relay::start(quic_addr(&broker)).await;
    let (_conn, accepted, mut control) = early_connect(
        &endpoint,
        &relay,
        connect_packet(ProtocolVersion::V5, &unique("zrtt-new")),
    )
    .await;
    assert_eq!(control.expect_connack().await.code, ReasonCode::SUCCESS);
    relay.set(Mode::Open);
    assert!(tokio::time::timeout(WAIT, accepted).await.unwrap());
    let topic = unique("zrtt-new");
    control.subscribe(1, &topic, QoS::AtMostOnce).await;
    broker.shutdown().await;
}

#[tokio::test]
async fn harden_zero_rtt_connect_with_a_will_waits_for_the_handshake() {
    // A will would be published if the handshake never completed (a replay): held.
    let broker = broker_with(|_| {}).await;
    let endpoint = ticketed_endpoint(&broker).await;
    let relay = Relay::start(quic_addr(&broker)).await;
    let mut connect = connect_packet(ProtocolVersion::V5, &unique("zrtt-will"));
    connect.will = Some(will(&unique("zrtt-will"), b"gone", QoS::AtMostOnce));
    let (_conn, _accepted, mut control) = early_connect(&endpoint, &relay, connect).await;
    assert!(
        matches!(control.read(QUIET).await, StreamRead::TimedOut),
        "no CONNACK before the handshake completes"
    );
    relay.set(Mode::Open);
    assert_eq!(control.expect_connack().await.code, ReasonCode::SUCCESS);
    broker.shutdown().await;
}
