//! The client's one task: it owns the protocol state, the stream map and the current
//! [`ServerConnection`], takes commands from the [`Client`](super::Client) handles, and sends events to
//! the application.
//!
//! The loop: carry out the state's outputs (encoded bytes to the link's writers, completions
//! to waiting handles, messages to the event queue), then wait for one of: room in the event
//! channel, an inbound packet (only while the application keeps up: that is the
//! back-pressure), a command (only while there is room to queue it), or the keep-alive
//! deadline. A lost connection is reported, then retried after a jittered exponential backoff
//! over the URL list, in order; commands keep being served meanwhile (publishes fill the
//! offline buffer). Nothing the server sends can panic it: a malformed packet or a protocol
//! violation ends the connection with a logged error and a reconnect.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::api::{DisconnectReason, Event, Message, PublishOutcome, Received, Subscription};
use super::options::ClientOptions;
use super::race::{AttemptId, Race};
use super::state::{
    ClientState, Completion, Failure, Output, PublishRequest, RequestId, StateError,
};
use super::streams::{Route, StreamMap};
use super::transport::{
    encoded, AttemptError, Inbound, Progress, ServerConnection, TransportContext,
};
use super::{ClientError, Stats};
use crate::codec::{ConnAck, Connect, Disconnect, Packet, Properties, Publish, ReasonCode, Will};

/// Commands queued from the handles to the driver.
const COMMAND_QUEUE: usize = 64;
/// Bytes waiting in the link's writers beyond which no new command is taken.
const BACKLOG_HIGH_WATER: usize = 1024 * 1024;
/// How long a closing connection may take to send DISCONNECT.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

pub enum Command {
    Publish(Box<Message>, Reply<PublishOutcome>),
    Subscribe(Vec<Subscription>, Reply<Vec<ReasonCode>>),
    Unsubscribe(Vec<String>, Reply<Vec<ReasonCode>>),
    Rebind(Reply<SocketAddr>),
    Disconnect(Reply<()>),
    Abort(Reply<()>),
    Reauthenticate(Reply<()>),
}

enum Waiter {
    Publish(Reply<PublishOutcome>),
    Acked(Reply<Vec<ReasonCode>>),
}

/// How serving one connection ended.
enum Ended {
    Lost(DisconnectReason),
    Stop,
}

/// The clock of the client (tokio's, so paused-time tests drive it).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Connects once (trying each URL in turn) and spawns the driver task.
pub async fn start(
    options: ClientOptions,
) -> Result<(mpsc::Sender<Command>, Arc<Stats>, mpsc::Receiver<Event>), ClientError> {
    let options = Arc::new(options);
    let ctx = Arc::new(TransportContext::new(&options)?);
    let stats = Arc::new(Stats::default());
    let connect = connect_packet(&options, &options.client_id, true);
    let (link, connack) = connect_any(
        Arc::clone(&ctx),
        Arc::clone(&options),
        connect,
        Arc::clone(&stats),
        Arc::default(),
    )
    .await?;
    let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
    let (events, events_rx) = mpsc::channel(options.event_capacity);
    let driver = Driver {
        state: ClientState::new(
            options.version,
            options.keep_alive,
            options.offline_buffer,
            StreamMap::new(options.streams.clone()).is_multi_stream(),
            now(),
        ),
        streams: StreamMap::new(options.streams.clone()),
        client_id: options.client_id.clone(),
        rng: seed(&options.client_id),
        options,
        ctx,
        stats: Arc::clone(&stats),
        commands,
        events,
        backlog: VecDeque::new(),
        waiters: HashMap::new(),
        next_request: 0,
        link: None,
        reauth: None,
    };
    let span = tracing::debug_span!("client", client_id = %driver.client_id);
    tokio::spawn(tracing::Instrument::instrument(
        driver.run(link, connack),
        span,
    ));
    Ok((tx, stats, events_rx))
}

