//! The `/api/v5` handlers, in EMQX's paths, field names, paging and error shapes
//! (`{"data": [...], "meta": {"page", "limit", "count", "hasnext"}}`; errors
//! `{"code": "...", "message": "..."}` with 400, 401 or 404).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{metrics, AdminState};
use crate::auth::banned::{Ban, BanKind};
use crate::broker::clock;
use crate::broker::view::SessionView;
use crate::codec::{Properties, Publish, QoS};
use crate::core::message::AppMessage;
use crate::core::topic::{filter_matches, TopicFilter, TopicName};

type Shared = State<Arc<AdminState>>;

/// An error answered as EMQX does.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "BAD_REQUEST",
            message: message.into(),
        }
    }

    fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code,
            message: message.into(),
        }
    }

    fn unauthorized(code: &'static str, message: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code,
            message: message.into(),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "INTERNAL_ERROR",
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The routes that need a caller: an API key (Basic) or a dashboard login (Bearer).
pub fn protected() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/api/v5/logout", post(logout))
        .route("/api/v5/nodes", get(nodes))
        .route("/api/v5/nodes/{node}", get(node))
        .route("/api/v5/stats", get(stats))
        .route("/api/v5/metrics", get(metrics_json))
        .route("/api/v5/listeners", get(listeners))
        .route("/api/v5/clients", get(clients))
        .route("/api/v5/clients/{clientid}", get(client).delete(kick))
        .route(
            "/api/v5/clients/{clientid}/subscriptions",
            get(client_subscriptions),
        )
        .route("/api/v5/subscriptions", get(subscriptions))
        .route("/api/v5/topics", get(topics))
        .route("/api/v5/publish", post(publish))
        .route("/api/v5/publish/bulk", post(publish_bulk))
        .route("/api/v5/mqtt/retainer/messages", get(retained_list))
        .route(
            "/api/v5/mqtt/retainer/message/{*topic}",
            get(retained_one).delete(retained_delete),
        )
        .route("/api/v5/mqtt/delayed/messages", get(delayed_list))
        .route(
            "/api/v5/mqtt/delayed/messages/{msgid}",
            get(delayed_one).delete(delayed_delete),
        )
        .route("/api/v5/mqtt/topic_rewrite", get(rewrite_rules))
        .route("/api/v5/mqtt/auto_subscribe", get(auto_subscribe))
        .route("/api/v5/banned", get(banned_list).post(banned_add))
        .route("/api/v5/banned/{as}/{who}", delete(banned_delete))
        .route("/api/v5/reload", post(reload))
}

/// The routes anyone may call: health, login, and Prometheus (EMQX's default: scrapers
/// carry no credentials; see `docs/operations.md`).
pub fn public() -> Router<Arc<AdminState>> {
    Router::new()
        .route("/api/v5/status", get(status))
        .route("/status", get(status))
        .route("/api/v5/login", post(login))
        .route("/api/v5/prometheus/stats", get(metrics::prometheus))
}

/// Lets a request through only with credentials we know.
pub async fn require_caller(
    State(state): Shared,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(header) = header else {
        return Err(ApiError::unauthorized(
            "BAD_API_KEY_OR_SECRET",
            "missing credentials: HTTP Basic with an API key, or a login token (Bearer)",
        ));
    };
    let Some(caller) = state.auth.check(header, clock::now()) else {
        return Err(ApiError::unauthorized(
            if header.starts_with("Bearer ") {
                "TOKEN_TIME_OUT"
            } else {
                "BAD_API_KEY_OR_SECRET"
            },
            "bad API key or secret, or the login token expired",
        ));
    };
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

// ---- paging and filters -------------------------------------------------------------------

type Params = Query<HashMap<String, String>>;

struct Paging {
    page: usize,
    limit: usize,
}

const MAX_LIMIT: usize = 10_000;

fn paging(params: &HashMap<String, String>) -> ApiResult<Paging> {
    let number = |key: &str, default: usize| -> ApiResult<usize> {
        match params.get(key).or_else(|| params.get(&format!("_{key}"))) {
            None => Ok(default),
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| {
                    (1..=MAX_LIMIT.max(usize::from(key == "page") * usize::MAX)).contains(n)
                })
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`{key}` must be a whole number from 1{}",
                        if key == "limit" { " to 10000" } else { "" }
                    ))
                }),
        }
    };
    Ok(Paging {
        page: number("page", 1)?,
        limit: number("limit", 100)?,
    })
}

