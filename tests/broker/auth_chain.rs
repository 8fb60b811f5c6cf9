//! EMQX's authentication chain through a whole broker: a JWT source whose `acl` claim goes
//! before the ACL file, and an HTTP service (a local one here) whose answers become CONNACK
//! codes; what no source accepts is refused. (`tests/interop/test_auth_backends.py` does the
//! same with paho-mqtt and PyJWT.)

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use petrel::codec::{ProtocolVersion, QoS, ReasonCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{connect_packet, publish_struct, unique, will, RawClient, TestBroker};

const SECRET: &str = "an-integration-test-secret-of-32b";

/// An HTTP authentication service: one request per connection, answered by the username
/// in the JSON body.
async fn http_service() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                // Bounded: a request is small; stop at its body's closing brace.
                while request.len() < 64 * 1024 && !request.ends_with(b"}") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&request);
                let body = if request.contains(r#""username":"eve""#) {
                    r#"{"result": "deny"}"#
                } else if request.contains(r#""username":"root""#) {
                    r#"{"result": "allow", "is_superuser": true}"#
                } else {
                    r#"{"result": "ignore"}"#
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

fn token(client_id: &str, acl: serde_json::Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    encode(
        &Header::default(),
        &json!({"clientid": client_id, "exp": now + 300, "acl": acl}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn login(client_id: &str, username: &str, password: &str) -> petrel::codec::Connect {
    let mut connect = connect_packet(ProtocolVersion::V5, client_id);
    connect.username = Some(username.to_owned());
    connect.password = Some(bytes::Bytes::copy_from_slice(password.as_bytes()));
    connect
}

#[tokio::test]
async fn auth_chain_jwt_acl_claim_and_http_answers() {
    let dir = std::env::temp_dir().join(unique("petrel-auth-chain"));
    std::fs::create_dir_all(&dir).unwrap();
    let acl_file = dir.join("acl");
    std::fs::write(
        &acl_file,
        "user car\ntopic read acl/#\npattern write acl/devices/%c\n",
    )
    .unwrap();
    let http = http_service().await;
    let auth: petrel::auth::AuthSettings = toml::from_str(&format!(
        r#"
        acl_file = "{}"
        [[authentication]]
        mechanism = "jwt"
        secret = "{SECRET}"
        verify_claims = {{ clientid = "${{clientid}}" }}
        [[authentication]]
        mechanism = "password_based"
        backend = "http"
        url = "http://{http}/auth"
        "#,
        acl_file.display()
    ))
    .unwrap();
    let broker = TestBroker::start_with(|c| c.auth = auth).await;

    // The claim's list form first, then the ACL file for what it does not match.
    let id = unique("car");
    let claim = json!([
        {"permission": "deny", "action": "subscribe", "topic": "acl/secret"},
        {"permission": "allow", "action": "publish", "topic": "jwt/${clientid}"},
    ]);
    let (mut car, _) =
        RawClient::connect_ok(broker.addr, login(&id, "car", &token(&id, claim))).await;
    let codes = car
        .subscribe_codes(1, &["acl/secret", "acl/#", "other/#"], QoS::AtLeastOnce)
        .await;
    assert_eq!(
        codes,
        [
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED
        ]
    );
    for (topic, expected) in [
        (format!("jwt/{id}"), ReasonCode::SUCCESS),
        (format!("acl/devices/{id}"), ReasonCode::SUCCESS),
        ("jwt/someone-else".to_owned(), ReasonCode::NOT_AUTHORIZED),
    ] {
        let (code, _) = car
            .publish_ack(publish_struct(&topic, QoS::AtLeastOnce, Some(5), b"x"))
            .await;
        assert_eq!(code, expected, "{topic}");
    }
    car.disconnect().await;

    // The object form denies what it does not list, the will's topic included.
    let id = unique("car");
    let mut connect = login(&id, "car", &token(&id, json!({"pub": ["jwt/up"]})));
    connect.will = Some(will("acl/devices/x", b"gone", QoS::AtMostOnce));
    let (_, connack) = RawClient::connect_with(broker.addr, connect).await;
    assert_eq!(connack.code, ReasonCode::NOT_AUTHORIZED);

    // The HTTP service: deny is 0x87, a superuser skips every topic check, ignore leaves no
    // source: 0x86. A token for another client id fails verify_claims: 0x86.
    let (_, connack) = RawClient::connect_with(broker.addr, login(&unique("e"), "eve", "pw")).await;
    assert_eq!(connack.code, ReasonCode::NOT_AUTHORIZED);
    let (mut root, _) = RawClient::connect_ok(broker.addr, login(&unique("r"), "root", "pw")).await;
    let codes = root.subscribe_codes(1, &["#"], QoS::AtMostOnce).await;
    assert_eq!(codes, [ReasonCode::GRANTED_QOS_0]);
    root.disconnect().await;
    let (_, connack) = RawClient::connect_with(broker.addr, login(&unique("z"), "zed", "pw")).await;
    assert_eq!(connack.code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    let stolen = token("another-car", json!(null));
    let (_, connack) =
        RawClient::connect_with(broker.addr, login(&unique("c"), "car", &stolen)).await;
    assert_eq!(connack.code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);

    let failures = broker
        .running
        .broker
        .metrics
        .auth_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(failures, 4);
    broker.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
