//! JWT authentication in EMQX's shape (`mechanism = "jwt"`): the token comes in the password
//! field (or the username, `from = "username"`), signed with a shared secret (HS256/384/512),
//! or a public key (RS*, PS*, ES256/384, EdDSA) given as PEM or in a JWKS file. `exp` and
//! `nbf` are checked against the time the caller passes in (the shell reads the clock);
//! `verify_claims` must match exactly, with `${clientid}` and `${username}` filled in; an
//! `acl` claim (EMQX's shapes, see `client_acl`) limits the connection's topics.
//!
//! Answers, as EMQX: no token, or one that is not ours (not a JWT, an algorithm of another
//! key family, `none`, a signature our key does not verify) → ignore, so that the next source
//! is asked; a token we signed whose claims fail (expired, not yet valid, a claim that does
//! not match, a malformed `acl`) → deny. Keys are read from files at load and on reload.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::chain::{Grant, Verdict};
use super::client_acl::ClientAcl;
use super::{Credentials, Refusal};

/// At most this many keys from a JWKS file (each may be tried for a token without `kid`).
const MAX_JWKS_KEYS: usize = 32;
/// Longer tokens are not ours (bounded decoding work per CONNECT).
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Which CONNECT field carries the token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenField {
    #[default]
    Password,
    Username,
}

/// EMQX's `algorithm`: says which key setting is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeyKind {
    #[serde(rename = "hmac-based")]
    Hmac,
    #[serde(rename = "public-key")]
    PublicKey,
}

/// One `mechanism = "jwt"` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSettings {
    pub key: KeySource,
    pub from: TokenField,
    /// Claim name → expected value (`${clientid}`, `${username}` filled in).
    pub verify_claims: BTreeMap<String, String>,
    /// The claim holding per-client ACL rules (EMQX's `acl_claim_name`, default `acl`).
    pub acl_claim_name: String,
}

/// Where the verification key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Secret {
        secret: String,
        base64: bool,
    },
    /// PEM text, or the path of a PEM file.
    PublicKey(String),
    JwksFile(PathBuf),
    /// EMQX's `use_jwks = true` with `endpoint`: fetched over HTTP(S), again every
    /// `refresh_interval`.
    JwksEndpoint(super::jwks::EndpointSettings),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

impl Family {
    fn algorithms(self) -> Vec<Algorithm> {
        use Algorithm::*;
        match self {
            Self::Hmac => vec![HS256, HS384, HS512],
            Self::Rsa => vec![RS256, RS384, RS512, PS256, PS384, PS512],
            Self::Ec => vec![ES256, ES384],
            Self::Ed => vec![EdDSA],
        }
    }
}

/// A verification key (opaque outside this module).
pub struct Key {
    id: Option<String>,
    family: Family,
    key: DecodingKey,
}

/// A loaded JWT source.
pub struct Jwt {
    settings: JwtSettings,
    keys: Keys,
}

enum Keys {
    /// Read from the settings or files at (re)load.
    Fixed(Arc<Vec<Key>>),
    Remote(Box<super::jwks::Remote>),
}

impl std::fmt::Debug for Jwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwt")
            .field("from", &self.settings.from)
            .finish()
    }
}

impl Jwt {
    /// Reads the key (or the key files); an error names the setting or the file.
    pub fn load(settings: &JwtSettings) -> Result<Self, String> {
        let keys = match &settings.key {
            KeySource::Secret { secret, base64 } => {
                let key = if *base64 {
                    DecodingKey::from_base64_secret(secret).map_err(|e| {
                        format!("secret: not base64 ({e}); or set secret_base64_encoded = false")
                    })?
                } else {
                    DecodingKey::from_secret(secret.as_bytes())
                };
                vec![Key {
                    id: None,
                    family: Family::Hmac,
                    key,
                }]
            }
            KeySource::PublicKey(text) => {
                let pem = if text.trim_start().starts_with("-----BEGIN") {
                    text.clone()
                } else {
                    std::fs::read_to_string(text)
                        .map_err(|e| format!("public_key: cannot read {text}: {e}"))?
                };
                vec![pem_key(pem.as_bytes()).map_err(|e| format!("public_key: {e}"))?]
            }
            KeySource::JwksFile(path) => jwks_keys(path)?,
            KeySource::JwksEndpoint(endpoint) => {
                return Ok(Self {
                    settings: settings.clone(),
                    keys: Keys::Remote(Box::new(super::jwks::Remote::new(endpoint)?)),
                })
            }
        };
        Ok(Self {
            settings: settings.clone(),
            keys: Keys::Fixed(Arc::new(keys)),
        })
    }

    /// For the start-up log.
    pub fn describe(&self) -> String {
        let key = match &self.settings.key {
            KeySource::Secret { .. } => "hmac-based".to_owned(),
            KeySource::PublicKey(_) => "public-key".to_owned(),
            KeySource::JwksFile(path) => {
                let n = match &self.keys {
                    Keys::Fixed(keys) => keys.len(),
                    Keys::Remote(_) => 0,
                };
                format!("{n} keys from {}", path.display())
            }
            KeySource::JwksEndpoint(endpoint) => format!("keys from {}", endpoint.url),
        };
        let from = match self.settings.from {
            TokenField::Password => "password",
            TokenField::Username => "username",
        };
        format!("jwt ({key}, from {from})")
    }