/// One page of `items` (built only for the rows on the page) in EMQX's envelope.
fn paged<T>(items: Vec<T>, paging: &Paging, row: impl Fn(&T) -> Value) -> Json<Value> {
    let count = items.len();
    let start = (paging.page - 1).saturating_mul(paging.limit);
    let data: Vec<Value> = items
        .iter()
        .skip(start)
        .take(paging.limit)
        .map(row)
        .collect();
    let hasnext = start.saturating_add(paging.limit) < count;
    Json(json!({
        "data": data,
        "meta": {"page": paging.page, "limit": paging.limit, "count": count, "hasnext": hasnext},
    }))
}

fn flag(params: &HashMap<String, String>, key: &str) -> ApiResult<Option<bool>> {
    match params.get(key).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(_) => Err(ApiError::bad_request(format!(
            "`{key}` must be true or false"
        ))),
    }
}

fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

fn epoch_secs(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---- health and nodes ---------------------------------------------------------------------

async fn status(State(state): Shared, params: Params) -> Response {
    if params.get("format").map(String::as_str) == Some("json") {
        return Json(json!({
            "node_name": &*state.node,
            "rel_vsn": state.version,
            "status": "running",
            "role": "core",
        }))
        .into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("Node {} is started\npetrel is running", state.node),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

async fn login(State(state): Shared, Json(body): Json<Login>) -> ApiResult<Json<Value>> {
    match state
        .auth
        .login(&body.username, &body.password, clock::now())
    {
        Some(token) => Ok(Json(json!({
            "token": token,
            "version": state.version,
            "license": {"edition": "opensource"},
        }))),
        None => {
            // Guessing passwords costs half a second a try.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Err(ApiError::unauthorized("BAD_USERNAME_OR_PWD", "Auth failed"))
        }
    }
}

async fn logout(State(state): Shared, headers: HeaderMap) -> StatusCode {
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        state.auth.logout(token.trim());
    }
    StatusCode::NO_CONTENT
}

fn node_json(state: &AdminState) -> Value {
    let m = &state.broker.metrics;
    let (memory_used, memory_total) = metrics::memory();
    let load = metrics::load_average();
    json!({
        "node": &*state.node,
        "node_status": "running",
        "version": state.version,
        "edition": "Opensource",
        "role": "core",
        "uptime": u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "connections": m.connections.load(Ordering::Relaxed),
        "live_connections": state.broker.clients.len(),
        "memory_used": memory_used,
        "memory_total": memory_total,
        "load1": load[0],
        "load5": load[1],
        "load15": load[2],
        "sys_path": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
    })
}

async fn nodes(State(state): Shared) -> Json<Value> {
    Json(json!([node_json(&state)]))
}

async fn node(State(state): Shared, Path(name): Path<String>) -> ApiResult<Json<Value>> {
    if name != *state.node {
        return Err(ApiError::not_found("NOT_FOUND", format!("no node {name}")));
    }
    Ok(Json(node_json(&state)))
}

/// EMQX answers per node unless `aggregate=true`.
fn per_node(
    state: &AdminState,
    params: &HashMap<String, String>,
    mut value: Value,
) -> ApiResult<Json<Value>> {
    if flag(params, "aggregate")? == Some(true) {
        return Ok(Json(value));
    }
    value["node"] = json!(&*state.node);
    Ok(Json(json!([value])))
}

async fn stats(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    per_node(&state, &params, metrics::stats(&state.broker))
}

async fn metrics_json(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    per_node(&state, &params, metrics::counters(&state.broker))
}

async fn listeners(State(state): Shared) -> Json<Value> {
    let node = &*state.node;
    let all: Vec<Value> = state
        .listeners
        .iter()
        .map(|(kind, addr)| {
            let kind = metrics::listener_type(*kind);
            json!({
                "id": format!("{kind}:default"),
                "type": kind,
                "name": "default",
                "bind": addr.to_string(),
                "running": true,
                "enable": true,
                "node": node,
            })
        })
        .collect();
    Json(Value::Array(all))
}

// ---- clients ------------------------------------------------------------------------------

fn client_json(state: &AdminState, view: &SessionView) -> Value {
    let node = &*state.node;
    match view {
        SessionView::Online(info) => {
            let link = info.link_quality().map(|q| {
                json!({
                    "rtt_us": q.rtt_us,
                    "cwnd": q.cwnd,
                    "sent_packets": q.sent_packets,
                    "lost_packets": q.lost_packets,
                    "lost_bytes": q.lost_bytes,
                    "congestion_events": q.congestion_events,
                })
            });
            let kind = match info.transport {
                "tcp" => "tcp",
                "tls" => "ssl",
                other => other,
            };
            json!({
                "clientid": &*info.client_id,
                "username": info.username.as_deref(),
                "ip_address": info.peer.ip().to_string(),
                "port": info.peer.port(),
                "connected": true,
                "conn_state": "connected",
                "connected_at": rfc3339(info.connected_at),
                "created_at": rfc3339(info.connected_at),
                "proto_name": if info.proto_ver == 3 { "MQIsdp" } else { "MQTT" },
                "proto_ver": info.proto_ver,
                "keepalive": info.keepalive,
                "clean_start": info.clean_start,
                "expiry_interval": info.expiry_interval,
                "subscriptions_cnt": info.subscriptions.load(Ordering::Relaxed),
                "inflight_cnt": info.inflight.load(Ordering::Relaxed),
                "mqueue_len": info.mailbox.len(),
                "mqueue_dropped": info.mailbox.dropped(),
                "recv_msg": info.recv_msg.load(Ordering::Relaxed),
                "send_msg": info.send_msg.load(Ordering::Relaxed),
                "node": node,
                "listener": format!("{kind}:default"),
                "transport": info.transport,
                "link": link,
            })
        }
        SessionView::Offline(session) => json!({
            "clientid": &*session.client_id,
            "username": null,
            "ip_address": null,
            "port": null,
            "connected": false,
            "conn_state": "disconnected",
            "connected_at": null,
            "proto_name": "MQTT",
            "clean_start": false,
            "expiry_interval": session.expiry_interval,
            "subscriptions_cnt": session.subscriptions,
            "inflight_cnt": session.inflight,
            "mqueue_len": session.queued,
            "node": node,
            "transport": null,
            "link": null,
        }),
    }
}

async fn clients(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    let text = |key: &str| params.get(key).map(String::as_str);
    let conn_state = match text("conn_state") {
        None => None,
        Some("connected") => Some(true),
        Some("disconnected") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`conn_state` must be connected or disconnected, not {other}"
            )))
        }
    };
    let ip = match text("ip_address") {
        None => None,
        Some(ip) => Some(ip.parse::<std::net::IpAddr>().map_err(|_| {
            ApiError::bad_request(format!("`ip_address` {ip} is not an IP address"))
        })?),
    };
    let clean_start = flag(&params, "clean_start")?;
    let proto_ver = match text("proto_ver") {
        None => None,
        Some(v) => Some(
            v.parse::<u8>()
                .map_err(|_| ApiError::bad_request("`proto_ver` must be 3, 4 or 5"))?,
        ),
    };
    let mut all: Vec<SessionView> = state
        .broker
        .sessions_view()
        .into_iter()
        .filter(|view| {
            let online = match view {
                SessionView::Online(info) => Some(info),
                SessionView::Offline(_) => None,
            };
            let username = online.and_then(|i| i.username.as_deref());
            text("clientid").is_none_or(|c| c == view.client_id())
                && text("like_clientid").is_none_or(|c| view.client_id().contains(c))
                && text("username").is_none_or(|u| Some(u) == username)
                && text("like_username").is_none_or(|u| username.is_some_and(|n| n.contains(u)))
                && conn_state.is_none_or(|c| c == online.is_some())
                && ip.is_none_or(|ip| online.is_some_and(|i| i.peer.ip() == ip))
                && clean_start.is_none_or(|c| online.is_some_and(|i| i.clean_start == c))
                && proto_ver.is_none_or(|v| online.is_some_and(|i| i.proto_ver == v))
        })
        .collect();
    all.sort_by(|a, b| a.client_id().cmp(b.client_id()));
    Ok(paged(all, &paging, |view| client_json(&state, view)))
}

