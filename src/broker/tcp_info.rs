//! TCP link figures for the operators' view: the kernel's `TCP_INFO` of the broker's TCP
//! connections (round-trip time, congestion window, segments sent and retransmitted), read
//! through the `sock_diag` netlink interface rather than `getsockopt`, so that no `unsafe`
//! code of ours is needed (the crate forbids it).
//!
//! [`snapshot`] asks the kernel for one dump of the established TCP sockets (IPv4, then IPv6)
//! with their `INET_DIAG_INFO` attribute and files each by its (local, peer) address pair,
//! which is how a byte-stream connection ([`ClientInfo::local`] and `peer`) finds its own.
//! The netlink calls block: async callers use [`measure`], which runs the dump on tokio's
//! blocking pool. Nothing here runs on the message path; a snapshot is taken per API request
//! or Prometheus scrape that shows TCP clients.
//!
//! Linux only; elsewhere, and where netlink is refused (a restricted container), the snapshot
//! is an error and TCP clients show no link figures.
//!
//! [`ClientInfo::local`]: super::clients::ClientInfo::local

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use super::clients::LinkQuality;

/// A dump stops after this many sockets (a memory bound: about 150 bytes each).
const MAX_SOCKETS: usize = 1_000_000;

/// The established TCP sockets of this network namespace with their link figures, by
/// (local, peer) address.
#[derive(Debug, Default)]
pub struct TcpLinks {
    links: HashMap<(SocketAddr, SocketAddr), LinkQuality>,
}

impl TcpLinks {
    /// The figures of the connection from `local` to `peer`, if the dump saw it.
    pub fn get(&self, local: SocketAddr, peer: SocketAddr) -> Option<LinkQuality> {
        self.links
            .get(&(canonical(local), canonical(peer)))
            .copied()
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    fn insert(&mut self, local: SocketAddr, peer: SocketAddr, quality: LinkQuality) {
        self.links
            .insert((canonical(local), canonical(peer)), quality);
    }
}

/// One address the same way however the socket API and the kernel spelled it: an IPv4
/// client of a dual-stack listener is `::ffff:a.b.c.d` to one and may be `a.b.c.d` to the
/// other, and the kernel reports no IPv6 flow label or scope id.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// [`snapshot`] on tokio's blocking pool. `None` when the kernel's figures cannot be had: the
/// first such failure is logged (at debug: an operator's request, not the broker, misses
/// figures), later ones are not.
pub async fn measure() -> Option<TcpLinks> {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    let err = match tokio::task::spawn_blocking(snapshot).await {
        Ok(Ok(links)) => return Some(links),
        Ok(Err(err)) => err.to_string(),
        Err(join) => join.to_string(),
    };
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::debug!(%err, "cannot read TCP_INFO through sock_diag: TCP clients show no link figures");
    }
    None
}

/// One dump of the established TCP sockets and their `TCP_INFO`. Blocking.
#[cfg(target_os = "linux")]
pub fn snapshot() -> std::io::Result<TcpLinks> {
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};

    let mut links = TcpLinks::default();
    sock_diag::dump(AF_INET, &mut links)?;
    // A kernel without IPv6 refuses the second dump: the IPv4 sockets still count.
    if let Err(err) = sock_diag::dump(AF_INET6, &mut links) {
        tracing::trace!(%err, "no IPv6 TCP sockets to read");
    }
    Ok(links)
}

/// Not Linux: no `sock_diag`.
#[cfg(not(target_os = "linux"))]
pub fn snapshot() -> std::io::Result<TcpLinks> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "TCP_INFO is read through Linux's sock_diag only",
    ))
}

