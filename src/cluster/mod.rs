//! Clustering on NATS JetStream (issue 18), being built: the pieces here are sans-IO and
//! tested, and are not yet wired into the broker.
//! - `subject`: MQTT topics and filters as NATS subjects (the route table's mapping).

pub mod subject;
