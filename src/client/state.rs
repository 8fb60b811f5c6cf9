//! The client's MQTT protocol state, sans-IO: packets in, packets and completions out, time
//! passed in. No sockets, no tasks, no clock; the driver (`driver.rs`) feeds it and carries
//! out its [`Output`]s.
//!
//! What it owns:
//! - packet ids (one space for PUBLISH, SUBSCRIBE and UNSUBSCRIBE, so an ack finds its packet
//!   whichever stream carries it);
//! - outgoing QoS 1/2 in flight, in send order, bounded by the server's Receive Maximum, and
//!   resent after a reconnect: PUBLISH with DUP, or PUBREL once PUBREC was seen;
//! - the publish queue: behind a full window while connected, and the offline buffer
//!   (bounded: beyond `offline_limit` a publish fails) while disconnected;
//! - inbound QoS 2 ids between PUBREC and PUBREL, so a resent PUBLISH is acknowledged but
//!   delivered once. Ids are session-wide, as the server allocates them;
//! - the subscriptions to restore when the server lost the session (session present 0), and
//!   in multi-stream mode to move back from the control stream to their data streams when it
//!   kept it (the server parks a dead stream's subscriptions on the control stream);
//! - keep-alive: PINGREQ after `keep_alive` of silence either way (nothing sent, or nothing
//!   received: a publisher that never stops sending still finds out that nothing comes back),
//!   the connection is dead when no packet answers within half a `keep_alive` (at least 1 s):
//!   1.5 keep-alives of silence, the server's own limit.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::streams::Route;
use crate::codec::{
    encoded_len, Ack, ConnAck, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, Subscribe, SubscriptionOptions, Unsubscribe,
};

/// Names a request of the application, so that its completion can find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// A publish the application asked for: `publish.packet_id` is assigned when it is sent.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub request: RequestId,
    pub publish: Publish,
    pub route: Route,
    pub enqueued: Instant,
}

/// What the state machine asks the driver to do.
#[derive(Debug)]
pub enum Output {
    /// Write this packet on this route.
    Send(Route, Packet),
    /// A request finished.
    Done(RequestId, Result<Completion, Failure>),
    /// An application message arrived on this route.
    Deliver(Route, Publish),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// QoS 0: handed to the transport; QoS 1: PUBACK; QoS 2: PUBCOMP. `latency` runs from
    /// the request to that moment.
    Published {
        packet_id: Option<PacketId>,
        reason: ReasonCode,
        latency: Duration,
    },
    /// SUBACK / UNSUBACK reason codes, one per filter (empty UNSUBACK reasons on v3).
    Acked(Vec<ReasonCode>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("the server answered {0:?}")]
    Rejected(ReasonCode),
    #[error("the packet exceeds the server's maximum packet size")]
    TooLarge,
    #[error("the offline buffer is full")]
    OfflineBufferFull,
}

/// Why the connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("protocol violation by the server: {0}")]
    Violation(&'static str),
    #[error("the server disconnected: {0:?}")]
    ServerDisconnect(ReasonCode),
    #[error("the server refused the connection: {0:?}")]
    Refused(ReasonCode),
    #[error("keep-alive timeout")]
    KeepAliveTimeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// QoS 1 PUBLISH sent.
    Ack,
    /// QoS 2 PUBLISH sent.
    Rec,
    /// QoS 2 PUBREL sent.
    Comp,
}

#[derive(Debug, Clone)]
struct InFlight {
    seq: u64,
    request: RequestId,
    publish: Publish,
    route: Route,
    phase: Phase,
    enqueued: Instant,
}

/// A subscription to restore, keyed by its filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubRecord {
    pub options: SubscriptionOptions,
    pub route: Route,
    pub properties: Properties,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// The application's own request.
    User(RequestId),
    /// Restoring a subscription the server lost.
    Restore,
    /// Moving a subscription from the control stream back to its data stream.
    Move,
}

#[derive(Debug, Clone)]
enum Pending {
    Subscribe(Why, Subscribe, Route),
    Unsubscribe(Option<RequestId>, Unsubscribe, Route),
}

