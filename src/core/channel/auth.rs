//! MQTT 5 enhanced authentication (§4.12): the AUTH exchange between CONNECT and CONNACK, and
//! re-authentication once connected. The channel keeps the protocol rules (which AUTH may
//! come when, the method fixed by CONNECT, one exchange at a time, a deadline); what the
//! Authentication Data means (SCRAM's arithmetic, the user's keys, randomness) is the
//! shell's: each client step is an [`Action::Authenticate`], answered with
//! [`Channel::auth_continue`], [`Channel::auth_succeed`] or [`Channel::auth_fail`].

use super::*;

/// One step of the client's side of an exchange, for the shell to judge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthStep {
    /// The Authentication Method of CONNECT (every AUTH carries the same [MQTT-4.12.0-5]).
    pub method: Arc<str>,
    /// The client's Authentication Data (empty when it sent none).
    pub data: Bytes,
    /// The first message of an exchange (CONNECT's, or a re-authentication's AUTH 0x19):
    /// the shell starts afresh.
    pub first: bool,
    /// Re-authentication of a connected client (§4.12.1).
    pub reauth: bool,
}

/// Where an exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No exchange in progress (connected, authenticated).
    Idle,
    /// The shell is judging a step ([`Action::Authenticate`] is out).
    Deciding,
    /// We sent AUTH 0x18 and wait for the client's AUTH 0x18.
    AwaitClient,
}

/// The connection's enhanced authentication: boxed on the channel, as most connections
/// have none.
#[derive(Debug)]
pub(super) struct Enhanced {
    method: Arc<str>,
    phase: Phase,
    /// The exchange in progress is a re-authentication.
    reauth: bool,
    /// A re-authentication must end by then (the connect timeout after it began).
    deadline: Option<Instant>,
    /// CONNECT's Clean Start, for the session lookup once authenticated.
    clean_start: bool,
    /// The shell's last Authentication Data, for the successful CONNACK.
    connack_data: Option<Bytes>,
}

impl Channel {
    /// CONNECT carried an Authentication Method: the exchange starts instead of the session
    /// lookup (the channel is `Authenticating` until the shell succeeds or fails it).
    pub(super) fn start_enhanced(
        &mut self,
        method: String,
        data: Option<Bytes>,
        clean_start: bool,
    ) {
        let method: Arc<str> = Arc::from(method);
        self.enhanced = Some(Box::new(Enhanced {
            method: Arc::clone(&method),
            phase: Phase::Deciding,
            reauth: false,
            deadline: None,
            clean_start,
            connack_data: None,
        }));
        self.state = State::Authenticating;
        self.actions.push_back(Action::Authenticate(AuthStep {
            method,
            data: data.unwrap_or_default(),
            first: true,
            reauth: false,
        }));
    }

    /// The method this connection authenticated with, if it used enhanced authentication.
    pub fn auth_method(&self) -> Option<&str> {
        self.enhanced.as_deref().map(|e| &*e.method)
    }

    /// The deadline of a re-authentication in progress.
    pub(super) fn reauth_deadline(&self) -> Option<Instant> {
        self.enhanced.as_deref().and_then(|e| e.deadline)
    }

    /// An AUTH packet from the client, in `Authenticating` or `Connected`.
    pub(super) fn handle_auth(&mut self, now: Instant, auth: Auth) {
        let Some(enhanced) = self.enhanced.as_deref_mut() else {
            // [MQTT-4.12.0-7]: no Authentication Method in CONNECT, so no AUTH.
            return self.auth_protocol_error();
        };
        // [MQTT-4.12.0-5], [MQTT-4.12.1-1]: the method of CONNECT, every time.
        if auth.properties.authentication_method.as_deref() != Some(&*enhanced.method) {
            return self.auth_protocol_error();
        }
        let first = match (enhanced.phase, auth.reason) {
            // [MQTT-4.12.0-3]: the answer to our AUTH is an AUTH 0x18.
            (Phase::AwaitClient, ReasonCode::CONTINUE_AUTHENTICATION) => false,
            // [MQTT-4.12.1-1]: a connected client may start re-authentication with 0x19,
            // one exchange at a time.
            (Phase::Idle, ReasonCode::RE_AUTHENTICATE) if self.state == State::Connected => {
                enhanced.reauth = true;
                enhanced.deadline = Some(now + self.limits.connect_timeout);
                true
            }
            // Anything else (0x00 from a client, 0x19 mid-exchange or before CONNACK, 0x18
            // unasked) breaks [MQTT-3.15.2-1]'s rules of the exchange.
            _ => return self.auth_protocol_error(),
        };
        enhanced.phase = Phase::Deciding;
        let step = AuthStep {
            method: Arc::clone(&enhanced.method),
            data: auth
                .properties
                .authentication_data
                .clone()
                .unwrap_or_default(),
            first,
            reauth: enhanced.reauth,
        };
        self.actions.push_back(Action::Authenticate(step));
    }

