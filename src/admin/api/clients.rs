//! Clients, their subscriptions, and the subscribed topics.

use super::*;
use crate::broker::tcp_info::TcpLinks;

// ---- clients ------------------------------------------------------------------------------

/// A client in EMQX's shape, plus `transport` and `link`; `tcp` is the snapshot of the TCP
/// connections' figures, if one was taken (see [`tcp_links_for`]).
pub(super) fn client_json(state: &AdminState, view: &SessionView, tcp: Option<&TcpLinks>) -> Value {
    let node = &*state.node;
    match view {
        SessionView::Online(info) => {
            let link = info.link_quality_with(tcp).map(|q| {
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
                "inflight_max": info.inflight_max.load(Ordering::Relaxed),
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
            "mqueue_dropped": session.dropped,
            "node": node,
            "transport": null,
            "link": null,
        }),
    }
}

/// The kernel's figures of the TCP connections, taken only when `views` shows a client
/// connected over TCP (a netlink dump per request otherwise spent for nothing).
pub(super) async fn tcp_links_for(
    state: &AdminState,
    views: &[SessionView],
) -> Option<Arc<TcpLinks>> {
    let tcp = views
        .iter()
        .any(|v| matches!(v, SessionView::Online(info) if info.is_tcp()));
    if tcp {
        state.tcp_links().await
    } else {
        None
    }
}

pub(super) async fn clients(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
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
    let tcp = tcp_links_for(&state, paging.page_of(&all)).await;
    Ok(paged(all, &paging, |view| {
        client_json(&state, view, tcp.as_deref())
    }))
}

pub(super) fn client_not_found() -> ApiError {
    ApiError::not_found("CLIENTID_NOT_FOUND", "Client ID not found")
}

pub(super) async fn client(
    State(state): Shared,
    Path(client_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let view = state
        .broker
        .session_view(&client_id)
        .ok_or_else(client_not_found)?;
    let tcp = tcp_links_for(&state, std::slice::from_ref(&view)).await;
    Ok(Json(client_json(&state, &view, tcp.as_deref())))
}

pub(super) async fn kick(
    State(state): Shared,
    Path(client_id): Path<String>,
) -> ApiResult<StatusCode> {
    if state.broker.kick(&client_id) {
        tracing::info!(%client_id, "kicked through the API");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(client_not_found())
    }
}

pub(super) struct SubscriptionRow {
    client_id: String,
    topic: String,
    options: crate::codec::SubscriptionOptions,
}

pub(super) fn subscription_json(node: &str, row: &SubscriptionRow) -> Value {
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

pub(super) fn subscription_rows(
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

pub(super) async fn client_subscriptions(
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

pub(super) async fn subscriptions(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
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

pub(super) async fn topics(State(state): Shared, params: Params) -> ApiResult<Json<Value>> {
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
