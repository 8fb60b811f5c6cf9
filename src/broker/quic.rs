//! The MQTT-over-QUIC driver, wire-compatible with EMQX in single- and multi-stream mode.
//!
//! The first client-opened bidirectional stream is the control stream ([`Flow::CONTROL`]);
//! every further one is a data flow with plain MQTT framing. One task per connection owns the
//! [`Link`] (the channel and its session); each stream has a reader task that decodes packets
//! into an event queue and a writer task fed with encoded bytes, so a stalled stream never
//! blocks another (the point of per-topic streams on lossy links).
//!
//! Policies, beyond the wire mapping:
//! - Data streams opened before CONNACK are accepted but not read until CONNECT is accepted
//!   (QUIC flow control holds the client meanwhile).
//! - 0-RTT: CONNECT, SUBSCRIBE, UNSUBSCRIBE and PINGREQ take effect from early data; every
//!   other packet received before the handshake completes is held and fed in order once it
//!   has (a replayed flight can then never publish or acknowledge anything).
//! - A stream that ends, is reset or stopped by the client, or carries malformed input ends
//!   that flow only: its subscriptions and in-flight messages move to the control stream, and
//!   nothing read from it afterwards is acted on. The control stream ending ends the
//!   connection, closed with the MQTT reason code as the QUIC error code (0 when normal).
//! - Data flows get process-unique ids (not their stream index), so the flows a persistent
//!   session remembers from an earlier connection (in its mailbox, say) can never be taken
//!   for a stream of the new connection that happens to have the same index.
//! - Migration is quinn's: the connection follows the client's new address, and the span's
//!   `peer` follows it too.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::link::Link;
use super::{clock, Broker};
use crate::codec::{Codec, DecodeError, Packet, ProtocolVersion, ReasonCode};
use crate::core::message::Flow;
use crate::transport::tls::peer_username;
use crate::transport::tls::PeerCertAsUsername;

/// Packets held while the handshake completes; a client sending more in 0-RTT is cut off.
const MAX_HELD: usize = 1024;
/// Bytes queued to all of a connection's streams before deliveries wait.
const BACKLOG_HIGH_WATER: usize = 1024 * 1024;

/// The next data flow id; `Flow::CONTROL` (0) is never handed out.
static NEXT_DATA_FLOW: AtomicU64 = AtomicU64::new(1);

/// Accepts QUIC connections until `shutdown`.
pub async fn accept(
    endpoint: Endpoint,
    broker: Arc<Broker>,
    retry: bool,
    peer_cert_as_username: PeerCertAsUsername,
    handshake_timeout: Duration,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        // Address validation against amplification: a Retry round trip proves the client
        // owns its address before any handshake work is done.
        if retry && !incoming.remote_address_validated() {
            if let Err(err) = incoming.retry() {
                tracing::debug!(%err, "cannot send a QUIC Retry");
            }
            continue;
        }
        tracker.spawn(serve(
            Arc::clone(&broker),
            incoming,
            peer_cert_as_username,
            handshake_timeout,
            shutdown.clone(),
        ));
    }
    // Give connections a moment to send their last packets (DISCONNECT 0x8B) before the
    // endpoint goes.
    endpoint.wait_idle().await;
}

async fn serve(
    broker: Arc<Broker>,
    incoming: Incoming,
    peer_cert_as_username: PeerCertAsUsername,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) {
    let peer = incoming.remote_address();
    let span =
        tracing::debug_span!("conn", transport = "quic", %peer, client_id = tracing::field::Empty);
    async move {
        let connecting = match incoming.accept() {
            Ok(connecting) => connecting,
            Err(err) => return tracing::debug!(%err, "QUIC connection refused"),
        };
        // On the server side this always succeeds: the connection is usable at once (0.5-RTT)
        // and `handshake` resolves when the handshake has completed.
        let Ok((conn, handshake)) = connecting.into_0rtt() else {
            return;
        };
        broker.metrics.connections.fetch_add(1, Ordering::Relaxed);
        broker
            .metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let metrics = Arc::clone(&broker);
        QuicConnection::new(broker, conn.clone(), peer, peer_cert_as_username)
            .run(handshake, handshake_timeout, shutdown)
            .await;
        metrics.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }
    .instrument(span)
    .await;
}

/// What the stream tasks tell the connection task.
enum Event {
    /// A stream was accepted: its writer, and the writer task's handle.
    Opened(Flow, Writer, tokio::task::JoinHandle<()>),
    Packet(Flow, Packet),
    Invalid(Flow, DecodeError),
    /// The stream ended, was reset, or the client stopped reading it.
    Ended(Flow),
}