    /// A protocol error in the exchange: CONNACK 0x82 before CONNACK, DISCONNECT 0x82 after.
    fn auth_protocol_error(&mut self) {
        if self.state == State::Authenticating {
            self.refuse(ReasonCode::PROTOCOL_ERROR);
        } else {
            self.protocol_error(ReasonCode::PROTOCOL_ERROR);
        }
    }

    fn deciding(&mut self) -> Option<&mut Enhanced> {
        self.enhanced
            .as_deref_mut()
            .filter(|e| e.phase == Phase::Deciding)
    }

    /// The shell needs another message from the client: AUTH 0x18 with `data`
    /// [MQTT-4.12.0-2].
    pub fn auth_continue(&mut self, data: Bytes) {
        if self.state == State::Closed {
            return;
        }
        let Some(enhanced) = self.deciding() else {
            return;
        };
        enhanced.phase = Phase::AwaitClient;
        let packet = auth_packet(
            ReasonCode::CONTINUE_AUTHENTICATION,
            &enhanced.method,
            Some(data),
        );
        self.send(&packet);
    }

    /// The client is authenticated. Before CONNACK: `username` (the identity the exchange
    /// proved, unless the transport vouched for one) becomes the connection's, and the
    /// session lookup follows ([`Action::Connect`]); CONNACK will carry `data`. On
    /// re-authentication: AUTH 0x00 with `data`.
    pub fn auth_succeed(&mut self, data: Option<Bytes>, username: Option<String>) {
        if self.state == State::Closed {
            return;
        }
        let Some(enhanced) = self.deciding() else {
            return;
        };
        enhanced.phase = Phase::Idle;
        enhanced.deadline = None;
        if enhanced.reauth {
            enhanced.reauth = false;
            let packet = auth_packet(ReasonCode::SUCCESS, &enhanced.method, data);
            return self.send(&packet);
        }
        enhanced.connack_data = data;
        let clean_start = enhanced.clean_start;
        if let (Some(username), false) = (username, self.username_from_transport) {
            self.username = Some(username);
        }
        self.state = State::AwaitSession;
        self.actions.push_back(Action::Connect {
            client_id: Arc::clone(&self.client_id),
            clean_start,
        });
    }

    /// The exchange failed: CONNACK `code` before CONNACK [MQTT-4.12.0-4]; DISCONNECT
    /// `code` on re-authentication [MQTT-4.12.1-2] (the shell gives a code DISCONNECT
    /// allows, such as 0x87).
    pub fn auth_fail(&mut self, code: ReasonCode) {
        if self.deciding().is_none() {
            return;
        }
        match self.state {
            State::Authenticating => self.refuse(code),
            State::Connected => self.close(code, Initiator::Broker, true, true),
            _ => {}
        }
    }

    /// The re-authentication deadline passed: the client is no longer trusted.
    pub(super) fn reauth_timed_out(&mut self) {
        self.close(ReasonCode::NOT_AUTHORIZED, Initiator::Broker, true, true);
    }

    /// The properties a successful CONNACK adds [MQTT-4.12.0-5].
    pub(super) fn connack_auth(&mut self, properties: &mut Properties) {
        if let Some(enhanced) = self.enhanced.as_deref_mut() {
            properties.authentication_method = Some(enhanced.method.to_string());
            properties.authentication_data = enhanced.connack_data.take();
        }
    }
}

fn auth_packet(reason: ReasonCode, method: &str, data: Option<Bytes>) -> Packet {
    let mut properties = Properties::default();
    properties.authentication_method = Some(method.to_owned());
    properties.authentication_data = data.filter(|d| !d.is_empty());
    Packet::Auth(Auth { reason, properties })
}
