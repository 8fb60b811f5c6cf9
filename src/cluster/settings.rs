//! `[cluster]`: how a node joins a Petrel cluster on NATS JetStream. Off unless `nats` names
//! at least one server.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// NATS servers to connect to (`nats://host:port`, `tls://host:port`); one URL or a list.
    /// Empty: no cluster (one node with its embedded store).
    #[serde(deserialize_with = "one_or_many")]
    pub nats: Vec<String>,
    /// This node's name, unique in the cluster; empty: `broker.node_name` (by default
    /// `petrel@<host>`).
    pub node_name: String,
    /// Prefix of every NATS subject, stream and bucket of this cluster, so that several
    /// Petrel clusters (or other users) can share one NATS system.
    pub prefix: String,
    /// Replicas of the JetStream streams and buckets (R3 in a 3-server NATS cluster survives
    /// the loss of one server; a single NATS server needs 1).
    pub replicas: usize,
    /// NATS credentials: user and password, a token, or an NKEY `.creds` file.
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    pub creds_file: Option<PathBuf>,
    /// TLS to NATS: the CA that signed the servers' certificates, and this node's client
    /// certificate and key when the servers verify clients. Any of them turns TLS on.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// How long a node waits for NATS at start-up, and for another node's answer (a session
    /// takeover) before deciding that node is gone.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub connect_timeout: Duration,
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub request_timeout: Duration,
    /// How long JetStream keeps forwarded QoS 1/2 messages (the stream they are committed to
    /// before the publisher's acknowledgement), and how many bytes at most.
    #[serde(deserialize_with = "crate::duration::deserialize")]
    pub message_retention: Duration,
    pub message_max_bytes: i64,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            nats: Vec::new(),
            node_name: String::new(),
            prefix: "petrel".into(),
            replicas: 3,
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            message_retention: Duration::from_secs(600),
            message_max_bytes: 1 << 30,
        }
    }
}

impl ClusterSettings {
    /// Whether clustering is on.
    pub fn enabled(&self) -> bool {
        !self.nats.is_empty()
    }

    /// Why these settings cannot work, naming the key.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        for url in &self.nats {
            if url.trim().is_empty() {
                return Err(("cluster.nats", "an empty server URL".into()));
            }
        }
        let token_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !token_ok(&self.prefix) {
            return Err((
                "cluster.prefix",
                "letters, digits, '-' and '_' only (it names NATS subjects, streams and buckets)"
                    .into(),
            ));
        }
        if self.node_name.len() > 200 || self.node_name.chars().any(|c| c.is_control()) {
            return Err((
                "cluster.node_name",
                "at most 200 bytes, no control characters".into(),
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err((
                "cluster.replicas",
                "between 1 and 5 (JetStream's limit)".into(),
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err((
                "cluster.user",
                "cluster.user and cluster.password go together".into(),
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err((
                "cluster.tls_cert_file",
                "cluster.tls_cert_file and cluster.tls_key_file go together".into(),
            ));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(("cluster.request_timeout", "must be above zero".into()));
        }
        Ok(())
    }
}

/// `nats = "nats://a:4222"` or `nats = ["nats://a:4222", "nats://b:4222"]`; a single string
/// may also list URLs separated by commas (as NATS's own tools accept).
fn one_or_many<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ClusterSettings {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn off_by_default_and_one_url_or_a_list() {
        assert!(!ClusterSettings::default().enabled());
        let one = parse(r#"nats = "nats://a:4222, nats://b:4222""#);
        assert_eq!(one.nats, ["nats://a:4222", "nats://b:4222"]);
        let many = parse(r#"nats = ["nats://a:4222"]"#);
        assert_eq!(many.nats, ["nats://a:4222"]);
        assert!(many.enabled());
        assert_eq!(many.check(), Ok(()));
    }

    #[test]
    fn bad_settings_name_their_key() {
        let bad = parse("nats = \"nats://a\"\nprefix = \"a.b\"");
        assert_eq!(bad.check().unwrap_err().0, "cluster.prefix");
        let bad = parse("nats = \"nats://a\"\nreplicas = 7");
        assert_eq!(bad.check().unwrap_err().0, "cluster.replicas");
        let bad = parse("nats = \"nats://a\"\nuser = \"u\"");
        assert_eq!(bad.check().unwrap_err().0, "cluster.user");
        assert!(toml::from_str::<ClusterSettings>("nodes = 3").is_err());
    }
}
