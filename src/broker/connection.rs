//! The per-connection driver: a thin loop around one [`Channel`].
//!
//! Each turn it decodes every complete packet in the read buffer and feeds it to the
//! channel, carries out the channel's actions against the shared [`Broker`], moves deliveries
//! from the session's mailbox into the channel while the in-flight window allows, and then
//! waits in **one poll function** for whatever comes next: the socket becoming readable or
//! writable, the mailbox (deliveries, a takeover), the channel's one timer, a paused
//! publisher's relief, shutdown. Every wait is a `poll_*` call on state the connection owns,
//! so the task's future is little more than that state: an idle connection costs its
//! `Channel`, its socket and a timer, with no read or write buffer held (a quiet connection
//! reads through a stack buffer and gives its buffers back). Nothing half-parsed lives in a
//! future that could be cancelled: reads only append to the buffer, decoding happens between
//! waits.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::Instrument;

use super::link::{self, Link};
use super::{clock, Broker};
use crate::codec::Codec;

/// A quiet connection reads through a buffer on the stack this large and keeps no read
/// buffer of its own between packets (the Mosquitto class of memory per idle client).
const STACK_READ: usize = 2 * 1024;
/// A busy connection reads into its own buffer, sized to the traffic within these bounds.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;
/// An empty output buffer larger than this is given back even by a busy connection.
const KEEP_OUT: usize = 4 * 1024;
/// A connection with no traffic for this long gives back every buffer and queue it holds
/// empty (not at once: a connection between two packets would allocate them again).
const TRIM_AFTER: std::time::Duration = std::time::Duration::from_millis(500);

/// Serves one client connection until it closes. `peer_username` is the identity the
/// transport established (a client certificate's CN or SAN); it replaces the CONNECT username.
///
/// A plain function returning the future: the connection is built here and the future
/// borrows it where it lies, so the task holds one `Connection` (an `async fn` keeps each
/// argument twice, and a value moved from one `async` frame into another is kept in both).
pub fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    transport: &'static str,
    peer_username: Option<String>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send
