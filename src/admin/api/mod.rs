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

mod banned;
mod clients;
mod messages;
mod nodes;

use banned::*;
use clients::*;
use messages::*;
use nodes::*;

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
        .route("/api/v5/nodes/{node}/stats", get(node_stats))
        .route("/api/v5/nodes/{node}/metrics", get(node_metrics))
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
    // EMQX also accepts the older `_page` and `_limit`.
    let number = |key: &str, default: usize, max: usize| -> ApiResult<usize> {
        let Some(text) = params.get(key).or_else(|| params.get(&format!("_{key}"))) else {
            return Ok(default);
        };
        text.parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("`{key}` must be a whole number from 1 to {max}"))
            })
    };
    Ok(Paging {
        page: number("page", 1, usize::MAX)?,
        limit: number("limit", 100, MAX_LIMIT)?,
    })
}

impl Paging {
    fn start(&self) -> usize {
        (self.page - 1).saturating_mul(self.limit)
    }

    /// The items of the requested page.
    fn page_of<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        let start = self.start().min(items.len());
        &items[start..][..self.limit.min(items.len() - start)]
    }
}

/// One page of `items` (built only for the rows on the page) in EMQX's envelope.
fn paged<T>(items: Vec<T>, paging: &Paging, row: impl Fn(&T) -> Value) -> Json<Value> {
    let count = items.len();
    let data: Vec<Value> = paging.page_of(&items).iter().map(row).collect();
    let hasnext = paging.start().saturating_add(paging.limit) < count;
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

// ---- health and login ---------------------------------------------------------------------

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
