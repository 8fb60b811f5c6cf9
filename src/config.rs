//! Configuration: the TOML file model, environment and command-line overrides, and the
//! validated runtime settings built from them.
//!
//! Sources, later ones winning: built-in defaults, the file (`--config`), environment
//! variables `PETREL_SECTION__KEY=value`, then `--set section.key=value`. Unknown keys are
//! errors that name the key. Every default is written once, in the `Default` impls below, and
//! documented in `petrel.example.toml` (which a test loads so it cannot rot).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::admin::{ApiSettings, SysSettings};
pub use crate::broker::listener::{ListenerConfig, ListenerKind};
use crate::broker::listener::{
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONN_RATE, DEFAULT_WS_PATH,
};
pub use crate::broker::mailbox::QueueFull;
use crate::codec::{QoS, SubscriptionOptions};
use crate::core::rewrite::{AutoSubscribe, RewriteAction, RewriteRule, MAX_RULES};
pub use crate::core::router::SharedStrategy;
use crate::core::topic::TopicFilter;
#[cfg(test)]
use crate::duration::parse_duration;
use crate::duration::{deserialize as duration, deserialize_some as some_duration};
pub use crate::storage::{Durability, StorageSettings};
pub use crate::transport::quic::{Congestion, QuicSettings};
pub use crate::transport::tls::{ClientVerify, PeerCertAsUsername, TlsSettings};

/// The largest packet MQTT can frame: 256 MB.
pub const MAX_PACKET_SIZE_CEILING: u32 = 268_435_455 + 5;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub broker: BrokerSection,
    pub mqtt: MqttSection,
    pub session: SessionSection,
    pub log: LogSection,
    pub quic: QuicSettings,
    pub delayed: DelayedSection,
    pub retainer: RetainerSection,
    pub auto_subscribe: AutoSubscribeSection,
    /// `[shared_subscription_group.NAME] strategy = "..."`: a group's own strategy.
    pub shared_subscription_group: std::collections::HashMap<String, SharedGroupSettings>,
    /// `[[rewrite]]` rules, first match wins.
    pub rewrite: Vec<RewriteFile>,
    pub auth: crate::auth::AuthSettings,
    pub storage: StorageSettings,
    pub api: ApiSettings,
    pub sys_topics: SysSettings,
    pub flapping_detect: crate::broker::flapping::FlappingSettings,
    pub cluster: crate::cluster::ClusterSettings,
    #[serde(deserialize_with = "listeners")]
    pub listeners: Vec<ListenerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            broker: BrokerSection::default(),
            mqtt: MqttSection::default(),
            session: SessionSection::default(),
            log: LogSection::default(),
            quic: QuicSettings::default(),
            delayed: DelayedSection::default(),
            retainer: RetainerSection::default(),
            auto_subscribe: AutoSubscribeSection::default(),
            shared_subscription_group: Default::default(),
            rewrite: Vec::new(),
            auth: crate::auth::AuthSettings::default(),
            storage: StorageSettings::default(),
            api: ApiSettings::default(),
            sys_topics: SysSettings::default(),
            flapping_detect: Default::default(),
            cluster: Default::default(),
            listeners: ListenerKind::ALL
                .iter()
                .map(|&kind| ListenerConfig::new(kind, kind.default_bind()))
                .collect(),
        }
    }
}

/// `broker.max_queued_bytes` by default: 256 MiB. Safe on the smallest machines a broker runs
/// on (a 512 MiB container keeps room for its connections), and far above what healthy
/// traffic queues (subscribers that keep up hold about a window each): it is reached only
/// when many subscribers fall behind at once.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 256 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerSection {
    /// Where persistent state lives.
    pub data_dir: PathBuf,
    /// How long a closing connection may take to flush its last packets.
    #[serde(deserialize_with = "duration")]
    pub close_linger: Duration,
    /// This node's name in `$SYS/brokers/<node>/...` and the API (EMQX's `node.name`);
    /// default `petrel@<hostname>`.
    pub node_name: Option<String>,
    /// Connections open at once over every listener; past it a new socket is closed at once.
    pub max_connections: usize,
    /// Connections open at once from one IP address (0: no limit, the default: carrier-grade
    /// NAT puts thousands of phones and vehicles behind one address).
    pub max_connections_per_address: usize,
    /// Bytes of deliveries queued over every session past which publishers are held until
    /// the queues drain to three quarters of it (0: no limit).
    pub max_queued_bytes: u64,
    /// Sessions held at once, online and offline persistent (0: no limit); past it a
    /// CONNECT that needs a new session gets CONNACK 0x97 (3.1.1: return code 3).
    pub max_sessions: usize,
    /// TCP keepalive on accepted sockets, EMQX's "Idle,Interval,Probes" in seconds, or
    /// "none".
    pub tcp_keepalive: String,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            close_linger: Duration::from_secs(5),
            node_name: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_address: 0,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
            max_sessions: 2 * DEFAULT_MAX_CONNECTIONS,
            tcp_keepalive: crate::broker::listener::TcpKeepalive::DEFAULT.to_owned(),
        }
    }
}

