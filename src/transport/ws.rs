//! MQTT over WebSocket (MQTT 5.0 §6): the HTTP upgrade, and an adapter that turns a stream of
//! binary WebSocket messages into the byte stream the connection driver reads.
//!
//! The upgrade serves one path (default `/mqtt`) and the subprotocols `mqtt`, `mqttv3.1` and
//! `mqtt-v5`, answering with the first one the client offered; like EMQX it also accepts a
//! client that offers none. Frames are size-capped at the maximum MQTT packet size.
//!
//! MQTT packets may straddle messages and a message may hold several packets: the adapter
//! hands out bytes without regard to message boundaries, and sends each flush of the driver as
//! one binary message. A text message is a protocol violation [MQTT-6.0.0-1] and ends the
//! stream with an error; a close message or the end of the socket ends it cleanly.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

/// The subprotocols we speak, as registered for MQTT.
pub const SUBPROTOCOLS: [&str; 3] = ["mqtt", "mqttv3.1", "mqtt-v5"];

/// Bytes written but not yet sent: past this, a write first sends them as one message.
const MAX_PENDING_WRITE: usize = 64 * 1024;

/// The server side of the upgrade for one listener.
#[derive(Clone)]
pub struct WsAcceptor {
    path: Arc<str>,
    config: WebSocketConfig,
}

impl WsAcceptor {
    /// Serves `path`; messages and frames larger than `max_packet_size` are refused.
    pub fn new(path: &str, max_packet_size: u32) -> Self {
        let max = usize::try_from(max_packet_size).unwrap_or(usize::MAX);
        Self {
            path: Arc::from(path),
            config: WebSocketConfig {
                max_message_size: Some(max),
                max_frame_size: Some(max),
                ..WebSocketConfig::default()
            },
        }
    }

    /// Reads the HTTP upgrade and answers it: 404 for another path, 400 for subprotocols
    /// that are all foreign. The caller bounds the time this may take.
    pub async fn accept<S>(&self, stream: S) -> Result<WsStream<S>, tungstenite::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let path = Arc::clone(&self.path);
        #[expect(
            clippy::result_large_err,
            reason = "tungstenite's Callback returns the HTTP refusal by value"
        )]
        let callback =
            move |request: &Request, response: Response| answer_upgrade(&path, request, response);
        let ws =
            tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(self.config))
                .await?;
        Ok(WsStream::new(ws))
    }
}

/// Our answer to an upgrade request: the response, or the HTTP refusal.
#[expect(
    clippy::result_large_err,
    reason = "tungstenite's Callback returns the HTTP refusal by value"
)]
fn answer_upgrade(
    path: &str,
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != path {
        return Err(refusal(
            StatusCode::NOT_FOUND,
            "no MQTT endpoint at this path",
        ));
    }
    match choose_subprotocol(request) {
        Ok(Some(protocol)) => {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
            Ok(response)
        }
        Ok(None) => Ok(response),
        Err(()) => Err(refusal(
            StatusCode::BAD_REQUEST,
            "unsupported WebSocket subprotocol: use mqtt",
        )),
    }
}

fn refusal(status: StatusCode, text: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(text.to_owned()));
    *response.status_mut() = status;
    response
}

/// The first subprotocol the client offered that we speak; `Ok(None)` when it offered none,
/// `Err` when it offered only others.
fn choose_subprotocol(request: &Request) -> Result<Option<&'static str>, ()> {
    let mut offered = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Ok(None);
    }
    offered
        .find_map(|name| SUBPROTOCOLS.iter().copied().find(|ours| *ours == name))
        .map(Some)
        .ok_or(())
}

/// A WebSocket connection seen as a byte stream (either role: tests use it as a client).
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    /// What is left of the binary message being read.
    incoming: Bytes,
    /// Bytes written since the last flush; a flush sends them as one binary message.
    outgoing: Vec<u8>,
    read_closed: bool,
}

impl<S> WsStream<S> {
    pub fn new(inner: WebSocketStream<S>) -> Self {
        Self {
            inner,
            incoming: Bytes::new(),
            outgoing: Vec::new(),
            read_closed: false,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.outgoing.is_empty() {
            ready!(Pin::new(&mut self.inner).poll_ready(cx)).map_err(into_io)?;
            let message = Message::Binary(std::mem::take(&mut self.outgoing));
            Pin::new(&mut self.inner)
                .start_send(message)
                .map_err(into_io)?;
        }
        Pin::new(&mut self.inner).poll_flush(cx).map_err(into_io)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.incoming.is_empty() {
                let n = buf.remaining().min(this.incoming.len());
                buf.put_slice(&this.incoming.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.incoming = Bytes::from(data),
                Some(Ok(Message::Text(_))) => {
                    this.read_closed = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT travels in binary messages [MQTT-6.0.0-1]",
                    )));
                }
                // tungstenite answers pings itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.read_closed = true,
                Some(Err(tungstenite::Error::ConnectionClosed)) => this.read_closed = true,
                Some(Err(err)) => {
                    this.read_closed = true;
                    return Poll::Ready(Err(into_io(err)));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() >= MAX_PENDING_WRITE {
            ready!(this.poll_send_pending(cx))?;
        }
        let n = buf.len().min(MAX_PENDING_WRITE - this.outgoing.len());
        this.outgoing.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send_pending(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send_pending(cx))?;
        match ready!(Pin::new(&mut this.inner).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(into_io(err))),
        }
    }
}

fn into_io(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(err) => err,
        other => io::Error::other(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

    fn request(protocols: &[&str]) -> Request {
        let mut request = "ws://localhost/mqtt".into_client_request().unwrap();
        for p in protocols {
            request.headers_mut().append(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_str(p).unwrap(),
            );
        }
        request.map(|_| ())
    }

    #[test]
    fn the_first_offered_mqtt_subprotocol_is_chosen() {
        assert_eq!(choose_subprotocol(&request(&[])), Ok(None));
        assert_eq!(choose_subprotocol(&request(&["mqtt"])), Ok(Some("mqtt")));
        assert_eq!(
            choose_subprotocol(&request(&["chat, mqttv3.1, mqtt"])),
            Ok(Some("mqttv3.1"))
        );
        assert_eq!(
            choose_subprotocol(&request(&["chat", "mqtt-v5"])),
            Ok(Some("mqtt-v5"))
        );
        assert_eq!(choose_subprotocol(&request(&["chat"])), Err(()));
    }

    #[tokio::test]
    async fn bytes_cross_message_boundaries_both_ways() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (client, server) = tokio::io::duplex(1 << 16);
        let acceptor = WsAcceptor::new("/mqtt", 1024);
        let server = tokio::spawn(async move {
            let mut stream = acceptor.accept(server).await.unwrap();
            let mut got = [0u8; 6];
            stream.read_exact(&mut got).await.unwrap();
            stream.write_all(b"pong").await.unwrap();
            stream.flush().await.unwrap();
            got
        });
        let (mut ws, response) = tokio_tungstenite::client_async("ws://localhost/mqtt", client)
            .await
            .unwrap();
        assert!(response
            .headers()
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .is_none());
        use futures_util::{SinkExt as _, StreamExt as _};
        ws.send(Message::Binary(b"abc".to_vec())).await.unwrap();
        ws.send(Message::Binary(b"def".to_vec())).await.unwrap();
        assert_eq!(server.await.unwrap(), *b"abcdef");
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Binary(b"pong".to_vec())
        );
    }
}