enum Write {
    Data(Bytes),
    Reset(VarInt),
}

struct Writer {
    tx: mpsc::UnboundedSender<Write>,
    backlog: Arc<AtomicUsize>,
    /// Stops the stream's reader: a flow whose writer is gone is over.
    reading: CancellationToken,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.reading.cancel();
    }
}

struct QuicConnection {
    link: Link,
    conn: Connection,
    peer: SocketAddr,
    writers: HashMap<Flow, Writer>,
    control_writer: Option<tokio::task::JoinHandle<()>>,
    tasks: JoinSet<()>,
    held: Vec<(Flow, Packet)>,
    /// Whether (and how) a verified client certificate names the username; `None` once
    /// applied.
    peer_cert_as_username: PeerCertAsUsername,
}

impl QuicConnection {
    fn new(
        broker: Arc<Broker>,
        conn: Connection,
        peer: SocketAddr,
        peer_cert_as_username: PeerCertAsUsername,
    ) -> Self {
        Self {
            peer_cert_as_username,
            link: Link::new(broker, peer),
            conn,
            peer,
            writers: HashMap::new(),
            control_writer: None,
            tasks: JoinSet::new(),
            held: Vec::new(),
        }
    }

    async fn run(
        mut self,
        handshake: quinn::ZeroRttAccepted,
        handshake_timeout: Duration,
        shutdown: CancellationToken,
    ) {
        let handshake_deadline = clock::now() + handshake_timeout;
        let max_packet_size = self.link.broker.limits().max_packet_size;
        let (events_tx, mut events) = mpsc::channel(64);
        let (version_tx, version_rx) = watch::channel(None);
        self.tasks.spawn(accept_streams(
            self.conn.clone(),
            events_tx,
            version_rx,
            max_packet_size,
        ));
        let mut handshake = std::pin::pin!(handshake);
        let mut handshake_done = false;
        let mut shutting_down = false;
        loop {
            self.flush();
            if self.link.closed {
                break;
            }
            if self.link.channel.is_connected() && version_tx.borrow().is_none() {
                // CONNACK is out: data streams may now be read, in the connection's version.
                let _ = version_tx.send(Some(self.link.channel.version()));
            }
            let writers = &self.writers;
            self.link
                .pump_deliveries(|| backlog(writers) < BACKLOG_HIGH_WATER);
            self.flush();

            let paused = self.link.is_paused(clock::now());
            let link = &mut self.link;
            let deadline = link.channel.poll_timeout();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    link.channel.handle_shutdown();
                }
                _ = clock::sleep_until(handshake_deadline), if !handshake_done => {
                    tracing::debug!("QUIC handshake did not complete in time");
                    self.link.channel.handle_transport_closed();
                }
                _ = &mut handshake, if !handshake_done => {
                    handshake_done = true;
                    for (flow, packet) in std::mem::take(&mut self.held) {
                        if !self.is_live(flow) {
                            continue;
                        }
                        let now = self.link.tick();
                        self.link.channel.handle_flow_packet(now, flow, packet);
                        self.link.carry_out_actions().await;
                    }
                }
                _ = super::link::relief(&link.pressure, link.pause_deadline), if paused => {}
                event = events.recv(), if !paused => match event {
                    Some(event) => self.handle_event(event, handshake_done),
                    None => self.link.channel.handle_transport_closed(),
                },
                _ = self.conn.closed() => self.link.channel.handle_transport_closed(),
                signal = std::future::poll_fn(|cx| link.poll_mailbox(cx)) => {
                    if let Some(ack) = signal {
                        link.handle_takeover(ack);
                    }
                }
                _ = async { clock::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    self.link.channel.handle_timeout(clock::now());
                }
            }
            self.link.tick();
            self.link.carry_out_actions().await;
            self.follow_migration();
        }
        self.close().await;
    }

    /// Whether input on `flow` is still acted on: the control flow until the connection ends,
    /// a data flow until it is closed (from either side).
    fn is_live(&self, flow: Flow) -> bool {
        flow.is_control() || self.writers.contains_key(&flow)
    }

    /// The username the client's verified certificate maps to, once per connection.
    fn certificate_username(&mut self) -> Option<String> {
        let rule = std::mem::replace(&mut self.peer_cert_as_username, PeerCertAsUsername::None);
        if rule == PeerCertAsUsername::None {
            return None;
        }
        let identity = self.conn.peer_identity()?;
        let chain = identity
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .ok()?;
        peer_username(chain.first()?, rule)
    }

    fn handle_event(&mut self, event: Event, handshake_done: bool) {
        let now = self.link.tick();
        match &event {
            // Late input from a data flow that was already closed (its reader is stopping).
            Event::Packet(flow, _) | Event::Invalid(flow, _) | Event::Ended(flow)
                if !self.is_live(*flow) =>
            {
                return;
            }
            _ => {}
        }
        let channel = &mut self.link.channel;
        match event {
            Event::Opened(flow, writer, handle) => {
                if flow.is_control() {
                    self.control_writer = Some(handle);
                } else {
                    self.tasks.spawn(async move {
                        let _ = handle.await;
                    });
                    channel.open_flow(flow);
                }
                self.writers.insert(flow, writer);
            }
            Event::Packet(flow, packet) => {
                let replay_safe = matches!(
                    packet,
                    Packet::Connect(_)
                        | Packet::Subscribe(_)
                        | Packet::Unsubscribe(_)
                        | Packet::PingReq
                );
                if matches!(packet, Packet::Connect(_)) {
                    // Listeners with client certificates have no 0-RTT, so the handshake
                    // (and the certificate's verification) is complete by now.
                    if let Some(username) = self.certificate_username() {
                        self.link.channel.set_peer_username(username);
                    }
                }
                let channel = &mut self.link.channel;
                if handshake_done || replay_safe {
                    channel.handle_flow_packet(now, flow, packet);
                } else if self.held.len() < MAX_HELD {
                    self.held.push((flow, packet));
                } else {
                    channel.handle_transport_closed();
                }
            }
            Event::Invalid(flow, err) => {
                tracing::debug!(%err, flow = flow.0, "bad packet from client");
                channel.handle_flow_error(now, flow, &err);
            }
            Event::Ended(flow) => {
                self.writers.remove(&flow);
                channel.handle_flow_closed(now, flow);
            }
        }
    }

    /// Hands every flow's encoded output to its writer, and resets the streams of flows the
    /// channel closed.
    fn flush(&mut self) {
        let writers = &self.writers;
        let control = self.link.channel.out();
        if !control.is_empty() {
            send(writers.get(&Flow::CONTROL), control);
        }
        self.link
            .channel
            .drain_flow_output(|flow, out| send(writers.get(&flow), out));
        for flow in self.link.closed_flows.drain(..) {
            if let Some(writer) = self.writers.remove(&flow) {
                let _ = writer.tx.send(Write::Reset(VarInt::from_u32(u32::from(
                    ReasonCode::MALFORMED_PACKET.0,
                ))));
            }
        }
    }

    fn follow_migration(&mut self) {
        let now = self.conn.remote_address();
        if now != self.peer {
            tracing::debug!(from = %self.peer, to = %now, "client migrated");
            tracing::Span::current().record("peer", tracing::field::display(now));
            self.peer = now;
        }
    }

    /// Lets the control stream flush what the channel said last, then closes the connection
    /// with the MQTT reason code as the QUIC error code (0 for a normal end).
    async fn close(mut self) {
        let reason = self.link.close_reason.unwrap_or(ReasonCode::SUCCESS);
        let code = if reason == ReasonCode::DISCONNECT_WITH_WILL || !reason.is_failure() {
            0
        } else {
            reason.0
        };
        self.writers.clear(); // ends each writer after its queue: streams finish gracefully
        if let Some(handle) = self.control_writer.take() {
            let linger = self.link.broker.settings().close_linger;
            let _ = tokio::time::timeout(linger, handle).await;
        }
        self.conn.close(VarInt::from_u32(u32::from(code)), b"");
        self.tasks.shutdown().await;
    }
}

