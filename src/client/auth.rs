//! The client's side of MQTT 5 enhanced authentication (§4.12): SCRAM-SHA-256 over CONNECT,
//! AUTH and CONNACK, and re-authentication (AUTH 0x19) on a connected client. The arithmetic
//! is `auth::scram`'s; this file adds the packets and the nonce (the client's randomness).

use bytes::Bytes;

use crate::auth::scram::{ClientExchange, METHOD};
use crate::codec::{Auth, Packet, Properties, ReasonCode};

/// An MQTT 5 Authentication Method the client can use (with the username and password of
/// its options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (RFC 7677): the password never crosses the wire, and the server proves
    /// it knows the user's keys.
    ScramSha256,
}

impl AuthMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::ScramSha256 => METHOD,
        }
    }
}

impl std::str::FromStr for AuthMethod {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        if text.eq_ignore_ascii_case(METHOD) {
            Ok(Self::ScramSha256)
        } else {
            Err(format!(
                "unknown authentication method `{text}` (known: {METHOD})"
            ))
        }
    }
}

/// One exchange in progress.
pub(super) struct Exchange {
    scram: ClientExchange,
    /// Our AUTH 0x18 went out: the next server message is the last.
    answered: bool,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("answered", &self.answered)
            .finish_non_exhaustive()
    }
}

impl Exchange {
    /// Starts an exchange with a fresh nonce; returns it with the client-first-message.
    pub fn start(username: &str, password: &[u8]) -> (Self, Bytes) {
        let mut nonce = [0u8; 18];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .expect("the operating system's random source is available");
        let nonce = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, nonce);
        let (scram, first) = ClientExchange::new(username, password, &nonce);
        (
            Self {
                scram,
                answered: false,
            },
            first.into(),
        )
    }

    /// The server's AUTH 0x18 (server-first-message): our AUTH 0x18 (client-final).
    pub fn answer(&mut self, auth: &Auth) -> Result<Packet, String> {
        if auth.reason != ReasonCode::CONTINUE_AUTHENTICATION || self.answered {
            return Err(format!("unexpected AUTH {:?}", auth.reason));
        }
        check_method(&auth.properties)?;
        let data = auth
            .properties
            .authentication_data
            .as_deref()
            .unwrap_or_default();
        let last = self
            .scram
            .handle_server_first(data)
            .map_err(|e| e.to_string())?;
        self.answered = true;
        Ok(packet(ReasonCode::CONTINUE_AUTHENTICATION, last.into()))
    }

    /// The server's success (CONNACK 0x00 or AUTH 0x00) with the server-final-message: the
    /// server must prove it knows our keys.
    pub fn finish(&self, properties: &Properties) -> Result<(), String> {
        check_method(properties)?;
        if !self.answered {
            return Err("success before the exchange finished".into());
        }
        let data = properties
            .authentication_data
            .as_deref()
            .unwrap_or_default();
        self.scram
            .verify_server_final(data)
            .map_err(|e| e.to_string())
    }
}

fn check_method(properties: &Properties) -> Result<(), String> {
    // [MQTT-4.12.0-5]: every AUTH and the successful CONNACK name the method.
    if properties.authentication_method.as_deref() != Some(METHOD) {
        return Err("the server answered with another authentication method".into());
    }
    Ok(())
}

/// An AUTH packet of ours.
pub(super) fn packet(reason: ReasonCode, data: Bytes) -> Packet {
    let mut properties = Properties::default();
    properties.authentication_method = Some(METHOD.to_owned());
    properties.authentication_data = Some(data);
    Packet::Auth(Auth { reason, properties })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{ClientFirst, ScramKeys, ServerExchange};
    use std::num::NonZeroU32;

    fn data(packet: &Packet) -> Bytes {
        match packet {
            Packet::Auth(a) => a.properties.authentication_data.clone().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn exchange_against_the_server_side() {
        let (mut exchange, first) = Exchange::start("user", b"pencil");
        let parsed = ClientFirst::parse(&first).unwrap();
        let keys = ScramKeys::derive(b"pencil", vec![7; 16], NonZeroU32::new(4096).unwrap());
        let (server, server_first) = ServerExchange::start(&parsed, "srv", keys, true).unwrap();
        let Packet::Auth(challenge) =
            packet(ReasonCode::CONTINUE_AUTHENTICATION, server_first.into())
        else {
            unreachable!()
        };
        let reply = exchange.answer(&challenge).unwrap();
        // Only one answer per exchange.
        assert!(exchange.answer(&challenge).is_err());
        let server_final = server.finish(&data(&reply)).unwrap();
        let mut ok = Properties::default();
        ok.authentication_method = Some(METHOD.into());
        ok.authentication_data = Some(server_final.into());
        exchange.finish(&ok).unwrap();
        // A server that does not know the keys cannot forge the signature.
        let mut forged = ok.clone();
        forged.authentication_data = Some(Bytes::from_static(b"v=AAAA"));
        assert!(exchange.finish(&forged).is_err());
        let mut other = ok;
        other.authentication_method = Some("PLAIN".into());
        assert!(exchange.finish(&other).is_err());
        assert_eq!("scram-sha-256".parse(), Ok(AuthMethod::ScramSha256));
    }
}
