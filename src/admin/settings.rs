//! The `[api]` and `[sys_topics]` settings (EMQX's `dashboard` and `api_key` names where one
//! exists, Mosquitto's `sys_interval` as `[sys_topics] interval`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::deserialize as duration;

/// `[api]`: the HTTP API, Prometheus endpoint and dashboard.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// Serve the API at all.
    pub enable: bool,
    /// Where it listens (EMQX's dashboard port).
    pub bind: SocketAddr,
    /// Serve HTTPS with this certificate chain (PEM) and `key`; plain HTTP without.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Origins allowed to call the API from a browser (CORS); empty: none but our own pages.
    /// `["*"]` allows any.
    pub cors: Vec<String>,
    /// `key:secret` lines (EMQX's `api_key.bootstrap_file`): API keys for Basic auth.
    pub bootstrap_file: Option<PathBuf>,
    /// The dashboard's administrator (EMQX's `dashboard.default_username`).
    pub default_username: String,
    /// Its password. When unset, the first start writes a random one to
    /// `<data_dir>/dashboard_admin_password` and logs that path; there is no well-known
    /// default password. (`--set api.default_password=123456` is read as a number by the
    /// layering; a number is taken as its digits.)
    #[serde(deserialize_with = "text_or_number")]
    pub default_password: Option<String>,
    /// How long a dashboard login token is valid (EMQX's `dashboard.token_expired_time`).
    #[serde(deserialize_with = "duration")]
    pub token_expired_time: Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            enable: true,
            bind: SocketAddr::from(([0, 0, 0, 0], 18083)),
            cert: None,
            key: None,
            cors: Vec::new(),
            bootstrap_file: None,
            default_username: "admin".into(),
            default_password: None,
            token_expired_time: Duration::from_secs(60 * 60),
        }
    }
}

/// `[sys_topics]`: the `$SYS` tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SysSettings {
    /// How often the `$SYS` topics are published (Mosquitto's `sys_interval`, EMQX's
    /// `sys_msg_interval`); `0s` turns them off.
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// Publish `$SYS/brokers/<node>/clients/<clientid>/connected|disconnected` events.
    pub client_events: bool,
}

impl Default for SysSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            client_events: true,
        }
    }
}

/// A string, or a number taken as its text.
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Integer(i64),
        Float(f64),
    }
    Ok(Some(match Raw::deserialize(d)? {
        Raw::Text(text) => text,
        Raw::Integer(n) => n.to_string(),
        Raw::Float(n) => n.to_string(),
    }))
}
