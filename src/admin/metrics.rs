//! The broker's counters in EMQX's shapes: `/api/v5/stats` (gauges), `/api/v5/metrics`
//! (counters) and `/api/v5/prometheus/stats` (text exposition format, EMQX's metric names,
//! plus Petrel's per-transport link figures: QUIC's path statistics and TCP's `TCP_INFO`).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{json, Value};

use super::AdminState;
use crate::broker::clients::ClientInfo;
use crate::broker::listener::ListenerKind;
use crate::broker::tcp_info::TcpLinks;
use crate::broker::Broker;

/// EMQX's listener type names.
pub fn listener_type(kind: ListenerKind) -> &'static str {
    match kind {
        ListenerKind::Tcp => "tcp",
        ListenerKind::Tls => "ssl",
        ListenerKind::Ws => "ws",
        ListenerKind::Wss => "wss",
        ListenerKind::Quic => "quic",
    }
}

/// The gauges of `/api/v5/stats`, with EMQX's keys.
pub fn stats(b: &Broker) -> Value {
    let m = &b.metrics;
    let subscriptions = b.subscription_count();
    let (topics, shared) = b.filter_counts();
    json!({
        "connections.count": m.connections.load(Ordering::Relaxed),
        "connections.max": m.connections_max.load(Ordering::Relaxed),
        "live_connections.count": b.clients.len(),
        "live_connections.max": m.connections_max.load(Ordering::Relaxed),
        "sessions.count": b.session_count(),
        "topics.count": topics,
        "subscriptions.count": subscriptions,
        "subscriptions.shared.count": shared,
        "suboptions.count": subscriptions,
        "retained.count": b.retained_count(),
        "retained.bytes": b.retained_bytes(),
        "delayed.count": b.delayed_count(),
        "quic.stream_tasks.count": m.quic_stream_tasks.load(Ordering::Relaxed),
        "queued.bytes": b.budget.bytes(),
    })
}

/// The counters of `/api/v5/metrics`, with EMQX's keys (and Petrel's where EMQX has none).
pub fn counters(b: &Broker) -> Value {
    let m = &b.metrics;
    let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    json!({
        "messages.received": m.messages_received(),
        "messages.qos0.received": n(&m.messages_received[0]),
        "messages.qos1.received": n(&m.messages_received[1]),
        "messages.qos2.received": n(&m.messages_received[2]),
        "messages.sent": n(&m.messages_delivered),
        "messages.dropped": m.messages_dropped(),
        "messages.dropped.no_subscribers": n(&m.dropped_no_subscribers),
        "messages.dropped.queue_full": n(&m.dropped_queue_full),
        "messages.dropped.expired": n(&m.dropped_undeliverable),
        "messages.dropped.store_refused": n(&m.store_refused),
        "messages.dropped.acl_denied": n(&m.acl_denied),
        "messages.dropped.publisher_paused": n(&m.dropped_paused),
        "authorization.deny": n(&m.acl_denied),
        "authentication.failure": n(&m.auth_failures),
        "client.connected": n(&m.connections_total),
        "session.expired": n(&m.sessions_expired),
        "publisher.pauses": n(&m.publisher_pauses),
        "connections.refused": b.permits.refused.load(Ordering::Relaxed),
        "connections.slow_reader_closed": n(&m.slow_readers_closed),
        "connections.sessions_refused": n(&m.sessions_refused),
        "messages.retained.refused": n(&m.retained_refused),
        "quic.handshakes": n(&m.quic_handshakes),
        "quic.0rtt.accepted": n(&m.quic_0rtt_accepted),
        "quic.migrations": n(&m.quic_migrations),
        "quic.retries": n(&m.quic_retries),
        "quic.datagrams.sent": n(&m.quic_datagrams.sent),
        "quic.datagrams.received": n(&m.quic_datagrams.received),
        "quic.datagrams.duplicates": n(&m.quic_datagrams.duplicates),
        "quic.datagrams.invalid": n(&m.quic_datagrams.invalid),
        "quic.datagrams.fallbacks": n(&m.quic_datagrams.fallbacks),
        "quic.datagrams.dropped": n(&m.quic_datagrams.send_dropped),
        "connections.rate_limited": n(&m.connections_rate_limited),
        "connections.flapping_banned": n(&m.flapping_bans),
        "cluster.messages.forwarded": n(&m.peers_forwarded),
        "cluster.messages.received": n(&m.messages_from_peers),
        "cluster.messages.duplicates": n(&m.peers_duplicates),
        "cluster.messages.dropped": n(&m.peers_dropped),
        "cluster.messages.replayed": n(&m.peers_replayed),
        "cluster.takeovers.asked": n(&m.peers_takeovers_asked),
        "cluster.takeovers.answered": n(&m.peers_takeovers_answered),
    })
}

