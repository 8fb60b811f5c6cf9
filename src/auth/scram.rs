//! SCRAM-SHA-256 (RFC 5802 with RFC 7677's hash), both sides, as MQTT 5 enhanced
//! authentication carries it: the messages travel as Authentication Data of CONNECT, AUTH and
//! CONNACK under the Authentication Method `SCRAM-SHA-256`.
//!
//! Sans-IO arithmetic and message syntax only: nonces are arguments (the broker shell and the
//! client draw them), nothing here reads a clock or a socket. No channel binding (`n,,` or
//! `y,,`; `p=` is refused), no authorization identity (`a=`), and the password is used as its
//! UTF-8 bytes without SASLprep normalization (ASCII passwords are unaffected).
//!
//! The server keeps `StoredKey` and `ServerKey` only ([`ScramKeys`]), never the password; an
//! unknown user gets keys derived from a secret ([`ScramKeys::mock`]), so the exchange looks
//! the same (same salt on every try, same iteration count) and fails like a wrong password.

use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::{digest, hmac, pbkdf2};

/// The MQTT Authentication Method name.
pub const METHOD: &str = "SCRAM-SHA-256";
/// The iteration count `petrel passwd` writes (RFC 7677's minimum).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// A client refuses a server asking for more (a hostile server could burn its CPU), and a
/// password file may not ask for more either.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// An iteration count from a file or a server: 1 to [`MAX_ITERATIONS`].
pub fn parse_iterations(text: Option<&str>) -> Option<NonZeroU32> {
    text.and_then(|n| n.parse::<u32>().ok())
        .filter(|&n| n <= MAX_ITERATIONS)
        .and_then(NonZeroU32::new)
}
/// Salt length of new entries and of mock salts.
pub const SALT_LEN: usize = 16;
/// The longest SCRAM message either side accepts: real ones are a few hundred bytes.
pub const MAX_MESSAGE: usize = 2048;
const KEY_LEN: usize = 32;

/// Why an exchange failed. [`ScramError::InvalidProof`] is the answer to a wrong password and
/// to an unknown user alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    #[error("the proof does not match")]
    InvalidProof,
    #[error("the server's signature does not match (not the server we share the password with)")]
    InvalidServerSignature,
    #[error("the server refused: {0}")]
    ServerError(&'static str),
}

/// What a server stores for a SCRAM-SHA-256 user (RFC 5802 §3): enough to check a proof and
/// sign the answer, not enough to log in as the user.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub iterations: NonZeroU32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; KEY_LEN],
    pub server_key: [u8; KEY_LEN],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ScramKeys({} iterations)", self.iterations)
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; KEY_LEN] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    let mut out = [0; KEY_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; KEY_LEN] {
    let mut out = [0; KEY_LEN];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

fn salted_password(password: &[u8], salt: &[u8], iterations: NonZeroU32) -> [u8; KEY_LEN] {
    let mut out = [0; KEY_LEN];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password,
        &mut out,
    );
    out
}