impl BrokerSection {
    /// `node_name`, or `petrel@<hostname>`.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "127.0.0.1".into());
            format!("petrel@{host}")
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSection {
    pub max_packet_size: u32,
    /// The largest CONNECT, checked before anything is buffered: a peer not yet
    /// authenticated cannot make the broker hold `max_packet_size` bytes (a CONNECT with a
    /// will larger than this needs it raised).
    pub max_connect_packet_size: u32,
    pub receive_maximum: u16,
    pub max_inflight: u16,
    pub topic_alias_maximum: u16,
    /// Bytes one connection's inbound topic aliases may hold (0: no limit); past it
    /// DISCONNECT 0x97. The broker's outbound aliases have the same budget (past it, topics
    /// go out in full).
    pub max_topic_alias_bytes: usize,
    /// User Properties in one packet, a CONNECT's and its will's together (0: no limit);
    /// past it DISCONNECT 0x97.
    pub max_user_properties: u32,
    /// Bytes of output waiting for a client that does not read (0: no limit; never below
    /// 1 MiB + `max_packet_size` + 64 KiB); past it the connection is closed (0x97).
    pub max_outbound_buffer: usize,
    pub max_keepalive: u16,
    pub maximum_qos: u8,
    pub retain_available: bool,
    pub wildcard_subscription_available: bool,
    pub shared_subscription_available: bool,
    pub subscription_identifiers_available: bool,
    pub max_topic_levels: usize,
    pub max_client_id_len: usize,
    pub max_subscriptions: usize,
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// `$exclusive/{filter}` subscriptions (EMQX's `mqtt.exclusive_subscription`).
    pub exclusive_subscription: bool,
    /// How a shared group picks a member (EMQX's names); `[shared_subscription_group.NAME]`
    /// sets it per group.
    pub shared_subscription_strategy: SharedStrategy,
}

impl Default for MqttSection {
    fn default() -> Self {
        let limits = crate::core::channel::Limits::default();
        Self {
            max_packet_size: limits.max_packet_size,
            max_connect_packet_size: limits.max_connect_packet_size,
            receive_maximum: limits.receive_maximum,
            max_inflight: limits.max_inflight,
            topic_alias_maximum: limits.topic_alias_maximum,
            max_topic_alias_bytes: limits.max_topic_alias_bytes,
            max_user_properties: limits.max_user_properties,
            max_outbound_buffer: limits.max_outbound_buffer,
            max_keepalive: limits.max_keepalive,
            maximum_qos: limits.maximum_qos as u8,
            retain_available: limits.retain_available,
            wildcard_subscription_available: limits.wildcard_subscription_available,
            shared_subscription_available: limits.shared_subscription_available,
            subscription_identifiers_available: limits.subscription_identifiers_available,
            max_topic_levels: limits.max_topic_levels,
            max_client_id_len: limits.max_client_id_len,
            max_subscriptions: limits.max_subscriptions,
            connect_timeout: limits.connect_timeout,
            exclusive_subscription: limits.exclusive_subscription,
            shared_subscription_strategy: SharedStrategy::default(),
        }
    }
}

/// `[auto_subscribe]`: EMQX's automatic subscriptions, `[[auto_subscribe.topics]]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoSubscribeSection {
    pub topics: Vec<AutoSubscribeFile>,
}

/// One `[[auto_subscribe.topics]]` entry, with EMQX's names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoSubscribeFile {
    /// The filter; `${clientid}`, `${username}`, `${host}` and `${port}` are replaced.
    pub topic: String,
    #[serde(default)]
    pub qos: u8,
    /// Retain Handling (0, 1, 2).
    #[serde(default)]
    pub rh: u8,
    /// Retain As Published.
    #[serde(default)]
    pub rap: bool,
    /// No Local.
    #[serde(default)]
    pub nl: bool,
}

/// `[shared_subscription_group.NAME]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedGroupSettings {
    pub strategy: SharedStrategy,
}

/// One `[[rewrite]]` rule, with EMQX's names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteFile {
    /// `publish`, `subscribe` or `all`.
    pub action: String,
    /// A topic filter the topic must match.
    pub source_topic: String,
    /// A regular expression whose groups `$1`…`$N` `dest_topic` may use.
    pub re: String,
    pub dest_topic: String,
}

/// `[delayed]`: EMQX's delayed publish (`$delayed/{seconds}/{topic}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DelayedSection {
    pub enable: bool,
    /// Delayed messages held at once (0: no limit); past it a publish gets 0x97.
    pub max_delayed_messages: usize,
}

impl Default for DelayedSection {
    fn default() -> Self {
        Self {
            enable: true,
            max_delayed_messages: 0,
        }
    }
}

/// `[retainer]`: bounds on retained messages, with EMQX's names (each 0 for no limit). Past
/// one, a message is still routed but not retained; it is counted and logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetainerSection {
    /// Retained messages held.
    pub max_retained_messages: usize,
    /// The largest retained payload, in bytes.
    pub max_payload_size: usize,
    /// Topic and payload bytes of every retained message together.
    pub max_retained_bytes: usize,
}

