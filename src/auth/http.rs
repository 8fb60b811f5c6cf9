//! The HTTP authentication backend in EMQX 5's shape (`mechanism = "password_based"`,
//! `backend = "http"`): how fleets plug in their own identity service.
//!
//! Each CONNECT becomes one request to `url` (`method = "post"`: `body` as JSON, or as a
//! form when `headers` say `application/x-www-form-urlencoded`; `"get"`: `body` as query
//! parameters), with EMQX's placeholders `${clientid}`, `${username}`, `${password}`,
//! `${peerhost}`, `${listener}` filled in (URL-encoded in the URL). The answer:
//! HTTP 200 with `{"result": "allow" | "deny" | "ignore", "is_superuser": bool, "acl": ...}`
//! (`acl` in EMQX's shapes, see `client_acl`), or 204 for allow. Any other status, a body
//! that is not such JSON, a connection failure or `request_timeout` passing means ignore (the
//! next source decides), as in EMQX, and is logged: at warn when the service starts failing
//! (at most once a minute, so that clients whose requests fail cannot raise the warn rate),
//! otherwise at debug; at info when it answers again.
//!
//! At most `pool_size` requests are in flight (others wait, within their timeout) over kept-
//! alive connections (hyper's pooled client). Allow and deny answers are cached for
//! `cache_ttl` (`cache_max_count` entries), keyed by an HMAC with a per-process random key of
//! the client id, username, password, peer address and listener: the cache never holds a
//! password, nor a hash that could be tested offline. `https://` URLs are verified against the
//! system's trust store or `ssl.cacertfile` (`http_connect`). This is the one source with
//! sockets and tasks (hyper's connection tasks); the broker never blocks a runtime thread on it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ring::hmac;
use serde::Deserialize;
use serde_json::Value;

use super::chain::{render_with, Grant, Verdict};
use super::client_acl::ClientAcl;
use super::http_connect::Connector;
use super::{Credentials, Refusal};

/// The largest response body read.
const MAX_RESPONSE: usize = 64 * 1024;
const FORM: &str = "application/x-www-form-urlencoded";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Post,
    Get,
}

/// One `backend = "http"` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub method: Method,
    pub url: String,
    pub headers: BTreeMap<String, String>,
    /// Field → template.
    pub body: BTreeMap<String, String>,
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    pub pool_size: usize,
    /// 0 turns the cache off.
    pub cache_ttl: Duration,
    pub cache_max_count: usize,
    /// EMQX's `ssl.cacertfile`: the CA of an `https://` service (default: the system's).
    pub cacertfile: Option<PathBuf>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        let body = [
            ("clientid", "${clientid}"),
            ("username", "${username}"),
            ("password", "${password}"),
            ("peerhost", "${peerhost}"),
        ];
        Self {
            method: Method::Post,
            url: String::new(),
            headers: BTreeMap::new(),
            body: body
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            pool_size: 8,
            cache_ttl: Duration::from_secs(60),
            cache_max_count: 10_000,
            cacertfile: None,
        }
    }
}

impl HttpSettings {
    pub fn validate(&self) -> Result<(), String> {
        let probe = self.url.replace("${", "x").replace('}', "x");
        let url = url::Url::parse(&probe).map_err(|e| format!("url = {:?}: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url = {:?}: must be http:// or https://", self.url));
        }
        if self.cacertfile.is_some() && url.scheme() != "https" {
            return Err("ssl.cacertfile goes with an https:// url".into());
        }
        for (name, value) in &self.headers {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers: `{name}` is not a header name"))?;
            HeaderValue::from_str(value)
                .map_err(|_| format!("headers: the value of `{name}` is not a header value"))?;
        }
        if !(1..=1024).contains(&self.pool_size) {
            return Err("pool_size must be 1 to 1024".into());
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err("request_timeout and connect_timeout must be above 0".into());
        }
        if self.cache_max_count > 1_000_000 {
            return Err("cache_max_count must be at most 1,000,000".into());
        }
        Ok(())
    }

    fn form(&self) -> bool {
        self.headers.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case("content-type") && value.starts_with(FORM)
        })
    }
}

