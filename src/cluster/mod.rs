//! Clustering on NATS JetStream (issue 18): several nodes, one broker to clients.
//! - `settings`: `[cluster]`.
//! - `subject`: MQTT topics and filters as NATS subjects (the route table's mapping).
//! - `kv`: the durable store's engine on a JetStream KV bucket (sessions, queued and
//!   in-flight deliveries, retained and delayed messages, session owners).
//! - `node`: the running member: the broker's `Peers` on NATS (routing, shared groups,
//!   session hand-over, retained changes of other nodes).

pub mod kv;
pub mod node;
pub mod presence;
pub mod settings;
pub mod subject;
#[cfg(test)]
pub(crate) mod test_nats;

pub use settings::ClusterSettings;
