//! Integration tests: an in-process Petrel broker on `127.0.0.1:0`, exercised by a real
//! third-party client (`rumqttc`, 3.1.1 and 5) and by a raw-packet client built on Petrel's
//! codec (exact bytes, exact reason codes). Grouped by family; test names say the behaviour.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod auth;
mod auth_chain;
mod backpressure;
mod bad;
mod client;
mod conformance;
mod conn;
mod durable;
mod emqx;
mod harden;
mod limits;
mod lossy;
mod pubsub;
mod quic;
mod retain;
mod scram;
mod session;
mod tools;
mod transports;
mod v5;
mod will;
