//! The table of connected clients, for operators: who is connected, from where, over which
//! transport, since when, and how their link behaves (QUIC's path statistics from quinn, TCP's
//! from the kernel through `tcp_info`). A connection enters it once its
//! CONNECT is accepted and leaves when it closes; the message path only bumps the
//! connection's own counters (relaxed atomics on a struct no other connection writes).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use rustc_hash::FxHashMap;

use super::mailbox::Mailbox;
use super::tcp_info::TcpLinks;
use crate::codec::ReasonCode;

/// One connected client.
#[derive(Debug)]
pub struct ClientInfo {
    pub conn_id: u64,
    pub client_id: Arc<str>,
    pub username: Option<Box<str>>,
    pub peer: SocketAddr,
    /// Our end of a byte-stream transport's TCP connection (`None` for QUIC): with `peer`, it
    /// finds the connection's socket in a [`TcpLinks`] snapshot.
    pub local: Option<SocketAddr>,
    /// `tcp`, `tls`, `ws`, `wss` or `quic`.
    pub transport: &'static str,
    /// 3, 4 or 5.
    pub proto_ver: u8,
    pub keepalive: u16,
    pub clean_start: bool,
    pub expiry_interval: u32,
    pub connected_at: SystemTime,
    pub mailbox: Arc<Mailbox>,
    /// PUBLISH packets received from the client.
    pub recv_msg: AtomicU64,
    /// Deliveries sent to it.
    pub send_msg: AtomicU64,
    /// QoS 1/2 deliveries in flight (as of the connection's last turn).
    pub inflight: AtomicU32,
    /// The outbound in-flight window's size (`core::window`), as of the same turn.
    pub inflight_max: AtomicU32,
    pub subscriptions: AtomicU32,
    /// The QUIC connection, whose path statistics the API reads.
    pub quic: Option<quinn::Connection>,
}

/// A link's quality as the transport measures it: QUIC's path statistics, or the kernel's
/// `TCP_INFO` for the byte-stream transports (see `tcp_info::quality` for how TCP's counters
/// map onto these fields).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkQuality {
    /// Smoothed round-trip time, in microseconds.
    pub rtt_us: u64,
    /// Congestion window, in bytes.
    pub cwnd: u64,
    /// Packets sent (TCP: data segments sent, retransmissions included).
    pub sent_packets: u64,
    /// Packets declared lost (TCP: segments retransmitted).
    pub lost_packets: u64,
    /// Bytes declared lost (TCP: bytes retransmitted).
    pub lost_bytes: u64,
    /// Times the congestion controller backed off (TCP: not counted by the kernel, 0).
    pub congestion_events: u64,
}

impl ClientInfo {
    /// Whether the client's transport runs over TCP (and so has figures in a [`TcpLinks`]).
    pub fn is_tcp(&self) -> bool {
        self.local.is_some()
    }

    /// The transport's own measure of the link: QUIC's path statistics from quinn; for the
    /// byte-stream transports, the connection's figures in `tcp` (`None` without a snapshot,
    /// or if the snapshot missed the socket).
    pub fn link_quality_with(&self, tcp: Option<&TcpLinks>) -> Option<LinkQuality> {
        if let Some(conn) = &self.quic {
            return Some(quic_quality(conn));
        }
        tcp?.get(self.local?, self.peer)
    }

    pub fn count_received(&self) {
        self.recv_msg.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_sent(&self, n: u64) {
        self.send_msg.fetch_add(n, Ordering::Relaxed);
    }
}

fn quic_quality(conn: &quinn::Connection) -> LinkQuality {
    let stats = conn.stats();
    LinkQuality {
        rtt_us: u64::try_from(stats.path.rtt.as_micros()).unwrap_or(u64::MAX),
        cwnd: stats.path.cwnd,
        sent_packets: stats.path.sent_packets,
        lost_packets: stats.path.lost_packets,
        lost_bytes: stats.path.lost_bytes,
        congestion_events: stats.path.congestion_events,
    }
}

/// Told when a client connects and disconnects (for `$SYS` client events).
pub trait ClientEvents: Send + Sync {
    fn connected(&self, info: &ClientInfo);
    fn disconnected(&self, info: &ClientInfo, reason: ReasonCode);
}

/// Connected clients by client id.
#[derive(Default)]
pub struct Clients {
    table: Mutex<FxHashMap<Arc<str>, Arc<ClientInfo>>>,
    events: OnceLock<Arc<dyn ClientEvents>>,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clients")
            .field("connected", &self.len())
            .finish()
    }
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, FxHashMap<Arc<str>, Arc<ClientInfo>>> {
        self.table.lock().expect("clients lock is never poisoned")
    }

    /// Whom to tell of connections and disconnections (set once, at start-up).
    pub fn set_events(&self, events: Arc<dyn ClientEvents>) {
        let _ = self.events.set(events);
    }

    /// A connection's CONNECT was accepted (replacing the connection it took over from).
    pub fn insert(&self, info: Arc<ClientInfo>) {
        self.lock()
            .insert(Arc::clone(&info.client_id), Arc::clone(&info));
        if let Some(events) = self.events.get() {
            events.connected(&info);
        }
    }

    /// Connection `info.conn_id` closed for `reason`; a newer connection of the same client
    /// stays in the table.
    pub fn remove(&self, info: &ClientInfo, reason: ReasonCode) {
        {
            let mut table = self.lock();
            if table
                .get(&info.client_id)
                .is_some_and(|c| c.conn_id == info.conn_id)
            {
                table.remove(&info.client_id);
            }
        }
        if let Some(events) = self.events.get() {
            events.disconnected(info, reason);
        }
    }

    pub fn get(&self, client_id: &str) -> Option<Arc<ClientInfo>> {
        self.lock().get(client_id).cloned()
    }

    /// Every connected client (a snapshot: handles, not copies).
    pub fn all(&self) -> Vec<Arc<ClientInfo>> {
        self.lock().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}
