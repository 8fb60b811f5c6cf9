//! Several quinn endpoints on one UDP port, so that a QUIC listener uses every core.
//!
//! quinn runs all of an endpoint's socket I/O, packet demultiplexing and timers in one task
//! (its endpoint driver); connections' own work (crypto, streams) runs in their tasks. On a
//! connection storm the endpoint task is the bottleneck (quinn issue #1576 "Intra-endpoint
//! horizontal scaling"), so a listener binds `quic.endpoints` sockets to the same address
//! with `SO_REUSEPORT` (Linux), one quinn endpoint on each. The kernel spreads datagrams over
//! the sockets by a hash of the 4-tuple.
//!
//! That hash is what breaks connection migration with plain `SO_REUSEPORT` (quic-go issue
//! #2597): a client whose address changes (NAT rebinding, a new network) lands on another
//! socket, whose endpoint does not know the connection ID and answers with a stateless reset
//! (the reset key is the listener's, so the client believes it) — the connection dies. So
//! routing here is by connection ID, without BPF:
//! - every endpoint issues connection IDs whose first byte is its own index
//!   ([`RoutedCids`], 8 bytes, the other 7 random from the system's CSPRNG: the plaintext
//!   server-id scheme of QUIC-LB, draft-ietf-quic-load-balancers);
//! - each endpoint's socket ([`RoutedSocket`]) looks at every datagram it receives: a packet
//!   whose destination connection ID names another endpoint is handed to that endpoint's
//!   queue (an in-process channel) and never seen by this one. Initial and 0-RTT packets
//!   carry an ID the client chose, and stay where the kernel put them: before the handshake
//!   is confirmed a client does not migrate (RFC 9000 §9), so its 4-tuple, and the socket,
//!   stay the same until the connection uses the endpoint's own IDs.
//!
//! A migrated connection's packets thus cost one extra copy (the datagram moves between two
//! endpoint tasks) and its answers leave from its own endpoint's socket, which has the same
//! local address. Every endpoint shares one `ServerConfig` (the Retry and NEW_TOKEN key) and
//! one reset key, so any of them validates a token the others issued.
//!
//! Limits: a GRO batch (several datagrams of one 4-tuple in one read) is routed by its first
//! datagram, so two connections of one client socket would have to live on one endpoint, as
//! they do unless one of them migrated. `SO_REUSEPORT` lets any process of the same user join
//! the port's group and receive a share of its datagrams, as with any reuse-port server.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::RecvMeta;
use quinn::{
    AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, Endpoint, EndpointConfig, ServerConfig,
    UdpPoller,
};
use ring::rand::SecureRandom;
use tokio::sync::mpsc;

/// Length of the connection IDs the endpoints issue (quinn's default length too).
const CID_LEN: usize = 8;
/// Datagrams waiting to be handed to another endpoint; past this they are dropped, as a
/// full socket buffer would.
const FORWARD_QUEUE: usize = 4096;