/// This node's entry of `/api/v5/nodes` (EMQX's fields), `uptime` after it started.
pub fn node_info(b: &Broker, node: &str, uptime: std::time::Duration) -> Value {
    let (memory_used, memory_total) = memory();
    let load = load_average();
    json!({
        "node": node,
        "node_status": "running",
        "version": env!("CARGO_PKG_VERSION"),
        "edition": "Opensource",
        "role": "core",
        "uptime": u64::try_from(uptime.as_millis()).unwrap_or(u64::MAX),
        "connections": b.metrics.connections.load(Ordering::Relaxed),
        "live_connections": b.clients.len(),
        "memory_used": memory_used,
        "memory_total": memory_total,
        "load1": load[0],
        "load5": load[1],
        "load15": load[2],
        "sys_path": std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),
    })
}

/// What a node tells the rest of its cluster about itself (`cluster::presence`): its
/// [`node_info`], with its [`stats`] under `stats` and its [`counters`] under `metrics`.
pub fn node_report(b: &Broker, node: &str, uptime: std::time::Duration) -> Value {
    let mut report = node_info(b, node, uptime);
    report["stats"] = stats(b);
    report["metrics"] = counters(b);
    report
}

/// Resident and total memory in bytes (from `/proc`; 0 where it cannot be read).
pub fn memory() -> (u64, u64) {
    let kib = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    let used = std::fs::read_to_string("/proc/self/status").map_or(0, |t| kib(&t, "VmRSS:"));
    let total = std::fs::read_to_string("/proc/meminfo").map_or(0, |t| kib(&t, "MemTotal:"));
    (used, total)
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
    ]
}

/// The link figures of the connected clients of one transport, summed for Prometheus.
#[derive(Default)]
struct LinkTotals {
    connections: u64,
    measured: u64,
    rtt_sum_us: u64,
    rtt_max_us: u64,
    cwnd_sum: u64,
    sent_packets: u64,
    lost_packets: u64,
    congestion_events: u64,
}

/// `GET /api/v5/prometheus/stats`.
pub async fn prometheus(State(state): State<Arc<AdminState>>) -> impl IntoResponse {
    let clients = state.broker.clients.all();
    // One netlink dump per scrape, and none when no client is connected over TCP.
    let tcp = if clients.iter().any(|c| c.is_tcp()) {
        state.tcp_links().await
    } else {
        None
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        exposition(&state, &clients, tcp.as_deref()),
    )
}