fn client_not_found() -> ApiError {
    ApiError::not_found("CLIENTID_NOT_FOUND", "Client ID not found")
}

async fn client(State(state): Shared, Path(client_id): Path<String>) -> ApiResult<Json<Value>> {
    let view = state
        .broker
        .session_view(&client_id)
        .ok_or_else(client_not_found)?;
    Ok(Json(client_json(&state, &view)))
}

async fn kick(State(state): Shared, Path(client_id): Path<String>) -> ApiResult<StatusCode> {
    if state.broker.kick(&client_id) {
        tracing::info!(%client_id, "kicked through the API");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(client_not_found())
    }
}

struct SubscriptionRow {
    client_id: String,
    topic: String,
    options: crate::codec::SubscriptionOptions,
}

fn subscription_json(node: &str, row: &SubscriptionRow) -> Value {
    json!({
        "clientid": row.client_id,
        "topic": row.topic,
        "qos": row.options.qos as u8,
        "nl": u8::from(row.options.no_local),
        "rap": u8::from(row.options.retain_as_published),
        "rh": row.options.retain_handling,
        "node": node,
    })
}

fn subscription_rows(
    state: &AdminState,
    keep: impl Fn(&str, &str) -> bool,
) -> Vec<SubscriptionRow> {
    let mut rows = Vec::new();
    state
        .broker
        .for_each_subscription(|topic, client_id, options| {
            if keep(topic, client_id) {
                rows.push(SubscriptionRow {
                    client_id: client_id.to_owned(),
                    topic: topic.to_owned(),
                    options,
                });
            }
        });
    rows.sort_by(|a, b| (&a.client_id, &a.topic).cmp(&(&b.client_id, &b.topic)));
    rows
}

