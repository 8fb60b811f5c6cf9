//! Petrel's async MQTT client (tokio): one API over every transport, chosen by URL
//! (`mqtt://`, `mqtts://`, `ws://`, `wss://`, `quic://`), MQTT 3.1.1 and 5.0, made for lossy
//! links.
//!
//! ```no_run
//! # async fn demo() -> Result<(), petrel::client::ClientError> {
//! use petrel::client::{Client, ClientOptions, Event, Message, QoS, QuicStreams, Version};
//! let options = ClientOptions::with_urls(&["quic://127.0.0.1:14567", "mqtts://127.0.0.1:8883"])?
//!     .client_id("car-1")
//!     .version(Version::V5)
//!     .persistent(3600)
//!     .ca_file("data/certs/ca.pem")
//!     .streams(QuicStreams::per_group().group("commands", &["cmd/#"], 10));
//! let (client, mut events) = Client::connect(options).await?;
//! client.subscribe("cmd/car-1/#", QoS::AtLeastOnce).await?; // resolves on SUBACK
//! client
//!     .publish(Message::new("telemetry/car-1/speed", "88").qos(QoS::AtLeastOnce))
//!     .await?; // resolves on PUBACK
//! // Many in flight at once: enqueue now, await the completions later.
//! let handle = client.publish_nowait(Message::new("t", "x").qos(QoS::ExactlyOnce)).await?;
//! let outcome = handle.await?; // PUBCOMP; outcome.latency is enqueue → PUBCOMP
//! while let Some(event) = events.recv().await {
//!     match event {
//!         Event::Message(m) => println!("{} {:?}", m.topic, m.payload),
//!         Event::Disconnected { reason, .. } => println!("lost: {reason}"),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Shape (sans-IO core, thin async shell, as the broker):
//! - `options`: [`ClientOptions`], URL parsing into [`ServerUrl`] / [`Transport`], TLS,
//!   [`Backoff`].
//! - `streams`: the QUIC stream policy ([`QuicStreams`]: single stream, per topic, per named
//!   group with priorities, bounded; beyond the bound topics share streams by hash).
//! - `state`: the MQTT protocol state, sans-IO and unit-tested in virtual time: packet ids,
//!   in-flight QoS 1/2 under the server's Receive Maximum, resend with DUP after reconnect,
//!   inbound QoS 2 dedup until PUBREL, subscriptions to restore, the offline buffer.
//! - `transport`: connecting each transport; QUIC control and data streams, 0-RTT, rebind;
//!   [`SharedTransport`], configurations and QUIC endpoints shared by many clients.
//! - `driver`: the one task per client that owns all of it: commands in, events out,
//!   reconnect rounds with jittered exponential backoff across the URL list.
//! - `race`: within a reconnect round, when a fresh connect attempt starts while older ones
//!   are still pending ([`Overlap`]), sans-IO.
//! - `api`: the [`Client`] handle and the message and event types.
//! - `auth`: MQTT 5 enhanced authentication ([`AuthMethod::ScramSha256`]) in the CONNECT
//!   handshake, and [`Client::reauthenticate`].
//!
//! Back-pressure: events go to a bounded channel (`event_capacity`). When the application does
//! not read them, the driver stops reading from the network (TCP and QUIC flow control then
//! hold the server back): memory stays bounded and nothing is dropped. While stalled, the
//! keep-alive verdict waits (a PINGRESP may sit unread). Publishing is bounded too: behind a
//! full window or a busy transport, `publish_nowait` waits for room; while disconnected up to
//! `offline_buffer` publishes queue, then they fail with [`ClientError::OfflineBufferFull`].

mod api;
mod auth;
mod driver;
mod options;
mod race;
mod state;
mod streams;
mod transport;

use std::sync::atomic::{AtomicU64, Ordering};

pub use api::{
    Client, DisconnectReason, Event, Events, Message, PublishHandle, PublishOutcome, Received,
    Subscription,
};
pub use auth::AuthMethod;
pub use options::{Backoff, ClientOptions, ServerUrl, TlsOptions, Transport};
pub use race::Overlap;
pub use streams::{QuicStreams, Route, StreamGroup, StreamPolicy};
pub use transport::SharedTransport;

pub use crate::codec::{PacketId, Properties, ProtocolVersion as Version, QoS, ReasonCode};

/// Why a client operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("invalid URL {0}")]
    InvalidUrl(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("invalid topic: {0}")]
    InvalidTopic(String),
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("the server refused the connection: {0:?}")]
    Refused(ReasonCode),
    #[error("the server answered {0:?}")]
    Rejected(ReasonCode),
    #[error("the packet exceeds the server's maximum packet size")]
    PacketTooLarge,
    #[error("disconnected and the offline buffer is full")]
    OfflineBufferFull,
    #[error("not connected over QUIC")]
    NotQuic,
    #[error("I/O: {0}")]
    Io(String),
    #[error("the client is closed")]
    Closed,
}

/// Counters shared by the driver and every handle.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful connects (the first and every reconnect).
    pub connects: AtomicU64,
    /// Connects whose CONNECT went out in 0-RTT and was accepted.
    pub zero_rtt_connects: AtomicU64,
    /// QUIC data streams opened (control streams not counted).
    pub data_streams_opened: AtomicU64,
    /// Application messages received (after QoS 2 dedup).
    pub messages_received: AtomicU64,
    /// The QoS 0 datagram class (docs/datagram.md), over every connection.
    pub datagrams: crate::transport::datagram::Counters,
    /// How long the last successful connect took, from its attempt's start to CONNACK (µs;
    /// 0 before the first): the reconnect race keeps each attempt at least half as long
    /// again before dropping it (`Race::keep_for`).
    pub last_connect_us: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub connects: u64,
    pub zero_rtt_connects: u64,
    pub data_streams_opened: u64,
    pub messages_received: u64,
    /// Datagrams sent (every copy) and received (every copy), messages received by datagram
    /// (once each), and copies suppressed as duplicates.
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub datagram_messages: u64,
    pub datagram_duplicates: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            connects: self.connects.load(Ordering::Relaxed),
            zero_rtt_connects: self.zero_rtt_connects.load(Ordering::Relaxed),
            data_streams_opened: self.data_streams_opened.load(Ordering::Relaxed),
            messages_received: self.messages_received.load(Ordering::Relaxed),
            datagrams_sent: self.datagrams.sent.load(Ordering::Relaxed),
            datagrams_received: self.datagrams.received.load(Ordering::Relaxed),
            datagram_messages: self.datagrams.delivered.load(Ordering::Relaxed),
            datagram_duplicates: self.datagrams.duplicates.load(Ordering::Relaxed),
        }
    }
}
