//! The MQTT-over-QUIC driver, wire-compatible with EMQX in single- and multi-stream mode.
//!
//! The first client-opened bidirectional stream is the control stream ([`Flow::CONTROL`]);
//! every further one is a data flow with plain MQTT framing. One task per connection runs the
//! common `driver::Driver` over a [`QuicWire`], which accepts the streams and reads and writes
//! the control stream itself, as the byte-stream transports do their socket: a connection on
//! one stream (EMQX's single-stream mode, paho, an idle fleet) costs one task and no queues.
//! Each data stream has a reader task (the shared `PacketReader`) that decodes packets into
//! an event queue and a writer task fed with encoded bytes, so a stalled stream never blocks
//! another (the point of per-topic streams on lossy links); the queue and the tasks are made
//! with the first data stream.
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

use bytes::{Buf, Bytes, BytesMut};
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
        let connection = serve(
            Arc::clone(&broker),
            permit,
            handshakes.begin(),
            incoming,
            peer_cert_as_username,
            handshake_timeout,
            shutdown.clone(),
        );
        if let Some(connection) = connection {
            tracker.spawn(connection);
        }
    }
    // Give connections a moment to send their last packets (DISCONNECT 0x8B) before the
    // endpoint goes.
    endpoint.wait_idle().await;
}

/// Accepts one incoming connection (quinn does the handshake's first flight here, under its
/// endpoint's lock, whichever task calls it) and returns the future that drives it until it
/// closes; `None` if quinn refuses it.
///
/// The connection is built here, in a plain function, and the future borrows it where it
/// lies, so the task holds one `Driver` and nothing else of size (an `async fn` keeps its
/// arguments for its whole life, and a value moved from one `async` frame into another in
/// both: the task was 4.7 KB per connection, it is about 2 KB this way).
fn serve(
    broker: Arc<Broker>,
    // Held for the connection's life.
    permit: Permit,
    // Held until the handshake completes or fails.
    handshake_in_progress: InProgress,
    incoming: Incoming,
    peer_cert_as_username: PeerCertAsUsername,
    handshake_timeout: Duration,
    shutdown: CancellationToken,
) -> Option<impl Future<Output = ()> + Send> {
    let peer = incoming.remote_address();
    let span =
        tracing::debug_span!("conn", transport = "quic", %peer, client_id = tracing::field::Empty);
    let mut driver = span.in_scope(|| {
        start(
            &broker,
            incoming,
            peer,
            handshake_in_progress,
            peer_cert_as_username,
            handshake_timeout,
        )
    })?;
    Some(
        async move {
            let _permit = permit;
            driver.run(&shutdown).await;
            broker.metrics.connections.fetch_sub(1, Ordering::Relaxed);
        }
        .instrument(span),
    )
}

/// Accepts the connection and builds its driver; `None` if quinn refuses it.
fn start(
    broker: &Arc<Broker>,
    incoming: Incoming,
    peer: SocketAddr,
    handshake_in_progress: InProgress,
    peer_cert_as_username: PeerCertAsUsername,
    handshake_timeout: Duration,
) -> Option<Driver<QuicWire>> {
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(err) => {
            tracing::debug!(%err, "QUIC connection refused");
            return None;
        }
    };
    // On the server side this always succeeds: the connection is usable at once (0.5-RTT)
    // and `handshake` resolves when the handshake has completed.
    let (conn, handshake) = connecting.into_0rtt().ok()?;
    broker.metrics.connection_opened();
    let limits = broker.limits();
    let sizes = PacketSizes {
        max: limits.max_packet_size,
        connect: limits.max_connect_packet_size,
        user_properties: limits.user_properties_limit(),
    };
    let wire = QuicWire::new(
        conn,
        peer,
        peer_cert_as_username,
        handshake,
        handshake_in_progress,
        clock::now() + handshake_timeout,
        sizes,
    );
    let mut link = Link::new(Arc::clone(broker), peer, "quic");
    link.quic = Some(wire.connection().clone());
    Some(Driver::new(link, wire))
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

