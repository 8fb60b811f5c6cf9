//! EMQX's authentication chain: `[[auth.authentication]]` entries tried in order, after the
//! Mosquitto `password_file` when one is set. Each source answers allow, deny or ignore (pass
//! on to the next); what happens when all of them pass is `AuthService`'s anonymous policy.
//!
//! ```toml
//! [[auth.authentication]]
//! mechanism = "jwt"
//! secret = "..."
//!
//! [[auth.authentication]]
//! mechanism = "password_based"
//! backend = "http"
//! url = "http://127.0.0.1:8080/auth"
//! ```
//!
//! This module parses the entries into typed settings (an error names the entry and the
//! setting) and runs the chain; the sources themselves live in `password_source` (below),
//! `jwt` and `http`.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::cache::VerifiedCache;
use super::client_acl::ClientAcl;
use super::http::{HttpAuth, HttpSettings, Method};
use super::jwt::{Jwt, JwtSettings, KeyKind, KeySource, TokenField};
use super::password::PasswordFile;
use super::{Credentials, Refusal};

/// What an accepted client may do beyond the broker's own rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// EMQX's `is_superuser`: no topic is checked for this connection.
    pub superuser: bool,
    /// Rules the source handed out, checked before the ACL file.
    pub acl: Option<Arc<ClientAcl>>,
}

/// One source's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow(Grant),
    Deny(Refusal),
    /// Not this source's client: ask the next one.
    Ignore,
}

/// One `[[auth.authentication]]` entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawEntry")]
pub struct SourceSettings {
    /// `enable = false` keeps the entry in the file and out of the chain.
    pub enable: bool,
    pub kind: SourceKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// `mechanism = "password_based"`, `backend = "built_in_database"`: a password file in
    /// Mosquitto's format (our built-in database).
    PasswordFile(PathBuf),
    Jwt(JwtSettings),
    Http(HttpSettings),
}

/// Every setting any entry may have; `SourceSettings::try_from` keeps those of its kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    mechanism: String,
    backend: Option<String>,
    enable: Option<bool>,
    // built_in_database
    password_file: Option<PathBuf>,
    // jwt
    algorithm: Option<KeyKind>,
    secret: Option<String>,
    secret_base64_encoded: Option<bool>,
    public_key: Option<String>,
    jwks_file: Option<PathBuf>,
    use_jwks: Option<bool>,
    endpoint: Option<String>,
    refresh_interval: Option<u64>,
    from: Option<TokenField>,
    verify_claims: Option<BTreeMap<String, String>>,
    acl_claim_name: Option<String>,
    // http
    method: Option<Method>,
    url: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    body: Option<BTreeMap<String, String>>,
    request_timeout: Option<String>,
    connect_timeout: Option<String>,
    pool_size: Option<usize>,
    cache_ttl: Option<String>,
    cache_max_count: Option<usize>,
    ssl: Option<RawSsl>,
}

/// EMQX's `ssl` block of the HTTP backend (the part that applies to a client).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsl {
    enable: Option<bool>,
    cacertfile: Option<PathBuf>,
    verify: Option<String>,
}

impl TryFrom<RawEntry> for SourceSettings {
    type Error = String;

    fn try_from(raw: RawEntry) -> Result<Self, String> {
        let kind = match (raw.mechanism.as_str(), raw.backend.as_deref()) {
            ("password_based", Some("built_in_database")) => {
                raw.only(&["password_file"], "built_in_database")?;
                SourceKind::PasswordFile(raw.password_file.clone().ok_or(
                    "backend = \"built_in_database\" needs password_file (Mosquitto's format)",
                )?)
            }
            ("password_based", Some("http")) => SourceKind::Http(raw.http()?),
            ("password_based", other) => {
                return Err(format!(
                    "mechanism = \"password_based\": backend must be \"built_in_database\" or \"http\", not {other:?}"
                ))
            }
            ("jwt", None) => SourceKind::Jwt(raw.jwt()?),
            ("jwt", Some(_)) => return Err("mechanism = \"jwt\" takes no backend".into()),
            (other, _) => {
                return Err(format!(
                    "mechanism must be \"password_based\" or \"jwt\", not {other:?} (SCRAM is set on [auth] itself)"
                ))
            }
        };
        Ok(Self {
            enable: raw.enable.unwrap_or(true),
            kind,
        })
    }
}