/// Tries every URL in order, each bounded by the connect timeout.
async fn connect_any(
    ctx: Arc<TransportContext>,
    options: Arc<ClientOptions>,
    connect: Packet,
    stats: Arc<Stats>,
    progress: Arc<Progress>,
) -> Result<(ServerConnection, ConnAck), ClientError> {
    let mut errors = Vec::new();
    let mut refused = None;
    for url in &options.urls {
        let started = now();
        let attempt = ServerConnection::open(
            &ctx,
            url,
            &connect,
            options.max_packet_size,
            Arc::clone(&stats),
            options.scram_login()?,
            &progress,
        );
        match tokio::time::timeout(options.connect_timeout, attempt).await {
            Ok(Ok(connected)) => {
                let took = u64::try_from(now().duration_since(started).as_micros());
                stats
                    .last_connect_us
                    .store(took.unwrap_or(u64::MAX), Ordering::Relaxed);
                return Ok(connected);
            }
            Ok(Err(AttemptError::Refused(code))) => {
                refused = Some(code);
                errors.push(format!("{url}: refused {code:?}"));
            }
            Ok(Err(err)) => errors.push(format!("{url}: {err}")),
            Err(_) => errors.push(format!(
                "{url}: no answer within {:?}",
                options.connect_timeout
            )),
        }
        tracing::debug!(
            error = errors.last().map(String::as_str),
            "connect attempt failed"
        );
    }
    match refused {
        Some(code) if errors.len() == 1 => Err(ClientError::Refused(code)),
        _ => Err(ClientError::Connect(errors.join("; "))),
    }
}

type Connected = (ServerConnection, ConnAck);

/// One reconnect round: overlapping attempts (each over the URL list) as [`Race`] schedules
/// them, the first CONNACK wins and the others are dropped. Ends with the winner, when an
/// attempt the server answered fails (a refusal: CONNACK failure code, TCP RST, TLS alert), or
/// when the round's budget (the connect timeout) is spent with every
/// attempt ended. Bounded: at most `overlap.max_pending` attempts (tasks) at once.
async fn race_round(
    ctx: Arc<TransportContext>,
    options: Arc<ClientOptions>,
    connect: Packet,
    stats: Arc<Stats>,
    mut rng: u64,
) -> Result<Connected, ClientError> {
    // An attempt is kept at least half as long again as the last connect took, so that on
    // a long path (a satellite's 0.6 s round trip) the server has had the time to answer it
    // before it is dropped to make room for a fresh one.
    let last_connect = Duration::from_micros(stats.last_connect_us.load(Ordering::Relaxed));
    let mut race = Race::new(now(), options.overlap, options.connect_timeout)
        .keep_for(last_connect.mul_f64(1.5).min(options.connect_timeout));
    let mut tasks: tokio::task::JoinSet<(AttemptId, Result<Connected, ClientError>)> =
        tokio::task::JoinSet::new();
    let mut attempts: HashMap<AttemptId, (tokio::task::AbortHandle, Arc<Progress>)> =
        HashMap::new();
    let mut last_error = ClientError::Connect("no connect attempt".into());
    loop {
        let step = race.poll(now(), random_unit(&mut rng), |id| {
            attempts.get(&id).is_some_and(|(_, p)| p.answered())
        });
        for id in step.drop {
            if let Some((handle, _)) = attempts.remove(&id) {
                tracing::debug!(attempt = id.0, "connect attempt dropped");
                handle.abort();
            }
        }
        if let Some(id) = step.start {
            tracing::debug!(attempt = id.0, "connect attempt");
            let progress = Arc::new(Progress::default());
            let attempt = connect_any(
                Arc::clone(&ctx),
                Arc::clone(&options),
                connect.clone(),
                Arc::clone(&stats),
                Arc::clone(&progress),
            );
            let handle = tasks.spawn(async move { (id, attempt.await) });
            attempts.insert(id, (handle, progress));
        }
        if race.over(now()) {
            return Err(last_error);
        }
        let deadline = race.deadline(now());
        tokio::select! {
            joined = tasks.join_next(), if !tasks.is_empty() => match joined {
                Some(Ok((_, Ok(connected)))) => return Ok(connected), // dropping `tasks` ends the rest
                Some(Ok((id, Err(err)))) => {
                    tracing::debug!(attempt = id.0, %err, "connect attempt failed");
                    let answered = attempts.remove(&id).is_some_and(|(_, p)| p.answered());
                    race.ended(now(), id);
                    if answered || matches!(err, ClientError::Refused(_)) {
                        // The server (or its host) answered and said no: back off.
                        return Err(err);
                    }
                    last_error = err;
                }
                // Aborted (already forgotten) or panicked: either way it is over.
                Some(Err(_)) | None => {}
            },
            () = sleep_until(deadline), if deadline.is_some() => {}
        }
    }
}

