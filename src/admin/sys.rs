//! The `$SYS` topics: Mosquitto's `$SYS/broker/...` set and EMQX's `$SYS/brokers/<node>/...`
//! tree, published every `[sys_topics] interval` as retained messages (as Mosquitto does;
//! only values that changed are published again), and EMQX's client events
//! `$SYS/brokers/<node>/clients/<clientid>/connected|disconnected` as they happen. They go
//! through the router like any message, so the ACL decides who may read them, and a `#`
//! subscription does not see them [MQTT-4.7.2-1]. They are not written to the durable store.
//! In a cluster, `$SYS/brokers` lists every running node (from `cluster::presence`).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics;
use crate::broker::clients::{ClientEvents, ClientInfo};
use crate::broker::{clock, Broker};
use crate::cluster::presence::Presence;
use crate::codec::{Properties, Publish, QoS, ReasonCode};
use crate::core::message::AppMessage;
use crate::core::topic::TopicName;

/// Starts the periodic publisher (and the client events, if enabled); returns the handle
/// that changes the interval on reload (`Duration::ZERO`: off).
pub fn start(
    broker: &Arc<Broker>,
    node: Arc<str>,
    presence: Option<Arc<Presence>>,
    settings: &super::SysSettings,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> watch::Sender<Duration> {
    if settings.client_events {
        broker.clients.set_events(Arc::new(Events {
            broker: Arc::downgrade(broker),
            node: Arc::clone(&node),
        }));
    }
    let (interval_tx, interval) = watch::channel(settings.interval);
    let mut publisher = Publisher {
        broker: Arc::downgrade(broker),
        node,
        presence,
        last: HashMap::new(),
        started: clock::now(),
        loads: Loads::default(),
    };
    let shutdown = shutdown.clone();
    tracker.spawn(async move { publisher.run(interval, shutdown).await });
    interval_tx
}

/// Routes one `$SYS` message from the broker itself.
fn publish(broker: &Broker, topic: String, payload: Bytes, retain: bool) {
    let Ok(name) = TopicName::parse(topic.clone(), 0) else {
        // A client id that makes no topic name (it holds `+`, `#`, or is too long).
        return tracing::debug!(topic, "no $SYS event for this client id");
    };
    let now = clock::now();
    let message = AppMessage::from_publish(
        name,
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain,
            topic,
            packet_id: None,
            properties: Properties::default(),
            payload,
        },
        None,
        now,
    );
    broker.publish(Arc::new(message), now);
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

struct Events {
    broker: Weak<Broker>,
    node: Arc<str>,
}

impl Events {
    fn topic(&self, client_id: &str, event: &str) -> String {
        format!("$SYS/brokers/{}/clients/{client_id}/{event}", self.node)
    }
}

/// The fields every client event carries (EMQX's names).
fn identity(info: &ClientInfo) -> Payload {
    Payload(json!({
        "clientid": &*info.client_id,
        "username": info.username.as_deref(),
        "ipaddress": info.peer.ip().to_string(),
        "proto_name": if info.proto_ver == 3 { "MQIsdp" } else { "MQTT" },
        "proto_ver": info.proto_ver,
    }))
}

/// A client event's JSON object, built in two parts.
struct Payload(Value);

impl Payload {
    fn extend(&mut self, more: Value) {
        if let (Value::Object(into), Value::Object(from)) = (&mut self.0, more) {
            into.extend(from);
        }
    }
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// EMQX's disconnect reasons.
fn reason_name(reason: ReasonCode) -> String {
    match reason {
        ReasonCode::SUCCESS => "normal".into(),
        ReasonCode::ADMINISTRATIVE_ACTION => "kicked".into(),
        ReasonCode::SESSION_TAKEN_OVER => "takenover".into(),
        ReasonCode::KEEP_ALIVE_TIMEOUT => "keepalive_timeout".into(),
        ReasonCode::SERVER_SHUTTING_DOWN => "shutdown".into(),
        other => other.text().map_or_else(
            || format!("0x{:02X}", other.0),
            |t| t.to_lowercase().replace(' ', "_"),
        ),
    }
}

impl ClientEvents for Events {
    fn connected(&self, info: &ClientInfo) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        let mut payload = identity(info);
        payload.extend(json!({
            "keepalive": info.keepalive,
            "clean_start": info.clean_start,
            "expiry_interval": info.expiry_interval,
            "connected_at": millis(info.connected_at),
            "connack": 0,
            "ts": millis(clock::wall()),
        }));
        let topic = self.topic(&info.client_id, "connected");
        publish(&broker, topic, Bytes::from(payload.to_string()), false);
    }

    fn disconnected(&self, info: &ClientInfo, reason: ReasonCode) {
        let Some(broker) = self.broker.upgrade() else {
            return;
        };
        let now = millis(clock::wall());
        let mut payload = identity(info);
        payload.extend(json!({
            "reason": reason_name(reason),
            "disconnected_at": now,
            "ts": now,
        }));
        let topic = self.topic(&info.client_id, "disconnected");
        publish(&broker, topic, Bytes::from(payload.to_string()), false);
    }
}

/// Mosquitto's load figures: exponentially weighted per-minute rates over 1, 5 and 15
/// minutes.
#[derive(Default)]
struct Loads {
    previous: HashMap<&'static str, u64>,
    averages: HashMap<&'static str, [f64; 3]>,
}

impl Loads {
    /// Folds in `total` for `name`, `elapsed` after the last sample; returns the averages.
    fn sample(&mut self, name: &'static str, total: u64, elapsed: Duration) -> [f64; 3] {
        let previous = self.previous.insert(name, total).unwrap_or(total);
        let secs = elapsed.as_secs_f64().max(0.001);
        let per_minute = total.saturating_sub(previous) as f64 * 60.0 / secs;
        let averages = self.averages.entry(name).or_insert([per_minute; 3]);
        for (average, window) in averages.iter_mut().zip([60.0, 300.0, 900.0]) {
            let keep = (-secs / window).exp();
            *average = *average * keep + per_minute * (1.0 - keep);
        }
        *averages
    }
}

struct Publisher {
    broker: Weak<Broker>,
    node: Arc<str>,
    /// The cluster's nodes, for `$SYS/brokers` (`None`: this node alone).
    presence: Option<Arc<Presence>>,
    /// What was last published on each topic: unchanged values are not sent again.
    last: HashMap<String, String>,
    started: std::time::Instant,
    loads: Loads,
}

impl Publisher {
    async fn run(&mut self, mut interval: watch::Receiver<Duration>, shutdown: CancellationToken) {
        let mut last_turn = clock::now();
        loop {
            let every = *interval.borrow_and_update();
            if every.is_zero() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = interval.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let Some(broker) = self.broker.upgrade() else {
                return;
            };
            let now = clock::now();
            self.turn(&broker, now - last_turn);
            last_turn = now;
            drop(broker);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
                changed = interval.changed() => if changed.is_err() { return },
            }
        }
    }

    /// EMQX's `$SYS/brokers`: the running nodes' names, sorted, separated by commas.
    fn brokers(&self) -> String {
        match &self.presence {
            Some(presence) => presence.running().join(","),
            None => self.node.to_string(),
        }
    }

    fn set(&mut self, broker: &Broker, topic: String, value: String) {
        if self.last.get(&topic) == Some(&value) {
            return;
        }
        publish(broker, topic.clone(), Bytes::from(value.clone()), true);
        self.last.insert(topic, value);
    }

    /// One round of values.
    fn turn(&mut self, broker: &Broker, elapsed: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let version = env!("CARGO_PKG_VERSION");
        let uptime = self.started.elapsed().as_secs();
        let m = &broker.metrics;
        let sessions = broker.session_count() as u64;
        let connected = broker.clients.len() as u64;
        let received = m.messages_received();
        let sent = m.messages_delivered.load(Relaxed);
        let dropped = m.messages_dropped();
        let opened = m.connections_total.load(Relaxed);
        let mut values: Vec<(String, String)> = vec![
            ("version".into(), format!("petrel version {version}")),
            ("uptime".into(), format!("{uptime} seconds")),
            ("clients/connected".into(), connected.to_string()),
            (
                "clients/disconnected".into(),
                sessions.saturating_sub(connected).to_string(),
            ),
            ("clients/total".into(), sessions.max(connected).to_string()),
            (
                "clients/maximum".into(),
                m.connections_max.load(Relaxed).to_string(),
            ),
            (
                "clients/expired".into(),
                m.sessions_expired.load(Relaxed).to_string(),
            ),
            ("messages/received".into(), received.to_string()),
            ("messages/sent".into(), sent.to_string()),
            (
                "messages/stored".into(),
                (broker.retained_count() + broker.delayed_count()).to_string(),
            ),
            ("publish/messages/dropped".into(), dropped.to_string()),
            (
                "retained messages/count".into(),
                broker.retained_count().to_string(),
            ),
            (
                "subscriptions/count".into(),
                broker.subscription_count().to_string(),
            ),
            ("heap/current".into(), metrics::memory().0.to_string()),
        ];
        for (name, total) in [
            ("messages/received", received),
            ("messages/sent", sent),
            ("publish/dropped", dropped),
            ("connections", opened),
        ] {
            let averages = self.loads.sample(name, total, elapsed);
            for (window, average) in ["1min", "5min", "15min"].iter().zip(averages) {
                values.push((format!("load/{name}/{window}"), format!("{average:.2}")));
            }
        }
        for (key, value) in values {
            self.set(broker, format!("$SYS/broker/{key}"), value);
        }
        // EMQX's tree.
        let node = Arc::clone(&self.node);
        self.set(broker, "$SYS/brokers".into(), self.brokers());
        let base = format!("$SYS/brokers/{node}");
        self.set(broker, format!("{base}/version"), version.into());
        self.set(
            broker,
            format!("{base}/sysdescr"),
            "Petrel MQTT broker".into(),
        );
        self.set(
            broker,
            format!("{base}/uptime"),
            format!("{uptime} seconds"),
        );
        self.set(
            broker,
            format!("{base}/datetime"),
            humantime::format_rfc3339_seconds(clock::wall()).to_string(),
        );
        for (group, values) in [
            ("stats", metrics::stats(broker)),
            ("metrics", metrics::counters(broker)),
        ] {
            if let Value::Object(map) = values {
                for (key, value) in map {
                    self.set(
                        broker,
                        format!("{base}/{group}/{}", key.replace('.', "/")),
                        value.to_string(),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_averages_follow_the_rate_per_minute() {
        let mut loads = Loads::default();
        assert_eq!(loads.sample("m", 0, Duration::from_secs(10)), [0.0; 3]);
        // 100 messages in 10 s: 600 a minute; the 1-minute average moves furthest.
        let [one, five, fifteen] = loads.sample("m", 100, Duration::from_secs(10));
        assert!(
            one > five && five > fifteen && fifteen > 0.0,
            "{one} {five} {fifteen}"
        );
        assert!(one < 600.0);
        for i in 2..200 {
            loads.sample("m", 100 * i, Duration::from_secs(10));
        }
        let [one, ..] = loads.sample("m", 100 * 200, Duration::from_secs(10));
        assert!((one - 600.0).abs() < 1.0, "{one}");
    }

    #[test]
    fn disconnect_reasons_use_emqx_names() {
        assert_eq!(reason_name(ReasonCode::ADMINISTRATIVE_ACTION), "kicked");
        assert_eq!(reason_name(ReasonCode::SUCCESS), "normal");
        assert_eq!(reason_name(ReasonCode::PROTOCOL_ERROR), "protocol_error");
    }
}
