//! The MQTT-over-QUIC driver, wire-compatible with EMQX in single- and multi-stream mode.
//!
//! The first client-opened bidirectional stream is the control stream ([`Flow::CONTROL`]);
//! every further one is a data flow with plain MQTT framing. One task per connection runs the
//! common `driver::Driver` over a [`QuicWire`]; each stream has a reader task (the shared
//! `PacketReader`) that decodes packets into an event queue and a writer task fed with encoded
//! bytes, so a stalled stream never blocks another (the point of per-topic streams on lossy
//! links).
//!
//! Policies, beyond the wire mapping:
//! - Data streams opened before CONNACK are accepted but not read until CONNECT is accepted
//!   (QUIC flow control holds the client meanwhile).
//! - 0-RTT: early data is read and decoded at once, but may be a replay: anyone who captured
//!   a client's first flight can send it again, and a replay never completes the handshake
//!   (that takes the client's Finished, made with keys the replayer lacks; a server's
//!   handshake is confirmed when it completes, RFC 9001 4.1.2). So before the handshake
//!   completes only a CONNECT that can harm nothing acts ([`connect_is_replay_safe`]): no
//!   will, and a client id with no session (online or offline) and no will waiting, so there
//!   is nothing to take over, wipe or cancel, and nothing to publish if the handshake never
//!   completes; such a client gets its CONNACK in one round trip. Any other CONNECT, and
//!   every other packet, is held, in order, and fed once the handshake completes: a replayed
//!   CONNECT can never take over, wipe (clean start) or will-publish an existing session, nor
//!   a replayed PUBLISH publish. What a replay can do at most is leave an empty session
//!   (nothing subscribed: SUBSCRIBE waits too) for a client id that had none. A CONNECT held
//!   costs its client one round trip (CONNACK after two, as without 0-RTT).
//! - A stream that ends, is reset or stopped by the client, or carries malformed input ends
//!   that flow only: its subscriptions and in-flight messages move to the control stream, and
//!   nothing read from it afterwards is acted on. The control stream ending ends the
//!   connection, closed with the MQTT reason code as the QUIC error code (0 when normal).
//! - Data flows get process-unique ids (not their stream index), so the flows a persistent
//!   session remembers from an earlier connection (in its mailbox, say) can never be taken
//!   for a stream of the new connection that happens to have the same index.
//! - Migration is quinn's: the connection follows the client's new address, and the span's
//!   `peer` follows it too.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::driver::{Driver, Wire};
use super::link::Link;
use super::permits::{Handshakes, InProgress, ListenerSlots, Permit, RetryPolicy};
use super::{clock, Broker};
use crate::codec::{Codec, DecodeError, Packet, ProtocolVersion, ReasonCode};
use crate::core::message::Flow;
use crate::transport::datagram;
use crate::transport::reader::PacketReader;
use crate::transport::tls::peer_username;
use crate::transport::tls::PeerCertAsUsername;

/// Packets held while the handshake completes; a client sending more in 0-RTT is cut off.
const MAX_HELD: usize = 1024;
/// Bytes queued to all of a connection's streams before deliveries wait.
const BACKLOG_HIGH_WATER: usize = crate::core::channel::DELIVERY_BACKLOG;

/// The next data flow id; `Flow::CONTROL` (0) is never handed out.
static NEXT_DATA_FLOW: AtomicU64 = AtomicU64::new(1);

/// A QUIC listener's settings for its accept loop.
pub struct Listening {
    /// Its share of the connection limits.
    pub slots: Arc<ListenerSlots>,
    /// Its `max_conn_rate`.
    pub pacer: super::listener::Pacer,
    /// When to validate addresses with a Retry round trip first.
    pub retry: RetryPolicy,
    pub peer_cert_as_username: PeerCertAsUsername,
    pub handshake_timeout: Duration,
    /// The listener's handshakes in progress, shared by its endpoints (the Retry threshold
    /// is the listener's).
    pub handshakes: Arc<Handshakes>,
}