async fn client_subscriptions(
    State(state): Shared,
    Path(client_id): Path<String>,
) -> ApiResult<Json<Value>> {
    if state.broker.session_view(&client_id).is_none() {
        return Err(client_not_found());
    }
    let rows = subscription_rows(&state, |_, c| c == client_id);
    Ok(Json(Value::Array(
        rows.iter()
            .map(|r| subscription_json(&state.node, r))
            .collect(),
    )))
}

async fn subscriptions(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    let text = |key: &str| params.get(key).cloned();
    let qos = match text("qos") {
        None => None,
        Some(q) => Some(
            q.parse::<u8>()
                .ok()
                .filter(|q| *q <= 2)
                .ok_or_else(|| ApiError::bad_request("`qos` must be 0, 1 or 2"))?,
        ),
    };
    let (client, topic, group, matching) = (
        text("clientid"),
        text("topic"),
        text("share_group"),
        text("match_topic"),
    );
    let mut rows = subscription_rows(&state, |filter, client_id| {
        client.as_deref().is_none_or(|c| c == client_id)
            && topic.as_deref().is_none_or(|t| t == filter)
            && group.as_deref().is_none_or(|g| {
                filter
                    .strip_prefix("$share/")
                    .and_then(|r| r.split_once('/'))
                    .is_some_and(|(name, _)| name == g)
            })
            && matching.as_deref().is_none_or(|m| {
                TopicFilter::parse(filter, 0).is_ok_and(|f| filter_matches(f.filter(), m))
            })
    });
    if let Some(qos) = qos {
        rows.retain(|r| r.options.qos as u8 == qos);
    }
    Ok(paged(rows, &paging, |r| subscription_json(&state.node, r)))
}