impl RawEntry {
    /// Fails when a setting of another kind of source is set.
    fn only(&self, allowed: &[&str], what: &str) -> Result<(), String> {
        let set: [(&str, bool); 22] = [
            ("password_file", self.password_file.is_some()),
            ("algorithm", self.algorithm.is_some()),
            ("secret", self.secret.is_some()),
            (
                "secret_base64_encoded",
                self.secret_base64_encoded.is_some(),
            ),
            ("public_key", self.public_key.is_some()),
            ("jwks_file", self.jwks_file.is_some()),
            ("use_jwks", self.use_jwks.is_some()),
            ("endpoint", self.endpoint.is_some()),
            ("refresh_interval", self.refresh_interval.is_some()),
            ("from", self.from.is_some()),
            ("verify_claims", self.verify_claims.is_some()),
            ("acl_claim_name", self.acl_claim_name.is_some()),
            ("method", self.method.is_some()),
            ("url", self.url.is_some()),
            ("headers", self.headers.is_some()),
            ("body", self.body.is_some()),
            ("request_timeout", self.request_timeout.is_some()),
            ("connect_timeout", self.connect_timeout.is_some()),
            ("pool_size", self.pool_size.is_some()),
            ("cache_ttl", self.cache_ttl.is_some()),
            ("cache_max_count", self.cache_max_count.is_some()),
            ("ssl", self.ssl.is_some()),
        ];
        match set.iter().find(|(name, on)| *on && !allowed.contains(name)) {
            Some((name, _)) => Err(format!("`{name}` is not a setting of {what}")),
            None => Ok(()),
        }
    }

    fn jwt(&self) -> Result<JwtSettings, String> {
        self.only(
            &[
                "algorithm",
                "secret",
                "secret_base64_encoded",
                "public_key",
                "jwks_file",
                "use_jwks",
                "endpoint",
                "refresh_interval",
                "ssl",
                "from",
                "verify_claims",
                "acl_claim_name",
            ],
            "mechanism = \"jwt\"",
        )?;
        let use_jwks = self.use_jwks == Some(true);
        if !use_jwks
            && (self.endpoint.is_some() || self.refresh_interval.is_some() || self.ssl.is_some())
        {
            return Err("endpoint, refresh_interval and ssl go with use_jwks = true".into());
        }
        let key = match (&self.secret, &self.public_key, &self.jwks_file, use_jwks) {
            (Some(secret), None, None, false) => KeySource::Secret {
                secret: secret.clone(),
                base64: self.secret_base64_encoded.unwrap_or(false),
            },
            (None, Some(pem), None, false) => KeySource::PublicKey(pem.clone()),
            (None, None, Some(path), _) if self.endpoint.is_none() => {
                KeySource::JwksFile(path.clone())
            }
            (None, None, None, true) => {
                let url = self
                    .endpoint
                    .clone()
                    .ok_or("use_jwks = true needs endpoint (or a local jwks_file)")?;
                let https = url.starts_with("https:");
                KeySource::JwksEndpoint(super::jwks::EndpointSettings {
                    url,
                    refresh_interval: Duration::from_secs(self.refresh_interval.unwrap_or(300))
                        .max(Duration::from_secs(1)),
                    cacertfile: self.cacertfile(https)?,
                })
            }
            _ => {
                return Err(
                    "mechanism = \"jwt\" needs exactly one of secret, public_key, jwks_file, use_jwks = true with endpoint".into(),
                )
            }
        };
        match (self.algorithm, &key) {
            (Some(KeyKind::Hmac), KeySource::Secret { .. })
            | (Some(KeyKind::PublicKey), KeySource::PublicKey(_) | KeySource::JwksFile(_))
            | (None, _) => {}
            (Some(KeyKind::Hmac), _) => {
                return Err("algorithm = \"hmac-based\" needs secret".into())
            }
            (Some(KeyKind::PublicKey), _) => {
                return Err("algorithm = \"public-key\" needs public_key or jwks_file".into())
            }
        }
        if self.secret_base64_encoded.is_some() && self.secret.is_none() {
            return Err("secret_base64_encoded goes with secret".into());
        }
        Ok(JwtSettings {
            key,
            from: self.from.unwrap_or_default(),
            verify_claims: self.verify_claims.clone().unwrap_or_default(),
            acl_claim_name: self.acl_claim_name.clone().unwrap_or_else(|| "acl".into()),
        })
    }

