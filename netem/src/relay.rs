//! The UDP relay: clients send to the relay's address, the relay forwards each datagram through
//! the up link to the upstream server, and the server's answers through the down link back to
//! the client. Needs no privileges.
//!
//! Each client (its source address) gets its own upstream socket, so the server sees one peer
//! per client. An address change (scheduled in the profile's events, or asked for through
//! [`RelayHandle::change_address`]) moves every client to a fresh upstream socket mid-flow: the
//! server sees a new source port, and answers sent to the old one are lost, as after a NAT
//! rebinding. Both links are shared by all clients, as one bottleneck would be.
//!
//! One task owns the sockets and both links; a small reader task per upstream socket feeds it.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::link::{Link, LinkStats, Packet};
use crate::schedule::Schedule;
use crate::spec::{Direction, LinkSpec, Profile};

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// Clients beyond this many are refused (their datagrams dropped and counted).
const MAX_FLOWS: usize = 1024;
/// A client silent this long loses its upstream socket.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Datagrams from upstream sockets waiting for the relay task.
const UPSTREAM_QUEUE: usize = 4096;

/// Counters for both directions plus the relay's own events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    pub up: LinkStats,
    pub down: LinkStats,
    pub flows: usize,
    pub address_changes: u64,
    /// Datagrams dropped by the relay itself (too many clients, send errors).
    pub relay_dropped: u64,
}

enum Command {
    ChangeAddress(oneshot::Sender<usize>),
    Shutdown,
}

/// Starts relays.
pub struct Relay;

impl Relay {
    /// Binds `listen` and relays to `upstream` through `up` and `down`. The events of `up`
    /// (blackouts, address changes) drive the whole path; `down`'s blackouts come from the same
    /// seed, so give both directions the same events (as [`Relay::start_profile`] does).
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        up: LinkSpec,
        down: LinkSpec,
        seed: u64,
    ) -> io::Result<RelayHandle> {
        debug_assert_eq!(up.direction, Direction::Up);
        debug_assert_eq!(down.direction, Direction::Down);
        let socket = UdpSocket::bind(listen).await?;
        let local_addr = socket.local_addr()?;
        let (commands, command_rx) = mpsc::channel(16);
        let (upstream_tx, upstream_rx) = mpsc::channel(UPSTREAM_QUEUE);
        let stats = Arc::new(Mutex::new(RelayStats::default()));
        let state = State {
            socket,
            upstream,
            up: Link::new(&up, seed),
            down: Link::new(&down, seed),
            changes: Schedule::address_changes(&up.events, seed),
            flows: HashMap::new(),
            by_client: HashMap::new(),
            next_flow: 0,
            readers: JoinSet::new(),
            upstream_tx,
            start: Instant::now(),
            stats: RelayStats::default(),
            shared: stats.clone(),
        };
        let task = tokio::spawn(state.run(command_rx, upstream_rx));
        tracing::debug!(%local_addr, %upstream, seed, "relay started");
        Ok(RelayHandle {
            local_addr,
            commands,
            stats,
            task: Some(task),
        })
    }

    /// [`Relay::start`] with both directions of `profile`.
    pub async fn start_profile(
        listen: SocketAddr,
        upstream: SocketAddr,
        profile: &Profile,
        seed: u64,
    ) -> io::Result<RelayHandle> {
        let up = profile.link(Direction::Up);
        let down = profile.link(Direction::Down);
        Self::start(listen, upstream, up, down, seed).await
    }
}

/// A running relay. Dropping it stops the relay too (without waiting).
pub struct RelayHandle {
    local_addr: SocketAddr,
    commands: mpsc::Sender<Command>,
    stats: Arc<Mutex<RelayStats>>,
    task: Option<JoinHandle<()>>,
}

