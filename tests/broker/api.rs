//! The HTTP API on a real HTTP client (ureq), in EMQX's shapes, against clients connected
//! with rumqttc and mosquitto_sub: listing, paging, kicking, publishing, retained and delayed
//! messages, bans, Prometheus, and the authentication every route but health and login needs.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::process::Command;

use crate::common::{unique, TestBroker, TEST_ADMIN_PASSWORD, V4};

/// An answer: status and body (JSON when it parses, else a string).
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
}

#[derive(Clone)]
enum Auth {
    None,
    Bearer(String),
    Basic(String, String),
}

async fn http(
    api: SocketAddr,
    method: &str,
    path: &str,
    auth: &Auth,
    body: Option<Value>,
) -> Answer {
    let url = format!("http://{api}{path}");
    let method = method.to_owned();
    let auth = auth.clone();
    tokio::task::spawn_blocking(move || {
        let mut request = ureq::request(&method, &url).timeout(Duration::from_secs(10));
        match auth {
            Auth::None => {}
            Auth::Bearer(token) => {
                request = request.set("Authorization", &format!("Bearer {token}"))
            }
            Auth::Basic(user, secret) => {
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{secret}"));
                request = request.set("Authorization", &format!("Basic {encoded}"));
            }
        }
        let result = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(err) => panic!("{method} {url}: {err}"),
        };
        let status = response.status();
        let text = response.into_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, body }
    })
    .await
    .unwrap()
}

/// `POST /api/v5/publish` with `body`.
async fn api_publish(api: SocketAddr, auth: &Auth, body: Value) -> Answer {
    http(api, "POST", "/api/v5/publish", auth, Some(body)).await
}

/// Only the status of a request without a body.
async fn status_of(api: SocketAddr, method: &str, path: &str, auth: &Auth) -> u16 {
    http(api, method, path, auth, None).await.status
}

async fn login(api: SocketAddr) -> Auth {
    let answer = http(
        api,
        "POST",
        "/api/v5/login",
        &Auth::None,
        Some(json!({"username": "admin", "password": TEST_ADMIN_PASSWORD})),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["license"]["edition"], "opensource");
    Auth::Bearer(answer.body["token"].as_str().unwrap().to_owned())
}

