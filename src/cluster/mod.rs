//! Clustering on NATS JetStream (issue 18): several nodes, one broker to clients.
//! - `settings`: `[cluster]`.
//! - `subject`: MQTT topics and filters as NATS subjects (the route table's mapping).

pub mod presence;
pub mod settings;
pub mod subject;

pub use settings::ClusterSettings;
