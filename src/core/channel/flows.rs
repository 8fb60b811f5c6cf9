//! QUIC data flows (the EMQX multi-stream mapping): opening, per-flow output, and a dead
//! flow's subscriptions and in-flight messages moved to the control flow.

use super::*;

/// The output of `flow` among the open data flows, or the control flow's `out` if that flow
/// is not open.
pub(super) fn flow_out<'a>(
    flows: &'a mut [(Flow, BytesMut)],
    out: &'a mut BytesMut,
    flow: Flow,
) -> &'a mut BytesMut {
    if !flow.is_control() {
        if let Some((_, flow_out)) = flows.iter_mut().find(|(f, _)| *f == flow) {
            return flow_out;
        }
    }
    out
}

impl Channel {
    /// A data flow was opened by the client (QUIC multi-stream). Input on it must not be fed
    /// before the channel is connected.
    pub fn open_flow(&mut self, flow: Flow) {
        if !flow.is_control() && !self.flows.iter().any(|(f, _)| *f == flow) {
            self.flows.push((flow, BytesMut::new()));
        }
    }

    /// The connection negotiated the QoS 0 datagram class (docs/datagram.md): from now on
    /// QoS 0 deliveries are written to the [`Flow::DATAGRAM`] output (the shell sends each
    /// packet there as datagrams), and a CONNACK not yet sent carries `confirmation` as a User
    /// Property. Called before the CONNECT is handled.
    pub fn open_datagram_flow(&mut self, confirmation: (String, String)) {
        self.datagram_confirmation = Some(Box::new(confirmation));
        if !self.flows.iter().any(|(f, _)| *f == Flow::DATAGRAM) {
            self.flows.push((Flow::DATAGRAM, BytesMut::new()));
        }
    }

    /// Hands each data flow's pending output to `write`, leaving the buffers empty.
    pub fn drain_flow_output(&mut self, mut write: impl FnMut(Flow, &mut BytesMut)) {
        for (flow, out) in &mut self.flows {
            if !out.is_empty() {
                write(*flow, out);
            }
        }
    }

    /// A data flow's stream ended (reset, finished or failed). Its subscriptions move to the
    /// control flow and what was in flight on it is resent there, so a persistent session
    /// loses nothing when one stream dies.
    pub fn handle_flow_closed(&mut self, now: Instant, flow: Flow) {
        if flow.is_control() {
            return self.handle_transport_closed();
        }
        self.flows.retain(|(f, _)| *f != flow);
        if self.state != State::Connected {
            return;
        }
        for (id, state) in self.rehome(flow) {
            self.resend_outgoing(now, id, state);
        }
    }

    /// Moves a gone flow's subscriptions, in-flight messages and QoS 2 state to the control
    /// flow, mirrors the move in the router, and returns the in-flight entries that moved.
    pub(super) fn rehome(&mut self, flow: Flow) -> Vec<(PacketId, Outgoing)> {
        let Some(session) = self.session.as_mut() else {
            return Vec::new();
        };
        let in_flight: Vec<(PacketId, Outgoing)> = session
            .outgoing()
            .filter(|(_, o)| o.flow() == flow)
            .cloned()
            .collect();
        if self.durable && !flow.is_control() {
            // The store follows inbound QoS 2 ids to the control flow too.
            for &(f, id) in &session.awaiting_release {
                if f == flow && !session.awaiting_release.contains(&(Flow::CONTROL, id)) {
                    self.changes.push_back(Change::Freed { flow, id });
                    self.changes.push_back(Change::Held {
                        flow: Flow::CONTROL,
                        id,
                    });
                }
            }
        }
        for (old, new) in session.rehome(flow) {
            self.actions.push_back(Action::Unsubscribe {
                filter: old.filter,
                flow,
            });
            if let Some(subscription) = new {
                self.actions.push_back(Action::Subscribe {
                    subscription,
                    send_retained: false,
                });
            }
        }
        in_flight
    }

    /// [MQTT-4.4.0-1]: an unacknowledged PUBLISH goes again with DUP set, a PUBREL again as is,
    /// on the control flow.
    pub(super) fn resend_outgoing(&mut self, now: Instant, id: PacketId, state: Outgoing) {
        match state {
            Outgoing::Publish(mut delivery) => {
                delivery.flow = Flow::CONTROL;
                self.resend(now, &delivery, id);
            }
            Outgoing::Release(..) => self.send(&Packet::PubRel(Ack::new(id, ReasonCode::SUCCESS))),
        }
    }

    /// Malformed input on a flow: a data flow alone is closed, the control flow takes the
    /// connection with it.
    pub fn handle_flow_error(&mut self, now: Instant, flow: Flow, err: &DecodeError) {
        if flow.is_control() {
            return self.handle_decode_error(err);
        }
        self.actions.push_back(Action::CloseFlow(flow));
        self.handle_flow_closed(now, flow);
    }
}
