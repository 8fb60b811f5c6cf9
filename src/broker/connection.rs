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
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::link::Link;
use super::{clock, Broker};
use crate::codec::Codec;

/// Read sizes adapt to the traffic: an idle connection holds the smallest buffer (the
/// Mosquitto class of memory per idle client), a busy one reads in large batches.
const MIN_READ: usize = 256;
const MAX_READ: usize = 64 * 1024;
/// An empty output buffer larger than this is given back rather than kept while idle.
const KEEP_OUT: usize = 4 * 1024;

/// Serves one client connection until it closes. `peer_username` is the identity the
/// transport established (a client certificate's CN or SAN); it replaces the CONNECT username.
pub async fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    transport: &'static str,
    peer_username: Option<String>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let span = tracing::debug_span!(
        "conn",
        transport,
        %peer,
        client_id = tracing::field::Empty,
        username = tracing::field::Empty
    );
    broker.metrics.connections.fetch_add(1, Ordering::Relaxed);
    broker
        .metrics
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let metrics_broker = Arc::clone(&broker);
    let mut connection = Connection::new(broker);
    if let Some(username) = peer_username {
        connection.link.channel.set_peer_username(username);
    }
    connection.run(stream, shutdown).instrument(span).await;
    metrics_broker
        .metrics
        .connections
        .fetch_sub(1, Ordering::Relaxed);
}

/// Writes what the channel produced, then flushes the stream. Cancel-safe in the sense the
/// driver needs: bytes leave `out` only once the stream took them, and the caller retries the
/// flush until it completes.
async fn write_and_flush<W>(writer: &mut W, out: &mut BytesMut) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    while !out.is_empty() {
        if writer.write_buf(out).await? == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
    }
    writer.flush().await
}

struct Connection {
    link: Link,
    codec: Codec,
    rbuf: BytesMut,
    /// How much the next read asks for.
    read_size: usize,
}

impl Connection {
    fn new(broker: Arc<Broker>) -> Self {
        let codec = Codec::new(broker.limits().max_packet_size);
        Self {
            link: Link::new(broker),
            codec,
            rbuf: BytesMut::new(),
            read_size: MIN_READ,
        }
    }

    async fn run<S>(mut self, stream: S, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut shutting_down = false;
        // Bytes handed to the stream but maybe not yet flushed: TLS and WebSocket buffer
        // inside the stream, and a flush cancelled by `select!` must be retried.
        let mut unflushed = false;
        loop {
            self.decode_buffered().await;
            self.link.pump_deliveries(|| true);
            if self.link.closed {
                break;
            }
            let now = self.link.tick();
            let paused = self.link.is_paused(now);
            let link = &mut self.link;
            let deadline = link.channel.poll_timeout();
            let deliverable = link.deliverable();
            if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * self.read_size {
                self.rbuf = BytesMut::new();
            }
            if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
                self.rbuf.reserve(self.read_size);
            }
            let room = self.rbuf.capacity() - self.rbuf.len();
            if link.channel.out().is_empty() && link.channel.out().capacity() > KEEP_OUT {
                *link.channel.out() = BytesMut::new();
            }
            unflushed |= !link.channel.out().is_empty();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    link.channel.handle_shutdown();
                }
                Some(control) = link.control_rx.recv() => link.handle_control(control),
                written = write_and_flush(&mut writer, link.channel.out()), if unflushed => {
                    match written {
                        Ok(()) => unflushed = false,
                        Err(_) => {
                            link.channel.out().clear();
                            link.channel.handle_transport_closed();
                        }
                    }
                }
                read = reader.read_buf(&mut self.rbuf), if !paused => match read {
                    Ok(0) | Err(_) => link.channel.handle_transport_closed(),
                    Ok(n) if n >= room => self.read_size = (self.read_size * 2).min(MAX_READ),
                    Ok(n) if n < self.read_size / 4 => {
                        self.read_size = (self.read_size / 2).max(MIN_READ);
                    }
                    Ok(_) => {}
                },
                _ = super::link::relief(&link.pressure, link.pause_deadline), if paused => {}
                _ = async { deliverable.as_deref().expect("guarded").notified().await }, if deliverable.is_some() => {}
                _ = async { clock::sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                    link.channel.handle_timeout(clock::now());
                }
            }
            self.link.tick();
            self.link.carry_out_actions().await;
        }
        // Flush what the channel said last (CONNACK refusal, DISCONNECT) within the linger time.
        let linger = self.link.broker.settings().close_linger;
        let out = std::mem::take(self.link.channel.out());
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
        let now = self.link.tick();
        while !self.link.channel.is_closed() && !self.link.is_paused(now) {
            match self.codec.decode(&mut self.rbuf) {
                Ok(Some(packet)) => {
                    tracing::trace!(?packet, "received");
                    self.link.channel.handle_packet(now, packet);
                }
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!(%err, "bad packet from client");
                    self.link.channel.handle_decode_error(&err);
                }
            }
            self.link.carry_out_actions().await;
        }
    }
}
