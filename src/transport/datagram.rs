//! The QoS 0 latency class over QUIC DATAGRAM frames (RFC 9221): framing, redundancy and
//! duplicate suppression, shared by the broker (`broker::quic`) and the client
//! (`client::transport`). The wire extension is specified in docs/datagram.md.
//!
//! A datagram carries one complete MQTT PUBLISH packet at QoS 0, encoded exactly as on a
//! stream, behind a 5-byte header: a kind byte ([`KIND_PUBLISH`]) and a 32-bit sequence
//! number (big-endian, per connection and direction, wrapping). Each message is sent
//! `copies` times, the copies [`Sender`]'s `spacing` apart so that they travel in different
//! QUIC packets; the receiver keeps a [`DuplicateWindow`] over sequence numbers and passes each
//! message on once. Nothing here retransmits: a message whose copies are all lost is lost,
//! like any QoS 0 message.
//!
//! What this module must not do: make MQTT decisions (which packets may go as datagrams is
//! the caller's; the receiver checks only that a datagram holds one QoS 0 PUBLISH), spawn
//! tasks (the futures here are spawned by their callers) or queue without bound (the send
//! queue and the repair queue are bounded, quinn's datagram buffers drop the oldest).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::codec::{Codec, Packet, QoS};

/// The MQTT 5 User Property name of the negotiation, in CONNECT (the copies the client asks
/// for) and CONNACK (the copies the broker will send).
pub const USER_PROPERTY: &str = "petrel-datagram";
/// The kind byte of a PUBLISH datagram, version 1 of the extension. Other values are
/// reserved: such datagrams are counted as invalid and dropped.
pub const KIND_PUBLISH: u8 = 0x01;
/// Kind byte and sequence number.
pub const HEADER_LEN: usize = 5;
/// The most copies of one message either side sends.
pub const MAX_COPIES: u8 = 4;
/// Sequence numbers behind the highest one seen that are still told apart; older ones are
/// dropped as stale.
pub const WINDOW: u32 = 1024;
/// Framed datagrams queued for the sender task; more are dropped (QoS 0) and counted.
pub const SEND_QUEUE: usize = 512;
/// Bytes the sender frames datagrams into before it allocates again.
const FRAME_CHUNK: usize = 16 * 1024;
/// Copies waiting for their time; when full, the oldest waiting copy is dropped.
const REPAIR_QUEUE: usize = 2048;
/// The receive and send buffers given to quinn on a connection that may use datagrams.
pub const QUINN_RECEIVE_BUFFER: usize = 256 * 1024;
pub const QUINN_SEND_BUFFER: usize = 64 * 1024;
/// The time between two copies of a message by default: long enough that they leave in
/// different QUIC packets, short against the path delay.
pub const DEFAULT_SPACING: Duration = Duration::from_millis(2);

/// What happened to datagrams, in one direction pair of a connection (or summed over a
/// broker's connections). Copies are counted as datagrams.
#[derive(Debug, Default)]
pub struct Counters {
    /// Datagrams handed to QUIC (every copy).
    pub sent: AtomicU64,
    /// Messages that would have gone as datagrams but were too large: sent on a stream.
    pub fallbacks: AtomicU64,
    /// Messages or copies dropped before QUIC: the send or repair queue was full, or QUIC
    /// refused the datagram.
    pub send_dropped: AtomicU64,
    /// Datagrams received (every copy).
    pub received: AtomicU64,
    /// Messages passed on (once each).
    pub delivered: AtomicU64,
    /// Copies of messages already passed on.
    pub duplicates: AtomicU64,
    /// Datagrams older than the duplicate window: dropped.
    pub stale: AtomicU64,
    /// Datagrams that are not a well-formed QoS 0 PUBLISH behind a known header: dropped.
    pub invalid: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("shorter than the datagram header")]
    Short,
    #[error("unknown datagram kind {0:#04x}")]
    Kind(u8),
    #[error("not one QoS 0 PUBLISH packet")]
    NotQos0Publish,
}

/// Parses a client's or broker's copy count (the User Property's value): 1 to
/// [`MAX_COPIES`].
pub fn parse_copies(value: &str) -> Option<u8> {
    value
        .parse::<u8>()
        .ok()
        .filter(|n| (1..=MAX_COPIES).contains(n))
}

/// Whether `packet` (one encoded MQTT packet) is a QoS 0 PUBLISH, the only packet that may
/// go as a datagram.
pub fn is_qos0_publish(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b >> 4 == 3 && b & 0x06 == 0)
}