async fn topics(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    let wanted = params.get("topic").cloned();
    let mut filters = std::collections::BTreeSet::new();
    state.broker.for_each_subscription(|topic, _, _| {
        let plain = TopicFilter::parse(topic, 0)
            .map_or_else(|_| topic.to_owned(), |f| f.filter().to_owned());
        if wanted.as_deref().is_none_or(|w| w == plain) {
            filters.insert(plain);
        }
    });
    let node = &*state.node;
    Ok(paged(
        filters.into_iter().collect(),
        &paging,
        |topic| json!({"topic": topic, "node": node}),
    ))
}

// ---- publish ------------------------------------------------------------------------------

#[derive(Deserialize)]
struct PublishBody {
    topic: String,
    #[serde(default)]
    clientid: Option<String>,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    #[serde(default)]
    properties: Option<PublishProperties>,
}

#[derive(Deserialize, Default)]
struct PublishProperties {
    payload_format_indicator: Option<u8>,
    message_expiry_interval: Option<u32>,
    response_topic: Option<String>,
    correlation_data: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    user_properties: HashMap<String, String>,
}

fn message_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut id = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut id);
    id.iter().map(|b| format!("{b:02X}")).collect()
}

fn publish_one(state: &AdminState, body: PublishBody) -> ApiResult<Value> {
    let limits = state.broker.limits();
    let topic = TopicName::parse(body.topic.clone(), limits.max_topic_levels)
        .map_err(|err| ApiError::bad_request(format!("topic {:?}: {err}", body.topic)))?;
    let qos =
        QoS::from_u8(body.qos).ok_or_else(|| ApiError::bad_request("`qos` must be 0, 1 or 2"))?;
    let payload = match body.payload_encoding.as_deref() {
        None | Some("plain") => body.payload.into_bytes(),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body.payload.as_bytes())
            .map_err(|err| ApiError::bad_request(format!("payload is not base64: {err}")))?,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "`payload_encoding` must be plain or base64, not {other}"
            )))
        }
    };
    if payload.len() > limits.max_packet_size as usize {
        return Err(ApiError::bad_request(format!(
            "payload larger than mqtt.max_packet_size ({} bytes)",
            limits.max_packet_size
        )));
    }
    let mut properties = Properties::default();
    if let Some(p) = body.properties {
        let set = &mut *properties;
        set.payload_format_indicator = p.payload_format_indicator;
        set.message_expiry_interval = p.message_expiry_interval;
        set.response_topic = p.response_topic;
        set.correlation_data = p
            .correlation_data
            .map(|c| bytes::Bytes::from(c.into_bytes()));
        set.content_type = p.content_type;
        set.user_properties = p.user_properties.into_iter().collect();
    }
    let publish = Publish {
        dup: false,
        qos,
        retain: body.retain,
        topic: body.topic,
        packet_id: None,
        properties,
        payload: bytes::Bytes::from(payload),
    };
    let now = clock::now();
    let publisher = body.clientid.map(Arc::from);
    let message = AppMessage::from_publish(topic, publish, publisher, now);
    state.broker.publish(Arc::new(message), now);
    Ok(json!({"id": message_id()}))
}

async fn publish(State(state): Shared, Json(body): Json<PublishBody>) -> ApiResult<Json<Value>> {
    publish_one(&state, body).map(Json)
}

async fn publish_bulk(
    State(state): Shared,
    Json(bodies): Json<Vec<PublishBody>>,
) -> ApiResult<Json<Value>> {
    if bodies.len() > 1000 {
        return Err(ApiError::bad_request(
            "at most 1000 messages per bulk publish",
        ));
    }
    let results: ApiResult<Vec<Value>> =
        bodies.into_iter().map(|b| publish_one(&state, b)).collect();
    Ok(Json(Value::Array(results?)))
}

