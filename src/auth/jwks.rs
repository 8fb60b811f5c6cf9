//! A JWKS endpoint (EMQX's `use_jwks = true`, `endpoint`, `refresh_interval`): the JWT
//! source's keys, fetched over HTTP(S) when a CONNECT needs them and they are older than
//! `refresh_interval`. One fetch at a time (other CONNECTs wait for it, within its timeout);
//! after a failed fetch the old keys stay in use and the next try waits [`RETRY`], so a
//! flood of CONNECTs never becomes a flood of requests. No task of its own.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::http_connect::Connector;
use super::jwt::{parse_jwks, Key};

/// The least time between two fetches.
pub const RETRY: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BODY: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSettings {
    pub url: String,
    /// EMQX's `refresh_interval` (default 300 s).
    pub refresh_interval: Duration,
    /// EMQX's `ssl.cacertfile`, for an `https://` endpoint.
    pub cacertfile: Option<PathBuf>,
}

pub struct Remote {
    url: Uri,
    refresh: Duration,
    client: Client<Connector, Full<Bytes>>,
    state: Mutex<State>,
    /// Held while one fetch runs.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Arc<Vec<Key>>,
    fetched: Option<Instant>,
    tried: Option<Instant>,
    failing: bool,
}

impl Remote {
    /// Checks the settings; nothing is fetched until a CONNECT needs the keys.
    pub fn new(settings: &EndpointSettings) -> Result<Self, String> {
        let url: Uri = settings
            .url
            .parse()
            .map_err(|e| format!("endpoint = {:?}: {e}", settings.url))?;
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "endpoint = {:?}: must be http:// or https://",
                    settings.url
                ))
            }
        };
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(FETCH_TIMEOUT));
        let connector = Connector::new(tcp, https, settings.cacertfile.as_deref())?;
        Ok(Self {
            url,
            refresh: settings.refresh_interval,
            client: Client::builder(TokioExecutor::new()).build(connector),
            state: Mutex::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys in force at `now`, fetched first if they are due.
    pub async fn keys(&self, now: Instant) -> Arc<Vec<Key>> {
        if let Some(keys) = self.current(now) {
            return keys;
        }
        let _one_at_a_time = self.fetching.lock().await;
        // Another connection may have fetched them meanwhile.
        if let Some(keys) = self.current(now) {
            return keys;
        }
        self.lock().tried = Some(now);
        let fetched = match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(fetched) => fetched,
            Err(_) => Err(format!("no answer within {FETCH_TIMEOUT:?}")),
        };
        let mut state = self.lock();
        match fetched {
            Ok(keys) => {
                tracing::info!(endpoint = %self.url, keys = keys.len(), "JWKS fetched");
                state.keys = Arc::new(keys);
                state.fetched = Some(now);
                state.failing = false;
            }
            Err(why) => {
                if std::mem::replace(&mut state.failing, true) {
                    tracing::debug!(endpoint = %self.url, "JWKS: {why}");
                } else {
                    tracing::warn!(endpoint = %self.url, keys = state.keys.len(), "JWKS: {why}; the keys fetched before stay in use (endpoint)");
                }
            }
        }
        Arc::clone(&state.keys)
    }

    /// The keys, unless they are due for a fetch.
    fn current(&self, now: Instant) -> Option<Arc<Vec<Key>>> {
        let state = self.lock();
        let fresh = state.fetched.is_some_and(|at| now < at + self.refresh);
        let waiting = state.tried.is_some_and(|at| now < at + RETRY);
        (fresh || waiting).then(|| Arc::clone(&state.keys))
    }

    async fn fetch(&self) -> Result<Vec<Key>, String> {
        let request = hyper::Request::get(self.url.clone())
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("HTTP status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        parse_jwks(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `body` for every request and counts them.
    async fn endpoint(body: String) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = body.clone();
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while request.len() < 16 * 1024 && !request.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (addr, count)
    }

    #[tokio::test]
    async fn keys_are_fetched_when_due_and_kept_on_failure() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "k1", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])},
        ]});
        let (addr, count) = endpoint(jwks.to_string()).await;
        let fetches = || count.load(std::sync::atomic::Ordering::SeqCst);
        let remote = Remote::new(&EndpointSettings {
            url: format!("http://{addr}/jwks"),
            refresh_interval: Duration::from_secs(300),
            cacertfile: None,
        })
        .unwrap();
        let now = Instant::now();
        assert_eq!(remote.keys(now).await.len(), 1);
        assert_eq!(remote.keys(now + Duration::from_secs(299)).await.len(), 1);
        assert_eq!(fetches(), 1);
        let later = now + Duration::from_secs(300);
        assert_eq!(remote.keys(later).await.len(), 1);
        assert_eq!(fetches(), 2);

        // An endpoint that fails: nothing to use, and no second request within RETRY.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = listener.local_addr().unwrap();
        drop(listener);
        let remote = Remote::new(&EndpointSettings {
            url: format!("http://{gone}/jwks"),
            refresh_interval: Duration::from_secs(300),
            cacertfile: None,
        })
        .unwrap();
        assert!(remote.keys(now).await.is_empty());
        assert!(remote
            .current(now + RETRY - Duration::from_secs(1))
            .is_some());
        assert!(remote.current(now + RETRY).is_none());
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        for bad in ["ftp://x/jwks", "not a url"] {
            let err = Remote::new(&EndpointSettings {
                url: bad.into(),
                refresh_interval: Duration::from_secs(1),
                cacertfile: None,
            })
            .err()
            .expect("refused");
            assert!(err.contains("endpoint"), "{err}");
        }
    }
}
