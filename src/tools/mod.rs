//! The command-line tools: `petrel pub`, `petrel sub` and `petrel bench` built on
//! [`petrel::client`] (they speak every transport the client does and work against any
//! broker), and `petrel ctl` on the HTTP API.
//!
//! - `pubsub`: publish and subscribe, with mosquitto_pub / mosquitto_sub habits.
//! - `bench`: an end-to-end load generator in the manner of emqtt-bench.
//! - `ctl`: the administrator's commands (emqx ctl's names) over `/api/v5`.

pub mod bench;
pub mod ctl;
pub mod pubsub;

use std::path::PathBuf;
use std::time::Duration;

use petrel::client::{ClientError, ClientOptions, QoS, QuicStreams, Version};

/// Connection flags shared by every tool (mosquitto_pub/sub habits).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Broker URL: mqtt://, mqtts://, ws://, wss://, quic:// (repeat to give fallbacks,
    /// tried in order, e.g. QUIC first then TLS).
    #[arg(
        short = 'u',
        long = "url",
        value_name = "URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub urls: Vec<String>,
    /// Client identifier [default: generated].
    #[arg(short = 'i', long = "id", value_name = "CLIENT_ID")]
    pub client_id: Option<String>,
    /// Keep-alive in seconds.
    #[arg(
        short = 'k',
        long = "keepalive",
        value_name = "SECONDS",
        default_value_t = 60
    )]
    pub keep_alive: u16,
    /// MQTT version: 311 or 5.
    #[arg(short = 'V', long = "protocol-version", value_name = "311|5", default_value = "5", value_parser = parse_version)]
    pub version: Version,
    /// CA certificate file (PEM) to trust for mqtts, wss and quic.
    #[arg(long, value_name = "FILE")]
    pub cafile: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; needs --key.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Do not verify the server certificate (testing only).
    #[arg(long)]
    pub insecure: bool,
    #[arg(long)]
    pub username: Option<String>,
    #[arg(long)]
    pub password: Option<String>,
    /// MQTT 5 enhanced authentication with --username and --password (SCRAM-SHA-256): the
    /// password never goes over the wire.
    #[arg(long, value_name = "METHOD")]
    pub auth_method: Option<petrel::client::AuthMethod>,
    /// QUIC stream mapping: single, per-topic.
    #[arg(long, value_name = "POLICY", default_value = "single", value_parser = ["single", "per-topic"])]
    pub streams: String,
}

impl ConnectArgs {
    /// Client options for these flags, with `client_id` as the identifier when none was given.
    pub fn options(&self, client_id: &str) -> Result<ClientOptions, ClientError> {
        let urls: Vec<&str> = self.urls.iter().map(String::as_str).collect();
        let mut options = ClientOptions::with_urls(&urls)?
            .client_id(
                self.client_id
                    .clone()
                    .unwrap_or_else(|| client_id.to_owned()),
            )
            .version(self.version)
            .keep_alive(Duration::from_secs(u64::from(self.keep_alive)))
            .insecure(self.insecure);
        if let Some(ca) = &self.cafile {
            options = options.ca_file(ca);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            options = options.client_cert(cert, key);
        }
        if let Some(user) = &self.username {
            options = options.credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if let Some(method) = self.auth_method {
            options = options.auth_method(method);
            options.scram_login_check()?;
        }
        if self.streams == "per-topic" {
            options = options.streams(QuicStreams::per_topic());
        }
        Ok(options)
    }
}

fn parse_version(text: &str) -> Result<Version, String> {
    match text {
        "311" | "3.1.1" | "mqttv311" => Ok(Version::V311),
        "5" | "5.0" | "mqttv5" => Ok(Version::V5),
        other => Err(format!("unknown MQTT version {other:?}: use 311 or 5")),
    }
}

pub fn parse_qos(text: &str) -> Result<QoS, String> {
    text.parse::<u8>()
        .ok()
        .and_then(QoS::from_u8)
        .ok_or_else(|| format!("QoS must be 0, 1 or 2, not {text:?}"))
}

/// A client id unique to this process and moment, for tools run without `-i`.
pub fn generated_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}