// ---- retained and delayed messages --------------------------------------------------------

fn message_json(topic: &str, message: &AppMessage, payload: bool) -> Value {
    let mut value = json!({
        "topic": topic,
        "qos": message.qos as u8,
        "from_clientid": message.publisher.as_deref(),
        "from_username": null,
        "msgid": null,
    });
    if payload {
        value["payload"] =
            json!(base64::engine::general_purpose::STANDARD.encode(&message.payload));
    }
    value
}

async fn retained_list(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    let wanted = params.get("topic").cloned();
    let mut all = Vec::new();
    state.broker.for_each_retained(|topic, message| {
        if wanted.as_deref().is_none_or(|w| filter_matches(w, topic)) {
            all.push(message_json(topic, message, false));
        }
    });
    all.sort_by(|a, b| a["topic"].as_str().cmp(&b["topic"].as_str()));
    Ok(paged(all, &paging, Value::clone))
}

async fn retained_one(State(state): Shared, Path(topic): Path<String>) -> ApiResult<Json<Value>> {
    let message = state
        .broker
        .retained_message(&topic)
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", "Viewed message doesn't exist"))?;
    Ok(Json(message_json(&topic, &message, true)))
}

async fn retained_delete(State(state): Shared, Path(topic): Path<String>) -> ApiResult<StatusCode> {
    if state.broker.delete_retained(&topic) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(
            "NOT_FOUND",
            "Viewed message doesn't exist",
        ))
    }
}

fn delayed_json(
    state: &AdminState,
    view: &crate::broker::view::DelayedView,
    payload: bool,
) -> Value {
    let now = clock::now();
    let remaining = view.due.saturating_duration_since(now);
    let expected = clock::wall() + remaining;
    let mut value = message_json(view.message.topic.as_str(), &view.message, payload);
    value["msgid"] = json!(format!("{:X}", view.id));
    value["node"] = json!(&*state.node);
    value["delayed_remaining"] = json!(remaining.as_secs());
    value["expected_at"] = json!(rfc3339(expected));
    value
}

async fn delayed_list(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    let all = state.broker.delayed_view();
    Ok(paged(all, &paging, |d| delayed_json(&state, d, false)))
}

fn delayed_id(text: &str) -> ApiResult<u64> {
    u64::from_str_radix(text, 16).map_err(|_| ApiError::bad_request(format!("bad msgid {text}")))
}

async fn delayed_one(State(state): Shared, Path(msgid): Path<String>) -> ApiResult<Json<Value>> {
    let id = delayed_id(&msgid)?;
    state
        .broker
        .delayed_view()
        .iter()
        .find(|d| d.id == id)
        .map(|d| Json(delayed_json(&state, d, true)))
        .ok_or_else(|| ApiError::not_found("NOT_FOUND", "Message ID not found"))
}

async fn delayed_delete(State(state): Shared, Path(msgid): Path<String>) -> ApiResult<StatusCode> {
    if state.broker.delete_delayed(delayed_id(&msgid)?) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("NOT_FOUND", "Message ID not found"))
    }
}

async fn rewrite_rules(State(state): Shared) -> Json<Value> {
    let rules: Vec<Value> = state
        .broker
        .limits()
        .rewrite
        .iter()
        .map(|rule| {
            json!({
                "action": match rule.action {
                    crate::core::rewrite::RewriteAction::Publish => "publish",
                    crate::core::rewrite::RewriteAction::Subscribe => "subscribe",
                    crate::core::rewrite::RewriteAction::All => "all",
                },
                "source_topic": rule.source.as_str(),
                "re": rule.re.as_str(),
                "dest_topic": rule.dest,
            })
        })
        .collect();
    Json(Value::Array(rules))
}