/// What the operators' view shows of one `struct tcp_info` (the kernel's `linux/tcp.h`),
/// read by byte offset. The struct only ever grows at its end, so an older kernel's shorter
/// record simply lacks the later fields, which then read as 0 (the crate's typed `TcpInfo`
/// would instead refuse every record shorter than a 5.4 kernel's). The fields are in host
/// byte order.
///
/// For TCP, `lost_packets` counts retransmitted segments (`tcpi_total_retrans`) and
/// `sent_packets` the data segments sent, retransmissions included (`tcpi_data_segs_out`,
/// Linux 4.6+; all segments, pure ACKs included, before), so their ratio is the
/// retransmission rate; `lost_bytes` is the bytes retransmitted (`tcpi_bytes_retrans`,
/// Linux 4.19+). `TCP_INFO` counts no congestion back-offs, so `congestion_events` is 0.
fn quality(info: &[u8]) -> LinkQuality {
    // Offsets in `struct tcp_info`, checked against the uapi header with `offsetof`.
    const SND_MSS: usize = 16;
    const RTT: usize = 68;
    const SND_CWND: usize = 80;
    const TOTAL_RETRANS: usize = 100;
    const SEGS_OUT: usize = 136;
    const DATA_SEGS_OUT: usize = 156;
    const BYTES_RETRANS: usize = 208;

    let u32_at = |at: usize| {
        info.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from(u32::from_ne_bytes(b)))
    };
    let u64_at = |at: usize| {
        info.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let segments = u32_at(SND_CWND).unwrap_or(0);
    let mss = u32_at(SND_MSS).unwrap_or(0);
    LinkQuality {
        rtt_us: u32_at(RTT).unwrap_or(0),
        cwnd: segments.saturating_mul(mss),
        sent_packets: u32_at(DATA_SEGS_OUT)
            .or_else(|| u32_at(SEGS_OUT))
            .unwrap_or(0),
        lost_packets: u32_at(TOTAL_RETRANS).unwrap_or(0),
        lost_bytes: u64_at(BYTES_RETRANS).unwrap_or(0),
        congestion_events: 0,
    }
}

#[cfg(target_os = "linux")]
mod sock_diag {
    use std::io;
    use std::net::SocketAddr;
    use std::time::Duration;

    use netlink_packet_core::{
        NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
    };
    use netlink_packet_sock_diag::constants::{AF_INET, IPPROTO_TCP};
    use netlink_packet_sock_diag::inet::nlas::Nla;
    use netlink_packet_sock_diag::inet::{
        ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags,
    };
    use netlink_packet_sock_diag::SockDiagMessage;
    use netlink_sys::protocols::NETLINK_SOCK_DIAG;
    use netlink_sys::Socket;

    use super::{quality, TcpLinks, MAX_SOCKETS};

    /// Larger than any datagram of a dump (the kernel fills at most 32 KiB per datagram).
    const RECV_BUFFER: usize = 64 * 1024;
    /// The kernel answers a dump at once; a receive that waits this long means it will not.
    const RECV_TIMEOUT: Duration = Duration::from_secs(2);

    /// Dumps the established TCP sockets of one address family into `links`. Each family has
    /// a socket of its own, so a dump cut short leaves no replies for the next one to read.
    pub(super) fn dump(family: u8, links: &mut TcpLinks) -> io::Result<()> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        socket2::SockRef::from(&socket).set_read_timeout(Some(RECV_TIMEOUT))?;
        socket.send(&request(family), 0)?;