/// The length of the MQTT packet at the front of `buf` from its fixed header, if `buf` holds
/// it whole.
pub fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining: usize = 0;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            let len = 1 + i + 1 + remaining;
            return (len <= buf.len()).then_some(len);
        }
    }
    None
}

/// Appends one framed datagram (header and packet) to `out`.
pub fn frame(seq: u32, packet: &[u8], out: &mut BytesMut) {
    out.put_u8(KIND_PUBLISH);
    out.put_u32(seq);
    out.put_slice(packet);
}

/// Splits a received datagram into its sequence number and its PUBLISH packet, checking
/// that the packet is one QoS 0 PUBLISH filling the rest exactly (the codec checks the rest).
pub fn parse(datagram: &Bytes) -> Result<(u32, Bytes), Invalid> {
    if datagram.len() < HEADER_LEN {
        return Err(Invalid::Short);
    }
    if datagram[0] != KIND_PUBLISH {
        return Err(Invalid::Kind(datagram[0]));
    }
    let seq = u32::from_be_bytes([datagram[1], datagram[2], datagram[3], datagram[4]]);
    let packet = datagram.slice(HEADER_LEN..);
    if !is_qos0_publish(&packet) || packet_len(&packet) != Some(packet.len()) {
        return Err(Invalid::NotQos0Publish);
    }
    Ok((seq, packet))
}

/// Decodes the PUBLISH of a parsed datagram; `None` (count it invalid) for anything but a
/// QoS 0 PUBLISH without a topic alias (aliases are stateful and datagrams are unordered).
pub fn decode(codec: &mut Codec, packet: Bytes) -> Option<Packet> {
    let mut buf = BytesMut::from(&packet[..]);
    match codec.decode(&mut buf) {
        Ok(Some(Packet::Publish(publish)))
            if buf.is_empty()
                && publish.qos == QoS::AtMostOnce
                && publish.properties.topic_alias.is_none() =>
        {
            Some(Packet::Publish(publish))
        }
        _ => None,
    }
}

/// Whether a sequence number is new, a copy of one seen, or too old to tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
    Stale,
}

/// The receiver's sliding window over sequence numbers (serial-number arithmetic, so the
/// 32-bit counter may wrap): the highest number seen and a bitmap of the [`WINDOW`] numbers
/// up to it. Constant memory whatever the peer sends.
#[derive(Debug, Clone, Default)]
pub struct DuplicateWindow {
    /// The highest sequence number seen; meaningless until `started`.
    highest: u32,
    started: bool,
    /// Bit `i` of the bitmap: `highest - i` was seen.
    seen: [u64; (WINDOW / 64) as usize],
}

impl DuplicateWindow {
    /// Records `seq`, telling whether it is new.
    pub fn check(&mut self, seq: u32) -> Verdict {
        if !self.started {
            self.started = true;
            self.highest = seq;
            self.seen = Default::default();
            self.set(0);
            return Verdict::New;
        }
        let ahead = seq.wrapping_sub(self.highest);
        if ahead != 0 && ahead < 1 << 31 {
            self.shift(ahead);
            self.highest = seq;
            self.set(0);
            return Verdict::New;
        }
        let behind = self.highest.wrapping_sub(seq);
        if behind >= WINDOW {
            return Verdict::Stale;
        }
        if self.is_set(behind) {
            Verdict::Duplicate
        } else {
            self.set(behind);
            Verdict::New
        }
    }

    fn set(&mut self, age: u32) {
        self.seen[(age / 64) as usize] |= 1 << (age % 64);
    }

    fn is_set(&self, age: u32) -> bool {
        self.seen[(age / 64) as usize] & (1 << (age % 64)) != 0
    }

    /// Ages every bit by `by`.
    fn shift(&mut self, by: u32) {
        if by >= WINDOW {
            self.seen = Default::default();
            return;
        }
        let (words, bits) = ((by / 64) as usize, by % 64);
        let n = self.seen.len();
        for i in (0..n).rev() {
            let from = i.checked_sub(words);
            let hi = from.map_or(0, |j| self.seen[j] << bits);
            let lo = match (from.and_then(|j| j.checked_sub(1)), bits) {
                (Some(j), b) if b > 0 => self.seen[j] >> (64 - b),
                _ => 0,
            };
            self.seen[i] = hi | lo;
        }
    }
}

/// The send side of one connection: numbers messages and frames them into datagrams for
/// the [`send_loop`] task, dropping (and counting) when its queue is full.
#[derive(Debug)]
pub struct Sender {
    next: u32,
    tx: mpsc::Sender<Bytes>,
    /// Framing buffer, reused: one allocation for many datagrams.
    buf: BytesMut,
}