/// The receive and send buffer each listener socket asks for (`SO_RCVBUF`, `SO_SNDBUF`). The
/// kernel's default (about 208 KiB: some 90 datagrams of a full-size Initial) overflows in a
/// connection storm while the endpoint task is busy with handshakes: 5,900–6,100 client
/// datagrams dropped per 10,000-client storm on loopback, each costing its client a probe
/// timeout (about 1 s for an Initial) before it sends again. Linux caps what is granted at
/// `net.core.rmem_max` / `wmem_max` (raise those for the full size); memory is used only
/// while datagrams wait.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Binds `count` quinn server endpoints to `addr` (one when `count` is 1, or where
/// `SO_REUSEPORT` is not available). The first endpoint's local address is the listener's
/// (with the port resolved when `addr` has port 0).
pub fn bind(server: ServerConfig, addr: SocketAddr, count: usize) -> io::Result<Vec<Endpoint>> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| io::Error::other("QUIC endpoints need a tokio runtime"))?;
    if count <= 1 || !cfg!(target_os = "linux") {
        let socket = udp_socket(addr, false)?;
        return Ok(vec![Endpoint::new(
            EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )?]);
    }
    let count = count.min(usize::from(u8::MAX));
    let mut sockets = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let socket = udp_socket(bound, true)?;
        bound = socket.local_addr()?;
        sockets.push(socket);
    }
    let (senders, inboxes): (Vec<_>, Vec<_>) = (0..count)
        .map(|_| mpsc::channel::<Forwarded>(FORWARD_QUEUE))
        .unzip();
    let peers: Arc<[mpsc::Sender<Forwarded>]> = senders.into();
    // One reset key for all: a stateless reset must be the same whichever endpoint sends it.
    let base = EndpointConfig::default();
    let mut endpoints = Vec::with_capacity(count);
    for (index, (socket, inbox)) in sockets.into_iter().zip(inboxes).enumerate() {
        let index = u8::try_from(index).expect("count is at most 255");
        let socket = RoutedSocket {
            inner: runtime.wrap_udp_socket(socket)?,
            index,
            inbox: Mutex::new(inbox),
            peers: Arc::clone(&peers),
        };
        let mut config = base.clone();
        config.cid_generator(move || Box::new(RoutedCids::new(index)));
        endpoints.push(Endpoint::new_with_abstract_socket(
            config,
            Some(server.clone()),
            Arc::new(socket),
            Arc::clone(&runtime),
        )?);
    }
    Ok(endpoints)
}

/// A UDP socket bound to `addr` with [`SOCKET_BUFFER`] asked for (a smaller grant is kept),
/// with `SO_REUSEPORT` when `reuse_port` (Linux only).
pub fn udp_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        set_reuse_port(&socket)?;
    }
    // Best effort: the kernel grants at most its maximum, and a refusal leaves the default.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(target_os = "linux")]
fn set_reuse_port(socket: &socket2::Socket) -> io::Result<()> {
    socket.set_reuse_port(true)
}

#[cfg(not(target_os = "linux"))]
fn set_reuse_port(_socket: &socket2::Socket) -> io::Result<()> {
    Err(io::Error::other("SO_REUSEPORT endpoints are Linux-only"))
}

/// Connection IDs drawn from the system's CSPRNG per [`RANDOM_BATCH`] bytes: one `getrandom`
/// call per 64 IDs rather than per ID (a connection takes several).
const RANDOM_BATCH: usize = 64 * CID_LEN;

/// Connection IDs naming the endpoint that issued them in their first byte.
struct RoutedCids {
    index: u8,
    random: [u8; RANDOM_BATCH],
    /// Bytes of `random` already used.
    used: usize,
}

impl RoutedCids {
    fn new(index: u8) -> Self {
        Self {
            index,
            random: [0; RANDOM_BATCH],
            used: RANDOM_BATCH,
        }
    }
}

impl ConnectionIdGenerator for RoutedCids {
    fn generate_cid(&mut self) -> ConnectionId {
        if self.used == RANDOM_BATCH {
            if ring::rand::SystemRandom::new()
                .fill(&mut self.random)
                .is_err()
            {
                // The system's CSPRNG does not fail on Linux; should it, the IDs stay unique
                // (quinn retries a clash, so they must vary), if predictable.
                static FALLBACK: AtomicU64 = AtomicU64::new(1);
                for chunk in self.random.chunks_exact_mut(CID_LEN) {
                    let n = FALLBACK.fetch_add(1, Ordering::Relaxed);
                    chunk.copy_from_slice(&n.to_be_bytes());
                }
            }
            self.used = 0;
        }
        let mut bytes = [0u8; CID_LEN];
        bytes.copy_from_slice(&self.random[self.used..self.used + CID_LEN]);
        self.used += CID_LEN;
        bytes[0] = self.index;
        ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// A datagram received by one endpoint's socket for another endpoint.
struct Forwarded {
    meta: RecvMeta,
    data: Vec<u8>,
}

/// One endpoint's socket: its own `SO_REUSEPORT` socket plus the datagrams the other
/// endpoints received for its connections.
struct RoutedSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    index: u8,
    inbox: Mutex<mpsc::Receiver<Forwarded>>,
    peers: Arc<[mpsc::Sender<Forwarded>]>,
}

impl fmt::Debug for RoutedSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutedSocket")
            .field("index", &self.index)
            .field("endpoints", &self.peers.len())
            .finish_non_exhaustive()
    }
}