where
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
    let mut connection = Connection::new(broker, stream, peer, peer_username);
    async move {
        connection.run(&shutdown).instrument(span).await;
        connection
            .link
            .broker
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

struct Connection<S> {
    link: Link,
    codec: Codec,
    stream: S,
    rbuf: BytesMut,
    /// How much the next read into `rbuf` asks for; 0 while the connection is quiet (reads
    /// go through the stack and `rbuf` holds nothing between packets).
    read_size: usize,
    /// Bytes handed to the stream but maybe not yet flushed (TLS and WebSocket buffer inside
    /// the stream).
    unflushed: bool,
    shutting_down: bool,
    /// When the connection, quiet since, gives back its empty buffers (`None`: it has).
    trim_at: Option<std::time::Instant>,
}

/// What the connection waits on besides its own state, pinned in the task.
struct Waits<'a, 'b> {
    cancelled: Pin<&'a mut WaitForCancellationFuture<'b>>,
    timer: Pin<&'a mut Sleep>,
    /// Armed (the channel has a deadline).
    timer_armed: bool,
    /// While input is paused for overfilled subscribers.
    relief: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn new(
        broker: Arc<Broker>,
        stream: S,
        peer: SocketAddr,
        peer_username: Option<String>,
    ) -> Self {
        let codec = Codec::new(broker.limits().max_packet_size);
        let mut link = Link::new(broker, peer);
        if let Some(username) = peer_username {
            link.channel.set_peer_username(username);
        }
        Self {
            link,
            codec,
            stream,
            rbuf: BytesMut::new(),
            read_size: 0,
            unflushed: false,
            shutting_down: false,
            trim_at: None,
        }
    }

    async fn run(&mut self, shutdown: &CancellationToken) {
        let cancelled = std::pin::pin!(shutdown.cancelled());
        let timer = std::pin::pin!(tokio::time::sleep(std::time::Duration::ZERO));
        let mut waits = Waits {
            cancelled,
            timer,
            timer_armed: false,
            relief: None,
        };
        loop {
            self.decode_buffered().await;
            self.link.pump_deliveries(|| true);
            if self.link.closed {
                break;
            }
            let now = self.link.tick();
            if !self.link.is_paused(now) {
                waits.relief = None;
            } else if waits.relief.is_none() {
                waits.relief = Some(link::relief_owned(&self.link));
            }
            // One timer for the channel's deadline and the trim. It is moved only when the
            // deadline comes earlier or it has fired: a timer that fires early finds nothing
            // due and is re-armed (a busy connection's keep-alive deadline moves with every
            // packet, its timer rarely).
            let deadline = match (self.link.channel.poll_timeout(), self.trim_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match deadline {
                Some(deadline) => {
                    let deadline = tokio::time::Instant::from_std(deadline);
                    if !waits.timer_armed
                        || waits.timer.is_elapsed()
                        || deadline < waits.timer.deadline()
                    {
                        waits.timer.as_mut().reset(deadline);
                    }
                    waits.timer_armed = true;
                }
                None => waits.timer_armed = false,
            }
            self.release_buffers();
            self.unflushed |= !self.link.channel.out().is_empty();
            let active = std::future::poll_fn(|cx| self.poll_wait(cx, &mut waits)).await;
            let now = self.link.tick();
            if active {
                self.trim_at = Some(now + TRIM_AFTER);
            }
            self.link.carry_out_actions().await;
        }
        // Flush what the channel said last (CONNACK refusal, DISCONNECT) within the linger
        // time. Boxed: it runs once, and would otherwise enlarge every connection's task.
        Box::pin(self.linger()).await;
    }

    /// Gives back an empty read buffer that a quiet connection (reading through the stack)
    /// does not need or that is over twice a busy one's read size, and an oversized empty
    /// output buffer.
    fn release_buffers(&mut self) {
        if self.rbuf.is_empty()
            && (self.read_size == 0 || self.rbuf.capacity() > 2 * self.read_size)
        {
            self.rbuf = BytesMut::new();
        }
        let out = self.link.channel.out();
        if out.is_empty() && out.capacity() > KEEP_OUT {
            *out = BytesMut::new();
        }
    }

    /// Quiet for `TRIM_AFTER`: read through the stack again and give back every empty
    /// buffer and queue, so an idle connection costs its state alone.
    fn trim(&mut self) {
        if self.rbuf.is_empty() {
            self.read_size = 0;
            self.rbuf = BytesMut::new();
        }
        self.link.trim();
    }

    /// Waits for the next thing to do, doing what can be done at once (writing, reading)
    /// on the way. Ready when the loop has work: input read, the mailbox or the timer due, a
    /// pause over, shutdown, or the transport gone; `true` if it was traffic rather than
    /// the timer alone.
    fn poll_wait(&mut self, cx: &mut Context<'_>, waits: &mut Waits<'_, '_>) -> Poll<bool> {
        let mut ready = false;
        if !self.shutting_down && waits.cancelled.as_mut().poll(cx).is_ready() {
            self.shutting_down = true;
            self.link.channel.handle_shutdown();
            ready = true;
        }
        if self.unflushed {
            match self.poll_write(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(_)) => {
                    self.link.channel.out().clear();
                    self.unflushed = false;
                    self.link.channel.handle_transport_closed();
                    ready = true;
                }
                Poll::Pending => {}
            }
        }
        match &mut waits.relief {
            Some(relief) => {
                if relief.as_mut().poll(cx).is_ready() {
                    waits.relief = None;
                    ready = true;
                }
            }
            None => ready |= self.poll_read(cx).is_ready(),
        }
        if let Poll::Ready(takeover) = self.link.poll_mailbox(cx) {
            if let Some(ack) = takeover {
                self.link.handle_takeover(ack);
            }
            ready = true;
        }
        let active = ready;
        if waits.timer_armed && waits.timer.as_mut().poll(cx).is_ready() {
            waits.timer_armed = false;
            let now = clock::now();
            if !active && self.trim_at.is_some_and(|at| now >= at) {
                self.trim_at = None;
                self.trim();
            }
            self.link.channel.handle_timeout(now);
            ready = true;
        }
        if ready {
            Poll::Ready(active)
        } else {
            Poll::Pending
        }
    }

    /// Writes the channel's output until it is all out and flushed, or the socket is full.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let out = self.link.channel.out();
        while !out.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => out.advance(n),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Reads what the socket has into `rbuf`. Ready with the number of bytes read (0: the
    /// transport closed, which the channel has been told). A quiet connection reads through
    /// the stack; a read that fills the stack buffer or its own buffer makes the next read
    /// larger, one that uses little of it smaller.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<usize> {
        let read = if self.read_size == 0 {
            let mut stack = [0u8; STACK_READ];
            let mut buf = ReadBuf::new(&mut stack);
            match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    self.rbuf.extend_from_slice(buf.filled());
                    if n == STACK_READ {
                        self.read_size = MIN_READ;
                    }
                    Ok(n)
                }
                Poll::Ready(Err(err)) => Err(err),
                Poll::Pending => return Poll::Pending,
            }
        } else {
            if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
                self.rbuf.reserve(self.read_size);
            }
            let room = self.rbuf.capacity() - self.rbuf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf) {
                Poll::Ready(Ok(n)) => {
                    if n >= room {
                        self.read_size = (self.read_size * 2).min(MAX_READ);
                    } else if n < self.read_size / 4 {
                        self.read_size /= 2;
                        if self.read_size < MIN_READ {
                            self.read_size = 0;
                        }
                    }
                    Ok(n)
                }
                Poll::Ready(Err(err)) => Err(err),
                Poll::Pending => return Poll::Pending,
            }
        };
        match read {
            Ok(0) | Err(_) => {
                self.link.channel.handle_transport_closed();
                Poll::Ready(0)
            }
            Ok(n) => Poll::Ready(n),
        }
    }

    async fn linger(&mut self) {
        let linger = self.link.broker.settings().close_linger;
        let out = std::mem::take(self.link.channel.out());
        let _ = tokio::time::timeout(linger, async {
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
            }
            self.stream.shutdown().await
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