    /// EMQX's `ssl` block, for an `https://` service: its CA file.
    fn cacertfile(&self, https: bool) -> Result<Option<PathBuf>, String> {
        let Some(ssl) = &self.ssl else {
            return Ok(None);
        };
        if ssl.verify.as_deref().is_some_and(|v| v != "verify_peer") {
            return Err(
                "ssl.verify: only \"verify_peer\" (the service's certificate is always checked)"
                    .into(),
            );
        }
        if ssl.enable == Some(false) && https {
            return Err("ssl.enable = false with an https:// url".into());
        }
        Ok(ssl.cacertfile.clone())
    }

    fn http(&self) -> Result<HttpSettings, String> {
        self.only(
            &[
                "method",
                "url",
                "headers",
                "body",
                "request_timeout",
                "connect_timeout",
                "pool_size",
                "cache_ttl",
                "cache_max_count",
                "ssl",
            ],
            "backend = \"http\"",
        )?;
        let https = self.url.as_deref().is_some_and(|u| u.starts_with("https:"));
        let cacertfile = self.cacertfile(https)?;
        let duration = |name: &str, value: &Option<String>, default: Duration| match value {
            None => Ok(default),
            Some(text) => crate::duration::parse_duration(text)
                .map_err(|e| format!("{name} = {text:?}: {e} (e.g. \"5s\")")),
        };
        let defaults = HttpSettings::default();
        let settings = HttpSettings {
            method: self.method.unwrap_or(defaults.method),
            url: self.url.clone().ok_or("backend = \"http\" needs url")?,
            headers: self.headers.clone().unwrap_or(defaults.headers),
            body: self.body.clone().unwrap_or(defaults.body),
            request_timeout: duration(
                "request_timeout",
                &self.request_timeout,
                defaults.request_timeout,
            )?,
            connect_timeout: duration(
                "connect_timeout",
                &self.connect_timeout,
                defaults.connect_timeout,
            )?,
            pool_size: self.pool_size.unwrap_or(defaults.pool_size),
            cache_ttl: duration("cache_ttl", &self.cache_ttl, defaults.cache_ttl)?,
            cache_max_count: self.cache_max_count.unwrap_or(defaults.cache_max_count),
            cacertfile,
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// A password file as a source: a known user with the right password is allowed, with a
/// wrong one denied; an unknown user (or no username) is passed on. Unknown users still cost
/// a decoy hash, so the time taken does not say whether a user exists.
#[derive(Debug)]
pub struct PasswordSource {
    file: PasswordFile,
    users: HashSet<String>,
    /// Passwords verified lately (`[auth] cache_ttl`); a reload starts a new one.
    cache: VerifiedCache,
}

impl PasswordSource {
    /// Reads the file; verified passwords are remembered for `cache_ttl` (`cache_max_size`
    /// users).
    pub fn load(path: &Path, cache_ttl: Duration, cache_max_size: usize) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let file =
            PasswordFile::parse(&text).map_err(|err| format!("{}: {err}", path.display()))?;
        // The names as `PasswordFile::parse` reads them.
        let users = text
            .lines()
            .map(|line| line.trim_end_matches('\r'))
            .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
            .filter_map(|line| line.split_once(':').map(|(user, _)| user.to_owned()))
            .collect();
        Ok(Self {
            file,
            users,
            cache: VerifiedCache::new(cache_ttl, cache_max_size),
        })
    }

    /// SCRAM-SHA-256 keys for `user` (see `PasswordFile::scram_keys`).
    pub fn scram_keys(&self, user: &str) -> (super::scram::ScramKeys, bool) {
        self.file.scram_keys(user)
    }

    /// How many users the file has.
    pub fn users(&self) -> usize {
        self.file.len()
    }

    fn decide(&self, credentials: &Credentials<'_>, now: Instant) -> Verdict {
        let Some(username) = credentials.username else {
            return Verdict::Ignore;
        };
        let password = credentials.password.unwrap_or_default();
        // Only successes are cached: a wrong password always pays the full hash.
        if self.cache.hit(username, password, 0, now) {
            return Verdict::Allow(Grant::default());
        }
        if self.file.verify(username, password) {
            self.cache.remember(username, password, 0, now);
            Verdict::Allow(Grant::default())
        } else if self.users.contains(username) {
            Verdict::Deny(Refusal::BadCredentials)
        } else {
            Verdict::Ignore
        }
    }
}

/// A source in the chain.
#[derive(Debug)]
pub enum Source {
    PasswordFile(Box<PasswordSource>),
    Jwt(Box<Jwt>),
    /// Kept across reloads (its connections and cache are not files).
    Http(Arc<HttpAuth>),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Self::PasswordFile(file) => format!("password file with {} users", file.users()),
            Self::Jwt(jwt) => jwt.describe(),
            Self::Http(http) => http.describe(),
        }
    }