impl Default for RetainerSection {
    fn default() -> Self {
        let limits = crate::core::retain::RetainLimits::default();
        Self {
            max_retained_messages: limits.max_messages,
            max_payload_size: limits.max_payload_size,
            max_retained_bytes: limits.max_bytes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSection {
    /// Deliveries queued per session beyond the in-flight window (online or offline).
    pub max_queued: usize,
    /// What a full queue does with a QoS 1/2 delivery when no QoS 0 one can make room.
    pub queue_full: QueueFull,
    /// Session expiry for 3.1 / 3.1.1 clients connecting with clean session 0.
    #[serde(deserialize_with = "duration")]
    pub v3_expiry: Duration,
    /// Ceiling on what v5 clients may ask for; "never" for none.
    #[serde(deserialize_with = "duration")]
    pub max_expiry: Duration,
}

impl Default for SessionSection {
    fn default() -> Self {
        let limits = crate::core::channel::Limits::default();
        Self {
            max_queued: 1000,
            queue_full: Default::default(),
            v3_expiry: Duration::from_secs(u64::from(limits.v3_session_expiry)),
            max_expiry: Duration::MAX,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A `tracing` filter, e.g. `info` or `petrel=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// `text` (human; colours only on a terminal) or `json` (one object per line).
    pub format: LogFormat,
    /// Also write the log to this file (no colours), rotated every `rotation`.
    pub file: Option<PathBuf>,
    pub rotation: LogRotation,
    /// Rotated files kept (0: all).
    pub max_files: usize,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
            file: None,
            rotation: LogRotation::Daily,
            max_files: 7,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogRotation {
    Minutely,
    Hourly,
    Daily,
    Never,
}

/// The transports a listener can serve.
/// A `[[listeners]]` entry as written in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerFile {
    kind: ListenerKind,
    bind: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    verify: Option<ClientVerify>,
    client_ca: Option<PathBuf>,
    peer_cert_as_username: Option<PeerCertAsUsername>,
    path: Option<String>,
    #[serde(default, deserialize_with = "some_duration")]
    handshake_timeout: Option<Duration>,
    max_connections: Option<usize>,
    max_conn_rate: Option<ConnRateFile>,
}

/// `max_conn_rate` as EMQX writes it: a number of connections per second, `"N/s"`, or
/// `"infinity"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ConnRateFile {
    PerSecond(u32),
    Text(String),
}

impl ConnRateFile {
    /// `None`: no limit.
    fn parse(self) -> Result<Option<std::num::NonZeroU32>, String> {
        let n = match self {
            Self::PerSecond(n) => n,
            Self::Text(text) if text == "infinity" => return Ok(None),
            Self::Text(text) => text
                .strip_suffix("/s")
                .and_then(|n| n.trim().parse().ok())
                .ok_or_else(|| {
                    format!("`max_conn_rate` is a number per second, \"N/s\" or \"infinity\", got `{text}`")
                })?,
        };
        std::num::NonZeroU32::new(n)
            .map(Some)
            .ok_or_else(|| "`max_conn_rate` must be at least 1 (or \"infinity\")".to_owned())
    }
}

/// `[[listeners]]`, each entry checked by [`listener`].
fn listeners<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<ListenerConfig>, D::Error> {
    Vec::<ListenerFile>::deserialize(deserializer)?
        .into_iter()
        .map(|file| listener(file).map_err(serde::de::Error::custom))
        .collect()
}

/// A listener entry, validated: keys that do not apply to its kind are refused.
fn listener(file: ListenerFile) -> Result<ListenerConfig, String> {
    {
        let kind = file.kind;
        let tls_keys = [
            ("cert", file.cert.is_some()),
            ("key", file.key.is_some()),
            ("verify", file.verify.is_some()),
            ("client_ca", file.client_ca.is_some()),
            (
                "peer_cert_as_username",
                file.peer_cert_as_username.is_some(),
            ),
        ];
        if !kind.uses_tls() {
            if let Some((key, _)) = tls_keys.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "`{key}` applies to tls, wss and quic listeners, not to kind = \"{kind}\""
                ));
            }
        }
        if !kind.uses_websocket() && file.path.is_some() {
            return Err(format!(
                "`path` applies to ws and wss listeners, not to kind = \"{kind}\""
            ));
        }
        if kind == ListenerKind::Tcp && file.handshake_timeout.is_some() {
            return Err("`handshake_timeout` does not apply to kind = \"tcp\"".into());
        }
        if file.cert.is_some() != file.key.is_some() {
            return Err("`cert` and `key` must be given together".into());
        }
        let verify = file.verify.unwrap_or_default();
        if verify != ClientVerify::None && file.client_ca.is_none() {
            return Err("`verify` other than \"none\" needs `client_ca`".into());
        }
        let peer_cert_as_username = file.peer_cert_as_username.unwrap_or_default();
        if verify == ClientVerify::None && peer_cert_as_username != PeerCertAsUsername::None {
            return Err(
                "`peer_cert_as_username` needs `verify` = \"optional\" or \"required\"".into(),
            );
        }
        let path = file.path.unwrap_or_else(|| DEFAULT_WS_PATH.to_owned());
        if !path.starts_with('/') {
            return Err(format!("`path` must start with '/', got `{path}`"));
        }
        let handshake_timeout = file.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
        if handshake_timeout.is_zero() {
            return Err("`handshake_timeout` must be more than zero".into());
        }
        Ok(ListenerConfig {
            kind,
            bind: file.bind.unwrap_or_else(|| kind.default_bind()),
            tls: TlsSettings {
                cert: file.cert,
                key: file.key,
                verify,
                client_ca: file.client_ca,
                peer_cert_as_username,
            },
            path,
            handshake_timeout,
            max_connections: file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_conn_rate: match file.max_conn_rate {
                Some(rate) => rate.parse()?,
                None => Some(DEFAULT_MAX_CONN_RATE),
            },
        })
    }
}

impl Config {
    /// Loads the file (if any), applies environment (`PETREL_SECTION__KEY`) and `--set`
    /// overrides (`section.key=value`), and validates the result.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        sets: &[String],
    ) -> Result<Self, ConfigError> {
        let (mut table, origin) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    origin: path.display().to_string(),
                    message: e.to_string(),
                })?;
                (table, path.display().to_string())
            }
            None => (toml::Table::new(), "configuration".to_owned()),
        };
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("PETREL_") else {
                continue;
            };
            let Some((section, key)) = rest.split_once("__") else {
                continue;
            };
            set_key(
                &mut table,
                &section.to_lowercase(),
                &key.to_lowercase(),
                &value,
            );
        }
        for set in sets {
            let (path, value) = set.split_once('=').ok_or_else(|| ConfigError::Invalid {
                key: set.clone(),
                message: "expected section.key=value".into(),
            })?;
            let (section, key) = path.split_once('.').ok_or_else(|| ConfigError::Invalid {
                key: path.into(),
                message: "expected section.key".into(),
            })?;
            set_key(&mut table, section, key, value);
        }
        // Re-parsing the merged text makes serde's errors point at the offending key.
        let text = toml::to_string(&table).map_err(|e| ConfigError::Parse {
            origin: origin.clone(),
            message: e.to_string(),
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin,
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The `[[rewrite]]` rules, parsed (filters, regular expressions).
    pub fn rewrite_rules(&self) -> Result<Vec<RewriteRule>, ConfigError> {
        let invalid = |i: usize, field: &str, message: String| ConfigError::Invalid {
            key: format!("rewrite[{i}].{field}"),
            message,
        };
        if self.rewrite.len() > MAX_RULES {
            return Err(ConfigError::Invalid {
                key: "rewrite".into(),
                message: format!("at most {MAX_RULES} rules"),
            });
        }
        self.rewrite
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let action = match rule.action.as_str() {
                    "publish" => RewriteAction::Publish,
                    "subscribe" => RewriteAction::Subscribe,
                    "all" => RewriteAction::All,
                    other => {
                        return Err(invalid(
                            i,
                            "action",
                            format!("`{other}` is not publish, subscribe or all"),
                        ))
                    }
                };
                let source = TopicFilter::parse(&rule.source_topic, 0)
                    .map_err(|e| invalid(i, "source_topic", e.to_string()))?;
                let re =
                    regex::Regex::new(&rule.re).map_err(|e| invalid(i, "re", e.to_string()))?;
                Ok(RewriteRule {
                    action,
                    source,
                    re,
                    dest: rule.dest_topic.clone(),
                })
            })
            .collect()
    }

    /// The `[[auto_subscribe.topics]]` rules, checked.
    pub fn auto_subscribe_rules(&self) -> Result<Vec<AutoSubscribe>, ConfigError> {
        let topics = &self.auto_subscribe.topics;
        if topics.len() > MAX_RULES {
            return Err(ConfigError::Invalid {
                key: "auto_subscribe.topics".into(),
                message: format!("at most {MAX_RULES} rules"),
            });
        }
        topics
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let invalid = |field: &str, message: &str| ConfigError::Invalid {
                    key: format!("auto_subscribe.topics[{i}].{field}"),
                    message: message.into(),
                };
                let qos =
                    QoS::from_u8(rule.qos).ok_or_else(|| invalid("qos", "must be 0, 1 or 2"))?;
                if rule.rh > 2 {
                    return Err(invalid("rh", "must be 0, 1 or 2"));
                }
                if rule.topic.is_empty() {
                    return Err(invalid("topic", "must not be empty"));
                }
                Ok(AutoSubscribe {
                    topic: rule.topic.clone(),
                    options: SubscriptionOptions {
                        qos,
                        no_local: rule.nl,
                        retain_as_published: rule.rap,
                        retain_handling: rule.rh,
                    },
                })
            })
            .collect()
    }

    /// This node's name: `cluster.node_name`, or `broker.node_name`.
    pub fn node(&self) -> String {
        if self.cluster.node_name.is_empty() {
            self.broker.node_name()
        } else {
            self.cluster.node_name.clone()
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.rewrite_rules()?;
        self.auto_subscribe_rules()?;
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        let m = &self.mqtt;
        if !(16..=MAX_PACKET_SIZE_CEILING).contains(&m.max_packet_size) {
            return invalid(
                "mqtt.max_packet_size",
                "must be between 16 bytes and 256 MB",
            );
        }
        if m.max_connect_packet_size < 64 {
            return invalid(
                "mqtt.max_connect_packet_size",
                "must be at least 64 bytes (a CONNECT with a client id and credentials)",
            );
        }
        if m.receive_maximum == 0 {
            return invalid("mqtt.receive_maximum", "must be at least 1");
        }
        if m.max_inflight == 0 {
            return invalid("mqtt.max_inflight", "must be at least 1");
        }
        if m.maximum_qos > 2 {
            return invalid("mqtt.maximum_qos", "must be 0, 1 or 2");
        }
        if m.max_client_id_len < 23 {
            return invalid(
                "mqtt.max_client_id_len",
                "must be at least 23 [MQTT-3.1.3-5]",
            );
        }
        if self.session.max_queued == 0 {
            return invalid("session.max_queued", "must be at least 1");
        }
        if self.storage.group_window > Duration::from_secs(1) {
            return invalid(
                "storage.group_window",
                "at most 1s (every acknowledgement waits up to this long)",
            );
        }
        if let Err((key, message)) = self.cluster.check() {
            return invalid(key, &message);
        }
        if self.cluster.enabled() && self.storage.durability == Durability::None {
            return invalid(
                "storage.durability",
                "\"none\" cannot be used with [cluster]: a cluster keeps sessions, retained and \
                 delayed messages in JetStream, through the store",
            );
        }
        if self.api.cert.is_some() != self.api.key.is_some() {
            return invalid("api.cert", "api.cert and api.key go together");
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return invalid("log.level", &err.to_string());
        }
        if self
            .log
            .file
            .as_ref()
            .is_some_and(|f| f.file_name().is_none())
        {
            return invalid("log.file", "must name a file");
        }
        let flapping = &self.flapping_detect;
        if flapping.window_time.is_zero() {
            return invalid("flapping_detect.window_time", "must be more than zero");
        }
        if flapping.ban_time.is_zero() {
            return invalid("flapping_detect.ban_time", "must be more than zero");
        }
        if let Err(err) = crate::broker::listener::TcpKeepalive::parse(&self.broker.tcp_keepalive) {
            return invalid("broker.tcp_keepalive", &err);
        }
        if self.broker.max_connections == 0 {
            return invalid("broker.max_connections", "must be at least 1");
        }
        if self.listeners.iter().any(|l| l.max_connections == 0) {
            return invalid("listeners.max_connections", "must be at least 1");
        }
        if self.listeners.is_empty() {
            return invalid("listeners", "at least one listener is needed");
        }
        let q = &self.quic;
        if q.max_streams == 0 {
            return invalid(
                "quic.max_streams",
                "must be at least 1 (the control stream)",
            );
        }
        if q.stream_receive_window < 1024 || q.receive_window < q.stream_receive_window {
            return invalid(
                "quic.receive_window",
                "windows must be at least 1 KiB, and the connection's at least a stream's",
            );
        }
        if !(1..=crate::transport::datagram::MAX_COPIES).contains(&q.datagram_copies) {
            return invalid("quic.datagram_copies", "must be between 1 and 4");
        }
        if q.datagram_spacing > Duration::from_millis(100) {
            return invalid("quic.datagram_spacing", "must be at most 100 ms");
        }
        if q.idle_timeout.is_zero() || q.idle_timeout > Duration::from_secs(600) {
            return invalid("quic.idle_timeout", "must be between 1 ms and 10 minutes");
        }
        Ok(())
    }

    /// Replaces the listeners by TCP listeners on `tcp`, if any (see [`Self::replace_listeners`]).
    pub fn override_listeners(&mut self, tcp: &[SocketAddr]) {
        self.replace_listeners(tcp.iter().map(|&bind| (ListenerKind::Tcp, bind)));
    }

    /// Replaces the listeners by the ones named on the command line, if any. A named listener
    /// keeps the settings (certificates, path, timeouts) of the first configured listener of
    /// its kind, with only the address changed; otherwise it gets the defaults.
    pub fn replace_listeners(
        &mut self,
        named: impl IntoIterator<Item = (ListenerKind, SocketAddr)>,
    ) {
        let named: Vec<ListenerConfig> = named
            .into_iter()
            .map(|(kind, bind)| {
                let template = self.listeners.iter().find(|l| l.kind == kind);
                match template {
                    Some(template) => ListenerConfig {
                        bind,
                        ..template.clone()
                    },
                    None => ListenerConfig::new(kind, bind),
                }
            })
            .collect();
        if !named.is_empty() {
            self.listeners = named;
        }
    }
}