/// The HTTP source: a pooled client, a bound on requests in flight, the result cache.
pub struct HttpAuth {
    settings: HttpSettings,
    client: Client<Connector, Full<Bytes>>,
    slots: tokio::sync::Semaphore,
    cache: Mutex<Cache>,
    /// Set while the service fails (for the log).
    failing: AtomicBool,
    /// When the last warning was logged (milliseconds since `created`, 0: never).
    warned_at: AtomicU64,
    created: Instant,
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAuth")
            .field("url", &self.settings.url)
            .finish()
    }
}

impl HttpAuth {
    pub fn new(settings: &HttpSettings) -> Result<Self, String> {
        settings.validate()?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        let connector = Connector::new(
            connector,
            settings.url.starts_with("https:"),
            settings.cacertfile.as_deref(),
        )?;
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(settings.pool_size)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Self {
            client,
            slots: tokio::sync::Semaphore::new(settings.pool_size),
            cache: Mutex::new(Cache::new(settings.cache_max_count)),
            failing: AtomicBool::new(false),
            warned_at: AtomicU64::new(0),
            created: Instant::now(),
            settings: settings.clone(),
        })
    }

    pub fn describe(&self) -> String {
        let method = match self.settings.method {
            Method::Post => "POST",
            Method::Get => "GET",
        };
        format!("http ({method} {})", self.settings.url)
    }

    pub async fn decide(&self, credentials: &Credentials<'_>) -> Verdict {
        self.decide_at(credentials, Instant::now()).await
    }

    async fn decide_at(&self, credentials: &Credentials<'_>, now: Instant) -> Verdict {
        let ttl = self.settings.cache_ttl;
        let key = if ttl.is_zero() {
            None
        } else {
            let mut cache = self.lock();
            let key = cache.key(credentials);
            if let Some(verdict) = cache.get(&key, now) {
                return verdict;
            }
            Some(key)
        };
        let verdict = match self.ask(credentials).await {
            Ok(verdict) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(url = %self.settings.url, "the HTTP authentication service answers again");
                }
                verdict
            }
            Err(why) => {
                let started = !self.failing.swap(true, Ordering::Relaxed);
                if started && self.may_warn(now) {
                    tracing::warn!(url = %self.settings.url, "HTTP authentication: {why}; clients pass on to the next source until it answers (request_timeout, url)");
                } else {
                    tracing::debug!(url = %self.settings.url, "HTTP authentication: {why}; passing on");
                }
                return Verdict::Ignore;
            }
        };
        if let (Some(key), Verdict::Allow(_) | Verdict::Deny(_)) = (key, &verdict) {
            self.lock().insert(key, verdict.clone(), now, ttl);
        }
        verdict
    }

    /// At most one warning a minute.
    fn may_warn(&self, now: Instant) -> bool {
        let at = now.saturating_duration_since(self.created).as_millis() as u64 + 1;
        let last = self.warned_at.load(Ordering::Relaxed);
        (last == 0 || at >= last + 60_000)
            && self
                .warned_at
                .compare_exchange(last, at, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One request; `Err` says why there is no answer (the caller ignores).
    async fn ask(&self, credentials: &Credentials<'_>) -> Result<Verdict, String> {
        let request = self.request(credentials)?;
        let timeout = self.settings.request_timeout;
        let answer = tokio::time::timeout(timeout, async {
            let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("reading the response: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        })
        .await
        .map_err(|_| format!("no answer within request_timeout ({timeout:?})"))??;
        match answer {
            (StatusCode::NO_CONTENT, _) => Ok(Verdict::Allow(Grant::default())),
            (StatusCode::OK, body) => parse_answer(&body, credentials),
            (status, _) => Err(format!("HTTP status {status}")),
        }
    }

    fn request(&self, credentials: &Credentials<'_>) -> Result<Request<Full<Bytes>>, String> {
        let s = &self.settings;
        let encode = |value: &str, out: &mut String| {
            out.extend(url::form_urlencoded::byte_serialize(value.as_bytes()));
        };
        let mut url = render_with(&s.url, credentials, &encode);
        let fields = s.body.iter().map(|(k, v)| {
            (
                k.as_str(),
                render_with(v, credentials, &|v, out| out.push_str(v)),
            )
        });
        let form = || {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in fields.clone() {
                form.append_pair(k, &v);
            }
            form.finish()
        };
        let mut builder = Request::builder();
        let body = match s.method {
            Method::Get => {
                if !s.body.is_empty() {
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str(&form());
                }
                builder = builder.method(hyper::Method::GET);
                Bytes::new()
            }
            Method::Post if s.form() => {
                builder = builder.method(hyper::Method::POST);
                Bytes::from(form())
            }
            Method::Post => {
                builder = builder.method(hyper::Method::POST);
                if !s
                    .headers
                    .keys()
                    .any(|k| k.eq_ignore_ascii_case("content-type"))
                {
                    builder = builder.header(CONTENT_TYPE, "application/json");
                }
                let map: serde_json::Map<String, Value> = fields
                    .map(|(k, v)| (k.to_owned(), Value::String(v)))
                    .collect();
                Bytes::from(Value::Object(map).to_string())
            }
        };
        let uri: Uri = url.parse().map_err(|e| format!("the rendered url: {e}"))?;
        builder = builder.uri(uri);
        if !s.headers.keys().any(|k| k.eq_ignore_ascii_case("accept")) {
            builder = builder.header(hyper::header::ACCEPT, "application/json");
        }
        for (name, value) in &s.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder
            .body(Full::new(body))
            .map_err(|e| format!("building the request: {e}"))
    }
}

/// Reads a 200 answer's JSON.
fn parse_answer(body: &[u8], credentials: &Credentials<'_>) -> Result<Verdict, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|_| "HTTP 200 without a JSON body".to_owned())?;
    match value.get("result").and_then(Value::as_str) {
        Some("allow") => {
            let acl = match value.get("acl") {
                None | Some(Value::Null) => None,
                Some(acl) => Some(Arc::new(
                    ClientAcl::parse(acl, credentials.client_id, credentials.username)
                        .map_err(|e| format!("the answer's `acl`: {e}"))?,
                )),
            };
            let superuser = value.get("is_superuser").and_then(Value::as_bool) == Some(true);
            Ok(Verdict::Allow(Grant { superuser, acl }))
        }
        Some("deny") => Ok(Verdict::Deny(Refusal::NotAuthorized)),
        Some("ignore") => Ok(Verdict::Ignore),
        _ => Err("HTTP 200 whose `result` is not \"allow\", \"deny\" or \"ignore\"".into()),
    }
}

/// Recent answers by keyed hash of the credentials; bounded in count.
struct Cache {
    key: hmac::Key,
    entries: HashMap<[u8; 32], (Instant, Verdict)>,
    max: usize,
}

impl Cache {
    fn new(max: usize) -> Self {
        let rng = ring::rand::SystemRandom::new();
        Self {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)
                .expect("the system's random source works"),
            entries: HashMap::new(),
            max,
        }
    }

    fn key(&self, credentials: &Credentials<'_>) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        let peer = credentials.peer.ip().to_string();
        let username = credentials.username.map(str::as_bytes);
        let fields: [Option<&[u8]>; 5] = [
            Some(credentials.client_id.as_bytes()),
            username,
            credentials.password,
            Some(peer.as_bytes()),
            Some(credentials.listener.as_bytes()),
        ];
        for field in fields {
            // Length-prefixed (absent apart from empty), so no two inputs hash alike.
            match field {
                None => ctx.update(&[0]),
                Some(bytes) => {
                    ctx.update(&[1]);
                    ctx.update(&(bytes.len() as u64).to_be_bytes());
                    ctx.update(bytes);
                }
            }
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<Verdict> {
        match self.entries.get(key) {
            Some((expires, verdict)) if now < *expires => Some(verdict.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: [u8; 32], verdict: Verdict, now: Instant, ttl: Duration) {
        if self.max == 0 {
            return;
        }
        if self.entries.len() >= self.max {
            // Expired entries go first; if most are still live, all go (each insert then
            // costs O(1) amortised, and the bound holds).
            self.entries.retain(|_, (expires, _)| *expires > now);
            if self.entries.len() >= self.max * 3 / 4 {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (now + ttl, verdict));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
