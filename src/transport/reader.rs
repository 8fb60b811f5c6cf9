//! The one read-and-decode path for every MQTT byte stream: the broker's TCP, TLS, WebSocket
//! and QUIC streams and the client's.
//!
//! A [`PacketReader`] owns the stream, the codec and the read buffer. Reading and decoding
//! are separate steps (`poll_fill`, then `decode` until `Ok(None)`), so a driver can stop
//! decoding while its input is paused without losing what was read; [`PacketReader::next`]
//! does both for a task that only forwards packets. Memory follows the traffic: a quiet
//! stream reads through a small stack buffer and keeps no buffer of its own between packets
//! (the Mosquitto class of memory per idle client); a busy one reads into its own buffer,
//! sized to the traffic within bounds.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};

use crate::codec::{Codec, DecodeError, Packet};

/// A quiet stream reads through a buffer on the stack this large.
const STACK_READ: usize = 2 * 1024;
/// A busy stream reads into its own buffer, sized to the traffic within these bounds.
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;

/// Reads MQTT packets from one byte stream; see the module documentation.
#[derive(Debug)]
pub struct PacketReader<R> {
    io: R,
    codec: Codec,
    buf: BytesMut,
    /// How much the next read into `buf` asks for; 0 while the stream is quiet (reads go
    /// through the stack and `buf` holds nothing between packets).
    read_size: usize,
}

impl<R> PacketReader<R> {
    pub fn new(io: R, codec: Codec) -> Self {
        Self {
            io,
            codec,
            buf: BytesMut::new(),
            read_size: 0,
        }
    }

    /// The stream, for writing to it or closing it.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.io
    }

    /// The next complete packet already read; `Ok(None)` when more bytes are needed.
    pub fn decode(&mut self) -> Result<Option<Packet>, DecodeError> {
        self.codec.decode(&mut self.buf)
    }

    /// Gives back an empty read buffer that a quiet stream (reading through the stack) does
    /// not need, or that is over twice a busy one's read size.
    pub fn release_buffer(&mut self) {
        if self.buf.is_empty() && (self.read_size == 0 || self.buf.capacity() > 2 * self.read_size)
        {
            self.buf = BytesMut::new();
        }
    }

    /// The stream has been quiet for a while: read through the stack again and give back the
    /// buffer if it holds nothing.
    pub fn trim(&mut self) {
        if self.buf.is_empty() {
            self.read_size = 0;
            self.buf = BytesMut::new();
        }
    }
}

impl<R: AsyncRead + Unpin> PacketReader<R> {
    /// Reads what the stream has. Ready with the number of bytes read (0: the stream ended).
    /// A read that fills the stack buffer or its own buffer makes the next read larger, one
    /// that uses little of it smaller.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.read_size == 0 {
            let mut stack = [0u8; STACK_READ];
            let mut buf = ReadBuf::new(&mut stack);
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            self.buf.extend_from_slice(buf.filled());
            if n == STACK_READ {
                self.read_size = MIN_READ;
            }
            return Poll::Ready(Ok(n));
        }
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.buf
        ))?;
        if n >= room {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        } else if n < self.read_size / 4 {
            self.read_size /= 2;
            if self.read_size < MIN_READ {
                self.read_size = 0;
            }
        }
        Poll::Ready(Ok(n))
    }

    /// The next packet, reading as needed; `None` once the stream ended or failed. After a
    /// decode error the stream is not in a state to read on: the caller stops.
    pub async fn next(&mut self) -> Option<Result<Packet, DecodeError>> {
        loop {
            match self.decode() {
                Ok(Some(packet)) => return Some(Ok(packet)),
                Ok(None) => {}
                Err(err) => return Some(Err(err)),
            }
            self.release_buffer();
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode, ProtocolVersion, Publish, QoS};

    fn publish(i: usize, size: usize) -> Packet {
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: format!("t/{i}"),
            packet_id: None,
            properties: Default::default(),
            payload: vec![b'x'; size].into(),
        })
    }

    /// Packets of every size, split across reads of every size, decode the same; a stream
    /// that ends mid-packet ends the reader.
    #[tokio::test]
    async fn packets_split_across_reads_decode_in_order() {
        let mut wire = BytesMut::new();
        let sent: Vec<Packet> = (0..40).map(|i| publish(i, i * 211)).collect();
        for packet in &sent {
            encode(packet, ProtocolVersion::V311, &mut wire);
        }
        wire.extend_from_slice(&[0x30, 0x10, 0x00]); // a truncated PUBLISH
        let (mut tx, rx) = tokio::io::duplex(1500);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in wire.chunks(777) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut reader = PacketReader::new(rx, Codec::with_version(ProtocolVersion::V311, 1 << 20));
        let mut got = Vec::new();
        while let Some(packet) = reader.next().await {
            got.push(packet.expect("well-formed"));
        }
        writer.await.unwrap();
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn an_oversized_packet_is_an_error_not_an_allocation() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // PUBLISH with a remaining length of 2 MB against a 1 KB limit.
            let _ = tx.write_all(&[0x30, 0x80, 0x80, 0x80, 0x01]).await;
        });
        let mut reader = PacketReader::new(rx, Codec::with_version(ProtocolVersion::V311, 1024));
        let err = reader.next().await.expect("an error").unwrap_err();
        assert_eq!(
            err.reason_code(),
            crate::codec::ReasonCode::PACKET_TOO_LARGE
        );
        assert!(reader.buf.capacity() < 64 * 1024);
    }
}