fn connect_packet(options: &ClientOptions, client_id: &str, first: bool) -> Packet {
    let v5 = options.version.is_v5();
    // Reconnects resume whatever session can outlive a connection.
    let clean_start = if first || !v5 {
        options.clean_start
    } else {
        !options.session_persists()
    };
    let mut properties = Properties::default();
    if v5 {
        properties = options.connect_properties.clone();
        if options.session_expiry > 0 {
            properties.session_expiry_interval = Some(options.session_expiry);
        }
        properties.maximum_packet_size = Some(options.max_packet_size);
    }
    let will = options.will.as_ref().map(|m| Will {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos: m.qos,
        retain: m.retain,
        properties: if v5 {
            m.properties.clone()
        } else {
            Properties::default()
        },
    });
    Packet::Connect(Box::new(Connect {
        protocol: options.version,
        clean_start,
        keep_alive: u16::try_from(options.keep_alive.as_secs()).unwrap_or(u16::MAX),
        client_id: client_id.to_owned(),
        will,
        username: options.username.clone(),
        password: options.password.clone(),
        properties,
    }))
}

struct Driver {
    options: Arc<ClientOptions>,
    ctx: Arc<TransportContext>,
    stats: Arc<Stats>,
    state: ClientState,
    streams: StreamMap,
    /// As configured, or as the server assigned it (v5), for reconnects.
    client_id: String,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    /// Events the channel had no room for yet; while any wait, the network is not read.
    backlog: VecDeque<Event>,
    waiters: HashMap<RequestId, Waiter>,
    next_request: u64,
    link: Option<ServerConnection>,
    rng: u64,
    /// A re-authentication in progress, and who waits for it.
    reauth: Option<(super::auth::Exchange, Reply<()>)>,
}

impl Driver {
    async fn run(mut self, link: ServerConnection, connack: ConnAck) {
        self.connected(link, connack);
        loop {
            let reason = match self.serve().await {
                Ended::Stop => break,
                Ended::Lost(reason) => reason,
            };
            self.lost(reason);
            if self.options.reconnect.is_none() || !self.reconnect().await {
                break;
            }
        }
        self.state.handle_connection_lost();
        for (_, waiter) in self.waiters.drain() {
            match waiter {
                Waiter::Publish(reply) => drop(reply.send(Err(ClientError::Closed))),
                Waiter::Acked(reply) => drop(reply.send(Err(ClientError::Closed))),
            }
        }
        self.emit(Event::Disconnected {
            reason: DisconnectReason::Local,
            at: now(),
        });
        // Best effort: the application may not be reading any more.
        for event in self.backlog.drain(..) {
            let _ = self.events.try_send(event);
        }
    }