/// Compares in time that depends on the length only.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ScramKeys {
    /// Derives the stored keys from a password (what `petrel passwd --hash scram-sha-256`
    /// writes).
    pub fn derive(password: &[u8], salt: Vec<u8>, iterations: NonZeroU32) -> Self {
        let salted = salted_password(password, &salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        Self {
            iterations,
            stored_key: sha256(&client_key),
            server_key: hmac_sha256(&salted, b"Server Key"),
            salt,
        }
    }

    /// Whether `password` is this user's (a plain CONNECT password against a SCRAM entry):
    /// SaltedPassword → ClientKey → StoredKey, compared in constant time.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let salted = salted_password(password, &self.salt, self.iterations);
        let stored = sha256(&hmac_sha256(&salted, b"Client Key"));
        constant_time_eq(&stored, &self.stored_key)
    }

    /// Keys for a user who does not exist (or has no SCRAM entry): the same salt for the same
    /// name every time, so a client cannot tell it from a real user by asking twice; keys no
    /// password matches (a proof would need a SHA-256 preimage, and the exchange refuses a
    /// mock user anyway).
    pub fn mock(secret: &[u8], username: &str) -> Self {
        let salt = hmac_sha256(secret, format!("salt:{username}").as_bytes());
        Self {
            iterations: NonZeroU32::new(DEFAULT_ITERATIONS).expect("a non-zero constant"),
            salt: salt[..SALT_LEN].to_vec(),
            stored_key: hmac_sha256(secret, format!("stored:{username}").as_bytes()),
            server_key: hmac_sha256(secret, format!("server:{username}").as_bytes()),
        }
    }

    /// The password-file form: `$scram-sha-256$<iterations>$<salt>$<StoredKey>$<ServerKey>`.
    pub fn to_line(&self) -> String {
        format!(
            "$scram-sha-256${}${}${}${}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }

    /// Parses the fields after `$scram-sha-256$`.
    pub fn parse_fields<'a>(mut parts: impl Iterator<Item = &'a str>) -> Result<Self, String> {
        let iterations = parse_iterations(parts.next())
            .ok_or_else(|| format!("the iteration count must be 1 to {MAX_ITERATIONS}"))?;
        let mut field = |what: &str| -> Result<Vec<u8>, String> {
            let part = parts.next().ok_or_else(|| format!("missing {what}"))?;
            BASE64
                .decode(part)
                .map_err(|err| format!("{what} is not base64: {err}"))
        };
        let salt = field("salt")?;
        let key = |bytes: Vec<u8>, what: &str| -> Result<[u8; KEY_LEN], String> {
            bytes
                .try_into()
                .map_err(|b: Vec<u8>| format!("{what} must be {KEY_LEN} bytes, not {}", b.len()))
        };
        let stored_key = key(field("StoredKey")?, "StoredKey")?;
        let server_key = key(field("ServerKey")?, "ServerKey")?;
        if parts.next().is_some() {
            return Err("too many `$`-separated fields".into());
        }
        if salt.is_empty() {
            return Err("empty salt".into());
        }
        Ok(Self {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }
}

/// Splits `k=value` attributes; `value` may contain `=`.
fn attribute(part: &str, key: char) -> Result<&str, ScramError> {
    let mut chars = part.chars();
    if chars.next() == Some(key) && chars.next() == Some('=') {
        Ok(&part[2..])
    } else {
        Err(ScramError::Malformed("unexpected attribute"))
    }
}

/// `saslname` (RFC 5802 §5.1): `=2C` is `,` and `=3D` is `=`; any other `=` is an error.
fn decode_saslname(name: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad `=` escape in the username")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(ScramError::Malformed("empty username"));
    }
    Ok(out)
}

fn encode_saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

/// A nonce is printable ASCII without `,` (RFC 5802 §7).
fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn text(message: &[u8]) -> Result<&str, ScramError> {
    if message.len() > MAX_MESSAGE {
        return Err(ScramError::Malformed("message too long"));
    }
    std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))
}

/// The server's half of one exchange, between server-first and client-final.
pub struct ServerExchange {
    username: String,
    gs2_header: String,
    nonce: String,
    /// client-first-message-bare "," server-first-message: the start of AuthMessage.
    auth_prefix: String,
    keys: ScramKeys,
    /// False for a mock user: the exchange runs to the end and fails.
    known: bool,
}

impl std::fmt::Debug for ServerExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerExchange")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// A parsed client-first-message: the gs2 header and the bare part.
#[derive(Debug)]
pub struct ClientFirst<'a> {
    gs2_header: &'a str,
    bare: &'a str,
    pub username: String,
    nonce: &'a str,
}