fn send(writer: Option<&Writer>, out: &mut BytesMut) {
    let bytes = out.split().freeze();
    if let Some(writer) = writer {
        writer.backlog.fetch_add(bytes.len(), Ordering::Relaxed);
        let _ = writer.tx.send(Write::Data(bytes));
    }
}

fn backlog(writers: &HashMap<Flow, Writer>) -> usize {
    writers
        .values()
        .map(|w| w.backlog.load(Ordering::Relaxed))
        .sum()
}

/// The task writing one stream. If the client stops the stream (STOP_SENDING) or it fails,
/// the flow is reported `Ended`, whether or not anything was being written.
fn spawn_writer(
    flow: Flow,
    mut stream: SendStream,
    events: mpsc::Sender<Event>,
    reading: CancellationToken,
) -> (Writer, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(AtomicUsize::new(0));
    let pending = Arc::clone(&backlog);
    let handle = tokio::spawn(async move {
        // Not finished yet, so this resolves only on STOP_SENDING or a lost connection.
        let stopped = stream.stopped();
        tokio::pin!(stopped);
        loop {
            let write = tokio::select! {
                write = rx.recv() => write,
                _ = &mut stopped => {
                    let _ = events.send(Event::Ended(flow)).await;
                    return;
                }
            };
            match write {
                None => break,
                Some(Write::Data(bytes)) => {
                    let n = bytes.len();
                    if stream.write_chunk(bytes).await.is_err() {
                        let _ = events.send(Event::Ended(flow)).await;
                        return;
                    }
                    pending.fetch_sub(n, Ordering::Relaxed);
                }
                Some(Write::Reset(code)) => {
                    let _ = stream.reset(code);
                    return;
                }
            }
        }
        let _ = stream.finish();
        // Wait until the peer has everything (or the connection is gone).
        let _ = stream.stopped().await;
    });
    let writer = Writer {
        tx,
        backlog,
        reading,
    };
    (writer, handle)
}

