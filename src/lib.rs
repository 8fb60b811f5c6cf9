//! Petrel: a QUIC-first MQTT 3.1 / 3.1.1 / 5.0 broker for lossy networks.
//!
//! # Layout
//! - [`codec`]: sans-IO wire format for every MQTT version; imports nothing else of ours.
//! - [`core`]: sans-IO broker logic with time passed in: topics, the subscription trie, the
//!   retained store, sessions, and the per-connection protocol state machine (`Channel`).
//! - [`broker`]: the async shell: listeners, connection drivers, the shared session table and
//!   router, timers. The only module that spawns tasks, owns sockets or reads the clock.
//! - [`config`]: the TOML file model, overrides, and validated runtime settings.
//!
//! Dependency direction: `codec <- core <- broker`; `config` builds `broker` settings.

pub mod broker;
pub mod codec;
pub mod config;
pub mod core;