/// What the data streams' tasks (and the datagram reader) tell the connection task, and what
/// the connection task queues for itself.
enum Event {
    /// A data stream was accepted (its writer is in place).
    Opened(Flow),
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

/// A future the wire polls in place (the next stream, the control stream being stopped).
type Waiting<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The control stream, read and written by the connection task itself.
struct Control {
    reader: PacketReader<RecvStream>,
    send: SendStream,
    /// Resolves when the client stops reading the control stream (STOP_SENDING) or the
    /// connection is lost.
    stopped: Waiting<()>,
    /// Reading is over: the stream ended or failed, or carried malformed input.
    read_ended: bool,
    /// Writing failed: what the channel says from now on is dropped.
    write_failed: bool,
    /// The control flow's end has been reported to the channel.
    reported: bool,
}

impl Control {
    fn new(send: SendStream, recv: RecvStream, sizes: PacketSizes) -> Self {
        let mut codec = Codec::new(sizes.max);
        codec.set_connect_limit(sizes.connect);
        codec.set_max_user_properties(sizes.user_properties);
        let stopped = send.stopped();
        Self {
            reader: PacketReader::new(recv, codec),
            send,
            stopped: Box::pin(async move {
                let _ = stopped.await;
            }),
            read_ended: false,
            write_failed: false,
            reported: false,
        }
    }

    /// Writes `out` until it is all handed to quinn or the stream's flow control is full.
    /// `Err` when the stream can no longer be written (stopped, reset, connection lost).
    fn poll_write(&mut self, cx: &mut Context<'_>, out: &mut BytesMut) -> Result<(), ()> {
        while !out.is_empty() {
            match Pin::new(&mut self.send).poll_write(cx, out) {
                Poll::Ready(Ok(0)) | Poll::Pending => break,
                Poll::Ready(Ok(n)) => out.advance(n),
                Poll::Ready(Err(_)) => return Err(()),
            }
        }
        Ok(())
    }
}

/// What data streams need, made with the first one (or the datagram class): the queue their
/// tasks report to, the protocol version they decode with, and the tasks.
struct DataFlows {
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    /// Tells the data streams' readers the protocol version once CONNACK is out.
    version: watch::Sender<Option<ProtocolVersion>>,
    /// Each data stream's reader and writer, and the datagram tasks. Finished ones are
    /// reaped in `poll_transport`, so stream churn does not grow the set.
    tasks: JoinSet<Option<StreamTask>>,
}

/// One QUIC connection as the driver sees it: the control stream, the data streams' writers,
/// the events their tasks report, and the handshake.
pub struct QuicWire {
    conn: Connection,
    peer: SocketAddr,
    /// The next stream the client opens; `None` once the connection is gone.
    accepting: Option<Waiting<Result<(SendStream, RecvStream), quinn::ConnectionError>>>,
    /// The control stream, once the client opened it.
    control: Option<Control>,
    /// The data flows' writers.
    writers: HashMap<Flow, Writer>,
    /// Made with the first data stream or the datagram class.
    data: Option<DataFlows>,
    /// Events received and not yet handed to the channel.
    received: VecDeque<Event>,
    /// The protocol version, once CONNACK is out (data streams are read from then on).
    version: Option<ProtocolVersion>,
    /// Resolves when the handshake completes; `None` once it has.
    handshake: Option<Pin<Box<quinn::ZeroRttAccepted>>>,
    /// The handshake's deadline; `None` once it has completed.
    handshake_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts this connection among the listener's handshakes in progress until then.
    handshake_in_progress: Option<InProgress>,
    /// Packets received in 0-RTT, held until the handshake completes.
    held: Vec<(Flow, Packet)>,
    /// Whether any packet arrived before the handshake completed (0-RTT data).
    early_data: bool,
    /// Whether (and how) a verified client certificate names the username; `None` once
    /// applied.
    peer_cert_as_username: PeerCertAsUsername,
    sizes: PacketSizes,
    /// The QoS 0 datagram class, once the client's CONNECT negotiated it.
    datagram: Option<datagram::Sender>,
    /// The datagram reader is to start with CONNACK (the class was negotiated).
    datagram_reader_due: bool,
}

/// Events taken from the stream tasks per wake-up, at most.
const EVENTS_PER_WAKE: usize = 64;
/// Streams accepted per wake-up, at most (more are taken on the next).
const ACCEPTS_PER_WAKE: usize = 16;
/// A quiet connection keeps a control output buffer up to this size (as a byte stream's).
const KEEP_OUT: usize = 4 * 1024;

fn accept_next(
    conn: &Connection,
) -> Waiting<Result<(SendStream, RecvStream), quinn::ConnectionError>> {
    let conn = conn.clone();
    Box::pin(async move { conn.accept_bi().await })
}

impl QuicWire {
    /// The QUIC connection (its path statistics are the operators' link-quality view).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    fn new(
        conn: Connection,
        peer: SocketAddr,
        peer_cert_as_username: PeerCertAsUsername,
        handshake: quinn::ZeroRttAccepted,
        handshake_in_progress: InProgress,
        handshake_deadline: std::time::Instant,
        sizes: PacketSizes,
    ) -> Self {
        Self {
            accepting: Some(accept_next(&conn)),
            conn,
            peer,
            control: None,
            writers: HashMap::new(),
            data: None,
            received: VecDeque::new(),
            version: None,
            handshake: Some(Box::pin(handshake)),
            handshake_deadline: Some(Box::pin(tokio::time::sleep_until(
                tokio::time::Instant::from_std(handshake_deadline),
            ))),
            held: Vec::new(),
            early_data: false,
            handshake_in_progress: Some(handshake_in_progress),
            peer_cert_as_username,
            sizes,
            datagram: None,
            datagram_reader_due: false,
        }
    }