/// Polls `path` until `done` holds (bounded).
async fn until(api: SocketAddr, auth: &Auth, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..100 {
        let answer = http(api, "GET", path, auth, None).await;
        if answer.status == 200 && done(&answer.body) {
            return answer.body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{path} never satisfied the condition");
}

/// The fields of a client in EMQX's documented `GET /api/v5/clients/{clientid}` example that
/// Petrel answers with the same meaning.
const EMQX_CLIENT_FIELDS: &[&str] = &[
    "clientid",
    "username",
    "ip_address",
    "port",
    "connected",
    "connected_at",
    "created_at",
    "proto_name",
    "proto_ver",
    "keepalive",
    "clean_start",
    "expiry_interval",
    "subscriptions_cnt",
    "inflight_cnt",
    "mqueue_len",
    "mqueue_dropped",
    "recv_msg",
    "send_msg",
    "node",
];

#[tokio::test]
async fn api_needs_credentials_except_for_health_and_login() {
    let broker = TestBroker::start().await;
    let api = broker.running.api_addr().unwrap();
    let status = http(api, "GET", "/api/v5/status", &Auth::None, None).await;
    assert_eq!(status.status, 200);
    assert!(
        status
            .body
            .as_str()
            .unwrap()
            .ends_with("is started\npetrel is running"),
        "{status:?}"
    );
    for path in ["/api/v5/clients", "/api/v5/stats", "/api/v5/banned"] {
        let answer = http(api, "GET", path, &Auth::None, None).await;
        assert_eq!(answer.status, 401, "{path}");
        assert_eq!(answer.body["code"], "BAD_API_KEY_OR_SECRET", "{path}");
        let answer = http(
            api,
            "GET",
            path,
            &Auth::Basic("admin".into(), "wrong".into()),
            None,
        )
        .await;
        assert_eq!(answer.status, 401, "{path}");
        let answer = http(api, "GET", path, &Auth::Bearer("forged".into()), None).await;
        assert_eq!(answer.status, 401, "{path}");
    }
    let bad = http(
        api,
        "POST",
        "/api/v5/login",
        &Auth::None,
        Some(json!({"username": "admin", "password": "admin"})),
    )
    .await;
    assert_eq!(
        (bad.status, bad.body["code"].as_str()),
        (401, Some("BAD_USERNAME_OR_PWD"))
    );
    let token = login(api).await;
    assert_eq!(status_of(api, "GET", "/api/v5/stats", &token).await, 200);
    let basic = Auth::Basic("admin".into(), TEST_ADMIN_PASSWORD.into());
    assert_eq!(status_of(api, "GET", "/api/v5/nodes", &basic).await, 200);
    assert_eq!(status_of(api, "POST", "/api/v5/logout", &token).await, 204);
    assert_eq!(
        status_of(api, "GET", "/api/v5/stats", &token).await,
        401,
        "logged out"
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn api_keys_from_the_bootstrap_file_authenticate_with_basic_auth() {
    let dir = crate::common::temp_data_dir("api-keys");
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "ops-key:ops-secret\n").unwrap();
    let broker = TestBroker::start_with(|c| c.api.bootstrap_file = Some(keys.clone())).await;
    let api = broker.running.api_addr().unwrap();
    let good = Auth::Basic("ops-key".into(), "ops-secret".into());
    assert_eq!(status_of(api, "GET", "/api/v5/clients", &good).await, 200);
    let bad = Auth::Basic("ops-key".into(), "other".into());
    assert_eq!(status_of(api, "GET", "/api/v5/clients", &bad).await, 401);
    broker.shutdown().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn api_lists_pages_and_kicks_clients_of_rumqttc_and_mosquitto_sub() {
    let broker = TestBroker::start().await;
    let api = broker.running.api_addr().unwrap();
    let auth = login(api).await;
    let rumqttc_id = unique("api-rumqttc");
    let mut options = V4::options(broker.addr, &rumqttc_id);
    options.set_credentials("user-one", "");
    let (mut client, _) = V4::connect_with(options).await;
    client.subscribe("api/+/t", rumqttc::QoS::AtLeastOnce).await;
    let mosquitto_id = unique("api-mosquitto");
    let mut mosquitto = None;
    if which("mosquitto_sub") {
        mosquitto = Some(
            Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &broker.addr.port().to_string()])
                .args(["-i", &mosquitto_id, "-t", "api/mosq/#", "-q", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
    }
    let expected = if mosquitto.is_some() { 2 } else { 1 };
    let listed = until(api, &auth, "/api/v5/clients?limit=100", |b| {
        b["meta"]["count"] == expected
    })
    .await;
    assert_eq!(listed["meta"]["page"], 1);
    assert_eq!(listed["meta"]["hasnext"], false);
    let one = &listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["clientid"] == rumqttc_id.as_str())
        .unwrap();
    for field in EMQX_CLIENT_FIELDS {
        assert!(
            one.get(field).is_some(),
            "client lacks EMQX's field {field}: {one}"
        );
    }
    assert_eq!(one["username"], "user-one");
    assert_eq!(one["ip_address"], "127.0.0.1");
    assert_eq!(one["proto_ver"], 4);
    assert_eq!(one["connected"], true);
    assert_eq!(one["listener"], "tcp:default");
    // TCP's link figures come from the kernel's TCP_INFO (sock_diag).
    assert_eq!(one["transport"], "tcp");
    assert!(one["link"]["rtt_us"].is_u64(), "{one}");
    assert!(one["link"]["cwnd"].as_u64().unwrap() > 0, "{one}");
    assert!(one["link"]["sent_packets"].as_u64().unwrap() >= 1, "{one}");
    if mosquitto.is_some() {
        let page = http(api, "GET", "/api/v5/clients?limit=1&page=1", &auth, None)
            .await
            .body;
        assert_eq!(page["data"].as_array().unwrap().len(), 1);
        assert_eq!(page["meta"]["hasnext"], true);
        let mine = until(
            api,
            &auth,
            &format!("/api/v5/clients/{mosquitto_id}/subscriptions"),
            |b| b.as_array().is_some_and(|a| !a.is_empty()),
        )
        .await;
        assert_eq!(mine[0]["topic"], "api/mosq/#");
        assert_eq!(mine[0]["qos"], 1);
    }
    let filtered = http(
        api,
        "GET",
        &format!("/api/v5/clients?like_clientid={}", &rumqttc_id[..10]),
        &auth,
        None,
    )
    .await
    .body;
    assert!(filtered["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["clientid"].as_str().unwrap().contains(&rumqttc_id[..10])));
    let bad = http(api, "GET", "/api/v5/clients?page=0", &auth, None).await;
    assert_eq!(
        (bad.status, bad.body["code"].as_str()),
        (400, Some("BAD_REQUEST"))
    );
    let bad = http(api, "GET", "/api/v5/clients?conn_state=sleepy", &auth, None).await;
    assert_eq!(bad.status, 400);

    let detail = http(
        api,
        "GET",
        &format!("/api/v5/clients/{rumqttc_id}"),
        &auth,
        None,
    )
    .await;
    assert_eq!(detail.body["subscriptions_cnt"], 1, "{detail:?}");
    assert!(detail.body["link"]["rtt_us"].is_u64(), "{detail:?}");
    let subs = http(
        api,
        "GET",
        &format!("/api/v5/subscriptions?clientid={rumqttc_id}"),
        &auth,
        None,
    )
    .await
    .body;
    assert_eq!(subs["data"][0]["topic"], "api/+/t");
    assert_eq!(subs["data"][0]["qos"], 1);
    let topics = http(api, "GET", "/api/v5/topics", &auth, None).await.body;
    assert!(
        topics["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["topic"] == "api/+/t"),
        "{topics}"
    );

    // Published through the API, received by rumqttc.
    let published = api_publish(
        api,
        &auth,
        json!({"topic": "api/x/t", "payload": "hello from the API", "qos": 1}),
    )
    .await;
    assert_eq!(published.status, 200, "{published:?}");
    assert!(published.body["id"].is_string());
    let got = client.next_publish().await;
    assert_eq!(&got.payload[..], b"hello from the API");
    let bad = api_publish(api, &auth, json!({"topic": "a/#", "payload": ""})).await;
    assert_eq!(bad.status, 400, "a wildcard is no topic name");

    let stats = http(api, "GET", "/api/v5/stats?aggregate=true", &auth, None)
        .await
        .body;
    assert_eq!(stats["live_connections.count"], expected);
    let per_node = http(api, "GET", "/api/v5/stats", &auth, None).await.body;
    assert!(per_node[0]["node"].as_str().unwrap().starts_with("petrel@"));
    let metrics = http(api, "GET", "/api/v5/metrics?aggregate=true", &auth, None)
        .await
        .body;
    assert!(
        metrics["messages.qos1.received"].as_u64().unwrap() >= 1,
        "{metrics}"
    );
    let prometheus = http(api, "GET", "/api/v5/prometheus/stats", &Auth::None, None).await;
    let text = prometheus.body.as_str().unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("emqx_live_connections_count{"))
        .unwrap();
    assert!(line.ends_with(&format!(" {expected}")), "{line}");
    assert!(text.contains("petrel_link_connections{"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("petrel_link_rtt_seconds_avg{")
                && l.contains("transport=\"tcp\"")),
        "{text}"
    );

    // Kicked: the client's connection ends, and it is no longer listed.
    let kicked = http(
        api,
        "DELETE",
        &format!("/api/v5/clients/{rumqttc_id}"),
        &auth,
        None,
    )
    .await;
    assert_eq!(kicked.status, 204);
    client.expect_connection_error().await;
    until(
        api,
        &auth,
        &format!("/api/v5/clients?clientid={rumqttc_id}"),
        |b| b["meta"]["count"] == 0,
    )
    .await;
    let gone = http(
        api,
        "DELETE",
        &format!("/api/v5/clients/{rumqttc_id}"),
        &auth,
        None,
    )
    .await;
    assert_eq!(
        (gone.status, gone.body["code"].as_str()),
        (404, Some("CLIENTID_NOT_FOUND"))
    );
    drop(mosquitto);
    broker.shutdown().await;
}

#[tokio::test]
async fn api_shows_and_deletes_retained_and_delayed_messages() {
    let broker = TestBroker::start().await;
    let api = broker.running.api_addr().unwrap();
    let auth = login(api).await;
    let mut client = V4::connect(broker.addr, &unique("api-ret")).await;
    client
        .publish("api/ret/one", rumqttc::QoS::AtLeastOnce, true, b"kept")
        .await;
    client
        .publish(
            "$delayed/3600/api/later",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"later",
        )
        .await;
    let listed = until(api, &auth, "/api/v5/mqtt/retainer/messages", |b| {
        b["meta"]["count"] == 1
    })
    .await;
    assert_eq!(listed["data"][0]["topic"], "api/ret/one");
    let one = http(
        api,
        "GET",
        "/api/v5/mqtt/retainer/message/api%2Fret%2Fone",
        &auth,
        None,
    )
    .await;
    assert_eq!(one.status, 200, "{one:?}");
    assert_eq!(
        one.body["payload"],
        base64::engine::general_purpose::STANDARD.encode("kept")
    );
    assert_eq!(
        status_of(
            api,
            "DELETE",
            "/api/v5/mqtt/retainer/message/api%2Fret%2Fone",
            &auth
        )
        .await,
        204
    );
    assert_eq!(
        status_of(
            api,
            "GET",
            "/api/v5/mqtt/retainer/message/api%2Fret%2Fone",
            &auth
        )
        .await,
        404
    );
    // A new subscriber gets nothing retained.
    let mut late = V4::connect(broker.addr, &unique("api-late")).await;
    late.subscribe("api/ret/#", rumqttc::QoS::AtLeastOnce).await;
    late.expect_no_publish().await;

    // Delayed through the API too, as a client's publish would be.
    let through_api = api_publish(
        api,
        &auth,
        json!({"topic": "$delayed/7200/api/later2", "payload": "x", "qos": 1}),
    )
    .await;
    assert_eq!(through_api.status, 200, "{through_api:?}");
    let bad = api_publish(api, &auth, json!({"topic": "$delayed/x/y", "payload": ""})).await;
    assert_eq!(bad.status, 400);
    let delayed = until(api, &auth, "/api/v5/mqtt/delayed/messages", |b| {
        b["meta"]["count"] == 2
    })
    .await;
    assert_eq!(
        delayed["data"][1]["topic"], "api/later2",
        "due later, listed later"
    );
    let entry = &delayed["data"][0];
    assert_eq!(entry["topic"], "api/later");
    assert!(
        entry["delayed_remaining"].as_u64().unwrap() > 3500,
        "{entry}"
    );
    let msgid = entry["msgid"].as_str().unwrap();
    assert_eq!(
        status_of(
            api,
            "DELETE",
            &format!("/api/v5/mqtt/delayed/messages/{msgid}"),
            &auth
        )
        .await,
        204
    );
    let after = http(api, "GET", "/api/v5/mqtt/delayed/messages", &auth, None)
        .await
        .body;
    assert_eq!(after["meta"]["count"], 1);
    assert_eq!(
        status_of(
            api,
            "DELETE",
            &format!("/api/v5/mqtt/delayed/messages/{msgid}"),
            &auth
        )
        .await,
        404
    );
    broker.shutdown().await;
}

#[tokio::test]
async fn api_banned_clients_are_refused_until_the_ban_is_lifted() {
    let broker = TestBroker::start().await;
    let api = broker.running.api_addr().unwrap();
    let auth = login(api).await;
    let id = unique("api-banned");
    let banned = http(
        api,
        "POST",
        "/api/v5/banned",
        &auth,
        Some(json!({"as": "clientid", "who": id, "reason": "test"})),
    )
    .await;
    assert_eq!(banned.status, 200, "{banned:?}");
    assert_eq!(banned.body["until"], "infinity");
    assert_eq!(banned.body["by"], "admin");
    let list = http(api, "GET", "/api/v5/banned", &auth, None).await.body;
    assert_eq!(list["meta"]["count"], 1);
    let (_, ack) = crate::common::RawClient::connect_with(
        broker.addr,
        crate::common::connect_packet(petrel::codec::ProtocolVersion::V5, &id),
    )
    .await;
    assert_eq!(ack.code, petrel::codec::ReasonCode::BANNED);
    let bad = http(
        api,
        "POST",
        "/api/v5/banned",
        &auth,
        Some(json!({"as": "peerhost", "who": "nope"})),
    )
    .await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        status_of(
            api,
            "DELETE",
            &format!("/api/v5/banned/clientid/{id}"),
            &auth
        )
        .await,
        204
    );
    let (_, ack) = crate::common::RawClient::connect_with(
        broker.addr,
        crate::common::connect_packet(petrel::codec::ProtocolVersion::V5, &id),
    )
    .await;
    assert_eq!(ack.code, petrel::codec::ReasonCode::SUCCESS);
    broker.shutdown().await;
}

fn which(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test]
async fn sys_topics_carry_mosquitto_and_emqx_values_and_client_events() {
    let broker = TestBroker::start_with(|c| {
        c.sys_topics.interval = Duration::from_millis(200);
        c.sys_topics.client_events = true;
    })
    .await;
    let mut watcher = V4::connect(broker.addr, &unique("sys-watch")).await;
    watcher.subscribe("$SYS/#", rumqttc::QoS::AtMostOnce).await;
    let mut wildcard = V4::connect(broker.addr, &unique("sys-wild")).await;
    wildcard.subscribe("#", rumqttc::QoS::AtMostOnce).await;
    let node = broker.running.broker_node();
    let joining = unique("sys-joins");
    let joined = V4::connect(broker.addr, &joining).await;
    drop(joined);
    let mut seen = std::collections::HashMap::new();
    let wanted = [
        "$SYS/broker/version".to_owned(),
        "$SYS/broker/clients/connected".to_owned(),
        "$SYS/broker/load/messages/received/1min".to_owned(),
        format!("$SYS/brokers/{node}/version"),
        format!("$SYS/brokers/{node}/stats/connections/count"),
        format!("$SYS/brokers/{node}/clients/{joining}/connected"),
        format!("$SYS/brokers/{node}/clients/{joining}/disconnected"),
    ];
    for _ in 0..2000 {
        if wanted.iter().all(|t| seen.contains_key(t)) {
            break;
        }
        let got = watcher.next_publish().await;
        seen.insert(got.topic.clone(), got.payload.clone());
    }
    for topic in &wanted {
        assert!(
            seen.contains_key(topic),
            "no {topic}; saw {:?}",
            seen.keys()
        );
    }
    assert!(std::str::from_utf8(&seen["$SYS/broker/version"])
        .unwrap()
        .starts_with("petrel version "));
    let connected: Value =
        serde_json::from_slice(&seen[&format!("$SYS/brokers/{node}/clients/{joining}/connected")])
            .unwrap();
    assert_eq!(connected["clientid"], joining.as_str());
    assert_eq!(connected["proto_ver"], 4);
    assert_eq!(connected["ipaddress"], "127.0.0.1");
    let gone: Value = serde_json::from_slice(
        &seen[&format!("$SYS/brokers/{node}/clients/{joining}/disconnected")],
    )
    .unwrap();
    assert_eq!(gone["clientid"], joining.as_str());
    assert!(gone["reason"].is_string());
    // `#` does not match `$SYS` topics [MQTT-4.7.2-1].
    wildcard.expect_no_publish().await;
    // Retained: a late subscriber gets the current values at once.
    let mut late = V4::connect(broker.addr, &unique("sys-late")).await;
    late.subscribe("$SYS/broker/version", rumqttc::QoS::AtMostOnce)
        .await;
    let got = late.next_publish().await;
    assert!(got.retain);
    broker.shutdown().await;
}
