//! The per-connection driver: a thin async loop around one [`Channel`].
//!
//! It reads into a connection-owned buffer, decodes every complete packet and feeds it to the
//! channel, carries out the channel's actions against the shared [`Broker`], moves deliveries
//! from the session's mailbox into the channel while the in-flight window allows, and writes
//! the channel's output with as few syscalls as the socket allows. One timer is re-armed to
//! the channel's next deadline. Nothing half-parsed lives in a future that `select!` can
//! cancel: reads only append to the buffer, decoding happens outside the `select!`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::mailbox::Mailbox;
use super::{clock, Broker, Control};
use crate::codec::Codec;
use crate::core::channel::{Action, Channel};

/// Initial read buffer; it grows only as far as a packet being read needs.
const READ_CHUNK: usize = 4 * 1024;

/// Serves one client connection until it closes.
pub async fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    transport: &'static str,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::debug_span!("conn", transport, %peer, client_id = tracing::field::Empty);
    broker.metrics.connections.fetch_add(1, Ordering::Relaxed);
    broker
        .metrics
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let metrics_broker = Arc::clone(&broker);
    Connection::new(broker)
        .run(stream, shutdown)
        .instrument(span)
        .await;
    metrics_broker
        .metrics
        .connections
        .fetch_sub(1, Ordering::Relaxed);
}

struct Connection {
    broker: Arc<Broker>,
    conn_id: u64,
    channel: Channel,
    codec: Codec,
    rbuf: BytesMut,
    mailbox: Option<Arc<Mailbox>>,
    control_tx: mpsc::Sender<Control>,
    control_rx: mpsc::Receiver<Control>,
    takeover_acks: Vec<oneshot::Sender<()>>,
    closed: bool,
}

impl Connection {
    fn new(broker: Arc<Broker>) -> Self {
        let limits = Arc::clone(broker.limits());
        let codec = Codec::new(limits.max_packet_size);
        let (control_tx, control_rx) = mpsc::channel(4);
        Self {
            conn_id: broker.next_conn_id(),
            channel: Channel::new(limits, clock::now()),
            broker,
            codec,
            rbuf: BytesMut::new(),
            mailbox: None,
            control_tx,
            control_rx,
            takeover_acks: Vec::new(),
            closed: false,
        }
    }

    async fn run<S>(mut self, stream: S, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut shutting_down = false;
        loop {
            self.decode_buffered().await;
            self.pump_deliveries();
            if self.closed {
                break;
            }
            let deadline = self.channel.poll_timeout();
            let deliverable = self.mailbox.clone().filter(|_| self.channel.can_deliver());
            if self.rbuf.capacity() - self.rbuf.len() < 512 {
                self.rbuf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    self.channel.handle_shutdown();
                }
                Some(control) = self.control_rx.recv() => match control {
                    Control::Takeover(ack) => {
                        self.takeover_acks.push(ack);
                        self.channel.handle_takeover();
                    }
                },
                written = writer.write_buf(self.channel.out()), if !self.channel.out().is_empty() => {
                    if written.is_err() {
                        self.channel.out().clear();
                        self.channel.handle_transport_closed();
                    }
                }
                read = reader.read_buf(&mut self.rbuf) => match read {
                    Ok(0) | Err(_) => self.channel.handle_transport_closed(),
                    Ok(_) => {}
                },
                _ = async { deliverable.as_deref().expect("guarded").notified().await }, if deliverable.is_some() => {}
                _ = async { clock::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    self.channel.handle_timeout(clock::now());
                }
            }
            self.carry_out_actions().await;
        }
        // Flush what the channel said last (CONNACK refusal, DISCONNECT) within the linger time.
        let linger = self.broker.settings().close_linger;
        let out = std::mem::take(self.channel.out());
        let _ = tokio::time::timeout(linger, async {
            if !out.is_empty() {
                writer.write_all(&out).await?;
            }
            writer.shutdown().await
        })
        .await;
    }

    /// Decodes and handles every complete packet in the read buffer, carrying out the
    /// channel's actions after each (a CONNECT must be answered before what follows it).
    async fn decode_buffered(&mut self) {
        while !self.channel.is_closed() {
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(packet)) => {
                    tracing::trace!(?packet, "received");
                    self.channel.handle_packet(clock::now(), packet);
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!(%err, "bad packet from client");
                    self.channel.handle_decode_error(&err);
                }
            }
            self.carry_out_actions().await;
        }
    }

    async fn carry_out_actions(&mut self) {
        while let Some(action) = self.channel.poll_action() {
            let now = clock::now();
            match action {
                Action::Connect {
                    client_id,
                    clean_start,
                } => {
                    tracing::Span::current().record("client_id", &*client_id);
                    let opened = self
                        .broker
                        .open_session(now, &client_id, clean_start, self.conn_id, &self.control_tx)
                        .await;
                    match opened {
                        Ok((session, mailbox)) => {
                            self.mailbox = Some(mailbox);
                            self.channel.accept(clock::now(), session);
                        }
                        Err(code) => self.channel.reject(code),
                    }
                }
                Action::Route(message) => self.broker.publish(message, now),
                Action::Subscribe {
                    subscription,
                    send_retained,
                } => {
                    if let Some(mailbox) = &self.mailbox {
                        let client_id = self.channel.client_id();
                        self.broker.subscribe(
                            now,
                            client_id,
                            mailbox,
                            &subscription,
                            send_retained,
                        );
                    }
                }
                Action::Unsubscribe { filter, flow } => {
                    self.broker
                        .unsubscribe(self.channel.client_id(), &filter, flow)
                }
                // Only QUIC data streams are separate flows; a byte stream has none to close.
                Action::CloseFlow(_) => {}
                Action::Close(close) => {
                    tracing::debug!(reason = %close.reason, initiator = ?close.initiator, "connection closed");
                    let dropped = self.channel.dropped;
                    self.broker
                        .metrics
                        .messages_dropped
                        .fetch_add(dropped, Ordering::Relaxed);
                    self.channel.dropped = 0;
                    let client_id = Arc::clone(self.channel.client_id());
                    self.broker
                        .close_session(now, self.conn_id, &client_id, *close);
                    self.mailbox = None;
                    self.closed = true;
                    // The session is filed: a connection taking over need not wait for our
                    // last bytes to flush.
                    for ack in self.takeover_acks.drain(..) {
                        let _ = ack.send(());
                    }
                }
            }
        }
    }

    /// Moves deliveries from the mailbox into the channel while its window has room.
    fn pump_deliveries(&mut self) {
        let Some(mailbox) = &self.mailbox else { return };
        let now = clock::now();
        let mut offered = 0u64;
        while self.channel.can_deliver() {
            let Some(delivery) = mailbox.pop() else { break };
            self.channel.deliver(now, delivery);
            offered += 1;
        }
        // Deliveries the channel dropped (expired, too large for the client) are counted as
        // they happen, not only when the connection closes, and not as delivered.
        let dropped = std::mem::take(&mut self.channel.dropped);
        let metrics = &self.broker.metrics;
        if dropped > 0 {
            metrics
                .messages_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
        let sent = offered.saturating_sub(dropped);
        if sent > 0 {
            metrics
                .messages_delivered
                .fetch_add(sent, Ordering::Relaxed);
        }
    }
}