/// The server's limits from CONNACK.
#[derive(Debug, Clone, Copy)]
struct ServerLimits {
    receive_maximum: u16,
    max_packet_size: u32,
    maximum_qos: QoS,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            receive_maximum: u16::MAX,
            max_packet_size: u32::MAX,
            maximum_qos: QoS::ExactlyOnce,
        }
    }
}

#[derive(Debug)]
pub struct ClientState {
    version: ProtocolVersion,
    keep_alive: Duration,
    offline_limit: usize,
    multi_stream: bool,
    connected: bool,
    server: ServerLimits,
    next_id: PacketId,
    seq: u64,
    in_flight: BTreeMap<PacketId, InFlight>,
    queue: VecDeque<PublishRequest>,
    inbound_qos2: HashSet<PacketId>,
    subscriptions: BTreeMap<String, SubRecord>,
    pending: HashMap<PacketId, Pending>,
    last_sent: Instant,
    last_received: Instant,
    ping_sent: Option<Instant>,
    out: VecDeque<Output>,
}

impl ClientState {
    pub fn new(
        version: ProtocolVersion,
        keep_alive: Duration,
        offline_limit: usize,
        multi_stream: bool,
        now: Instant,
    ) -> Self {
        Self {
            version,
            keep_alive,
            offline_limit,
            multi_stream,
            connected: false,
            server: ServerLimits::default(),
            next_id: PacketId(1),
            seq: 0,
            in_flight: BTreeMap::new(),
            queue: VecDeque::new(),
            inbound_qos2: HashSet::new(),
            subscriptions: BTreeMap::new(),
            pending: HashMap::new(),
            last_sent: now,
            last_received: now,
            ping_sent: None,
            out: VecDeque::new(),
        }
    }

    /// Publishes waiting for the window or for a connection.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Outgoing QoS 1/2 messages not yet acknowledged.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    // -----------------------------------------------------------------------------------------
    // Connection lifecycle

    /// CONNACK arrived on a new connection: adopt the server's limits, then resend what was
    /// in flight and restore or move subscriptions.
    pub fn handle_connack(&mut self, now: Instant, connack: &ConnAck) -> Result<(), StateError> {
        if self.connected {
            return Err(StateError::Violation("a second CONNACK"));
        }
        if connack.code.is_failure() {
            return Err(StateError::Refused(connack.code));
        }
        let p = &connack.properties;
        self.server = ServerLimits {
            receive_maximum: p.receive_maximum.unwrap_or(u16::MAX).max(1),
            max_packet_size: p.maximum_packet_size.unwrap_or(u32::MAX),
            maximum_qos: p
                .maximum_qos
                .and_then(QoS::from_u8)
                .unwrap_or(QoS::ExactlyOnce),
        };
        if let Some(seconds) = p.server_keep_alive {
            // [MQTT-3.2.2-21]: the server's keep-alive replaces ours.
            self.keep_alive = Duration::from_secs(u64::from(seconds));
        }
        self.connected = true;
        self.last_sent = now;
        self.last_received = now;
        self.ping_sent = None;

        // Requests in flight when the last connection died go out again first.
        let mut pending: Vec<(PacketId, Pending)> = self.pending.drain().collect();
        pending.sort_by_key(|(id, _)| *id);
        for (id, p) in pending {
            match &p {
                Pending::Subscribe(_, sub, route) => {
                    self.send(now, *route, Packet::Subscribe(sub.clone()));
                }
                Pending::Unsubscribe(_, unsub, route) => {
                    self.send(now, *route, Packet::Unsubscribe(unsub.clone()));
                }
            }
            self.pending.insert(id, p);
        }

        if connack.session_present {
            self.resume(now);
        } else {
            self.restart(now);
        }
        self.pump(now);
        Ok(())
    }