impl<'a> ClientFirst<'a> {
    pub fn parse(message: &'a [u8]) -> Result<Self, ScramError> {
        let message = text(message)?;
        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let mut parts = message.splitn(3, ',');
        let cbind = parts.next().unwrap_or_default();
        let authzid = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let bare = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        match cbind {
            "n" | "y" => {}
            _ if cbind.starts_with("p=") => {
                return Err(ScramError::Unsupported(
                    "channel binding (SCRAM-SHA-256-PLUS)",
                ))
            }
            _ => return Err(ScramError::Malformed("bad channel-binding flag")),
        }
        if !authzid.is_empty() {
            return Err(ScramError::Unsupported("an authorization identity (a=)"));
        }
        let gs2_header = &message[..message.len() - bare.len()];
        let mut attrs = bare.split(',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(ScramError::Unsupported("mandatory extensions (m=)"));
        }
        let username = decode_saslname(attribute(first, 'n')?)?;
        let nonce = attribute(attrs.next().unwrap_or_default(), 'r')?;
        if !valid_nonce(nonce) {
            return Err(ScramError::Malformed("bad client nonce"));
        }
        Ok(Self {
            gs2_header,
            bare,
            username,
            nonce,
        })
    }
}

impl ServerExchange {
    /// Answers a client-first-message with the server-first-message. `server_nonce` is
    /// fresh randomness (printable, no `,`), `keys` the user's or [`ScramKeys::mock`]'s with
    /// `known` false.
    pub fn start(
        client_first: &ClientFirst<'_>,
        server_nonce: &str,
        keys: ScramKeys,
        known: bool,
    ) -> Result<(Self, String), ScramError> {
        if !valid_nonce(server_nonce) {
            return Err(ScramError::Malformed("bad server nonce"));
        }
        let nonce = format!("{}{server_nonce}", client_first.nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&keys.salt),
            keys.iterations
        );
        let exchange = Self {
            username: client_first.username.clone(),
            gs2_header: client_first.gs2_header.to_owned(),
            auth_prefix: format!("{},{server_first}", client_first.bare),
            nonce,
            keys,
            known,
        };
        Ok((exchange, server_first))
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    /// Checks the client-final-message; on success, the server-final-message (`v=…`).
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let message = text(client_final)?;
        let (without_proof, proof) = message
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attribute(attrs.next().unwrap_or_default(), 'c')?;
        let nonce = attribute(attrs.next().unwrap_or_default(), 'r')?;
        let binding = BASE64
            .decode(binding)
            .map_err(|_| ScramError::Malformed("channel binding is not base64"))?;
        if binding != self.gs2_header.as_bytes() {
            return Err(ScramError::Malformed(
                "channel binding differs from the gs2 header",
            ));
        }
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce differs"));
        }
        let proof = BASE64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != KEY_LEN {
            return Err(ScramError::InvalidProof);
        }
        let auth_message = format!("{},{without_proof}", self.auth_prefix);
        let signature = hmac_sha256(&self.keys.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; KEY_LEN];
        for (i, byte) in client_key.iter_mut().enumerate() {
            *byte = proof[i] ^ signature[i];
        }
        let matches = constant_time_eq(&sha256(&client_key), &self.keys.stored_key);
        if !(matches && self.known) {
            return Err(ScramError::InvalidProof);
        }
        let server_signature = hmac_sha256(&self.keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature)))
    }
}

/// The client's half of one exchange.
pub struct ClientExchange {
    password: Vec<u8>,
    client_nonce: String,
    client_first_bare: String,
    /// Set once server-first was answered: the ServerSignature to expect.
    expected: Option<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for ClientExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientExchange").finish_non_exhaustive()
    }
}

impl ClientExchange {
    /// Starts an exchange; returns it with the client-first-message. `nonce` is fresh
    /// randomness, printable and without `,`.
    pub fn new(username: &str, password: &[u8], nonce: &str) -> (Self, String) {
        let client_first_bare = format!("n={},r={nonce}", encode_saslname(username));
        let first = format!("n,,{client_first_bare}");
        (
            Self {
                password: password.to_vec(),
                client_nonce: nonce.to_owned(),
                client_first_bare,
                expected: None,
            },
            first,
        )
    }

