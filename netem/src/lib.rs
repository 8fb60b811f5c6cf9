//! A userspace link emulator with Linux netem's semantics, for testing protocols over bad
//! networks without `sch_netem`. It knows nothing of the protocols it carries.
//!
//! # Layout
//! - `units`: durations, percentages, rates and spans in tc's spellings.
//! - `spec`: stages per direction, scheduled events, named profiles (`profiles.toml`).
//! - `rng`: the one seeded generator, netem's correlated uniform, distribution variates.
//! - `schedule`: blackout windows and address-change instants in passed-in time.
//! - `link`: the sans-IO model of one direction (`send` / `poll` / `next_deadline`).
//! - `tc`: renders a profile as the equivalent `tc qdisc ... netem` commands.
//! - `relay`: the tokio UDP relay (one upstream socket per client, address changes).
//! - `packet`: TUN devices and a network namespace, so any IP traffic crosses the model.
//! - `seed`: where a run's seed comes from (`NETEM_SEED`) and how it is reported.
//!
//! `link`, `schedule`, `rng`, `spec` and `units` never read the clock or touch sockets.

pub mod link;
pub mod packet;
pub mod relay;
pub mod rng;
pub mod schedule;
pub mod seed;
pub mod spec;
pub mod tc;
pub mod units;

pub use link::{Link, LinkStats, Packet};
pub use packet::PacketLink;
pub use relay::{Relay, RelayHandle, RelayStats};
pub use spec::{Direction, LinkSpec, Profile, Profiles, Stages};
