use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::core::access::Access;

/// A tiny HTTP/1.1 service: answers each request with `respond(request text)` (status,
/// body, delay) and keeps every request's text.
struct Service {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

type Respond = fn(&str) -> (u16, &'static str, Duration);

async fn service(respond: Respond) -> Service {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // One request after another on a kept-alive connection, until it closes.
                loop {
                    let (head_end, length) = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            break (end + 4, length);
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    while buf.len() < head_end + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let request = String::from_utf8_lossy(&buf[..head_end + length]).into_owned();
                    buf.drain(..head_end + length);
                    let (status, body, delay) = respond(&request);
                    seen.lock().unwrap().push(request);
                    tokio::time::sleep(delay).await;
                    let response = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Service { addr, requests }
}

/// Answers by the username the request carries.
fn by_username(request: &str) -> (u16, &'static str, Duration) {
    let has = |name: &str| {
        request.contains(&format!("\"username\":\"{name}\""))
            || request.contains(&format!("username={name}&"))
            || request.contains(&format!("username={name} "))
    };
    let no_delay = Duration::ZERO;
    if has("alice") {
        (
            200,
            r#"{"result": "allow", "is_superuser": false}"#,
            no_delay,
        )
    } else if has("root") {
        (
            200,
            r#"{"result": "allow", "is_superuser": true}"#,
            no_delay,
        )
    } else if has("limited") {
        (
            200,
            r#"{"result": "allow", "acl": [{"permission": "allow", "action": "publish", "topic": "t/${clientid}"}]}"#,
            no_delay,
        )
    } else if has("eve") {
        (200, r#"{"result": "deny"}"#, no_delay)
    } else if has("nobody") {
        (200, r#"{"result": "ignore"}"#, no_delay)
    } else if has("quiet") {
        (204, "", no_delay)
    } else if has("broken") {
        (500, "oops", no_delay)
    } else if has("html") {
        (200, "<html></html>", no_delay)
    } else if has("slow") {
        (200, r#"{"result": "allow"}"#, Duration::from_secs(5))
    } else {
        (404, "", no_delay)
    }
}

fn settings(addr: SocketAddr) -> HttpSettings {
    HttpSettings {
        url: format!("http://{addr}/auth"),
        request_timeout: Duration::from_millis(500),
        ..HttpSettings::default()
    }
}

fn creds<'a>(username: &'a str, password: &'a [u8]) -> Credentials<'a> {
    Credentials {
        client_id: "car1",
        username: Some(username),
        password: Some(password),
        peer: "192.0.2.7:1234".parse().unwrap(),
        certified: false,
        listener: "tcp:default",
        now_unix: 1_700_000_000,
    }
}

#[tokio::test]
async fn the_service_allows_denies_or_passes_on() {
    let service = service(by_username).await;
    let mut s = settings(service.addr);
    s.cache_ttl = Duration::ZERO;
    let http = HttpAuth::new(&s).unwrap();
    let allowed = Verdict::Allow(Grant::default());
    assert_eq!(http.decide(&creds("alice", b"pw")).await, allowed);
    assert_eq!(http.decide(&creds("quiet", b"pw")).await, allowed);
    assert_eq!(
        http.decide(&creds("root", b"pw")).await,
        Verdict::Allow(Grant {
            superuser: true,
            acl: None
        })
    );
    assert_eq!(
        http.decide(&creds("eve", b"pw")).await,
        Verdict::Deny(Refusal::NotAuthorized)
    );
    for ignored in ["nobody", "broken", "html", "unknown", "slow"] {
        assert_eq!(
            http.decide(&creds(ignored, b"pw")).await,
            Verdict::Ignore,
            "{ignored}"
        );
    }
    let Verdict::Allow(grant) = http.decide(&creds("limited", b"pw")).await else {
        panic!("allowed");
    };
    let acl = grant.acl.expect("the answer's rules");
    assert_eq!(acl.decide(Access::Publish, "t/car1"), Some(true));
    assert_eq!(acl.decide(Access::Publish, "t/car2"), None);
}

#[tokio::test]
async fn the_body_carries_emqx_placeholders() {
    let service = service(by_username).await;
    let mut s = settings(service.addr);
    s.body.insert("listener".into(), "${listener}".into());
    s.headers.insert("x-api-key".into(), "k1".into());
    let http = HttpAuth::new(&s).unwrap();
    http.decide(&creds("alice", b"s3cret\"")).await;
    let requests = service.requests.lock().unwrap();
    let request = &requests[0];
    assert!(request.starts_with("POST /auth HTTP/1.1\r\n"), "{request}");
    assert!(
        request.contains("content-type: application/json"),
        "{request}"
    );
    assert!(request.contains("x-api-key: k1"), "{request}");
    let body: Value = serde_json::from_str(request.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "clientid": "car1", "username": "alice", "password": "s3cret\"",
            "peerhost": "192.0.2.7", "listener": "tcp:default"
        })
    );
}

#[tokio::test]
async fn get_sends_the_body_as_query_parameters() {
    let service = service(by_username).await;
    let mut s = settings(service.addr);
    s.method = Method::Get;
    s.url = format!("http://{}/auth?c=${{clientid}}", service.addr);
    let http = HttpAuth::new(&s).unwrap();
    assert_eq!(
        http.decide(&creds("alice", b"a b&c")).await,
        Verdict::Allow(Grant::default())
    );
    let requests = service.requests.lock().unwrap();
    let line = requests[0].lines().next().unwrap().to_owned();
    assert!(line.starts_with("GET /auth?c=car1&"), "{line}");
    assert!(line.contains("password=a+b%26c"), "{line}");
    assert!(line.contains("username=alice"), "{line}");
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl_by_credentials() {
    let service = service(by_username).await;
    let http = HttpAuth::new(&settings(service.addr)).unwrap();
    let now = Instant::now();
    let count = || service.requests.lock().unwrap().len();
    for _ in 0..3 {
        http.decide_at(&creds("alice", b"pw"), now).await;
        http.decide_at(&creds("eve", b"pw"), now).await;
    }
    assert_eq!(count(), 2);
    // Another password, another entry; errors are never cached.
    http.decide_at(&creds("alice", b"other"), now).await;
    http.decide_at(&creds("broken", b"pw"), now).await;
    http.decide_at(&creds("broken", b"pw"), now).await;
    assert_eq!(count(), 5);
    // Past the TTL the service is asked again.
    let later = now + HttpSettings::default().cache_ttl;
    http.decide_at(&creds("alice", b"pw"), later).await;
    assert_eq!(count(), 6);
}

#[test]
fn the_cache_stays_within_its_bound() {
    let mut cache = Cache::new(4);
    let now = Instant::now();
    let creds_of = |i: u8| [i];
    for i in 0..50u8 {
        let password = creds_of(i);
        let key = cache.key(&creds("u", &password));
        cache.insert(key, Verdict::Ignore, now, Duration::from_secs(60));
        assert!(cache.len() <= 4);
    }
    // Keys differ by every field, and never contain the password.
    let a = cache.key(&creds("u", b"p"));
    assert_ne!(a, cache.key(&creds("u", b"q")));
    assert_ne!(a, cache.key(&creds("v", b"p")));
    let mut other_peer = creds("u", b"p");
    other_peer.peer = "192.0.2.8:1".parse().unwrap();
    assert_ne!(a, cache.key(&other_peer));
}

#[tokio::test]
async fn an_unreachable_service_is_passed_on() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let http = HttpAuth::new(&settings(addr)).unwrap();
    assert_eq!(http.decide(&creds("alice", b"pw")).await, Verdict::Ignore);
}

#[test]
fn settings_are_checked() {
    let ok = settings("127.0.0.1:1".parse().unwrap());
    assert!(ok.validate().is_ok());
    for (bad, needle) in [
        (
            HttpSettings {
                url: "ftp://auth.example/x".into(),
                ..ok.clone()
            },
            "must be http:// or https://",
        ),
        (
            HttpSettings {
                cacertfile: Some("/ca.pem".into()),
                ..ok.clone()
            },
            "ssl.cacertfile",
        ),
        (
            HttpSettings {
                url: "not a url".into(),
                ..ok.clone()
            },
            "url",
        ),
        (
            HttpSettings {
                pool_size: 0,
                ..ok.clone()
            },
            "pool_size",
        ),
        (
            HttpSettings {
                headers: [("bad header".to_owned(), "v".to_owned())].into(),
                ..ok.clone()
            },
            "headers",
        ),
    ] {
        let err = bad.validate().unwrap_err();
        assert!(err.contains(needle), "{err}");
    }
}

#[tokio::test]
async fn https_services_are_verified_against_the_ca() {
    use crate::transport::certs::{load_certs, load_key, Authority};
    let dir = std::env::temp_dir().join(format!("petrel-https-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Authority::generate("petrel test CA").unwrap();
    let leaf = ca.server(&["127.0.0.1".to_owned()]).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca_path = write("ca.pem", &ca.pem().cert);
    let cert = load_certs(&write("cert.pem", &leaf.cert)).unwrap();
    let key = load_key(&write("key.pem", &leaf.key)).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(crate::transport::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                while request.len() < 64 * 1024 && !request.ends_with(b"}") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = r#"{"result": "allow"}"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    let mut s = settings(addr);
    s.url = format!("https://{addr}/auth");
    s.cache_ttl = Duration::ZERO;
    s.cacertfile = Some(ca_path);
    let http = HttpAuth::new(&s).unwrap();
    assert_eq!(
        http.decide(&creds("alice", b"pw")).await,
        Verdict::Allow(Grant::default())
    );
    // The system's trust store does not know our CA: no answer, passed on.
    s.cacertfile = None;
    if let Ok(untrusting) = HttpAuth::new(&s) {
        assert_eq!(
            untrusting.decide(&creds("alice", b"pw")).await,
            Verdict::Ignore
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