/// The text exposition; the link figures are those of `clients`, the TCP ones from `tcp`.
fn exposition(state: &AdminState, clients: &[Arc<ClientInfo>], tcp: Option<&TcpLinks>) -> String {
    let mut out = String::with_capacity(4096);
    let node = &*state.node;
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{node=\"{node}\"}} {value}"
        );
    };
    let stats = stats(&state.broker);
    for (key, help) in [
        ("connections.count", "Connections open"),
        ("connections.max", "Most connections open at once"),
        (
            "live_connections.count",
            "Clients connected (CONNECT accepted)",
        ),
        ("sessions.count", "Sessions, online and offline"),
        ("topics.count", "Distinct subscribed filters"),
        ("subscriptions.count", "Subscriptions"),
        ("subscriptions.shared.count", "Shared subscriptions"),
        ("retained.count", "Retained messages"),
        (
            "retained.bytes",
            "Topic and payload bytes of the retained messages",
        ),
        ("delayed.count", "Delayed messages waiting"),
        (
            "quic.stream_tasks.count",
            "QUIC stream reader and writer tasks not yet released",
        ),
        (
            "queued.bytes",
            "Bytes of deliveries queued over every session (against broker.max_queued_bytes)",
        ),
    ] {
        let name = match key {
            "queued.bytes" => "petrel_queued_bytes".to_owned(),
            key if key.starts_with("quic.") => format!("petrel_{}", key.replace('.', "_")),
            key => format!("emqx_{}", key.replace('.', "_")),
        };
        metric(&name, "gauge", help, stats[key].as_f64().unwrap_or(0.0));
    }
    let counters = counters(&state.broker);
    if let Value::Object(map) = &counters {
        for (key, value) in map {
            let name = match key.as_str() {
                k if k.starts_with("quic.")
                    || k.starts_with("publisher.")
                    || k.starts_with("connections.")
                    || k.starts_with("cluster.") =>
                {
                    format!("petrel_{}_total", k.replace('.', "_"))
                }
                k => format!("emqx_{}", k.replace('.', "_")),
            };
            metric(&name, "counter", key, value.as_f64().unwrap_or(0.0));
        }
    }
    let (used, total) = memory();
    metric(
        "emqx_vm_total_memory",
        "gauge",
        "Memory of the machine, bytes",
        total as f64,
    );
    metric(
        "emqx_vm_used_memory",
        "gauge",
        "Resident memory of the broker, bytes",
        used as f64,
    );
    metric(
        "emqx_uptime_seconds",
        "gauge",
        "Seconds since the broker started",
        state.started.elapsed().as_secs_f64(),
    );
    // Link quality by transport, over the clients connected now.
    let mut totals: std::collections::BTreeMap<&'static str, LinkTotals> = Default::default();
    for info in clients {
        let t = totals.entry(info.transport).or_default();
        t.connections += 1;
        if let Some(q) = info.link_quality_with(tcp) {
            t.measured += 1;
            t.rtt_sum_us += q.rtt_us;
            t.rtt_max_us = t.rtt_max_us.max(q.rtt_us);
            t.cwnd_sum += q.cwnd;
            t.sent_packets += q.sent_packets;
            t.lost_packets += q.lost_packets;
            t.congestion_events += q.congestion_events;
        }
    }
    type Family = (
        &'static str,
        &'static str,
        &'static str,
        fn(&LinkTotals) -> f64,
    );
    let families: [Family; 7] = [
        (
            "petrel_link_connections",
            "gauge",
            "Clients connected, by transport",
            |t| t.connections as f64,
        ),
        (
            "petrel_link_rtt_seconds_avg",
            "gauge",
            "Mean smoothed round-trip time of the measured links",
            |t| {
                if t.measured == 0 {
                    0.0
                } else {
                    t.rtt_sum_us as f64 / t.measured as f64 / 1e6
                }
            },
        ),
        (
            "petrel_link_rtt_seconds_max",
            "gauge",
            "Largest smoothed round-trip time",
            |t| t.rtt_max_us as f64 / 1e6,
        ),
        (
            "petrel_link_cwnd_bytes_avg",
            "gauge",
            "Mean congestion window",
            |t| {
                if t.measured == 0 {
                    0.0
                } else {
                    t.cwnd_sum as f64 / t.measured as f64
                }
            },
        ),
        (
            "petrel_link_sent_packets",
            "gauge",
            "Packets sent on the links connected now (TCP: data segments)",
            |t| t.sent_packets as f64,
        ),
        (
            "petrel_link_lost_packets",
            "gauge",
            "Packets lost (QUIC: declared lost; TCP: segments retransmitted) on the links connected now",
            |t| t.lost_packets as f64,
        ),
        (
            "petrel_link_congestion_events",
            "gauge",
            "Congestion back-offs on the links connected now (QUIC only; 0 for TCP)",
            |t| t.congestion_events as f64,
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (transport, t) in &totals {
            if name != "petrel_link_connections" && t.measured == 0 {
                continue;
            }
            let _ = writeln!(
                out,
                "{name}{{node=\"{node}\",transport=\"{transport}\"}} {}",
                value(t)
            );
        }
    }
    out
}
