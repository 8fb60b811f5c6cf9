//! The byte-stream transports' [`Wire`] (TCP, TLS, WebSocket, WSS): one stream, read through
//! the shared [`PacketReader`] and written from the channel's output buffer. The loop around
//! it is `driver::Driver`, the same for every transport.
//!
//! Memory follows the traffic: a quiet connection reads through a stack buffer and keeps no
//! read buffer (see `transport::reader`), and an empty output buffer larger than `KEEP_OUT`
//! is given back, so an idle connection costs its `Channel`, its socket and a timer.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::driver::{Driver, Wire};
use super::link::Link;
use super::Broker;
use crate::codec::Codec;
use crate::transport::reader::PacketReader;

/// An empty output buffer larger than this is given back even by a busy connection.
const KEEP_OUT: usize = 4 * 1024;

/// Serves one client connection until it closes. `local` is our end of its TCP connection
/// (for the operators' view of the link). `peer_username` is the identity the transport
/// established (a client certificate's CN or SAN); it replaces the CONNECT username.
///
/// A plain function returning the future: the connection is built here and the future
/// borrows it where it lies, so the task holds one `Driver` (an `async fn` keeps each
/// argument twice, and a value moved from one `async` frame into another is kept in both).
pub fn serve<S>(
    broker: Arc<Broker>,
    stream: S,
    peer: SocketAddr,
    local: Option<SocketAddr>,
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
    broker.metrics.connection_opened();
    let limits = broker.limits();
    let mut codec = Codec::new(limits.max_packet_size);
    codec.set_connect_limit(limits.max_connect_packet_size);
    codec.set_max_user_properties(limits.user_properties_limit());
    let metrics = Arc::clone(&broker);
    let mut link = Link::new(broker, peer, transport);
    link.local = local;
    if let Some(username) = peer_username {
        link.channel.set_peer_username(username);
    }
    let mut driver = Driver::new(
        link,
        StreamWire {
            reader: PacketReader::new(stream, codec),
            unflushed: false,
        },
    );
    async move {
        driver.run(&shutdown).instrument(span).await;
        metrics.metrics.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One byte stream.
pub struct StreamWire<S> {
    reader: PacketReader<S>,
    /// Bytes handed to the stream but maybe not yet flushed (TLS and WebSocket buffer inside
    /// the stream).
    unflushed: bool,
}

impl<S> Wire for StreamWire<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    fn handle_input(&mut self, link: &mut Link, now: Instant) -> bool {
        match self.reader.decode() {
            Ok(Some(packet)) => {
                tracing::trace!(?packet, "received");
                link.handle_packet(now, crate::core::message::Flow::CONTROL, packet);
                true
            }
            Ok(None) => false,
            Err(err) => {
                tracing::debug!(%err, "bad packet from client");
                link.channel.handle_decode_error(&err);
                true
            }
        }
    }

    fn poll_receive(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()> {
        match std::task::ready!(self.reader.poll_fill(cx)) {
            Ok(0) | Err(_) => link.channel.handle_transport_closed(),
            Ok(_) => {}
        }
        Poll::Ready(())
    }

    fn poll_send(&mut self, cx: &mut Context<'_>, link: &mut Link) -> Poll<()> {
        self.unflushed |= !link.channel.out().is_empty();
        if !self.unflushed {
            return Poll::Ready(());
        }
        match std::task::ready!(self.poll_write(cx, link.channel.out())) {
            Ok(()) => {}
            Err(_) => {
                link.channel.out().clear();
                link.channel.handle_transport_closed();
            }
        }
        self.unflushed = false;
        Poll::Ready(())
    }

    fn release_buffers(&mut self, link: &mut Link) {
        self.reader.release_buffer();
        let out = link.channel.out();
        if out.is_empty() && out.capacity() > KEEP_OUT {
            *out = BytesMut::new();
        }
    }

    fn trim(&mut self) {
        self.reader.trim();
    }

    /// Flushes what the channel said last (CONNACK refusal, DISCONNECT) within the linger
    /// time, shuts our side down, and reads what the client still sends until it closes too:
    /// closing a socket with unread input resets the connection, and a reset can destroy the
    /// DISCONNECT (0x93, 0x95, ...) before the client has read why.
    async fn close(&mut self, link: &mut Link) {
        let linger = link.broker.settings().close_linger;
        let out = std::mem::take(link.channel.out());
        let stream = self.reader.get_mut();
        let _ = tokio::time::timeout(linger, async {
            if !out.is_empty() {
                stream.write_all(&out).await?;
            }
            stream.shutdown().await?;
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? != 0 {}
            Ok::<(), std::io::Error>(())
        })
        .await;
    }
}

impl<S> StreamWire<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Writes `out` until it is all out and flushed, or the socket is full.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut BytesMut,
    ) -> Poll<std::io::Result<()>> {
        let stream = self.reader.get_mut();
        while !out.is_empty() {
            match Pin::new(&mut *stream).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()))
                }
                Poll::Ready(Ok(n)) => out.advance(n),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(stream).poll_flush(cx)
    }
}