    /// The data flows' queue, version and tasks, made on first use.
    fn data_flows(&mut self) -> &mut DataFlows {
        let version = self.version;
        self.data.get_or_insert_with(|| {
            let (events_tx, events) = mpsc::channel(64);
            let (version, _) = watch::channel(version);
            DataFlows {
                events_tx,
                events,
                version,
                tasks: JoinSet::new(),
            }
        })
    }

    /// A stream the client opened: the first is the control stream, read and written here;
    /// each further one gets a reader and a writer task (the reader waits for CONNACK).
    fn stream_opened(&mut self, broker: &Arc<Broker>, send: SendStream, recv: RecvStream) {
        let index = recv.id().index();
        if index == 0 && self.control.is_none() {
            tracing::trace!(stream = index, "control stream accepted");
            self.control = Some(Control::new(send, recv, self.sizes));
            return;
        }
        let flow = Flow(NEXT_DATA_FLOW.fetch_add(1, Ordering::Relaxed));
        tracing::trace!(stream = index, flow = flow.0, "stream accepted");
        let sizes = self.sizes;
        let data = self.data_flows();
        let reading = CancellationToken::new();
        let writer = spawn_writer(
            flow,
            send,
            data.events_tx.clone(),
            reading.clone(),
            &mut data.tasks,
            StreamTask::new(broker),
        );
        let reader = read_flow(
            flow,
            recv,
            data.events_tx.clone(),
            data.version.subscribe(),
            sizes,
            reading,
        );
        let task = StreamTask::new(broker);
        data.tasks.spawn(async move {
            reader.await;
            Some(task)
        });
        self.writers.insert(flow, writer);
        self.received.push_back(Event::Opened(flow));
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

    /// The control stream's next input: a packet already read, a decode error (reading stops
    /// and the client is told to stop sending), or its end once everything read was decoded.
    fn next_control_event(&mut self) -> Option<Event> {
        let control = self.control.as_mut()?;
        if control.reported {
            return None;
        }
        if !control.read_ended {
            match control.reader.decode() {
                Ok(Some(packet)) => return Some(Event::Packet(Flow::CONTROL, packet)),
                Ok(None) => return None,
                Err(err) => {
                    let code = VarInt::from_u32(u32::from(err.reason_code().0));
                    let _ = control.reader.get_mut().stop(code);
                    control.read_ended = true;
                    control.reported = true;
                    return Some(Event::Invalid(Flow::CONTROL, err));
                }
            }
        }
        // Ended: what it carried before its end has been decoded above.
        match control.reader.decode() {
            Ok(Some(packet)) => Some(Event::Packet(Flow::CONTROL, packet)),
            _ => {
                control.reported = true;
                Some(Event::Ended(Flow::CONTROL))
            }
        }
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
            Event::Opened(flow) => {
                if self.writers.contains_key(&flow) {
                    link.channel.open_flow(flow);
                }
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
        self.data_flows().tasks.spawn(async move {
            sending.await;
            None
        });
        self.datagram = Some(sender);
        self.datagram_reader_due = true;
        link.channel
            .open_datagram_flow((datagram::USER_PROPERTY.into(), copies.to_string()));
        tracing::debug!(copies, "QoS 0 datagram class negotiated");
    }

    /// Starts reading the client's datagrams (the connection negotiated them and CONNACK is
    /// out): each new QoS 0 PUBLISH is handled as if it came on the control stream.
    fn start_datagram_reader(&mut self, link: &Link) {
        if !std::mem::take(&mut self.datagram_reader_due) || self.datagram.is_none() {
            return;
        }
        let mut codec = Codec::with_version(link.channel.version(), self.sizes.max);
        codec.set_max_user_properties(self.sizes.user_properties);
        let conn = self.conn.clone();
        let data = self.data_flows();
        let reading = datagram::receive_loop(
            conn,
            codec,
            data.events_tx.clone(),
            |packet| Event::Packet(Flow::CONTROL, packet),
            BrokerCounters(Arc::clone(&link.broker)),
        );
        data.tasks.spawn(async move {
            reading.await;
            None
        });
    }

    /// Hands every data flow's encoded output to its writer (the datagram flow's to the
    /// datagram sender), and resets the streams of flows the channel closed. The control
    /// flow's output stays in the channel until `write_control` writes it.
    fn flush_flows(&mut self, link: &mut Link) {
        let writers = &self.writers;
        let sender = &mut self.datagram;
        let max_datagram = self.conn.max_datagram_size();
        let counters = &link.broker.metrics.quic_datagrams;
        // Datagram-class packets too large for a datagram go on the control stream, after
        // what the channel wrote there.
        let mut spill = BytesMut::new();
        link.channel.drain_flow_output(|flow, out| {
            if flow == Flow::DATAGRAM {
                send_datagrams(sender.as_mut(), max_datagram, out, &mut spill, counters);
            } else {
                send(writers.get(&flow), out);
            }
        });
        if !spill.is_empty() {
            link.channel.out().extend_from_slice(&spill);
        }
        for flow in link.closed_flows.drain(..) {
            if let Some(writer) = self.writers.remove(&flow) {
                let _ = writer.tx.send(Write::Reset(VarInt::from_u32(u32::from(
                    ReasonCode::MALFORMED_PACKET.0,
                ))));
            }
        }
        if link.channel.is_connected() && self.version.is_none() {
            // CONNACK is out: data streams may now be read, in the connection's version.
            let version = link.channel.version();
            self.version = Some(version);
            if let Some(data) = &self.data {
                // Stored even while no reader waits (`send` would drop it): readers of data
                // streams opened later subscribe to this value.
                data.version.send_replace(Some(version));
            }
            self.start_datagram_reader(link);
        }
    }

    /// Writes the channel's control output to the control stream, as far as its flow control
    /// allows; a stream that can no longer be written ends the connection.
    fn write_control(&mut self, cx: &mut Context<'_>, link: &mut Link) {
        let out = link.channel.out();
        if out.is_empty() {
            return;
        }
        let Some(control) = self.control.as_mut().filter(|c| !c.write_failed) else {
            // No control stream (yet, or any more): nothing can carry it.
            out.clear();
            return;
        };
        if control.poll_write(cx, out).is_err() {
            out.clear();
            control.write_failed = true;
            link.channel.handle_transport_closed();
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
        self.handshake_deadline = None;
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

    /// Accepts the streams the client opened since the last look (a bounded number per
    /// wake-up); `true` if any was, or the connection is gone (the channel has been told).
    fn poll_accept(&mut self, cx: &mut Context<'_>, link: &mut Link) -> bool {
        let mut ready = false;
        for _ in 0..ACCEPTS_PER_WAKE {
            let Some(accepting) = &mut self.accepting else {
                return ready;
            };
            match accepting.as_mut().poll(cx) {
                Poll::Pending => return ready,
                Poll::Ready(Ok((send, recv))) => {
                    self.accepting = Some(accept_next(&self.conn));
                    self.stream_opened(&link.broker, send, recv);
                }
                Poll::Ready(Err(err)) => {
                    tracing::trace!(%err, "QUIC connection ended");
                    self.accepting = None;
                    link.channel.handle_transport_closed();
                }
            }
            ready = true;
        }
        // More may be waiting: look again on the next turn.
        cx.waker().wake_by_ref();
        ready
    }
}

impl Wire for QuicWire {
    fn handle_input(&mut self, link: &mut Link, now: std::time::Instant) -> bool {
        let event = match self.received.pop_front() {
            Some(event) => event,
            None => match self.next_control_event() {
                Some(event) => event,
                None => return false,
            },
        };
        self.handle_event(link, event, now);
        true
    }

    fn poll_receive(&mut self, cx: &mut Context<'_>, _link: &mut Link) -> Poll<()> {
        let mut ready = false;
        if let Some(data) = &mut self.data {
            while self.received.len() < EVENTS_PER_WAKE {
                match data.events.poll_recv(cx) {
                    Poll::Ready(Some(event)) => self.received.push_back(event),
                    // Never: the wire holds a sender.
                    Poll::Ready(None) | Poll::Pending => break,
                }
                ready = true;
            }
        }
        if let Some(control) = self.control.as_mut().filter(|c| !c.read_ended) {
            match control.reader.poll_fill(cx) {
                Poll::Ready(Ok(0) | Err(_)) => {
                    control.read_ended = true;
                    ready = true;
                }
                Poll::Ready(Ok(_)) => ready = true,
                Poll::Pending => {}
            }
        }
        if ready {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()> {
        self.flush_flows(link);
        self.write_control(cx, link);
        Poll::Ready(())
    }

    fn poll_transport(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()> {
        let mut ready = false;
        // Releases the tasks of data streams that ended.
        if let Some(data) = &mut self.data {
            while let Poll::Ready(Some(_)) = data.tasks.poll_join_next(cx) {}
        }
        if let Some(handshake) = &mut self.handshake {
            if let Poll::Ready(zero_rtt) = handshake.as_mut().poll(cx) {
                self.handshake_completed(link, zero_rtt);
                self.requeue_held();
                ready = true;
            } else if let Some(deadline) = &mut self.handshake_deadline {
                if deadline.as_mut().poll(cx).is_ready() {
                    tracing::debug!("QUIC handshake did not complete in time");
                    self.handshake = None;
                    self.handshake_deadline = None;
                    self.handshake_in_progress = None;
                    link.channel.handle_transport_closed();
                    ready = true;
                }
            }
        }
        ready |= self.poll_accept(cx, link);
        if let Some(control) = self.control.as_mut().filter(|c| !c.reported) {
            if control.stopped.as_mut().poll(cx).is_ready() {
                // The client stopped reading the control stream (or the connection is lost).
                control.read_ended = true;
                control.reported = true;
                self.received.push_back(Event::Ended(Flow::CONTROL));
                ready = true;
            }
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
            self.flush_flows(link);
        }
    }

    fn has_room(&self) -> bool {
        backlog(&self.writers) < BACKLOG_HIGH_WATER
    }

    /// The data writers' queues (unbounded channels) are bounded here: the driver closes the
    /// connection once they and the channel's output pass `mqtt.max_outbound_buffer`.
    fn backlog(&self, link: &mut Link) -> usize {
        backlog(&self.writers) + link.channel.out().len()
    }

    fn release_buffers(&mut self, link: &mut Link) {
        if let Some(control) = &mut self.control {
            control.reader.release_buffer();
        }
        let out = link.channel.out();
        if out.is_empty() && out.capacity() > KEEP_OUT {
            *out = BytesMut::new();
        }
    }

    fn trim(&mut self) {
        if let Some(control) = &mut self.control {
            control.reader.trim();
        }
        if self.received.is_empty() {
            self.received = VecDeque::new();
        }
    }

    /// Lets the control stream flush what the channel said last, then closes the connection
    /// with the MQTT reason code as the QUIC error code (0 for a normal end).
    async fn close(&mut self, link: &mut Link) {
        self.flush_flows(link);
        let reason = link.close_reason.unwrap_or(ReasonCode::SUCCESS);
        let code = if reason == ReasonCode::DISCONNECT_WITH_WILL || !reason.is_failure() {
            0
        } else {
            reason.0
        };
        self.writers.clear(); // ends each writer after its queue: streams finish gracefully
        let out = std::mem::take(link.channel.out());
        if let Some(control) = self.control.as_mut().filter(|c| !c.write_failed) {
            let linger = link.broker.settings().close_linger;
            let send = &mut control.send;
            let _ = tokio::time::timeout(linger, async {
                if !out.is_empty() && send.write_all(&out).await.is_err() {
                    return;
                }
                if send.finish().is_ok() {
                    // Until the client has everything (or the connection is gone).
                    let _ = send.stopped().await;
                }
            })
            .await;
        }
        self.conn.close(VarInt::from_u32(u32::from(code)), b"");
        if let Some(data) = &mut self.data {
            data.tasks.shutdown().await;
        }
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
    if let Some(writer) = writer {
        let bytes = out.split().freeze();
        writer.backlog.fetch_add(bytes.len(), Ordering::Relaxed);
        let _ = writer.tx.send(Write::Data(bytes));
    } else {
        out.clear();
    }
}

/// Sends each packet of the datagram flow's output (QoS 0 PUBLISH packets, whole) as
/// datagrams; one too large for a datagram goes to `control` (the control stream's output).
fn send_datagrams(
    sender: Option<&mut datagram::Sender>,
    max_datagram: Option<usize>,
    out: &mut BytesMut,
    control: &mut BytesMut,
    counters: &datagram::Counters,
) {
    let Some(sender) = sender else {
        control.extend_from_slice(out);
        out.clear();
        return;
    };
    let mut at = 0;
    while at < out.len() {
        let Some(len) = datagram::packet_len(&out[at..]) else {
            // Not whole packets: cannot happen with the channel's encoder; the stream takes it.
            control.extend_from_slice(&out[at..]);
            break;
        };
        if sender
            .send(&out[at..at + len], max_datagram, counters)
            .is_err()
        {
            control.extend_from_slice(&out[at..at + len]);
        }
        at += len;
    }
    out.clear();
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

/// Starts the task writing one data stream, in `tasks` (counted by `task` until reaped). If
/// the client stops the stream (STOP_SENDING) or it fails, the flow is reported `Ended`,
/// whether or not anything was being written.
fn spawn_writer(
    flow: Flow,
    mut stream: SendStream,
    events: mpsc::Sender<Event>,
    reading: CancellationToken,
    tasks: &mut JoinSet<Option<StreamTask>>,
    task: StreamTask,
) -> Writer {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let backlog = Arc::new(AtomicUsize::new(0));
    let pending = Arc::clone(&backlog);
    tasks.spawn(async move {
        // Not finished yet, so this resolves only on STOP_SENDING or a lost connection.
        let stopped = stream.stopped();
        tokio::pin!(stopped);
        loop {
            let write = tokio::select! {
                write = rx.recv() => write,
                _ = &mut stopped => {
                    let _ = events.send(Event::Ended(flow)).await;
                    return Some(task);
                }
            };
            match write {
                None => break,
                Some(Write::Data(bytes)) => {
                    let n = bytes.len();
                    if stream.write_chunk(bytes).await.is_err() {
                        let _ = events.send(Event::Ended(flow)).await;
                        return Some(task);
                    }
                    pending.fetch_sub(n, Ordering::Relaxed);
                }
                Some(Write::Reset(code)) => {
                    let _ = stream.reset(code);
                    return Some(task);
                }
            }
        }
        let _ = stream.finish();
        // Wait until the peer has everything (or the connection is gone).
        let _ = stream.stopped().await;
        Some(task)
    });
    Writer {
        tx,
        backlog,
        reading,
    }
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

#[cfg(test)]
mod tests {
    /// The size of what `f` returns, from its type alone (nothing is called).
    fn output_size<A, B, C, D, E, F, G, R>(_: fn(A, B, C, D, E, F, G) -> Option<R>) -> usize {
        std::mem::size_of::<R>()
    }

    /// A QUIC connection's task is its driver plus little: a regression to an `async fn`
    /// that keeps values twice (4.7 KB per connection) fails here, not in a fleet's memory.
    #[test]
    fn a_connection_task_holds_one_driver() {
        let task = output_size(super::serve);
        let driver = std::mem::size_of::<super::Driver<super::QuicWire>>();
        assert!(
            task < driver + 1024,
            "the connection future is {task} bytes for a {driver}-byte driver"
        );
    }
}