async fn auto_subscribe(State(state): Shared) -> Json<Value> {
    let topics: Vec<Value> = state
        .broker
        .limits()
        .auto_subscribe
        .iter()
        .map(|rule| {
            json!({
                "topic": rule.topic,
                "qos": rule.options.qos as u8,
                "nl": u8::from(rule.options.no_local),
                "rap": u8::from(rule.options.retain_as_published),
                "rh": rule.options.retain_handling,
            })
        })
        .collect();
    Json(Value::Array(topics))
}

// ---- banned -------------------------------------------------------------------------------

fn ban_json(ban: &Ban) -> Value {
    let at = |secs: u64| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
    json!({
        "as": ban.kind,
        "who": ban.who,
        "by": ban.by,
        "reason": ban.reason,
        "at": at(ban.at),
        "until": ban.until.map(at).unwrap_or_else(|| "infinity".into()),
    })
}

async fn banned_list(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
    let paging = paging(&params)?;
    Ok(paged(
        state.broker.auth().banned().list(),
        &paging,
        ban_json,
    ))
}

#[derive(Deserialize)]
struct BanBody {
    #[serde(rename = "as")]
    kind: String,
    who: String,
    #[serde(default)]
    by: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    until: Option<String>,
}

fn parse_time(key: &str, text: &str) -> ApiResult<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    humantime::parse_rfc3339_weak(text)
        .map(epoch_secs)
        .map_err(|_| {
            ApiError::bad_request(format!(
                "`{key}` must be RFC 3339 or seconds since the epoch"
            ))
        })
}

async fn banned_add(
    State(state): Shared,
    caller: Option<axum::Extension<super::auth::Caller>>,
    Json(body): Json<BanBody>,
) -> ApiResult<Json<Value>> {
    let kind = BanKind::parse(&body.kind)
        .ok_or_else(|| ApiError::bad_request("`as` must be clientid, username or peerhost"))?;
    let now = epoch_secs(clock::wall());
    let at = body
        .at
        .as_deref()
        .map(|t| parse_time("at", t))
        .transpose()?
        .unwrap_or(now);
    let until = match body.until.as_deref() {
        None | Some("infinity") => None,
        Some(text) => Some(parse_time("until", text)?),
    };
    let ban = Ban {
        kind,
        who: body.who,
        by: body
            .by
            .or_else(|| caller.map(|c| c.0.name().to_owned()))
            .unwrap_or_default(),
        reason: body.reason.unwrap_or_default(),
        at,
        until,
    };
    let ban = state
        .broker
        .auth()
        .banned()
        .add(ban)
        .map_err(|err| match err {
            crate::auth::banned::BannedError::Save { .. } => ApiError::internal(err.to_string()),
            _ => ApiError::bad_request(err.to_string()),
        })?;
    tracing::info!(kind = ?ban.kind, who = %ban.who, "banned through the API");
    if ban.kind == BanKind::Clientid {
        // EMQX kicks a client banned by its id.
        state.broker.kick(&ban.who);
    }
    Ok(Json(ban_json(&ban)))
}

async fn banned_delete(
    State(state): Shared,
    Path((kind, who)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let kind = BanKind::parse(&kind)
        .ok_or_else(|| ApiError::bad_request("`as` must be clientid, username or peerhost"))?;
    match state.broker.auth().banned().remove(kind, &who) {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(ApiError::not_found("NOT_FOUND", "Banned object not found")),
        Err(err) => Err(ApiError::internal(err.to_string())),
    }
}

// ---- reload -------------------------------------------------------------------------------

/// Petrel's own: what SIGHUP does (password and ACL files, log level, `$SYS` interval),
/// answered with the outcome. 503 when nothing serves reloads (a broker embedded in a
/// program other than `petrel`).
async fn reload(State(state): Shared) -> ApiResult<Json<Value>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let unavailable = || ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "SERVICE_UNAVAILABLE",
        message: "this process does not serve reloads".into(),
    };
    state.reload.try_send(tx).map_err(|_| unavailable())?;
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(Ok(message))) => Ok(Json(json!({"message": message}))),
        Ok(Ok(Err(message))) => Err(ApiError::bad_request(message)),
        _ => Err(unavailable()),
    }
}