        let mut buf = vec![0; RECV_BUFFER];
        // Every datagram holds at least one message: one socket, or the end of the dump.
        for _ in 0..=MAX_SOCKETS {
            let size = socket.recv(&mut &mut buf[..], 0)?;
            let mut rest = &buf[..size.min(buf.len())];
            while !rest.is_empty() {
                // A checked buffer's length is at least a header's, so `rest` shrinks.
                let length = NetlinkBuffer::new_checked(rest)
                    .map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err.to_string()))?
                    .length() as usize;
                let (message, next) = rest.split_at(length);
                rest = next.get(padding(length)..).unwrap_or_default();
                // A message the crate cannot read is one socket fewer, not a failed dump.
                let Ok(message) = NetlinkMessage::<SockDiagMessage>::deserialize(message) else {
                    continue;
                };
                match message.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(err) if err.code.is_some() => return Err(err.to_io()),
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        file(&response, links);
                        if links.len() >= MAX_SOCKETS {
                            return Ok(());
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The dump request: established TCP sockets of `family`, with `INET_DIAG_INFO`.
    fn request(family: u8) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut message = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::INFO,
                states: StateFlags::ESTABLISHED,
                socket_id: if family == AF_INET {
                    SocketId::new_v4()
                } else {
                    SocketId::new_v6()
                },
            })
            .into(),
        );
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }

    /// Netlink messages start on 4-byte boundaries: the bytes after one of `length` bytes.
    fn padding(length: usize) -> usize {
        length.next_multiple_of(4) - length
    }

    fn file(response: &InetResponse, links: &mut TcpLinks) {
        let Some(info) = response.nlas.iter().find_map(|nla| match nla {
            Nla::TcpInfo(info) => Some(info),
            _ => None,
        }) else {
            return;
        };
        let id = &response.header.socket_id;
        let local = SocketAddr::new(id.source_address, id.source_port);
        let peer = SocketAddr::new(id.destination_address, id.destination_port);
        links.insert(local, peer, quality(info));
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn tcp_info_fields_are_read_by_offset_and_missing_ones_are_zero() {
        let mut info = vec![0u8; 232];
        let mut put = |at: usize, v: u32| info[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        put(16, 1448); // snd_mss
        put(68, 25_000); // rtt
        put(80, 10); // snd_cwnd
        put(100, 3); // total_retrans
        put(136, 500); // segs_out
        put(156, 300); // data_segs_out
        info[208..216].copy_from_slice(&4344u64.to_ne_bytes()); // bytes_retrans
        let q = quality(&info);
        assert_eq!(
            q,
            LinkQuality {
                rtt_us: 25_000,
                cwnd: 14_480,
                sent_packets: 300,
                lost_packets: 3,
                lost_bytes: 4344,
                congestion_events: 0,
            }
        );
        // A 4.2 kernel's record (up to tcpi_segs_in): all segments stand in for data ones.
        let old = quality(&info[..144]);
        assert_eq!(
            (old.sent_packets, old.lost_bytes, old.rtt_us),
            (500, 0, 25_000)
        );
        assert_eq!(quality(&[]), LinkQuality::default());
    }

    #[test]
    fn canonical_addresses_match_across_spellings() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1883".parse().unwrap();
        let plain: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(canonical(mapped), plain);
        let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
            "fe80::1".parse().unwrap(),
            1883,
            7,
            3,
        ));
        assert_eq!(canonical(scoped), "[fe80::1]:1883".parse().unwrap());
    }

    #[test]
    fn snapshot_finds_a_loopback_connection_by_its_addresses() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        // A few round trips, so that the kernel has measured the RTT.
        let mut buf = [0u8; 1024];
        for _ in 0..5 {
            server.write_all(&[7; 1024]).unwrap();
            client.read_exact(&mut buf).unwrap();
            client.write_all(b"ack").unwrap();
            server.read_exact(&mut buf[..3]).unwrap();
        }
        let links = match snapshot() {
            Ok(links) => links,
            Err(err) => {
                eprintln!("skipped: netlink sock_diag is not permitted here ({err})");
                return;
            }
        };
        let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
        let q = links
            .get(local, peer)
            .unwrap_or_else(|| panic!("{local} -> {peer} is not among {} sockets", links.len()));
        assert!(q.rtt_us > 0, "{q:?}");
        assert!(q.sent_packets >= 5, "{q:?}");
        assert!(q.cwnd >= 1000, "{q:?}");
        assert!(q.lost_packets <= q.sent_packets, "{q:?}");
        // The client's side is a socket of its own, found the other way round.
        assert!(links.get(peer, local).is_some());
    }

    /// What one snapshot costs with 1,000 idle connections open (2,000 sockets, both ends
    /// being on this host), for docs/operations.md.
    #[test]
    #[ignore = "a measurement: cargo test --release --lib snapshot_cost -- --ignored --nocapture"]
    fn snapshot_cost_with_a_thousand_idle_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let pairs: Vec<_> = (0..1000)
            .map(|_| {
                let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                (client, listener.accept().unwrap().0)
            })
            .collect();
        let mut times: Vec<_> = (0..21)
            .map(|_| {
                let started = std::time::Instant::now();
                let links = snapshot().unwrap();
                let took = started.elapsed();
                for (_, server) in &pairs {
                    let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
                    assert!(links.get(local, peer).is_some());
                }
                took
            })
            .collect();
        times.sort();
        println!(
            "snapshot of {} connections: min {:?}, median {:?}, max {:?}",
            pairs.len(),
            times[0],
            times[times.len() / 2],
            times[times.len() - 1]
        );
    }
}
