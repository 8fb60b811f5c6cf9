//! The application's side: the [`Client`] handle (a cheap `Clone`: an mpsc sender to the
//! driver task), what it sends ([`Message`], [`Subscription`]) and what it receives
//! ([`Event`], [`Received`]). No protocol logic lives here.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::driver::{self, Command};
use super::options::{ClientOptions, ServerUrl};
use super::streams::Route;
use super::{ClientError, Stats, StatsSnapshot};
use crate::codec::{PacketId, Properties, QoS, ReasonCode, SubscriptionOptions};

/// An application message to publish (or the will).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// v5 properties: user properties, message expiry, content type, response topic,
    /// correlation data, payload format (and will delay for a will).
    pub properties: Properties,
    /// The QUIC stream group to send on (overrides the configured group filters).
    pub group: Option<String>,
}

impl Message {
    pub fn new(topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            topic: topic.into(),
            payload: payload.into(),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
            group: None,
        }
    }

    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    pub fn user_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties
            .user_properties
            .push((key.into(), value.into()));
        self
    }

    pub fn message_expiry(mut self, seconds: u32) -> Self {
        self.properties.message_expiry_interval = Some(seconds);
        self
    }

    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.properties.content_type = Some(content_type.into());
        self
    }

    pub fn response_topic(mut self, topic: impl Into<String>) -> Self {
        self.properties.response_topic = Some(topic.into());
        self
    }

    pub fn correlation_data(mut self, data: impl Into<Bytes>) -> Self {
        self.properties.correlation_data = Some(data.into());
        self
    }

    /// Payload Format Indicator 1: the payload is UTF-8.
    pub fn utf8(mut self) -> Self {
        self.properties.payload_format_indicator = Some(1);
        self
    }

    /// Will Delay Interval (only meaningful for the will).
    pub fn will_delay(mut self, seconds: u32) -> Self {
        self.properties.will_delay_interval = Some(seconds);
        self
    }

    pub fn properties(mut self, properties: Properties) -> Self {
        self.properties = properties;
        self
    }

    /// Sends on the QUIC stream of this group.
    pub fn stream_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// One filter to subscribe to, with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub options: SubscriptionOptions,
    /// v5 properties of the SUBSCRIBE (subscription identifier, user properties).
    pub properties: Properties,
    /// The QUIC stream group whose stream carries the SUBSCRIBE (and so the deliveries).
    pub group: Option<String>,
}

impl Subscription {
    pub fn new(filter: impl Into<String>, qos: QoS) -> Self {
        Self {
            filter: filter.into(),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
            properties: Properties::default(),
            group: None,
        }
    }

    pub fn no_local(mut self, on: bool) -> Self {
        self.options.no_local = on;
        self
    }

    pub fn retain_as_published(mut self, on: bool) -> Self {
        self.options.retain_as_published = on;
        self
    }

    /// 0 send retained messages, 1 only for a new subscription, 2 never.
    pub fn retain_handling(mut self, handling: u8) -> Self {
        self.options.retain_handling = handling;
        self
    }

    pub fn identifier(mut self, id: u32) -> Self {
        self.properties.subscription_identifiers = vec![id];
        self
    }

    pub fn user_property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties
            .user_properties
            .push((key.into(), value.into()));
        self
    }

    pub fn stream_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    /// The stream it arrived on (always `Control` on byte-stream transports).
    pub route: Route,
    pub at: Instant,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The server sent DISCONNECT with this reason (e.g. 0x8E session taken over).
    Server(ReasonCode),
    /// The transport closed or failed.
    Transport(String),
    /// The server broke the protocol (malformed packet, forbidden packet): we disconnected.
    Protocol(String),
    KeepAliveTimeout,
    /// The application called `disconnect` (or dropped every handle).
    Local,
}

impl std::fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Server(code) => write!(f, "server disconnect {code:?}"),
            Self::Transport(why) => write!(f, "transport: {why}"),
            Self::Protocol(why) => write!(f, "protocol violation by the server: {why}"),
            Self::KeepAliveTimeout => f.write_str("keep-alive timeout"),
            Self::Local => f.write_str("disconnected by the application"),
        }
    }
}

/// What happens to a client; every event carries the instant it happened.
#[derive(Debug, Clone)]
pub enum Event {
    Connected {
        url: ServerUrl,
        session_present: bool,
        /// CONNECT went out in 0-RTT (QUIC resumption) and was accepted.
        zero_rtt: bool,
        at: Instant,
    },
    Disconnected {
        reason: DisconnectReason,
        at: Instant,
    },
    /// The next connect attempt starts after `delay`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        at: Instant,
    },
    Message(Received),
}

/// The receiving end of a client's events (bounded; see the module docs for back-pressure).
pub struct Events(pub(super) mpsc::Receiver<Event>);

impl Events {
    /// The next event; `None` once the client has ended.
    pub async fn recv(&mut self) -> Option<Event> {
        self.0.recv().await
    }
}

/// How a publish completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishOutcome {
    pub packet_id: Option<PacketId>,
    /// The PUBACK / PUBCOMP reason code (success codes only; failures are errors).
    pub reason: ReasonCode,
    /// From the `publish` call to the completion (QoS 0: handed to the transport).
    pub latency: Duration,
}