impl Sender {
    /// A sender and the receiving end its [`send_loop`] takes.
    pub fn new() -> (Self, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let sender = Self {
            next: 0,
            tx,
            buf: BytesMut::new(),
        };
        (sender, rx)
    }

    /// Sends one encoded QoS 0 PUBLISH as datagrams if it fits `max_datagram_size`; gives it
    /// back otherwise (the caller sends it on a stream).
    pub fn send<'a>(
        &mut self,
        packet: &'a [u8],
        max_datagram_size: Option<usize>,
        counters: &Counters,
    ) -> Result<(), &'a [u8]> {
        match max_datagram_size {
            Some(max) if HEADER_LEN + packet.len() <= max => {}
            _ => {
                bump(&counters.fallbacks);
                return Err(packet);
            }
        }
        let need = HEADER_LEN + packet.len();
        if self.buf.capacity() < need {
            // One allocation for many datagrams (each keeps its slice of it alive).
            self.buf.reserve(need.max(FRAME_CHUNK));
        }
        frame(self.next, packet, &mut self.buf);
        self.next = self.next.wrapping_add(1);
        let datagram = self.buf.split().freeze();
        if self.tx.try_send(datagram).is_err() {
            bump(&counters.send_dropped);
        }
        Ok(())
    }
}

/// Sends each framed datagram at once, and its further `copies - 1` copies `spacing` apart,
/// until the [`Sender`] is dropped or the connection is lost.
pub async fn send_loop(
    conn: quinn::Connection,
    mut rx: mpsc::Receiver<Bytes>,
    copies: u8,
    spacing: Duration,
    counters: impl AsRef<Counters>,
) {
    let counters = counters.as_ref();
    // (when, datagram, copies still to send after this one)
    let mut repairs: VecDeque<(Instant, Bytes, u8)> = VecDeque::new();
    let send = |datagram: Bytes| match conn.send_datagram(datagram) {
        Ok(()) => {
            bump(&counters.sent);
            true
        }
        Err(quinn::SendDatagramError::ConnectionLost(_)) => false,
        Err(_) => {
            bump(&counters.send_dropped);
            true
        }
    };
    loop {
        let next_repair = repairs.front().map(|r| r.0);
        let due = async {
            match next_repair {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            datagram = rx.recv() => {
                let Some(datagram) = datagram else { return };
                if !send(datagram.clone()) {
                    return;
                }
                if copies > 1 {
                    if repairs.len() >= REPAIR_QUEUE {
                        repairs.pop_front();
                        bump(&counters.send_dropped);
                    }
                    repairs.push_back((Instant::now() + spacing, datagram, copies - 2));
                }
            }
            () = due => {
                let now = Instant::now();
                while repairs.front().is_some_and(|r| r.0 <= now) {
                    let Some((_, datagram, left)) = repairs.pop_front() else { break };
                    if !send(datagram.clone()) {
                        return;
                    }
                    if left > 0 {
                        repairs.push_back((now + spacing, datagram, left - 1));
                    }
                }
            }
        }
    }
}

/// Reads the connection's datagrams until it is lost: each new, well-formed QoS 0 PUBLISH
/// goes to `tx` once, wrapped by `wrap`; everything else is counted and dropped.
pub async fn receive_loop<E>(
    conn: quinn::Connection,
    mut codec: Codec,
    tx: mpsc::Sender<E>,
    wrap: impl Fn(Packet) -> E,
    counters: impl AsRef<Counters>,
) {
    let counters = counters.as_ref();
    let mut window = DuplicateWindow::default();
    while let Ok(datagram) = conn.read_datagram().await {
        bump(&counters.received);
        let Ok((seq, packet)) = parse(&datagram) else {
            bump(&counters.invalid);
            continue;
        };
        match window.check(seq) {
            Verdict::New => {}
            Verdict::Duplicate => {
                bump(&counters.duplicates);
                continue;
            }
            Verdict::Stale => {
                bump(&counters.stale);
                continue;
            }
        }
        let Some(packet) = decode(&mut codec, packet) else {
            bump(&counters.invalid);
            continue;
        };
        bump(&counters.delivered);
        if tx.send(wrap(packet)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode, ProtocolVersion, Publish};
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn publish(qos: QoS) -> Bytes {
        let mut out = BytesMut::new();
        let packet = Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: "t/1".into(),
            packet_id: (qos != QoS::AtMostOnce).then_some(crate::codec::PacketId(1)),
            properties: Default::default(),
            payload: Bytes::from_static(b"hello"),
        });
        encode(&packet, ProtocolVersion::V5, &mut out);
        out.freeze()
    }

    #[test]
    fn frame_then_parse_round_trips() {
        let packet = publish(QoS::AtMostOnce);
        let mut out = BytesMut::new();
        frame(0xDEAD_BEEF, &packet, &mut out);
        assert_eq!(&out[..5], &[0x01, 0xDE, 0xAD, 0xBE, 0xEF]);
        let (seq, inner) = parse(&out.freeze()).unwrap();
        assert_eq!(seq, 0xDEAD_BEEF);
        assert_eq!(inner, packet);
        let mut codec = Codec::with_version(ProtocolVersion::V5, 1 << 20);
        assert!(matches!(
            decode(&mut codec, inner),
            Some(Packet::Publish(_))
        ));
    }

    #[test]
    fn parse_refuses_other_kinds_qos_and_trailing_bytes() {
        let mut out = BytesMut::new();
        frame(1, &publish(QoS::AtLeastOnce), &mut out);
        assert_eq!(parse(&out.freeze()), Err(Invalid::NotQos0Publish));
        let mut out = BytesMut::new();
        frame(1, &publish(QoS::AtMostOnce), &mut out);
        out.put_u8(0);
        assert_eq!(parse(&out.freeze()), Err(Invalid::NotQos0Publish));
        assert_eq!(
            parse(&Bytes::from_static(&[2, 0, 0, 0, 0, 0x30, 0])),
            Err(Invalid::Kind(2))
        );
        assert_eq!(parse(&Bytes::from_static(&[1, 0])), Err(Invalid::Short));
    }

    #[test]
    fn window_tells_new_duplicate_and_stale() {
        let mut w = DuplicateWindow::default();
        assert_eq!(w.check(5), Verdict::New);
        assert_eq!(w.check(5), Verdict::Duplicate);
        assert_eq!(w.check(3), Verdict::New);
        assert_eq!(w.check(3), Verdict::Duplicate);
        assert_eq!(w.check(5 + WINDOW), Verdict::New);
        assert_eq!(w.check(5), Verdict::Stale);
        assert_eq!(w.check(6), Verdict::New);
        assert_eq!(w.check(6), Verdict::Duplicate);
        // Across the wrap.
        let mut w = DuplicateWindow::default();
        assert_eq!(w.check(u32::MAX), Verdict::New);
        assert_eq!(w.check(0), Verdict::New);
        assert_eq!(w.check(u32::MAX), Verdict::Duplicate);
    }

    #[test]
    fn packet_len_reads_the_fixed_header() {
        let packet = publish(QoS::AtMostOnce);
        assert_eq!(packet_len(&packet), Some(packet.len()));
        assert_eq!(packet_len(&packet[..packet.len() - 1]), None);
        assert_eq!(packet_len(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0]), None);
    }

    proptest! {
        /// Against a model that remembers every number: within the window the verdict is
        /// exact, and nothing is ever passed on twice.
        #[test]
        fn window_matches_a_model(start in any::<u32>(), steps in prop::collection::vec(-1500i64..1500, 1..400)) {
            let mut w = DuplicateWindow::default();
            let mut seen = HashSet::new();
            let mut highest: Option<u32> = None;
            for step in steps {
                let seq = start.wrapping_add(step as u32);
                let verdict = w.check(seq);
                let model = match highest {
                    None => Verdict::New,
                    Some(h) => {
                        let ahead = seq.wrapping_sub(h);
                        if ahead != 0 && ahead < 1 << 31 { Verdict::New }
                        else if h.wrapping_sub(seq) >= WINDOW { Verdict::Stale }
                        else if seen.contains(&seq) { Verdict::Duplicate }
                        else { Verdict::New }
                    }
                };
                prop_assert_eq!(verdict, model, "seq {}", seq);
                if verdict == Verdict::New {
                    prop_assert!(seen.insert(seq), "passed on twice: {}", seq);
                    if highest.is_none_or(|h| { let a = seq.wrapping_sub(h); a != 0 && a < 1 << 31 }) {
                        highest = Some(seq);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_datagrams_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let datagram = Bytes::from(bytes);
            if let Ok((_, packet)) = parse(&datagram) {
                let mut codec = Codec::with_version(ProtocolVersion::V5, 1 << 20);
                let _ = decode(&mut codec, packet);
            }
            let _ = packet_len(&datagram);
        }
    }
}