    fn connected(&mut self, link: ServerConnection, connack: ConnAck) {
        if let Some(id) = &connack.properties.assigned_client_identifier {
            self.client_id.clone_from(id);
        }
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        if link.zero_rtt {
            self.stats.zero_rtt_connects.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(url = %link.url, session_present = connack.session_present, zero_rtt = link.zero_rtt, "connected");
        self.emit(Event::Connected {
            url: link.url.clone(),
            session_present: connack.session_present,
            zero_rtt: link.zero_rtt,
            at: now(),
        });
        self.link = Some(link);
        if let Err(err) = self.state.handle_connack(now(), &connack) {
            tracing::warn!(%err, "unusable CONNACK");
        }
    }

    /// The server's AUTH during a re-authentication: answer it, or finish on AUTH 0x00.
    fn reauth_step(&mut self, auth: &crate::codec::Auth) -> Result<(), String> {
        let Some((exchange, _)) = self.reauth.as_mut() else {
            return Err("AUTH without a re-authentication".into());
        };
        if auth.reason == ReasonCode::SUCCESS {
            exchange.finish(&auth.properties)?;
            if let Some((_, reply)) = self.reauth.take() {
                let _ = reply.send(Ok(()));
            }
            return Ok(());
        }
        let answer = exchange.answer(auth)?;
        if let Some(link) = self.link.as_mut() {
            link.send(
                Route::Control,
                encoded(&answer, self.options.version),
                &self.streams,
            );
        }
        Ok(())
    }

    fn lost(&mut self, reason: DisconnectReason) {
        tracing::debug!(%reason, "connection lost");
        if let Some((_, reply)) = self.reauth.take() {
            let _ = reply.send(Err(ClientError::Closed));
        }
        self.link = None;
        self.state.handle_connection_lost();
        self.emit(Event::Disconnected { reason, at: now() });
    }

    /// Serves the current link until it ends.
    async fn serve(&mut self) -> Ended {
        loop {
            self.flush();
            let Some(link) = self.link.as_mut() else {
                return Ended::Lost(DisconnectReason::Transport("no link".into()));
            };
            let stalled = !self.backlog.is_empty();
            let backed_up = link.backlog() >= BACKLOG_HIGH_WATER;
            let room = self.state.queued() < self.options.offline_buffer.max(1) && !backed_up;
            // A publisher with nothing coming in must still wake when the writers catch up.
            let written = Arc::clone(&link.written);
            let deadline = self.state.poll_timeout();
            let events = self.events.clone();
            tokio::select! {
                biased;
                permit = events.reserve_owned(), if stalled => self.deliver(permit.ok()),
                inbound = link.recv(), if !stalled => {
                    if let Some(end) = self.inbound(inbound).await {
                        return end;
                    }
                }
                () = written.notified(), if backed_up => {}
                command = self.commands.recv(), if room => match command {
                    Some(command) => {
                        if let Some(end) = self.command(command).await {
                            return end;
                        }
                    }
                    None => {
                        self.close_link(Some(ReasonCode::NORMAL_DISCONNECTION)).await;
                        return Ended::Stop;
                    }
                },
                () = sleep_until(deadline), if deadline.is_some() => {
                    if self.state.handle_timeout(now(), stalled).is_err() {
                        // Nothing came back for 1.5 keep-alives: what is still queued cannot
                        // get through either, so the reconnect starts now rather than after
                        // waiting out the linger for it.
                        self.drop_link();
                        return Ended::Lost(DisconnectReason::KeepAliveTimeout);
                    }
                }
            }
        }
    }

    async fn inbound(&mut self, inbound: Option<Inbound>) -> Option<Ended> {
        let url = self
            .link
            .as_ref()
            .map(|l| l.url.to_string())
            .unwrap_or_default();
        match inbound {
            Some(Inbound::Packet(Route::Control, Packet::Auth(auth))) if self.reauth.is_some() => {
                let why = self.reauth_step(&auth).err()?;
                tracing::warn!(%url, why, "re-authentication failed");
                if let Some((_, reply)) = self.reauth.take() {
                    let _ = reply.send(Err(ClientError::Connect(why.clone())));
                }
                self.close_link(Some(ReasonCode::PROTOCOL_ERROR)).await;
                Some(Ended::Lost(DisconnectReason::Protocol(why)))
            }
            Some(Inbound::Packet(route, packet)) => {
                let err = self.state.handle_packet(now(), route, packet).err()?;
                let (reason, code) = match err {
                    StateError::ServerDisconnect(code) => (DisconnectReason::Server(code), None),
                    StateError::KeepAliveTimeout => (DisconnectReason::KeepAliveTimeout, None),
                    StateError::Violation(why) => {
                        tracing::warn!(%url, why, "protocol violation by the server; reconnecting");
                        (
                            DisconnectReason::Protocol(why.into()),
                            Some(ReasonCode::PROTOCOL_ERROR),
                        )
                    }
                    StateError::Refused(code) => (DisconnectReason::Server(code), None),
                };
                self.close_link(code).await;
                Some(Ended::Lost(reason))
            }
            Some(Inbound::Invalid(route, err)) => {
                tracing::warn!(%url, ?route, %err, "malformed packet from the server; reconnecting");
                self.close_link(Some(err.reason_code())).await;
                Some(Ended::Lost(DisconnectReason::Protocol(err.to_string())))
            }
            Some(Inbound::Ended(Route::Control)) | None => {
                self.close_link(None).await;
                Some(Ended::Lost(DisconnectReason::Transport(
                    "connection closed".into(),
                )))
            }
            Some(Inbound::Ended(route)) => {
                if let Some(link) = self.link.as_mut() {
                    link.forget(route);
                }
                None
            }
        }
    }

    async fn command(&mut self, command: Command) -> Option<Ended> {
        let v5 = self.options.version.is_v5();
        let at = now();
        match command {
            Command::Publish(message, reply) => {
                let request = self.request_id();
                let message = *message;
                let route = self.streams.route(&message.topic, message.group.as_deref());
                let publish = Publish {
                    dup: false,
                    qos: message.qos,
                    retain: message.retain,
                    topic: message.topic,
                    packet_id: None,
                    properties: if v5 {
                        message.properties
                    } else {
                        Properties::default()
                    },
                    payload: message.payload,
                };
                let publish = PublishRequest {
                    request,
                    publish,
                    route,
                    enqueued: at,
                };
                match self.state.publish(at, publish) {
                    Ok(()) => {
                        self.waiters.insert(request, Waiter::Publish(reply));
                    }
                    Err(failure) => drop(reply.send(Err(failure.into()))),
                }
            }
            Command::Subscribe(subscriptions, reply) => {
                let request = self.request_id();
                let first = &subscriptions[0];
                let route = self.streams.route(&first.filter, first.group.as_deref());
                let properties = if v5 {
                    first.properties.clone()
                } else {
                    Properties::default()
                };
                let filters = subscriptions
                    .into_iter()
                    .map(|s| (s.filter, s.options))
                    .collect();
                match self
                    .state
                    .subscribe(at, request, filters, properties, route)
                {
                    Ok(()) => {
                        self.waiters.insert(request, Waiter::Acked(reply));
                    }
                    Err(failure) => drop(reply.send(Err(failure.into()))),
                }
            }
            Command::Unsubscribe(filters, reply) => {
                let request = self.request_id();
                match self
                    .state
                    .unsubscribe(at, request, filters, Properties::default())
                {
                    Ok(()) => {
                        self.waiters.insert(request, Waiter::Acked(reply));
                    }
                    Err(failure) => drop(reply.send(Err(failure.into()))),
                }
            }
            Command::Rebind(reply) => {
                let remote = self
                    .link
                    .as_ref()
                    .filter(|l| l.is_quic())
                    .and_then(|l| l.remote);
                let result = match remote {
                    Some(remote) => self.ctx.rebind(remote),
                    None => Err(ClientError::NotQuic),
                };
                if let Ok(local) = &result {
                    tracing::debug!(%local, "rebound the QUIC endpoint");
                }
                let _ = reply.send(result);
            }
            Command::Disconnect(reply) => {
                self.close_link(Some(ReasonCode::NORMAL_DISCONNECTION))
                    .await;
                let _ = reply.send(Ok(()));
                return Some(Ended::Stop);
            }
            Command::Reauthenticate(reply) => {
                let login = match self.options.scram_login() {
                    Ok(Some(login)) => login,
                    Ok(None) => {
                        let why = "re-authentication needs an auth method in the options";
                        let _ = reply.send(Err(ClientError::Config(why.into())));
                        return None;
                    }
                    Err(err) => {
                        let _ = reply.send(Err(err));
                        return None;
                    }
                };
                if self.link.is_none() || self.reauth.is_some() {
                    let _ = reply.send(Err(ClientError::Closed));
                    return None;
                }
                let (exchange, first) = super::auth::Exchange::start(login.0, login.1);
                let packet = super::auth::packet(ReasonCode::RE_AUTHENTICATE, first);
                if let Some(link) = self.link.as_mut() {
                    link.send(
                        Route::Control,
                        encoded(&packet, self.options.version),
                        &self.streams,
                    );
                }
                self.reauth = Some((exchange, reply));
            }
            Command::Abort(reply) => {
                // Dropping the link closes the transport with nothing said.
                self.link = None;
                let _ = reply.send(Ok(()));
                return Some(Ended::Stop);
            }
        }
        None
    }

    /// Reconnects in rounds with backoff between them; `false` when the application stopped
    /// the client meanwhile.
    async fn reconnect(&mut self) -> bool {
        let backoff = self
            .options
            .reconnect
            .expect("only called with reconnect on");
        let mut failures = 0u32;
        loop {
            let delay = backoff.delay(failures, self.random_unit());
            self.emit(Event::Reconnecting {
                attempt: failures + 1,
                delay,
                at: now(),
            });
            if self.offline(tokio::time::sleep(delay)).await.is_none() {
                return false;
            }
            let connect = connect_packet(&self.options, &self.client_id, false);
            self.rng = self.rng.wrapping_add(1);
            let round = race_round(
                Arc::clone(&self.ctx),
                Arc::clone(&self.options),
                connect,
                Arc::clone(&self.stats),
                self.rng,
            );
            match self.offline(round).await {
                None => return false,
                Some(Ok((link, connack))) => {
                    self.connected(link, connack);
                    return true;
                }
                Some(Err(err)) => {
                    tracing::debug!(%err, "reconnect round failed");
                    failures = failures.saturating_add(1);
                }
            }
        }
    }

    /// Runs `work` while serving commands and events; `None` if the client was stopped.
    async fn offline<F: Future>(&mut self, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        loop {
            self.flush();
            let stalled = !self.backlog.is_empty();
            let events = self.events.clone();
            tokio::select! {
                biased;
                out = &mut work => return Some(out),
                permit = events.reserve_owned(), if stalled => self.deliver(permit.ok()),
                command = self.commands.recv() => match command {
                    Some(command) => {
                        if self.command(command).await.is_some() {
                            return None;
                        }
                    }
                    None => return None,
                },
            }
        }
    }

    /// Carries out the state's outputs.
    fn flush(&mut self) {
        let version = self.options.version;
        while let Some(output) = self.state.poll_output() {
            match output {
                Output::Send(route, packet) => {
                    if let Some(link) = self.link.as_mut() {
                        link.send(route, encoded(&packet, version), &self.streams);
                    }
                }
                Output::Done(request, result) => {
                    if let Some(waiter) = self.waiters.remove(&request) {
                        finish(waiter, result);
                    }
                }
                Output::Deliver(route, publish) => {
                    self.stats.messages_received.fetch_add(1, Ordering::Relaxed);
                    self.emit(Event::Message(Received {
                        topic: publish.topic,
                        payload: publish.payload,
                        qos: publish.qos,
                        retain: publish.retain,
                        dup: publish.dup,
                        packet_id: publish.packet_id,
                        properties: publish.properties,
                        route,
                        at: now(),
                    }));
                }
            }
        }
    }

    /// Queues an event; it goes straight into the channel when there is room.
    fn emit(&mut self, event: Event) {
        if self.events.is_closed() {
            return; // nobody listens
        }
        if !self.backlog.is_empty() {
            return self.backlog.push_back(event);
        }
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            self.backlog.push_back(event);
        }
    }