/// Resolves when a publish completes (QoS 1: PUBACK, QoS 2: PUBCOMP, QoS 0: written).
pub struct PublishHandle(pub(super) oneshot::Receiver<Result<PublishOutcome, ClientError>>);

impl Future for PublishHandle {
    type Output = Result<PublishOutcome, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// A handle to a running client. Cheap to clone; the client ends when `disconnect` is called
/// or every handle is dropped.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    stats: Arc<Stats>,
}

impl Client {
    /// Connects to the first URL that answers (each attempt bounded by `connect_timeout`)
    /// and starts the client's task. Fails if no URL could be reached; later losses are
    /// reconnected in the background (see [`Event`]).
    pub async fn connect(options: ClientOptions) -> Result<(Self, Events), ClientError> {
        let (tx, stats, events) = driver::start(options).await?;
        Ok((Self { tx, stats }, Events(events)))
    }

    /// Publishes and waits for the QoS handshake to complete.
    pub async fn publish(&self, message: Message) -> Result<PublishOutcome, ClientError> {
        self.publish_nowait(message).await?.await
    }

    /// Enqueues a publish and returns at once with a handle that resolves on completion, so
    /// many publishes can be in flight. Waits only when the client is saturated (window and
    /// queue full, or the transport backed up).
    pub async fn publish_nowait(&self, message: Message) -> Result<PublishHandle, ClientError> {
        validate_topic(&message.topic)?;
        let (done, rx) = oneshot::channel();
        self.command(Command::Publish(Box::new(message), done))
            .await?;
        Ok(PublishHandle(rx))
    }

    /// Subscribes to one filter; resolves on SUBACK with the granted QoS.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<QoS, ClientError> {
        self.subscribe_with(Subscription::new(filter, qos)).await
    }

    /// Subscribes with options; resolves on SUBACK with the granted QoS.
    pub async fn subscribe_with(&self, subscription: Subscription) -> Result<QoS, ClientError> {
        let reasons = self.subscribe_many(vec![subscription]).await?;
        match reasons.first() {
            Some(code) if !code.is_failure() => {
                Ok(QoS::from_u8(code.0).unwrap_or(QoS::ExactlyOnce))
            }
            Some(code) => Err(ClientError::Rejected(*code)),
            None => Err(ClientError::Rejected(ReasonCode::UNSPECIFIED_ERROR)),
        }
    }

    /// One SUBSCRIBE with several filters (on the stream of the first one's group); the
    /// SUBACK's reason codes, one per filter.
    pub async fn subscribe_many(
        &self,
        subscriptions: Vec<Subscription>,
    ) -> Result<Vec<ReasonCode>, ClientError> {
        if subscriptions.is_empty() {
            return Ok(Vec::new());
        }
        for s in &subscriptions {
            if s.filter.is_empty() {
                return Err(ClientError::InvalidTopic("empty filter".into()));
            }
        }
        let (done, rx) = oneshot::channel();
        self.command(Command::Subscribe(subscriptions, done))
            .await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Unsubscribes; resolves on UNSUBACK with its reason codes (empty on v3.1.1).
    pub async fn unsubscribe(&self, filter: &str) -> Result<Vec<ReasonCode>, ClientError> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Unsubscribe(vec![filter.to_owned()], done))
            .await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// QUIC connection migration: moves to a new local UDP socket; the connection and the
    /// session continue. Returns the new local address.
    pub async fn rebind(&self) -> Result<SocketAddr, ClientError> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Rebind(done)).await?;
        rx.await.unwrap_or(Err(ClientError::Closed))
    }

    /// Sends DISCONNECT (normal, so no will) and ends the client. Publishes still in flight
    /// fail with [`ClientError::Closed`]; await their handles first to be sure of them.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Disconnect(done)).await?;
        rx.await.unwrap_or(Ok(()))
    }

    /// Ends the client without DISCONNECT, as a crash or a dead link would: the server
    /// publishes the will. For tests and for applications that must simulate failure.
    pub async fn abort(&self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        self.command(Command::Abort(done)).await?;
        rx.await.unwrap_or(Ok(()))
    }

    /// MQTT 5 re-authentication (§4.12.1): runs the options' auth method (SCRAM-SHA-256)
    /// again on the live connection; resolves when the server's AUTH 0x00 proves it. A
    /// server that refuses disconnects (0x87).
    pub async fn reauthenticate(&self) -> Result<(), ClientError> {
        let (done, result) = oneshot::channel();
        self.command(Command::Reauthenticate(done)).await?;
        result.await.unwrap_or(Err(ClientError::Closed))
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    async fn command(&self, command: Command) -> Result<(), ClientError> {
        self.tx.send(command).await.map_err(|_| ClientError::Closed)
    }
}

/// [MQTT-4.7.3-1, -3]: a topic name is non-empty UTF-8 without wildcards or NUL.
fn validate_topic(topic: &str) -> Result<(), ClientError> {
    if topic.is_empty() {
        return Err(ClientError::InvalidTopic("empty topic".into()));
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(ClientError::InvalidTopic(format!(
            "{topic}: wildcards or NUL in a topic name"
        )));
    }
    Ok(())
}