    /// Answers the server-first-message with the client-final-message.
    pub fn handle_server_first(&mut self, message: &[u8]) -> Result<String, ScramError> {
        let message = text(message)?;
        let mut attrs = message.split(',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(ScramError::Unsupported("mandatory extensions (m=)"));
        }
        if let Ok(error) = attribute(first, 'e') {
            return Err(ScramError::ServerError(server_error(error)));
        }
        let nonce = attribute(first, 'r')?;
        if !nonce.starts_with(&self.client_nonce)
            || nonce.len() == self.client_nonce.len()
            || !valid_nonce(nonce)
        {
            return Err(ScramError::Malformed(
                "the server's nonce does not extend ours",
            ));
        }
        let salt = BASE64
            .decode(attribute(attrs.next().unwrap_or_default(), 's')?)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations = parse_iterations(Some(attribute(attrs.next().unwrap_or_default(), 'i')?))
            .ok_or(ScramError::Malformed("bad iteration count"))?;
        let salted = salted_password(&self.password, &salt, iterations);
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored_key = sha256(&client_key);
        let without_proof = format!("c={},r={nonce}", BASE64.encode("n,,"));
        let auth_message = format!("{},{message},{without_proof}", self.client_first_bare);
        let signature = hmac_sha256(&stored_key, auth_message.as_bytes());
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        let server_key = hmac_sha256(&salted, b"Server Key");
        self.expected = Some(hmac_sha256(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)))
    }

    /// Checks the server-final-message: the server proves it knows the user's keys.
    pub fn verify_server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let message = text(message)?;
        if let Ok(error) = attribute(message, 'e') {
            return Err(ScramError::ServerError(server_error(error)));
        }
        let signature = BASE64
            .decode(attribute(
                message.split(',').next().unwrap_or_default(),
                'v',
            )?)
            .map_err(|_| ScramError::Malformed("signature is not base64"))?;
        let expected = self
            .expected
            .ok_or(ScramError::Malformed("server-final before server-first"))?;
        if constant_time_eq(&signature, &expected) {
            Ok(())
        } else {
            Err(ScramError::InvalidServerSignature)
        }
    }
}