    fn deliver(&mut self, permit: Option<mpsc::OwnedPermit<Event>>) {
        match permit {
            Some(permit) => {
                if let Some(event) = self.backlog.pop_front() {
                    permit.send(event);
                }
                while let Some(event) = self.backlog.pop_front() {
                    if let Err(err) = self.events.try_send(event) {
                        if let mpsc::error::TrySendError::Full(event) = err {
                            self.backlog.push_front(event);
                        }
                        break;
                    }
                }
            }
            // The application dropped its receiver: events are discarded from now on.
            None => self.backlog.clear(),
        }
    }

    /// Ends the current link, with DISCONNECT carrying `reason` first if given (v3 has no
    /// reason codes: only a normal DISCONNECT is sent there).
    async fn close_link(&mut self, reason: Option<ReasonCode>) {
        let Some(link) = self.link.take() else {
            return;
        };
        let v5 = self.options.version.is_v5();
        let last = reason
            .filter(|r| v5 || *r == ReasonCode::NORMAL_DISCONNECTION)
            .map(|r| Packet::Disconnect(Disconnect::new(r)));
        link.close(last.as_ref(), CLOSE_LINGER).await;
        self.state.handle_connection_lost();
    }

    /// Ends the current link at once, with nothing said and no linger: for a link that has
    /// stopped answering.
    fn drop_link(&mut self) {
        // Dropping it aborts its writers and closes the transport (QUIC: CONNECTION_CLOSE).
        self.link = None;
        self.state.handle_connection_lost();
    }

