//! Sans-IO MQTT wire format for 3.1 (`MQIsdp`, level 3), 3.1.1 (level 4) and 5.0 (level 5).
//!
//! This module imports nothing else from Petrel and never touches sockets or the clock, so it
//! could move into its own crate with a file move. Decoding is two-phase: the fixed header is
//! read and its remaining length checked against the size limit before anything is buffered;
//! "need more bytes" is `Ok(None)`, never an error. Every malformed input yields a
//! [`DecodeError`] that names the reason code to answer with; no input panics.
//!
//! Layout: `model` (the packet types), `reason` (the reason-code table), `decode`, `encode`,
//! `properties` (property ids, allowed-per-packet table, reading and writing); `tests` (spec
//! fixtures, one test per malformed input, and the property-based round trips in
//! `tests/proptests.rs`).

#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

mod decode;
mod encode;
mod model;
mod properties;
mod reason;
#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
pub(crate) mod tests;

pub use decode::{Codec, DecodeError};
pub use encode::{encode, encoded_len, PublishRef};
pub use model::*;
pub use reason::ReasonCode;