/// RFC 5802's server-error-value names, as static text for the error.
fn server_error(value: &str) -> &'static str {
    match value {
        "invalid-encoding" => "invalid-encoding",
        "extensions-not-supported" => "extensions-not-supported",
        "invalid-proof" => "invalid-proof",
        "channel-bindings-dont-match" => "channel-bindings-dont-match",
        "server-does-support-channel-binding" => "server-does-support-channel-binding",
        "channel-binding-not-supported" => "channel-binding-not-supported",
        "unsupported-channel-binding-type" => "unsupported-channel-binding-type",
        "unknown-user" => "unknown-user",
        "invalid-username-encoding" => "invalid-username-encoding",
        "no-resources" => "no-resources",
        _ => "other-error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 §3: user "user", password "pencil".
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_keys() -> ScramKeys {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        ScramKeys::derive(b"pencil", salt, NonZeroU32::new(4096).unwrap())
    }

    #[test]
    fn rfc7677_server_side() {
        let first = ClientFirst::parse(CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(first.username, "user");
        let (exchange, server_first) =
            ServerExchange::start(&first, SERVER_NONCE, rfc_keys(), true).unwrap();
        assert_eq!(server_first, SERVER_FIRST);
        assert_eq!(exchange.username(), "user");
        assert_eq!(
            exchange.finish(CLIENT_FINAL.as_bytes()).unwrap(),
            SERVER_FINAL
        );
    }

    #[test]
    fn rfc7677_client_side() {
        let (mut client, first) = ClientExchange::new("user", b"pencil", CLIENT_NONCE);
        assert_eq!(first, CLIENT_FIRST);
        let last = client.handle_server_first(SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(last, CLIENT_FINAL);
        client.verify_server_final(SERVER_FINAL.as_bytes()).unwrap();
        assert_eq!(
            client.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::InvalidServerSignature)
        );
    }

    #[test]
    fn stored_keys_verify_plain_passwords_and_round_trip() {
        let keys = rfc_keys();
        assert!(keys.verify_password(b"pencil"));
        assert!(!keys.verify_password(b"pencil "));
        let line = keys.to_line();
        let rest = line.strip_prefix("$scram-sha-256$").unwrap();
        assert_eq!(ScramKeys::parse_fields(rest.split('$')).unwrap(), keys);
    }

    fn run(password: &[u8], keys: ScramKeys, known: bool) -> Result<String, ScramError> {
        let (mut client, first) = ClientExchange::new("user", password, "abc");
        let first = ClientFirst::parse(first.as_bytes())?;
        let (server, server_first) = ServerExchange::start(&first, "xyz", keys, known)?;
        let last = client.handle_server_first(server_first.as_bytes())?;
        let server_final = server.finish(last.as_bytes())?;
        client.verify_server_final(server_final.as_bytes())?;
        Ok(server_final)
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_alike() {
        assert!(run(b"pencil", rfc_keys(), true).is_ok());
        assert_eq!(
            run(b"crayon", rfc_keys(), true),
            Err(ScramError::InvalidProof)
        );
        let mock = ScramKeys::mock(b"secret", "user");
        assert_eq!(mock, ScramKeys::mock(b"secret", "user"), "deterministic");
        assert_ne!(mock.salt, ScramKeys::mock(b"secret", "other").salt);
        assert_eq!(mock.salt.len(), SALT_LEN);
        assert_eq!(run(b"pencil", mock, false), Err(ScramError::InvalidProof));
        // Even the right keys do not pass when the user is not known.
        assert_eq!(
            run(b"pencil", rfc_keys(), false),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn client_first_syntax() {
        let parsed = ClientFirst::parse(b"y,,n=a=2Cb=3Dc,r=n0nce,x=ext").unwrap();
        assert_eq!(parsed.username, "a,b=c");
        assert_eq!(encode_saslname("a,b=c"), "a=2Cb=3Dc");
        for (bad, needle) in [
            (&b"p=tls-unique,,n=u,r=x"[..], "channel binding"),
            (b"n,a=admin,n=u,r=x", "authorization"),
            (b"n,,m=ext,n=u,r=x", "mandatory"),
            (b"n,,n=u=41,r=x", "escape"),
            (b"n,,n=,r=x", "empty username"),
            (b"n,,n=u,r=", "nonce"),
            (b"n,,n=u", "attribute"),
            (b"x,,n=u,r=x", "flag"),
            (b"n,,n=u,r=a\xff", "UTF-8"),
            (b"n", "gs2"),
        ] {
            let err = ClientFirst::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{:?}: {err}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(ClientFirst::parse(&vec![b'a'; MAX_MESSAGE + 1]).is_err());
    }

    #[test]
    fn client_final_must_match_the_exchange() {
        let first = ClientFirst::parse(CLIENT_FIRST.as_bytes()).unwrap();
        let start = || {
            ServerExchange::start(&first, SERVER_NONCE, rfc_keys(), true)
                .unwrap()
                .0
        };
        let other_nonce = CLIENT_FINAL.replace("k0,p", "k1,p");
        let other_binding = CLIENT_FINAL.replace("c=biws", "c=eSws");
        for bad in [
            other_nonce.as_str(),
            other_binding.as_str(),
            "c=biws,r=x",
            "c=biws,r=x,p=!!",
        ] {
            assert!(
                matches!(
                    start().finish(bad.as_bytes()),
                    Err(ScramError::Malformed(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(
            start().finish(CLIENT_FINAL.replace("dHzb", "dHzc").as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn client_refuses_a_bad_server_first() {
        for bad in [
            "r=other,s=AAAA,i=4096",
            "r=abc,s=AAAA,i=4096",
            "r=abcX,s=!!,i=4096",
            "r=abcX,s=AAAA,i=0",
            "r=abcX,s=AAAA,i=99999999999",
            "e=unknown-user",
        ] {
            let (mut client, _) = ClientExchange::new("u", b"p", "abc");
            assert!(client.handle_server_first(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_messages_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = ClientFirst::parse(&bytes);
            let first = ClientFirst::parse(CLIENT_FIRST.as_bytes()).unwrap();
            let keys = ScramKeys::derive(b"p", vec![1], NonZeroU32::MIN);
            let (server, _) = ServerExchange::start(&first, SERVER_NONCE, keys, true).unwrap();
            let _ = server.finish(&bytes);
            let (mut client, _) = ClientExchange::new("u", b"p", "abc");
            let _ = client.handle_server_first(&bytes);
            let _ = client.verify_server_final(&bytes);
        }
    }
}