    fn request_id(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    fn random_unit(&mut self) -> f64 {
        random_unit(&mut self.rng)
    }
}

/// A number in `[0, 1)` for jitter (splitmix64; quality is not the point).
fn random_unit(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn finish(waiter: Waiter, result: Result<Completion, Failure>) {
    match (waiter, result) {
        (
            Waiter::Publish(reply),
            Ok(Completion::Published {
                packet_id,
                reason,
                latency,
            }),
        ) => drop(reply.send(Ok(PublishOutcome {
            packet_id,
            reason,
            latency,
        }))),
        (Waiter::Acked(reply), Ok(Completion::Acked(reasons))) => drop(reply.send(Ok(reasons))),
        (Waiter::Publish(reply), Err(failure)) => drop(reply.send(Err(failure.into()))),
        (Waiter::Acked(reply), Err(failure)) => drop(reply.send(Err(failure.into()))),
        (Waiter::Publish(reply), Ok(_)) => drop(reply.send(Err(ClientError::Closed))),
        (Waiter::Acked(reply), Ok(_)) => drop(reply.send(Err(ClientError::Closed))),
    }
}

impl From<Failure> for ClientError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Rejected(code) => Self::Rejected(code),
            Failure::TooLarge => Self::PacketTooLarge,
            Failure::OfflineBufferFull => Self::OfflineBufferFull,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// A per-client seed for jitter, so that clients started together spread out.
fn seed(client_id: &str) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    client_id
        .bytes()
        .fold(nanos ^ u64::from(std::process::id()), |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Overlap;

    /// A round against `url` with a long budget and slow overlap: it must end on its own.
    async fn round(url: &str) -> Result<Connected, ClientError> {
        let options = ClientOptions::new(url)
            .unwrap()
            .client_id("race")
            .connect_timeout(Duration::from_secs(60))
            .overlap(Overlap {
                interval: Duration::from_secs(20),
                max_pending: 3,
                jitter: 0.0,
            });
        let options = Arc::new(options);
        let ctx = Arc::new(TransportContext::new(&options).unwrap());
        let connect = connect_packet(&options, "race", true);
        let stats = Arc::new(Stats::default());
        let round = race_round(ctx, options, connect, stats, 1);
        tokio::time::timeout(Duration::from_secs(30), round)
            .await
            .expect("the round ended on the refusal, not after its 60 s budget")
    }

    #[tokio::test]
    async fn a_refused_connect_ends_the_round_at_once() {
        // A port nobody listens on: the host answers with RST.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = round(&format!("mqtt://{addr}")).await.err().unwrap();
        assert!(matches!(err, ClientError::Connect(_)), "{err}");
    }

    #[tokio::test]
    async fn a_server_that_closes_before_connack_ends_the_round() {
        // Accepts (so the attempt is answered), reads nothing, closes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let err = round(&format!("mqtt://{addr}")).await.err().unwrap();
        assert!(matches!(err, ClientError::Connect(_)), "{err}");
        server.abort();
    }
}