impl Listening {
    /// The same listener's settings for its next endpoint: shared limits and handshake
    /// count, and a pacer of its own with `pacer`.
    fn for_endpoint(&self, pacer: super::listener::Pacer) -> Self {
        Self {
            slots: Arc::clone(&self.slots),
            pacer,
            retry: self.retry,
            peer_cert_as_username: self.peer_cert_as_username,
            handshake_timeout: self.handshake_timeout,
            handshakes: Arc::clone(&self.handshakes),
        }
    }
}

/// Spawns one accept loop per endpoint of a listener (see `transport::quic_endpoints`). Each
/// loop after the first gets its pacer from `pacer` (its share of `max_conn_rate`).
pub fn accept_all(
    endpoints: Vec<Endpoint>,
    broker: &Arc<Broker>,
    listening: Listening,
    mut pacer: impl FnMut() -> super::listener::Pacer,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let mut endpoints = endpoints.into_iter();
    let Some(first) = endpoints.next() else {
        return;
    };
    for endpoint in endpoints {
        tracker.spawn(accept(
            endpoint,
            Arc::clone(broker),
            listening.for_endpoint(pacer()),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    tracker.spawn(accept(
        first,
        Arc::clone(broker),
        listening,
        tracker.clone(),
        shutdown.clone(),
    ));
}

/// Accepts QUIC connections until `shutdown`.
///
/// Order per incoming connection: Retry first (stateless and cheap, so it is not paced: under
/// a flood of spoofed addresses this is what keeps the handshakes in progress bounded), then
/// the `max_conn_rate` pause, then the connection limits, then the handshake in its own task.
pub async fn accept(
    endpoint: Endpoint,
    broker: Arc<Broker>,
    listening: Listening,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let Listening {
        slots,
        mut pacer,
        retry,
        peer_cert_as_username,
        handshake_timeout,
        handshakes,
    } = listening;
    // Whether the last unvalidated client was sent a Retry, and when that was last logged.
    let mut retrying = false;
    let told = super::LogEvery::default();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        // Address validation against amplification and handshake floods: a Retry round trip
        // proves the client owns its address before any handshake work is done.
        let validated = incoming.remote_address_validated();
        let in_progress = handshakes.in_progress();
        if !validated {
            let now_retrying = retry.retry(in_progress, false);
            if now_retrying != retrying && retry != RetryPolicy::Always {
                retrying = now_retrying;
                let state = if retrying { "on" } else { "off" };
                if told.due(clock::now()) {
                    tracing::info!(in_progress, "QUIC address validation (Retry) {state}: handshakes in progress against quic.retry_threshold");
                } else {
                    tracing::debug!(in_progress, "QUIC address validation (Retry) {state}");
                }
            }
            if now_retrying {
                match incoming.retry() {
                    Ok(()) => {
                        broker.metrics.quic_retries.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(err) => tracing::debug!(%err, "cannot send a QUIC Retry"),
                }
                continue;
            }
        }
        if !pacer.ready(&broker, &shutdown).await {
            break;
        }
        let permit = match broker.permits.admit(&slots, incoming.remote_address().ip()) {
            Ok(permit) => permit,
            Err(full) => {
                // Refused before any handshake work (CONNECTION_REFUSED to the client).
                tracing::debug!(peer = %incoming.remote_address(), ?full, "QUIC connection refused: connection limit");
                incoming.refuse();
                continue;
            }
        };
        tracker.spawn(serve(
            Arc::clone(&broker),
            permit,
            handshakes.begin(),
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
    // Held for the connection's life.
    _permit: Permit,
    // Held until the handshake completes or fails.
    handshake_in_progress: InProgress,
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
        broker.metrics.connection_opened();
        let metrics = Arc::clone(&broker);
        let limits = broker.limits();
        let sizes = PacketSizes {
            max: limits.max_packet_size,
            connect: limits.max_connect_packet_size,
            user_properties: limits.user_properties_limit(),
        };
        let wire = QuicWire::new(
            &broker,
            conn,
            peer,
            peer_cert_as_username,
            handshake,
            handshake_in_progress,
            clock::now() + handshake_timeout,
            sizes,
        );
        let mut link = Link::new(broker, peer, "quic");
        link.quic = Some(wire.connection().clone());
        Driver::new(link, wire).run(&shutdown).await;
        metrics.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }
    .instrument(span)
    .await;
}

/// The packet size limits the stream readers decode with.
#[derive(Debug, Clone, Copy)]
struct PacketSizes {
    max: u32,
    /// The largest CONNECT (the control stream's first packet).
    connect: u32,
    /// User Properties in one packet.
    user_properties: u32,
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

/// One QUIC connection as the driver sees it: the streams' writers, the events their tasks
/// report, and the handshake.
pub struct QuicWire {
    conn: Connection,
    peer: SocketAddr,
    writers: HashMap<Flow, Writer>,
    control_writer: Option<tokio::task::JoinHandle<()>>,
    /// The stream acceptor (`None`) and one waiter per data stream's writer. Finished ones are
    /// reaped in `poll_transport`, so stream churn does not grow the set.
    tasks: JoinSet<Option<StreamTask>>,
    events: mpsc::Receiver<Event>,
    /// Events received and not yet handed to the channel.
    received: VecDeque<Event>,
    /// Tells the data streams' readers the protocol version once CONNACK is out.
    version: watch::Sender<Option<ProtocolVersion>>,
    /// Resolves when the handshake completes; `None` once it has.
    handshake: Option<Pin<Box<quinn::ZeroRttAccepted>>>,
    handshake_deadline: Pin<Box<tokio::time::Sleep>>,
    /// Counts this connection among the listener's handshakes in progress until then.
    handshake_in_progress: Option<InProgress>,
    /// Packets received in 0-RTT, held until the handshake completes.
    held: Vec<(Flow, Packet)>,
    /// Whether any packet arrived before the handshake completed (0-RTT data).
    early_data: bool,
    closed: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Whether (and how) a verified client certificate names the username; `None` once
    /// applied.
    peer_cert_as_username: PeerCertAsUsername,
    sizes: PacketSizes,
    /// The QoS 0 datagram class, once the client's CONNECT negotiated it.
    datagram: Option<datagram::Sender>,
    /// For the datagram reader, started with CONNACK; dropped then if not negotiated.
    datagram_events: Option<mpsc::Sender<Event>>,
}

/// Events taken from the stream tasks per wake-up, at most.
const EVENTS_PER_WAKE: usize = 64;

impl QuicWire {
    /// The QUIC connection (its path statistics are the operators' link-quality view).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, each argument named"
    )]
    fn new(
        broker: &Arc<Broker>,
        conn: Connection,
        peer: SocketAddr,
        peer_cert_as_username: PeerCertAsUsername,
        handshake: quinn::ZeroRttAccepted,
        handshake_in_progress: InProgress,
        handshake_deadline: std::time::Instant,
        sizes: PacketSizes,
    ) -> Self {
        let (events_tx, events) = mpsc::channel(64);
        let (version, version_rx) = watch::channel(None);
        let mut tasks = JoinSet::new();
        let datagram_events = broker.settings().quic.datagrams.then(|| events_tx.clone());
        let accepting = accept_streams(
            Arc::clone(broker),
            conn.clone(),
            events_tx,
            version_rx,
            sizes,
        );
        tasks.spawn(async move {
            accepting.await;
            None
        });
        let closing = conn.clone();
        Self {
            closed: Box::pin(async move {
                closing.closed().await;
            }),
            conn,
            peer,
            writers: HashMap::new(),
            control_writer: None,
            tasks,
            events,
            received: VecDeque::new(),
            version,
            handshake: Some(Box::pin(handshake)),
            handshake_deadline: Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                handshake_deadline,
            ))),
            held: Vec::new(),
            early_data: false,
            handshake_in_progress: Some(handshake_in_progress),
            peer_cert_as_username,
            sizes,
            datagram: None,
            datagram_events,
        }
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

    fn handle_event(&mut self, link: &mut Link, event: Event, now: std::time::Instant) {
        match &event {
            // Late input from a data flow that was already closed (its reader is stopping).
            Event::Packet(flow, _) | Event::Invalid(flow, _) | Event::Ended(flow)
                if !self.is_live(*flow) =>
            {
                return;
            }
            _ => {}
        }
        match event {
            Event::Opened(flow, writer, handle) => {
                if flow.is_control() {
                    self.control_writer = Some(handle);
                } else {
                    let task = StreamTask::new(&link.broker);
                    self.tasks.spawn(async move {
                        let _ = handle.await;
                        Some(task)
                    });
                    link.channel.open_flow(flow);
                }
                self.writers.insert(flow, writer);
            }
            Event::Packet(flow, packet) => {
                if matches!(packet, Packet::Connect(_)) {
                    // Listeners with client certificates have no 0-RTT, so the handshake
                    // (and the certificate's verification) is complete by now.
                    if let Some(username) = self.certificate_username() {
                        link.channel.set_peer_username(username);
                    }
                }
                if self.handshake.is_some() && self.handshake_done(link) {
                    // Completed just now: what was held goes first.
                    if !self.held.is_empty() {
                        self.received.push_front(Event::Packet(flow, packet));
                        self.requeue_held();
                        return;
                    }
                }
                if self.handshake.is_some() {
                    self.early_data = true;
                }
                let act_now = self.handshake.is_none()
                    || (self.held.is_empty()
                        && matches!(&packet, Packet::Connect(c) if connect_is_replay_safe(&link.broker, c)));
                if act_now {
                    if let (Packet::Connect(connect), true) = (&packet, flow.is_control()) {
                        self.negotiate_datagrams(link, connect);
                    }
                    link.handle_packet(now, flow, packet);
                } else if self.held.len() < MAX_HELD {
                    self.held.push((flow, packet));
                } else {
                    link.channel.handle_transport_closed();
                }
            }
            Event::Invalid(flow, err) => {
                tracing::debug!(%err, flow = flow.0, "bad packet from client");
                link.channel.handle_flow_error(now, flow, &err);
            }
            Event::Ended(flow) => {
                self.writers.remove(&flow);
                link.channel.handle_flow_closed(now, flow);
            }
        }
    }

    /// The client asked for the QoS 0 datagram class (docs/datagram.md): granted if the
    /// listener allows it, the client speaks MQTT 5 and its QUIC transport parameters accept
    /// datagrams. The sender task starts now; CONNACK confirms with the copies we send.
    fn negotiate_datagrams(&mut self, link: &mut Link, connect: &crate::codec::Connect) {
        let settings = Arc::clone(&link.broker.settings().quic);
        if self.datagram.is_some() || !settings.datagrams || !connect.protocol.is_v5() {
            return;
        }
        let asked = connect
            .properties
            .user_properties
            .iter()
            .find(|(name, _)| name == datagram::USER_PROPERTY)
            .and_then(|(_, value)| datagram::parse_copies(value));
        let Some(asked) = asked else { return };
        if self.conn.max_datagram_size().is_none() {
            return;
        }
        let copies = asked.min(settings.datagram_copies);
        let (sender, rx) = datagram::Sender::new();
        let sending = datagram::send_loop(
            self.conn.clone(),
            rx,
            copies,
            settings.datagram_spacing,
            BrokerCounters(Arc::clone(&link.broker)),
        );
        self.tasks.spawn(async move {
            sending.await;
            None
        });
        self.datagram = Some(sender);
        link.channel
            .open_datagram_flow((datagram::USER_PROPERTY.into(), copies.to_string()));
        tracing::debug!(copies, "QoS 0 datagram class negotiated");
    }

    /// Starts reading the client's datagrams (the connection negotiated them and CONNACK is
    /// out): each new QoS 0 PUBLISH is handled as if it came on the control stream.
    fn start_datagram_reader(&mut self, link: &Link) {
        let Some(events) = self.datagram_events.take() else {
            return;
        };
        if self.datagram.is_none() {
            return;
        }
        let mut codec = Codec::with_version(link.channel.version(), self.sizes.max);
        codec.set_max_user_properties(self.sizes.user_properties);
        let reading = datagram::receive_loop(
            self.conn.clone(),
            codec,
            events,
            |packet| Event::Packet(Flow::CONTROL, packet),
            BrokerCounters(Arc::clone(&link.broker)),
        );
        self.tasks.spawn(async move {
            reading.await;
            None
        });
    }

    /// Hands every flow's encoded output to its writer (the datagram flow's to the datagram
    /// sender), and resets the streams of flows the channel closed.
    fn flush(&mut self, link: &mut Link) {
        let writers = &self.writers;
        let control = link.channel.out();
        if !control.is_empty() {
            send(writers.get(&Flow::CONTROL), control);
        }
        let sender = &mut self.datagram;
        let max_datagram = self.conn.max_datagram_size();
        let counters = &link.broker.metrics.quic_datagrams;
        link.channel.drain_flow_output(|flow, out| {
            if flow == Flow::DATAGRAM {
                send_datagrams(sender.as_mut(), max_datagram, out, writers, counters);
            } else {
                send(writers.get(&flow), out);
            }
        });
        for flow in link.closed_flows.drain(..) {
            if let Some(writer) = self.writers.remove(&flow) {
                let _ = writer.tx.send(Write::Reset(VarInt::from_u32(u32::from(
                    ReasonCode::MALFORMED_PACKET.0,
                ))));
            }
        }
        if link.channel.is_connected() && self.version.borrow().is_none() {
            // CONNACK is out: data streams may now be read, in the connection's version.
            let _ = self.version.send(Some(link.channel.version()));
            self.start_datagram_reader(link);
        }
    }

    /// Whether the handshake has completed by now, looked at without waiting: quinn reports
    /// the completion before it hands out the stream data that came with the client's
    /// Finished, so a packet read after it is not early data. (The no-op waker replaces the
    /// task's: `poll_transport` registers it again before the driver next waits.)
    fn handshake_done(&mut self, link: &Link) -> bool {
        let Some(handshake) = &mut self.handshake else {
            return true;
        };
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match handshake.as_mut().poll(&mut cx) {
            Poll::Ready(zero_rtt) => {
                self.handshake_completed(link, zero_rtt);
                true
            }
            Poll::Pending => false,
        }
    }

    fn handshake_completed(&mut self, link: &Link, zero_rtt: bool) {
        self.handshake = None;
        self.handshake_in_progress = None;
        let metrics = &link.broker.metrics;
        metrics.quic_handshakes.fetch_add(1, Ordering::Relaxed);
        // quinn's answer is the client's view (on a server it is always false): a packet
        // read before completion is what tells that 0-RTT data was accepted.
        if zero_rtt || self.early_data {
            metrics.quic_0rtt_accepted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What was held goes first, in order, before anything received since.
    fn requeue_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        for (flow, packet) in held.into_iter().rev() {
            self.received.push_front(Event::Packet(flow, packet));
        }
    }

    fn follow_migration(&mut self, link: &Link) {
        let now = self.conn.remote_address();
        if now != self.peer {
            link.broker
                .metrics
                .quic_migrations
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(from = %self.peer, to = %now, "client migrated");
            tracing::Span::current().record("peer", tracing::field::display(now));
            self.peer = now;
        }
    }
}

impl Wire for QuicWire {
    fn handle_input(&mut self, link: &mut Link, now: std::time::Instant) -> bool {
        let Some(event) = self.received.pop_front() else {
            return false;
        };
        self.handle_event(link, event, now);
        true
    }

    fn poll_receive(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()> {
        let mut ready = false;
        while self.received.len() < EVENTS_PER_WAKE {
            match self.events.poll_recv(cx) {
                Poll::Ready(Some(event)) => self.received.push_back(event),
                Poll::Ready(None) => {
                    link.channel.handle_transport_closed();
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            }
            ready = true;
        }
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn poll_send(&mut self, _cx: &mut Context<'_>, link: &mut Link) -> Poll<()> {
        self.flush(link);
        Poll::Ready(())
    }

    fn poll_transport(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()> {
        let mut ready = false;
        // Releases the writers of data streams that ended.
        while let Poll::Ready(Some(_)) = self.tasks.poll_join_next(cx) {}
        if let Some(handshake) = &mut self.handshake {
            if let Poll::Ready(zero_rtt) = handshake.as_mut().poll(cx) {
                self.handshake_completed(link, zero_rtt);
                self.requeue_held();
                ready = true;
            } else if self.handshake_deadline.as_mut().poll(cx).is_ready() {
                tracing::debug!("QUIC handshake did not complete in time");
                self.handshake = None;
                self.handshake_in_progress = None;
                link.channel.handle_transport_closed();
                ready = true;
            }
        }
        if self.closed.as_mut().poll(cx).is_ready() {
            link.channel.handle_transport_closed();
            ready = true;
        }
        self.follow_migration(link);
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn before_deliveries(&mut self, link: &mut Link) {
        // Output waiting for the store goes in `poll_send`, once the driver saw it durable.
        if !link.output_held() {
            self.flush(link);
        }
    }

    fn has_room(&self) -> bool {
        backlog(&self.writers) < BACKLOG_HIGH_WATER
    }

    /// The writers' queues (unbounded channels) are bounded here: the driver closes the
    /// connection once they and the channel's output pass `mqtt.max_outbound_buffer`.
    fn backlog(&self, link: &mut Link) -> usize {
        backlog(&self.writers) + link.channel.out().len()
    }

    /// Lets the control stream flush what the channel said last, then closes the connection
    /// with the MQTT reason code as the QUIC error code (0 for a normal end).
    async fn close(&mut self, link: &mut Link) {
        self.flush(link);
        let reason = link.close_reason.unwrap_or(ReasonCode::SUCCESS);
        let code = if reason == ReasonCode::DISCONNECT_WITH_WILL || !reason.is_failure() {
            0
        } else {
            reason.0
        };
        self.writers.clear(); // ends each writer after its queue: streams finish gracefully
        if let Some(handle) = self.control_writer.take() {
            let linger = link.broker.settings().close_linger;
            let _ = tokio::time::timeout(linger, handle).await;
        }
        self.conn.close(VarInt::from_u32(u32::from(code)), b"");
        self.tasks.shutdown().await;
    }
}

/// Whether a CONNECT received in 0-RTT data may act before the handshake completes: a replay
/// of it must harm nothing (see the module documentation). Checked when it arrives; a
/// session created between this check and the CONNECT's lookup (microseconds) would be taken
/// over: only a client racing itself can do that, and a replayer cannot choose the moment.
fn connect_is_replay_safe(broker: &Broker, connect: &crate::codec::Connect) -> bool {
    connect.will.is_none() && !broker.knows_client(&connect.client_id)
}

fn send(writer: Option<&Writer>, out: &mut BytesMut) {
    send_bytes(writer, out.split().freeze());
}

fn send_bytes(writer: Option<&Writer>, bytes: Bytes) {
    if let Some(writer) = writer {
        writer.backlog.fetch_add(bytes.len(), Ordering::Relaxed);
        let _ = writer.tx.send(Write::Data(bytes));
    }
}

/// Sends each packet of the datagram flow's output (QoS 0 PUBLISH packets, whole) as
/// datagrams; one too large for a datagram goes on the control stream.
fn send_datagrams(
    sender: Option<&mut datagram::Sender>,
    max_datagram: Option<usize>,
    out: &mut BytesMut,
    writers: &HashMap<Flow, Writer>,
    counters: &datagram::Counters,
) {
    let bytes = out.split().freeze();
    let control = writers.get(&Flow::CONTROL);
    let Some(sender) = sender else {
        return send_bytes(control, bytes);
    };
    let mut at = 0;
    while at < bytes.len() {
        let Some(len) = datagram::packet_len(&bytes[at..]) else {
            // Not whole packets: cannot happen with the channel's encoder; the stream takes it.
            return send_bytes(control, bytes.slice(at..));
        };
        if sender
            .send(&bytes[at..at + len], max_datagram, counters)
            .is_err()
        {
            send_bytes(control, bytes.slice(at..at + len));
        }
        at += len;
    }
}

/// The broker-wide datagram counters, for the datagram tasks.
struct BrokerCounters(Arc<Broker>);

impl AsRef<datagram::Counters> for BrokerCounters {
    fn as_ref(&self) -> &datagram::Counters {
        &self.0.metrics.quic_datagrams
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
    broker: Arc<Broker>,
    conn: Connection,
    events: mpsc::Sender<Event>,
    version: watch::Receiver<Option<ProtocolVersion>>,
    sizes: PacketSizes,
) {
    let mut readers = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = conn.accept_bi() => accepted,
            // Releases each reader as its stream ends (a finished task's output, and its
            // memory, stay in the set until joined).
            Some(_) = readers.join_next() => continue,
        };
        let Ok((send, recv)) = accepted else { break };
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
        let task = StreamTask::new(&broker);
        let reader = read_flow(flow, recv, events.clone(), version.clone(), sizes, reading);
        readers.spawn(async move {
            reader.await;
            task
        });
    }
    // The connection is gone; readers end with their streams.
    while readers.join_next().await.is_some() {}
}

/// Counts a stream's task in `quic_stream_tasks` until the task is released: it is the
/// task's output, so it is dropped when the task is reaped from its set, or with the task if
/// that is aborted.
struct StreamTask(Arc<Broker>);

impl StreamTask {
    fn new(broker: &Arc<Broker>) -> Self {
        broker
            .metrics
            .quic_stream_tasks
            .fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(broker))
    }
}

impl Drop for StreamTask {
    fn drop(&mut self) {
        self.0
            .metrics
            .quic_stream_tasks
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads one stream until it ends, or until its flow is closed from the broker's side
/// (`reading` cancelled), when the client is told to stop sending on it.
async fn read_flow(
    flow: Flow,
    mut recv: RecvStream,
    events: mpsc::Sender<Event>,
    version: watch::Receiver<Option<ProtocolVersion>>,
    sizes: PacketSizes,
    reading: CancellationToken,
) {
    let cancelled = tokio::select! {
        biased;
        _ = reading.cancelled() => true,
        _ = read_packets(flow, &mut recv, &events, version, sizes) => false,
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
    sizes: PacketSizes,
) {
    let max_packet_size = sizes.max;
    let mut codec = if flow.is_control() {
        let mut codec = Codec::new(max_packet_size);
        codec.set_connect_limit(sizes.connect);
        codec
    } else {
        let Ok(v) = version.wait_for(Option::is_some).await else {
            return;
        };
        let v = v.expect("waited for Some");
        Codec::with_version(v, max_packet_size)
    };
    codec.set_max_user_properties(sizes.user_properties);
    let mut reader = PacketReader::new(recv, codec);
    while let Some(next) = reader.next().await {
        match next {
            Ok(packet) => {
                if events.send(Event::Packet(flow, packet)).await.is_err() {
                    return;
                }
            }
            Err(err) => {
                let code = VarInt::from_u32(u32::from(err.reason_code().0));
                let _ = reader.get_mut().stop(code);
                let _ = events.send(Event::Invalid(flow, err)).await;
                return;
            }
        }
    }
    let _ = events.send(Event::Ended(flow)).await;
}