    /// Decides a CONNECT at `now_unix` (seconds since the epoch). Only a JWKS endpoint
    /// whose keys are due for a refresh waits (on one request for every connection).
    pub async fn decide(&self, credentials: &Credentials<'_>) -> Verdict {
        let keys = match &self.keys {
            Keys::Fixed(keys) => Arc::clone(keys),
            Keys::Remote(remote) => remote.keys(std::time::Instant::now()).await,
        };
        self.decide_with(&keys, credentials)
    }

    /// [`Jwt::decide`] with keys read from the settings or files.
    #[cfg(test)]
    fn decide_now(&self, credentials: &Credentials<'_>) -> Verdict {
        match &self.keys {
            Keys::Fixed(keys) => self.decide_with(keys, credentials),
            Keys::Remote(_) => panic!("a JWKS endpoint is asked asynchronously"),
        }
    }

    fn decide_with(&self, keys: &[Key], credentials: &Credentials<'_>) -> Verdict {
        let token = match self.settings.from {
            TokenField::Password => credentials
                .password
                .and_then(|p| std::str::from_utf8(p).ok()),
            TokenField::Username => credentials.username,
        };
        let Some(token) = token.filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_LEN) else {
            return Verdict::Ignore;
        };
        let Some(claims) = verified_claims(keys, token) else {
            return Verdict::Ignore;
        };
        match self.check_claims(&claims, credentials) {
            Ok(grant) => Verdict::Allow(grant),
            Err(why) => {
                tracing::debug!(peer = %credentials.peer, "jwt refused: {why}");
                Verdict::Deny(Refusal::BadCredentials)
            }
        }
    }

    fn check_claims(
        &self,
        claims: &serde_json::Map<String, Value>,
        credentials: &Credentials<'_>,
    ) -> Result<Grant, String> {
        let now = credentials.now_unix;
        let time = |name: &str| -> Result<Option<u64>, String> {
            match claims.get(name) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|t| *t >= 0.0)
                    .map(|t| Some(t as u64))
                    .ok_or_else(|| format!("`{name}` is not a time")),
            }
        };
        if let Some(exp) = time("exp")? {
            if exp <= now {
                return Err(format!("expired at {exp} (now {now})"));
            }
        }
        if let Some(nbf) = time("nbf")? {
            if nbf > now {
                return Err(format!("not valid before {nbf} (now {now})"));
            }
        }
        for (name, expected) in &self.settings.verify_claims {
            let expected = super::chain::render(expected, credentials);
            let matches = match claims.get(name) {
                Some(Value::String(s)) => *s == expected,
                Some(v @ (Value::Number(_) | Value::Bool(_))) => {
                    let text = v.to_string();
                    text == expected
                }
                _ => false,
            };
            if !matches {
                return Err(format!("claim `{name}` does not match verify_claims"));
            }
        }
        let acl = match claims.get(&self.settings.acl_claim_name) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Arc::new(
                ClientAcl::parse(value, credentials.client_id, credentials.username)
                    .map_err(|e| format!("claim `{}`: {e}", self.settings.acl_claim_name))?,
            )),
        };
        let superuser = matches!(claims.get("is_superuser"), Some(Value::Bool(true)));
        Ok(Grant { superuser, acl })
    }
}

/// The claims of a token one of `keys` signed, or `None`.
fn verified_claims(keys: &[Key], token: &str) -> Option<serde_json::Map<String, Value>> {
    // `alg: none` and unknown algorithms fail here.
    let header = jsonwebtoken::decode_header(token).ok()?;
    let candidates = keys.iter().filter(|key| {
        key.family.algorithms().contains(&header.alg)
            && match (&header.kid, &key.id) {
                (Some(kid), Some(id)) => kid == id,
                _ => true,
            }
    });
    for key in candidates {
        let mut validation = Validation::new(header.alg);
        validation.algorithms = key.family.algorithms();
        // Time and audience are checked by `check_claims`, with the caller's clock.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        if let Ok(data) =
            jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key.key, &validation)
        {
            return Some(data.claims);
        }
    }
    None
}

fn pem_key(pem: &[u8]) -> Result<Key, String> {
    let (family, key) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        (Family::Rsa, key)
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        (Family::Ec, key)
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        (Family::Ed, key)
    } else {
        return Err("not an RSA, EC or Ed25519 public key in PEM".into());
    };
    Ok(Key {
        id: None,
        family,
        key,
    })
}

fn jwks_keys(path: &Path) -> Result<Vec<Key>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("jwks_file: cannot read {}: {e}", path.display()))?;
    parse_jwks(text.as_bytes()).map_err(|e| format!("jwks_file {}: {e}", path.display()))
}

/// The keys of a JWK set (at most [`MAX_JWKS_KEYS`]).
pub fn parse_jwks(text: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet = serde_json::from_slice(text).map_err(|e| format!("not a JWK set: {e}"))?;
    if set.keys.len() > MAX_JWKS_KEYS {
        return Err(format!("more than {MAX_JWKS_KEYS} keys"));
    }
    set.keys
        .iter()
        .map(|jwk| {
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                AlgorithmParameters::OctetKeyPair(_) => Family::Ed,
                AlgorithmParameters::OctetKey(_) => Family::Hmac,
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
            Ok(Key {
                id: jwk.common.key_id.clone(),
                family,
                key,
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "jwt_tests.rs"]
mod tests;
