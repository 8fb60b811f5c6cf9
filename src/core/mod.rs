//! Sans-IO broker logic. Time is passed in as `now`; nothing here reads the clock, spawns a task
//! or touches a socket, so every behaviour can be driven synchronously in virtual time.
//!
//! - `topic`: topic names and filters (validation, matching, shared-subscription syntax).
//! - `router`: the subscription trie, shared groups with round robin.
//! - `retain`: retained messages by topic.
//! - `message`: an application message as routed between sessions, and one delivery of it.
//! - `session`: what survives a reconnect: subscriptions, in-flight and QoS 2 state.
//! - `channel`: the per-connection protocol state machine (CONNECT to close).
//! - `timers`: one deadline table for session expiry and delayed wills.
//! - `registry`: the session table: resume, takeover, clean start, expiry, wills.
//! - `fanout`: one publish to one delivery per session and flow (merge rules), retained
//!   messages for a new subscription.
//! - `hooks`: the seams the shell calls for observers, a durable store and peer nodes.
//! - `rewrite`: EMQX's topic rewrite rules and automatic subscriptions.
//! - `delayed`: `$delayed/{seconds}/{topic}` and the queue of messages waiting for their time.
//! - `window`: the outbound in-flight window, sized to the path's bandwidth-delay product.

#![deny(clippy::disallowed_methods, clippy::disallowed_types)]

pub mod access;
pub mod channel;
pub mod delayed;
pub mod fanout;
pub mod hooks;
pub mod message;
pub mod registry;
pub mod retain;
pub mod rewrite;
pub mod router;
pub mod session;
pub mod timers;
pub mod topic;
pub mod window;