impl RelayHandle {
    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Moves every client to a new upstream socket now; returns how many were moved.
    pub async fn change_address(&self) -> usize {
        let (tx, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::ChangeAddress(tx))
            .await
            .is_err()
        {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// The counters as of the relay's last step.
    pub fn stats(&self) -> RelayStats {
        *self.stats.lock().expect("stats lock is never poisoned")
    }

    /// Stops the relay and waits for its task; packets still in flight are discarded.
    pub async fn shutdown(mut self) {
        let _ = self.commands.send(Command::Shutdown).await;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Flow {
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    reader: AbortHandle,
    last_seen: Duration,
}

struct State {
    socket: UdpSocket,
    upstream: SocketAddr,
    up: Link,
    down: Link,
    changes: Schedule,
    flows: HashMap<u64, Flow>,
    by_client: HashMap<SocketAddr, u64>,
    next_flow: u64,
    readers: JoinSet<()>,
    upstream_tx: mpsc::Sender<(u64, Vec<u8>)>,
    start: Instant,
    stats: RelayStats,
    shared: Arc<Mutex<RelayStats>>,
}

impl State {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut upstream_rx: mpsc::Receiver<(u64, Vec<u8>)>,
    ) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut next_sweep = IDLE_TIMEOUT;
        loop {
            let deadline = [
                self.up.next_deadline(),
                self.down.next_deadline(),
                self.changes.next_deadline(),
                Some(next_sweep),
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("the sweep deadline is always there");
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::ChangeAddress(reply)) => {
                        let moved = self.change_address().await;
                        let _ = reply.send(moved);
                    }
                    Some(Command::Shutdown) | None => break,
                },
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, client)) => {
                        let now = self.start.elapsed();
                        self.client_datagram(now, client, buf[..n].to_vec()).await;
                    }
                    // ICMP errors from earlier sends surface here on some systems; keep going.
                    Err(e) => tracing::debug!(error = %e, "relay recv"),
                },
                Some((flow, data)) = upstream_rx.recv() => {
                    let now = self.start.elapsed();
                    self.down.send(now, Packet::new(data, flow));
                }
                () = tokio::time::sleep_until(self.start + deadline) => {}
            }
            let now = self.start.elapsed();
            if self.changes.poll(now) {
                self.change_address().await;
            }
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + IDLE_TIMEOUT / 4;
            }
            self.deliver(now).await;
            self.publish();
        }
        self.readers.shutdown().await;
    }

    async fn client_datagram(&mut self, now: Duration, client: SocketAddr, data: Vec<u8>) {
        let flow = match self.by_client.get(&client) {
            Some(&flow) => flow,
            None => match self.open_flow(now, client).await {
                Ok(flow) => flow,
                Err(e) => {
                    tracing::debug!(%client, error = %e, "relay cannot open a flow");
                    self.stats.relay_dropped += 1;
                    return;
                }
            },
        };
        if let Some(f) = self.flows.get_mut(&flow) {
            f.last_seen = now;
        }
        self.up.send(now, Packet::new(data, flow));
    }

    async fn open_flow(&mut self, now: Duration, client: SocketAddr) -> io::Result<u64> {
        if self.flows.len() >= MAX_FLOWS {
            return Err(io::Error::other("too many clients"));
        }
        let id = self.next_flow;
        self.next_flow += 1;
        let (socket, reader) = self.upstream_socket(id).await?;
        self.flows.insert(
            id,
            Flow {
                client,
                socket,
                reader,
                last_seen: now,
            },
        );
        self.by_client.insert(client, id);
        Ok(id)
    }

    async fn upstream_socket(&mut self, flow: u64) -> io::Result<(Arc<UdpSocket>, AbortHandle)> {
        let bind: SocketAddr = if self.upstream.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(self.upstream).await?;
        let socket = Arc::new(socket);
        let reader = self.readers.spawn(read_upstream(
            socket.clone(),
            flow,
            self.upstream_tx.clone(),
        ));
        Ok((socket, reader))
    }

    /// Gives every flow a new upstream socket; the old ones are closed.
    async fn change_address(&mut self) -> usize {
        let ids: Vec<u64> = self.flows.keys().copied().collect();
        let mut moved = 0;
        for id in ids {
            match self.upstream_socket(id).await {
                Ok((socket, reader)) => {
                    let flow = self.flows.get_mut(&id).expect("id came from the map");
                    flow.reader.abort();
                    flow.socket = socket;
                    flow.reader = reader;
                    moved += 1;
                }
                Err(e) => tracing::debug!(error = %e, "relay cannot rebind a flow"),
            }
        }
        self.stats.address_changes += 1;
        tracing::debug!(moved, "relay address change");
        moved
    }

    fn sweep(&mut self, now: Duration) {
        let idle: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_sub(f.last_seen) >= IDLE_TIMEOUT)
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            if let Some(flow) = self.flows.remove(&id) {
                flow.reader.abort();
                self.by_client.remove(&flow.client);
            }
        }
    }

    async fn deliver(&mut self, now: Duration) {
        while let Some(packet) = self.up.poll(now) {
            let Some(flow) = self.flows.get(&packet.tag) else {
                self.stats.relay_dropped += 1;
                continue;
            };
            if flow.socket.send(&packet.data).await.is_err() {
                self.stats.relay_dropped += 1;
            }
        }
        while let Some(packet) = self.down.poll(now) {
            let Some(flow) = self.flows.get(&packet.tag) else {
                self.stats.relay_dropped += 1;
                continue;
            };
            if self
                .socket
                .send_to(&packet.data, flow.client)
                .await
                .is_err()
            {
                self.stats.relay_dropped += 1;
            }
        }
    }

    fn publish(&mut self) {
        self.stats.up = self.up.stats();
        self.stats.down = self.down.stats();
        self.stats.flows = self.flows.len();
        *self.shared.lock().expect("stats lock is never poisoned") = self.stats;
    }
}

async fn read_upstream(socket: Arc<UdpSocket>, flow: u64, tx: mpsc::Sender<(u64, Vec<u8>)>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) => {
                // A full queue means the relay task is saturated: drop, as a router would.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    tx.try_send((flow, buf[..n].to_vec()))
                {
                    return;
                }
            }
            // The server's port was closed (ICMP port unreachable): the flow stays usable.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                tracing::debug!(flow, error = %e, "upstream socket closed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