/// The endpoint a datagram belongs to, by the destination connection ID of its first packet
/// (coalesced packets share it); `None` for packets that stay where they arrived.
fn owner(datagram: &[u8], endpoints: usize) -> Option<usize> {
    let first = *datagram.first()?;
    let id_first_byte = if first & 0x80 == 0 {
        // Short header: flags, then the destination connection ID.
        *datagram.get(1)?
    } else {
        // Long header (RFC 9000 §17.2): Initial (0) and 0-RTT (1) carry the client's own ID.
        let packet_type = (first >> 4) & 0x03;
        if packet_type < 2 || usize::from(*datagram.get(5)?) != CID_LEN {
            return None;
        }
        *datagram.get(6)?
    };
    let index = usize::from(id_first_byte);
    (index < endpoints).then_some(index)
}

impl RoutedSocket {
    /// Takes datagrams other endpoints forwarded here, up to `bufs.len()`.
    fn take_forwarded(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> usize {
        let mut inbox = self.inbox.lock().expect("never poisoned");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Poll::Ready(Some(forwarded)) = inbox.poll_recv(cx) else {
                break;
            };
            let len = forwarded.data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&forwarded.data[..len]);
            meta[n] = RecvMeta {
                len,
                stride: forwarded.meta.stride.min(len).max(1),
                ..forwarded.meta
            };
            n += 1;
        }
        n
    }
}

impl AsyncUdpSocket for RoutedSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let forwarded = self.take_forwarded(cx, bufs, meta);
        if forwarded > 0 {
            return Poll::Ready(Ok(forwarded));
        }
        loop {
            let received = match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            let mut kept = 0;
            for i in 0..received {
                let len = meta[i].len;
                let to = owner(&bufs[i][..len], self.peers.len());
                match to {
                    Some(to) if to != usize::from(self.index) => {
                        let forwarded = Forwarded {
                            meta: meta[i],
                            data: bufs[i][..len].to_vec(),
                        };
                        // A full queue drops the datagram, as a full socket buffer would.
                        let _ = self.peers[to].try_send(forwarded);
                    }
                    _ => {
                        if kept != i {
                            let (head, tail) = bufs.split_at_mut(i);
                            head[kept][..len].copy_from_slice(&tail[0][..len]);
                            meta[kept] = meta[i];
                        }
                        kept += 1;
                    }
                }
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_routes_by_the_endpoints_connection_id_and_keeps_client_chosen_ids() {
        // Short header: flags 0x40, then the destination ID.
        assert_eq!(owner(&[0x40, 1, 9, 9, 9, 9, 9, 9, 9, 0xaa], 2), Some(1));
        assert_eq!(owner(&[0x40, 0, 9, 9, 9, 9, 9, 9, 9], 2), Some(0));
        // An index no endpoint has: stays.
        assert_eq!(owner(&[0x40, 7, 9, 9, 9, 9, 9, 9, 9], 2), None);
        // Long header, Handshake (type 2): version, ID length 8, ID.
        let handshake = [0xe0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(owner(&handshake, 2), Some(1));
        // Initial (type 0) and 0-RTT (type 1): the client's ID, never routed.
        let initial = [0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(owner(&initial, 2), None);
        let zero_rtt = [0xd0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(owner(&zero_rtt, 2), None);
        // Truncated or empty datagrams: no panic, no route.
        assert_eq!(owner(&[], 2), None);
        assert_eq!(owner(&[0x40], 2), None);
        assert_eq!(owner(&[0xe0, 0, 0], 2), None);
    }

    #[test]
    fn connection_ids_name_their_endpoint() {
        let mut cids = RoutedCids::new(1);
        let a = cids.generate_cid();
        let b = cids.generate_cid();
        assert_eq!(a.len(), CID_LEN);
        assert_eq!((a[0], b[0]), (1, 1));
        assert_ne!(a, b, "random beyond the first byte");
    }
}