/// Sets `section.key` from a command-line or environment string: TOML syntax when it parses
/// (numbers, booleans, arrays), a plain string otherwise.
fn set_key(table: &mut toml::Table, section: &str, key: &str, value: &str) {
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.to_owned()));
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(section) = entry {
        section.insert(key.to_owned(), parsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)], sets: &[&str]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("petrel-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A file per call: tests run in parallel, and two texts may have the same length.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.toml"));
        std::fs::write(&path, text).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let result = Config::load(Some(&path), env, &sets);
        let _ = std::fs::remove_file(&path);
        result
    }

    #[test]
    fn example_config_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("petrel.example.toml");
        let config = Config::load(Some(&path), std::iter::empty(), &[]).unwrap();
        let defaults = Config::default();
        assert_eq!(config.cluster, defaults.cluster);
        assert_eq!(config.mqtt.max_packet_size, defaults.mqtt.max_packet_size);
        assert_eq!(
            config.mqtt.max_connect_packet_size,
            defaults.mqtt.max_connect_packet_size
        );
        assert_eq!(config.mqtt.receive_maximum, defaults.mqtt.receive_maximum);
        assert_eq!(config.session.max_queued, defaults.session.max_queued);
        assert_eq!(
            config.mqtt.max_topic_alias_bytes,
            defaults.mqtt.max_topic_alias_bytes
        );
        assert_eq!(
            config.mqtt.max_user_properties,
            defaults.mqtt.max_user_properties
        );
        assert_eq!(
            config.mqtt.max_outbound_buffer,
            defaults.mqtt.max_outbound_buffer
        );
        assert_eq!(
            config.retainer.max_retained_messages,
            defaults.retainer.max_retained_messages
        );
        assert_eq!(
            config.retainer.max_payload_size,
            defaults.retainer.max_payload_size
        );
        assert_eq!(
            config.retainer.max_retained_bytes,
            defaults.retainer.max_retained_bytes
        );
        assert_eq!(config.broker.max_sessions, defaults.broker.max_sessions);
        assert_eq!(config.broker.tcp_keepalive, defaults.broker.tcp_keepalive);
        assert_eq!(
            config.mqtt.max_subscriptions,
            defaults.mqtt.max_subscriptions
        );
        assert_eq!(config.session.v3_expiry, defaults.session.v3_expiry);
        assert_eq!(config.mqtt.connect_timeout, defaults.mqtt.connect_timeout);
        assert_eq!(config.listeners, defaults.listeners);
        assert_eq!(config.quic.datagrams, defaults.quic.datagrams);
        assert_eq!(config.quic.datagram_copies, defaults.quic.datagram_copies);
        assert_eq!(config.quic.datagram_spacing, defaults.quic.datagram_spacing);
        assert_eq!(config.auth, defaults.auth);
        assert_eq!(
            config.mqtt.exclusive_subscription,
            defaults.mqtt.exclusive_subscription
        );
        assert_eq!(config.delayed.enable, defaults.delayed.enable);
        assert_eq!(
            config.delayed.max_delayed_messages,
            defaults.delayed.max_delayed_messages
        );
        assert_eq!(config.log.level, defaults.log.level);
        assert_eq!(config.log.format, defaults.log.format);
        assert_eq!(config.log.file, defaults.log.file);
        assert_eq!(config.log.rotation, defaults.log.rotation);
        assert_eq!(config.log.max_files, defaults.log.max_files);
        assert_eq!(config.api.bind, defaults.api.bind);
        assert_eq!(config.api.enable, defaults.api.enable);
        assert_eq!(config.api.default_username, defaults.api.default_username);
        assert_eq!(config.api.default_password, defaults.api.default_password);
        assert_eq!(
            config.api.token_expired_time,
            defaults.api.token_expired_time
        );
        assert_eq!(config.sys_topics.interval, defaults.sys_topics.interval);
        assert_eq!(
            config.sys_topics.client_events,
            defaults.sys_topics.client_events
        );
        assert_eq!(config.broker.node_name, defaults.broker.node_name);
        assert_eq!(
            config.broker.max_connections,
            defaults.broker.max_connections
        );
        assert_eq!(
            config.broker.max_connections_per_address,
            defaults.broker.max_connections_per_address
        );
        assert_eq!(
            config.broker.max_queued_bytes,
            defaults.broker.max_queued_bytes
        );
        assert_eq!(config.session.queue_full, defaults.session.queue_full);
        let kinds: Vec<_> = config.listeners.iter().map(|l| l.kind).collect();
        assert_eq!(kinds, ListenerKind::ALL);
    }

    #[test]
    fn the_queue_full_policy_parses_by_name() {
        let config = load("[session]\nqueue_full = \"disconnect\"\n", &[], &[]).unwrap();
        assert_eq!(config.session.queue_full, QueueFull::Disconnect);
        let config = load("", &[], &["session.queue_full=drop_new"]).unwrap();
        assert_eq!(config.session.queue_full, QueueFull::DropNew);
        assert!(load("[session]\nqueue_full = \"spill_everything\"\n", &[], &[]).is_err());
    }

    #[test]
    fn a_numeric_dashboard_password_set_on_the_command_line_is_its_digits() {
        let config = load("", &[], &["api.default_password=123456"]).unwrap();
        assert_eq!(config.api.default_password.as_deref(), Some("123456"));
        let config = load("[api]\ndefault_password = \"s3cret\"\n", &[], &[]).unwrap();
        assert_eq!(config.api.default_password.as_deref(), Some("s3cret"));
    }

    #[test]
    fn auth_keys_set_from_the_command_line_like_mosquitto_names() {
        let config = load(
            "",
            &[("PETREL_AUTH__ALLOW_ANONYMOUS", "false")],
            &[
                "auth.password_file=/etc/petrel/passwd",
                "auth.acl_file=/etc/petrel/acl",
            ],
        )
        .unwrap();
        assert_eq!(config.auth.allow_anonymous, Some(false));
        assert_eq!(config.auth.password_file, Some("/etc/petrel/passwd".into()));
        assert_eq!(config.auth.acl_file, Some("/etc/petrel/acl".into()));
        let err = load("[auth]\npassword = 5\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("password"), "{err}");
    }

    #[test]
    fn log_section_parses_format_file_and_rotation() {
        let c = load(
            "[log]\nformat = \"json\"\nfile = \"/var/log/petrel/petrel.log\"\n\
             rotation = \"hourly\"\nmax_files = 3\n",
            &[],
            &["log.level=petrel=debug"],
        )
        .unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(
            c.log.file.as_deref(),
            Some(Path::new("/var/log/petrel/petrel.log"))
        );
        assert_eq!(c.log.rotation, LogRotation::Hourly);
        assert_eq!(c.log.max_files, 3);
        assert_eq!(c.log.level, "petrel=debug");
        for (text, key) in [
            ("format = \"yaml\"", "format"),
            ("rotation = \"weekly\"", "rotation"),
            ("level = \"petrel=loud\"", "log.level"),
            ("file = \"/\"", "log.file"),
        ] {
            let err = load(&format!("[log]\n{text}\n"), &[], &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = load("[mqtt]\nmax_packt_size = 5\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_packt_size"), "{err}");
    }

    #[test]
    fn invalid_value_names_the_key() {
        let err = load("[mqtt]\nmax_packet_size = 1\n", &[], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("mqtt.max_packet_size"), "{err}");
    }

    #[test]
    fn environment_and_set_override_the_file_in_that_order() {
        let c = load(
            "[mqtt]\nreceive_maximum = 10\nmax_inflight = 10\n",
            &[
                ("PETREL_MQTT__RECEIVE_MAXIMUM", "20"),
                ("PETREL_MQTT__MAX_INFLIGHT", "20"),
                ("OTHER", "x"),
            ],
            &["mqtt.max_inflight=30", "session.v3_expiry=5m"],
        )
        .unwrap();
        assert_eq!(c.mqtt.receive_maximum, 20);
        assert_eq!(c.mqtt.max_inflight, 30);
        assert_eq!(c.session.v3_expiry, Duration::from_secs(300));
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("never").unwrap(), Duration::MAX);
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn listeners_on_the_command_line_replace_the_configured_ones() {
        let mut c = Config::default();
        let a: SocketAddr = "127.0.0.1:1884".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1885".parse().unwrap();
        c.override_listeners(&[a, b]);
        assert_eq!(
            c.listeners.iter().map(|l| l.bind).collect::<Vec<_>>(),
            vec![a, b]
        );
    }

    #[test]
    fn listener_keys_parse_into_tls_and_websocket_settings() {
        let c = load(
            r#"
[[listeners]]
kind = "wss"
bind = "127.0.0.1:9001"
cert = "server.pem"
key = "server.key"
verify = "required"
client_ca = "ca.pem"
peer_cert_as_username = "cn"
path = "/ws"
handshake_timeout = "2s"

[[listeners]]
kind = "tls"
"#,
            &[],
            &[],
        )
        .unwrap();
        let wss = &c.listeners[0];
        assert_eq!(wss.kind, ListenerKind::Wss);
        assert_eq!(wss.bind, "127.0.0.1:9001".parse::<SocketAddr>().unwrap());
        assert_eq!(wss.tls.verify, ClientVerify::Required);
        assert_eq!(wss.tls.peer_cert_as_username, PeerCertAsUsername::Cn);
        assert_eq!(wss.tls.client_ca.as_deref(), Some(Path::new("ca.pem")));
        assert_eq!(wss.path, "/ws");
        assert_eq!(wss.handshake_timeout, Duration::from_secs(2));
        let tls = &c.listeners[1];
        assert_eq!(
            *tls,
            ListenerConfig::new(ListenerKind::Tls, "0.0.0.0:8883".parse().unwrap())
        );
    }

    #[test]
    fn listener_keys_that_do_not_apply_are_errors_naming_the_key() {
        for (text, key) in [
            ("kind = \"tcp\"\ncert = \"a\"\nkey = \"b\"", "cert"),
            ("kind = \"tls\"\npath = \"/mqtt\"", "path"),
            ("kind = \"ws\"\nverify = \"required\"", "verify"),
            ("kind = \"tls\"\nverify = \"required\"", "client_ca"),
            ("kind = \"tls\"\ncert = \"a\"", "key"),
            ("kind = \"ws\"\npath = \"mqtt\"", "path"),
            ("kind = \"tls\"\nverfy = \"none\"", "verfy"),
            ("kind = \"quic\"\nverify = \"optional\"", "verify"),
            ("kind = \"quic\"\npath = \"/mqtt\"", "path"),
        ] {
            let err = load(&format!("[[listeners]]\n{text}\n"), &[], &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn listeners_named_on_the_command_line_keep_their_kinds_settings() {
        let mut c = Config::default();
        c.listeners[1].tls.cert = Some("mine.pem".into());
        c.listeners[1].tls.key = Some("mine.key".into());
        let tls: SocketAddr = "127.0.0.1:18883".parse().unwrap();
        let ws: SocketAddr = "127.0.0.1:18083".parse().unwrap();
        c.replace_listeners([(ListenerKind::Tls, tls), (ListenerKind::Ws, ws)]);
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(
            (c.listeners[0].kind, c.listeners[0].bind),
            (ListenerKind::Tls, tls)
        );
        assert_eq!(
            c.listeners[0].tls.cert.as_deref(),
            Some(Path::new("mine.pem"))
        );
        assert_eq!(c.listeners[1], ListenerConfig::new(ListenerKind::Ws, ws));
    }

    /// Fuzzing the configuration loader: the example file with commented settings switched
    /// on, values replaced by arbitrary TOML values and keys by near-misses, and `--set`
    /// overrides of arbitrary text. Whatever comes in, loading returns a `Config` or an error
    /// that names where it went wrong; it never panics. A long run:
    /// `cargo test --lib fuzz_long -- --ignored`.
    fn mutated_example() -> impl proptest::strategy::Strategy<Value = (String, Vec<String>)> {
        use proptest::prelude::*;
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("petrel.example.toml");
        let example = std::fs::read_to_string(path).expect("petrel.example.toml");
        let lines: Vec<String> = example.lines().map(str::to_owned).collect();
        let n = lines.len();
        let value = prop_oneof![
            Just("0".to_owned()),
            Just("-1".to_owned()),
            Just("4294967296".to_owned()),
            Just("1e400".to_owned()),
            Just("\"\"".to_owned()),
            Just("\"1h\"".to_owned()),
            Just("\"0s\"".to_owned()),
            Just("\"nonsense\"".to_owned()),
            Just("true".to_owned()),
            Just("[]".to_owned()),
            Just("{}".to_owned()),
            Just("\"127.0.0.1:0\"".to_owned()),
            "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
            any::<i64>().prop_map(|i| i.to_string()),
        ];
        let edit = (0..n, 0u8..4, value);
        let set = prop_oneof![
            "[a-z_]{1,10}\\.[a-z_]{1,16}=[ -~]{0,12}",
            (
                prop::sample::select(vec![
                    "mqtt.max_packet_size",
                    "mqtt.max_inflight",
                    "session.max_queued",
                    "broker.max_connections",
                    "auth.allow_anonymous",
                    "log.level",
                    "api.bind",
                    "storage.durability",
                    "quic.congestion_control",
                ]),
                "[ -~]{0,12}"
            )
                .prop_map(|(k, v)| format!("{k}={v}")),
        ];
        (
            proptest::collection::vec(edit, 0..8),
            proptest::collection::vec(set, 0..3),
        )
            .prop_map(move |(edits, sets)| {
                let mut lines = lines.clone();
                for (line, how, value) in edits {
                    let text = lines[line].trim_start_matches("# ").to_owned();
                    lines[line] = match (how, text.split_once(" = ")) {
                        // Switch a commented setting on, as written.
                        (0, _) => text,
                        (1, Some((key, _))) => format!("{key} = {value}"),
                        (2, Some((key, v))) => format!("{key}x = {v}"),
                        (_, _) => format!("{text}{value}"),
                    };
                }
                (lines.join("\n"), sets)
            })
    }

    fn load_never_panics(
        text: &str,
        sets: &[String],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        if let Err(e) = load(text, &[], &sets) {
            let message = e.to_string();
            proptest::prop_assert!(!message.is_empty());
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn any_mutation_of_the_example_loads_or_says_why((text, sets) in mutated_example()) {
            load_never_panics(&text, &sets)?;
        }

        #[test]
        fn arbitrary_text_loads_or_says_why(text in "[\\[\\]a-z_=. \"0-9#\n]{0,300}") {
            load_never_panics(&text, &[])?;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]

        #[test]
        #[ignore = "long fuzzing run; cargo test --lib fuzz_long -- --ignored"]
        fn fuzz_long_config_mutations((text, sets) in mutated_example()) {
            load_never_panics(&text, &sets)?;
        }
    }
}