    /// The server kept the session: resend in send order, on the control stream (the server
    /// parked the old streams' state there).
    fn resume(&mut self, now: Instant) {
        let mut ids: Vec<(u64, PacketId)> =
            self.in_flight.iter().map(|(id, f)| (f.seq, *id)).collect();
        ids.sort_unstable();
        for (_, id) in ids {
            let Some(f) = self.in_flight.get_mut(&id) else {
                continue;
            };
            f.route = Route::Control;
            let packet = match f.phase {
                Phase::Ack | Phase::Rec => {
                    f.publish.dup = true;
                    Packet::Publish(f.publish.clone())
                }
                Phase::Comp => Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS)),
            };
            self.send(now, Route::Control, packet);
        }
        if self.multi_stream {
            let moves: Vec<(String, SubRecord)> = self
                .subscriptions
                .iter()
                .filter(|(_, r)| r.route != Route::Control)
                .map(|(f, r)| (f.clone(), r.clone()))
                .collect();
            for (filter, record) in moves {
                // Retained messages were sent when the subscription was made.
                let options = SubscriptionOptions {
                    retain_handling: 2,
                    ..record.options
                };
                self.subscribe_packet(
                    now,
                    Why::Move,
                    vec![(filter, options)],
                    record.properties,
                    record.route,
                );
            }
        }
    }

    /// The server has no session: inbound QoS 2 state is void, QoS 2 messages past PUBREC
    /// were received by the server and are complete, the rest go again, and every
    /// subscription is made anew on its route.
    fn restart(&mut self, now: Instant) {
        self.inbound_qos2.clear();
        let mut ids: Vec<(u64, PacketId)> =
            self.in_flight.iter().map(|(id, f)| (f.seq, *id)).collect();
        ids.sort_unstable();
        for (_, id) in ids {
            let Some(f) = self.in_flight.get_mut(&id) else {
                continue;
            };
            if f.phase == Phase::Comp {
                let f = self.in_flight.remove(&id).expect("just seen");
                self.complete(now, &f, ReasonCode::SUCCESS);
                continue;
            }
            f.publish.dup = true;
            let (route, packet) = (f.route, Packet::Publish(f.publish.clone()));
            self.send(now, route, packet);
        }
        let restore: Vec<(String, SubRecord)> = self
            .subscriptions
            .iter()
            .map(|(f, r)| (f.clone(), r.clone()))
            .collect();
        for (filter, record) in restore {
            self.subscribe_packet(
                now,
                Why::Restore,
                vec![(filter, record.options)],
                record.properties,
                record.route,
            );
        }
    }

    /// The connection is gone: nothing more is sent on it. In-flight messages, queued
    /// publishes and the application's pending (un)subscribes wait for the next CONNACK.
    pub fn handle_connection_lost(&mut self) {
        self.connected = false;
        self.ping_sent = None;
        self.out.retain(|o| !matches!(o, Output::Send(..)));
        self.pending.retain(|_, p| {
            !matches!(
                p,
                Pending::Subscribe(Why::Restore | Why::Move, ..) | Pending::Unsubscribe(None, ..)
            )
        });
    }

    // -----------------------------------------------------------------------------------------
    // Application requests

    /// Queues a publish; it is sent at once when connected and the window has room.
    pub fn publish(&mut self, now: Instant, request: PublishRequest) -> Result<(), Failure> {
        if !self.connected && self.queue.len() >= self.offline_limit {
            return Err(Failure::OfflineBufferFull);
        }
        self.queue.push_back(request);
        self.pump(now);
        Ok(())
    }

    pub fn subscribe(
        &mut self,
        now: Instant,
        request: RequestId,
        filters: Vec<(String, SubscriptionOptions)>,
        properties: Properties,
        route: Route,
    ) -> Result<(), Failure> {
        self.subscribe_packet(now, Why::User(request), filters, properties, route)
            .ok_or(Failure::Rejected(ReasonCode::PACKET_IDENTIFIER_IN_USE))
    }

    pub fn unsubscribe(
        &mut self,
        now: Instant,
        request: RequestId,
        filters: Vec<String>,
        properties: Properties,
    ) -> Result<(), Failure> {
        let route = filters
            .first()
            .and_then(|f| self.subscriptions.get(f))
            .map_or(Route::Control, |r| r.route);
        // Forgotten now, so a reconnect before UNSUBACK does not bring them back.
        for filter in &filters {
            self.subscriptions.remove(filter);
        }
        let id = self
            .allocate_id()
            .ok_or(Failure::Rejected(ReasonCode::PACKET_IDENTIFIER_IN_USE))?;
        let packet = Unsubscribe {
            packet_id: id,
            properties,
            filters,
        };
        if self.connected {
            self.send(now, route, Packet::Unsubscribe(packet.clone()));
        }
        self.pending
            .insert(id, Pending::Unsubscribe(Some(request), packet, route));
        Ok(())
    }

    fn subscribe_packet(
        &mut self,
        now: Instant,
        why: Why,
        filters: Vec<(String, SubscriptionOptions)>,
        properties: Properties,
        route: Route,
    ) -> Option<()> {
        let id = self.allocate_id()?;
        let packet = Subscribe {
            packet_id: id,
            properties,
            filters,
        };
        if self.connected {
            self.send(now, route, Packet::Subscribe(packet.clone()));
        }
        self.pending
            .insert(id, Pending::Subscribe(why, packet, route));
        Some(())
    }

    // -----------------------------------------------------------------------------------------
    // Packets from the server

    /// A packet from the server, on `route`. Acks go back on the route they answer.
    pub fn handle_packet(
        &mut self,
        now: Instant,
        route: Route,
        packet: Packet,
    ) -> Result<(), StateError> {
        // Any packet shows the server is alive (a PINGRESP may queue behind deliveries).
        self.ping_sent = None;
        self.last_received = now;
        match packet {
            Packet::Publish(publish) => self.handle_publish(now, route, publish)?,
            Packet::PubAck(ack) => {
                if let Some(f) = self.take_in_phase(ack.packet_id, Phase::Ack) {
                    self.finish(now, &f, ack.reason);
                }
            }
            Packet::PubRec(ack) => self.handle_pubrec(now, route, &ack),
            Packet::PubComp(ack) => {
                if let Some(f) = self.take_in_phase(ack.packet_id, Phase::Comp) {
                    // The server had the message since its PUBREC. "Packet Identifier not
                    // found" answers a PUBREL resent after a reconnect [MQTT-4.4.0-1] whose
                    // first PUBCOMP was lost with the connection; MQTT 5 §3.7.2.1, PUBCOMP
                    // reason 0x92: "The Packet Identifier is not known. This is not an error
                    // during recovery, but at other times indicates a mismatch between the
                    // Session State on the Client and Server." Either way the server took
                    // the message at PUBREC (§4.3.3), so the publish is complete: failing it
                    // would make the application publish a duplicate.
                    let reason = if ack.reason == ReasonCode::PACKET_IDENTIFIER_NOT_FOUND {
                        ReasonCode::SUCCESS
                    } else {
                        ack.reason
                    };
                    self.finish(now, &f, reason);
                }
            }
            Packet::PubRel(ack) => {
                let known = self.inbound_qos2.remove(&ack.packet_id);
                let reason = if known || !self.version.is_v5() {
                    ReasonCode::SUCCESS
                } else {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                };
                self.send(now, route, Packet::PubComp(Ack::new(ack.packet_id, reason)));
            }
            Packet::SubAck(suback) => self.handle_suback(now, suback.packet_id, suback.reasons),
            Packet::UnsubAck(unsuback) => {
                if let Some(Pending::Unsubscribe(Some(request), ..)) =
                    self.pending.remove(&unsuback.packet_id)
                {
                    self.out.push_back(Output::Done(
                        request,
                        Ok(Completion::Acked(unsuback.reasons)),
                    ));
                }
            }
            Packet::PingResp => {}
            Packet::Disconnect(d) => return Err(StateError::ServerDisconnect(d.reason)),
            Packet::ConnAck(_) => return Err(StateError::Violation("a second CONNACK")),
            Packet::Auth(_) => return Err(StateError::Violation("AUTH without an auth method")),
            Packet::Connect(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq => {
                return Err(StateError::Violation(
                    "a client-only packet from the server",
                ))
            }
        }
        self.pump(now);
        Ok(())
    }

    fn handle_publish(
        &mut self,
        now: Instant,
        route: Route,
        publish: Publish,
    ) -> Result<(), StateError> {
        if publish.topic.is_empty() {
            return Err(StateError::Violation(
                "a topic alias we never allowed (Topic Alias Maximum 0)",
            ));
        }
        match (publish.qos, publish.packet_id) {
            (QoS::AtMostOnce, _) => self.out.push_back(Output::Deliver(route, publish)),
            (QoS::AtLeastOnce, Some(id)) => {
                self.out.push_back(Output::Deliver(route, publish));
                self.send(
                    now,
                    route,
                    Packet::PubAck(Ack::new(id, ReasonCode::SUCCESS)),
                );
            }
            (QoS::ExactlyOnce, Some(id)) => {
                // A resend of a message already delivered is acknowledged, not delivered.
                if self.inbound_qos2.insert(id) {
                    self.out.push_back(Output::Deliver(route, publish));
                }
                self.send(
                    now,
                    route,
                    Packet::PubRec(Ack::new(id, ReasonCode::SUCCESS)),
                );
            }
            (_, None) => return Err(StateError::Violation("QoS > 0 PUBLISH without an id")),
        }
        Ok(())
    }

    fn handle_pubrec(&mut self, now: Instant, route: Route, ack: &Ack) {
        let id = ack.packet_id;
        match self.in_flight.get_mut(&id) {
            Some(f) if f.phase == Phase::Rec && ack.reason.is_failure() => {
                let f = self.in_flight.remove(&id).expect("just seen");
                self.finish(now, &f, ack.reason);
            }
            Some(f) if matches!(f.phase, Phase::Rec | Phase::Comp) => {
                f.phase = Phase::Comp;
                f.route = route;
                self.send(
                    now,
                    route,
                    Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS)),
                );
            }
            _ => {
                let reason = if self.version.is_v5() {
                    ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
                } else {
                    ReasonCode::SUCCESS
                };
                self.send(now, route, Packet::PubRel(Ack::new(id, reason)));
            }
        }
    }

    fn handle_suback(&mut self, now: Instant, id: PacketId, reasons: Vec<ReasonCode>) {
        let Some(Pending::Subscribe(why, subscribe, route)) = self.pending.remove(&id) else {
            return;
        };
        match why {
            Why::User(request) => {
                for ((filter, options), reason) in subscribe.filters.iter().zip(&reasons) {
                    if !reason.is_failure() {
                        let record = SubRecord {
                            options: *options,
                            route,
                            properties: subscribe.properties.clone(),
                        };
                        self.subscriptions.insert(filter.clone(), record);
                    }
                }
                self.out
                    .push_back(Output::Done(request, Ok(Completion::Acked(reasons))));
            }
            Why::Restore => {}
            Why::Move => {
                // Now that the data stream has it, the parked copy on control can go (Petrel
                // moved it already and answers 0x11; a broker that does not move it drops it).
                let filters = subscribe.filters.into_iter().map(|(f, _)| f).collect();
                if let Some(id) = self.allocate_id() {
                    let packet = Unsubscribe {
                        packet_id: id,
                        properties: Properties::default(),
                        filters,
                    };
                    self.send(now, Route::Control, Packet::Unsubscribe(packet.clone()));
                    self.pending
                        .insert(id, Pending::Unsubscribe(None, packet, Route::Control));
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Time

    /// The next keep-alive deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.connected || self.keep_alive.is_zero() {
            return None;
        }
        let silent_since = self.last_sent.min(self.last_received);
        Some(match self.ping_sent {
            Some(ping) => ping + self.answer_wait(),
            None => silent_since + self.keep_alive,
        })
    }

    /// How long a PINGREQ waits for an answer before the connection is declared dead: half
    /// the keep-alive (at least 1 s, at most the keep-alive), so that a client notices a dark
    /// link after 1.5 keep-alives, as the server does ([MQTT-3.1.2-22]), and its reconnect
    /// attempts are already running when the link returns.
    fn answer_wait(&self) -> Duration {
        (self.keep_alive / 2).max(self.keep_alive.min(Duration::from_secs(1)))
    }

    /// Sends PINGREQ after `keep_alive` of silence (nothing sent or nothing received); no
    /// answer within half a `keep_alive` more (see `answer_wait`) is a dead connection. While `stalled` (the application is not reading, so we are not
    /// either) the answer cannot be seen, and the verdict is deferred.
    pub fn handle_timeout(&mut self, now: Instant, stalled: bool) -> Result<(), StateError> {
        let Some(deadline) = self.poll_timeout() else {
            return Ok(());
        };
        if now < deadline {
            return Ok(());
        }
        match self.ping_sent {
            Some(_) if stalled => self.ping_sent = Some(now),
            Some(_) => return Err(StateError::KeepAliveTimeout),
            None => {
                self.send(now, Route::Control, Packet::PingReq);
                self.ping_sent = Some(now);
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Internals

    /// Sends queued publishes while connected and the window has room, in order.
    fn pump(&mut self, now: Instant) {
        while self.connected {
            let Some(front) = self.queue.front() else {
                break;
            };
            let qos = front.publish.qos;
            if qos > self.server.maximum_qos {
                let r = self.queue.pop_front().expect("front exists");
                self.out.push_back(Output::Done(
                    r.request,
                    Err(Failure::Rejected(ReasonCode::QOS_NOT_SUPPORTED)),
                ));
                continue;
            }
            let id = if qos == QoS::AtMostOnce {
                None
            } else {
                if self.in_flight.len() >= usize::from(self.server.receive_maximum) {
                    break;
                }
                let Some(id) = self.allocate_id() else { break };
                Some(id)
            };
            let mut r = self.queue.pop_front().expect("front exists");
            r.publish.packet_id = id;
            let packet = Packet::Publish(r.publish);
            if encoded_len(&packet, self.version) > self.server.max_packet_size as usize {
                self.out
                    .push_back(Output::Done(r.request, Err(Failure::TooLarge)));
                continue;
            }
            self.send(now, r.route, packet.clone());
            let Packet::Publish(publish) = packet else {
                unreachable!("built above")
            };
            match id {
                None => self.out.push_back(Output::Done(
                    r.request,
                    Ok(Completion::Published {
                        packet_id: None,
                        reason: ReasonCode::SUCCESS,
                        latency: now.saturating_duration_since(r.enqueued),
                    }),
                )),
                Some(id) => {
                    self.seq += 1;
                    let phase = if qos == QoS::AtLeastOnce {
                        Phase::Ack
                    } else {
                        Phase::Rec
                    };
                    self.in_flight.insert(
                        id,
                        InFlight {
                            seq: self.seq,
                            request: r.request,
                            publish,
                            route: r.route,
                            phase,
                            enqueued: r.enqueued,
                        },
                    );
                }
            }
        }
    }

    fn take_in_phase(&mut self, id: PacketId, phase: Phase) -> Option<InFlight> {
        match self.in_flight.get(&id) {
            Some(f) if f.phase == phase => self.in_flight.remove(&id),
            _ => None,
        }
    }

    fn finish(&mut self, now: Instant, f: &InFlight, reason: ReasonCode) {
        if reason.is_failure() {
            self.out
                .push_back(Output::Done(f.request, Err(Failure::Rejected(reason))));
        } else {
            self.complete(now, f, reason);
        }
    }

    fn complete(&mut self, now: Instant, f: &InFlight, reason: ReasonCode) {
        self.out.push_back(Output::Done(
            f.request,
            Ok(Completion::Published {
                packet_id: f.publish.packet_id,
                reason,
                latency: now.saturating_duration_since(f.enqueued),
            }),
        ));
    }

    /// The next free packet id, skipping ids in use; `None` when all 65535 are.
    fn allocate_id(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            let id = self.next_id;
            self.next_id = id.next();
            if !self.in_flight.contains_key(&id) && !self.pending.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    fn send(&mut self, now: Instant, route: Route, packet: Packet) {
        self.last_sent = now;
        self.out.push_back(Output::Send(route, packet));
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