    pub async fn decide(&self, credentials: &Credentials<'_>) -> Verdict {
        match self {
            Self::PasswordFile(file) => file.decide(credentials, Instant::now()),
            Self::Jwt(jwt) => jwt.decide(credentials).await,
            Self::Http(http) => http.decide(credentials).await,
        }
    }
}

/// Runs the sources in order: the first that does not ignore decides, and `None` means all
/// passed (or there were none).
pub async fn run(
    sources: &[Source],
    credentials: &Credentials<'_>,
) -> Option<(usize, Result<Grant, Refusal>)> {
    for (i, source) in sources.iter().enumerate() {
        match source.decide(credentials).await {
            Verdict::Allow(grant) => return Some((i, Ok(grant))),
            Verdict::Deny(refusal) => return Some((i, Err(refusal))),
            Verdict::Ignore => {}
        }
    }
    None
}

/// `template` with EMQX's placeholders filled in, in one pass (a value is never read as a
/// placeholder): `${clientid}`, `${username}`, `${password}`, `${peerhost}`, `${listener}`;
/// missing values are empty, unknown placeholders stay as written.
pub fn render(template: &str, credentials: &Credentials<'_>) -> String {
    render_with(template, credentials, &|value, out| out.push_str(value))
}

/// [`render`], each value written by `put` (which may encode it).
pub fn render_with(
    template: &str,
    credentials: &Credentials<'_>,
    put: &dyn Fn(&str, &mut String),
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            rest = &rest[start..];
            break;
        };
        match &after[..end] {
            "clientid" => put(credentials.client_id, &mut out),
            "username" => put(credentials.username.unwrap_or(""), &mut out),
            "password" => put(
                &String::from_utf8_lossy(credentials.password.unwrap_or_default()),
                &mut out,
            ),
            "peerhost" => put(&credentials.peer.ip().to_string(), &mut out),
            "listener" => put(credentials.listener, &mut out),
            _ => out.push_str(&rest[start..start + 3 + end]),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}