/// Accepts the client's bidirectional streams: the first is the control flow. Each gets a
/// reader; data flows are not read before CONNACK (`version` is set then).
async fn accept_streams(
    conn: Connection,
    events: mpsc::Sender<Event>,
    version: watch::Receiver<Option<ProtocolVersion>>,
    max_packet_size: u32,
) {
    let mut readers = JoinSet::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        let index = recv.id().index();
        let flow = if index == 0 {
            Flow::CONTROL
        } else {
            Flow(NEXT_DATA_FLOW.fetch_add(1, Ordering::Relaxed))
        };
        tracing::trace!(stream = index, flow = flow.0, "stream accepted");
        let reading = CancellationToken::new();
        let (writer, handle) = spawn_writer(flow, send, events.clone(), reading.clone());
        if events
            .send(Event::Opened(flow, writer, handle))
            .await
            .is_err()
        {
            break;
        }
        readers.spawn(read_flow(
            flow,
            recv,
            events.clone(),
            version.clone(),
            max_packet_size,
            reading,
        ));
    }
    // The connection is gone; readers end with their streams.
    while readers.join_next().await.is_some() {}
}

/// Reads one stream until it ends, or until its flow is closed from the broker's side
/// (`reading` cancelled), when the client is told to stop sending on it.
async fn read_flow(
    flow: Flow,
    mut recv: RecvStream,
    events: mpsc::Sender<Event>,
    version: watch::Receiver<Option<ProtocolVersion>>,
    max_packet_size: u32,
    reading: CancellationToken,
) {
    let cancelled = tokio::select! {
        biased;
        _ = reading.cancelled() => true,
        _ = read_packets(flow, &mut recv, &events, version, max_packet_size) => false,
    };
    if cancelled {
        let _ = recv.stop(VarInt::from_u32(0));
    }
}

async fn read_packets(
    flow: Flow,
    recv: &mut RecvStream,
    events: &mpsc::Sender<Event>,
    mut version: watch::Receiver<Option<ProtocolVersion>>,
    max_packet_size: u32,
) {
    let mut codec = if flow.is_control() {
        Codec::new(max_packet_size)
    } else {
        let Ok(v) = version.wait_for(Option::is_some).await else {
            return;
        };
        let v = v.expect("waited for Some");
        Codec::with_version(v, max_packet_size)
    };
    // A busy stream reads into a reused buffer; one that has nothing to read gives an
    // empty buffer back before waiting, so an idle stream holds none.
    let mut buf = BytesMut::new();
    loop {
        let read = {
            let mut read = std::pin::pin!(recv.read_chunk(usize::MAX, true));
            match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                Poll::Ready(read) => read,
                Poll::Pending => {
                    if buf.is_empty() {
                        buf = BytesMut::new();
                    }
                    read.await
                }
            }
        };
        match read {
            Ok(Some(chunk)) => {
                if buf.capacity() - buf.len() < chunk.bytes.len() {
                    buf.reserve(chunk.bytes.len().max(4096));
                }
                buf.extend_from_slice(&chunk.bytes);
            }
            Ok(None) | Err(_) => break,
        }
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(packet)) => {
                    if events.send(Event::Packet(flow, packet)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    let _ = recv.stop(VarInt::from_u32(u32::from(err.reason_code().0)));
                    let _ = events.send(Event::Invalid(flow, err)).await;
                    return;
                }
            }
        }
    }
    let _ = events.send(Event::Ended(flow)).await;
}
