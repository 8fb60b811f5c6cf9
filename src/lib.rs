//! Petrel: a QUIC-first MQTT 3.1 / 3.1.1 / 5.0 broker for lossy networks.
//!
//! # Layout
//! - [`codec`]: sans-IO wire format for every MQTT version; imports nothing else of ours.
//! - `core`: sans-IO broker logic with time and randomness passed in: topics, the
//!   subscription trie, the retained store, sessions, the session registry (resume, takeover,
//!   expiry, wills), fan-out, and the per-connection protocol state machine (`Channel`).
//! - `broker`: the async shell: listeners, connection drivers, the locks around the
//!   registry and the router, mailboxes, timers. The only module that spawns tasks, owns
//!   sockets or reads the clock; it carries out what `core` decides.
//! - [`transport`]: what turns an accepted socket into an MQTT byte stream: TLS (rustls,
//!   optional mTLS), WebSocket, and the development certificates. No tasks, no clock.
//! - [`config`]: the TOML file model: parse, layer (file, environment, `--set`), validate.
//!   Settings types live with their owners (`transport::tls`, `transport::quic`,
//!   `broker::listener`, `auth`); `config` re-exports the ones a file names.
//! - [`server`]: the wiring: validated configuration to each subsystem, listeners bound.
//! - [`storage`]: the durable store behind the core's `Store` seam: an append-only log of
//!   checksummed group commits, read back at start-up; `petrel store check/repair`.
//! - `duration`: durations in settings (`"10s"`, `"never"`), shared by every settings type.
//! - [`client`]: the async MQTT client library (every transport by URL, QUIC stream policy,
//!   reconnect and session resume); its protocol state is sans-IO like `core`.
//!
//! Dependency direction: `codec <- core <- broker -> transport`; `config` reads the settings
//! types of `broker`, `transport` and `auth`; `server` builds everything from `config`.
//!
//! # Public API
//! The client library ([`client`]), the wire format ([`codec`]), and what starts a broker:
//! [`config`] and [`server`], with [`auth`] (password files) and [`transport`] (certificates,
//! TLS and QUIC settings). `core` and `broker` are the crate's own (the `internals` feature
//! opens them to the criterion benchmarks); the command-line tools live with the binary.

pub mod admin;
pub mod auth;
// The broker's internals belong to the crate; the `internals` feature opens them to the
// criterion benchmarks only (`cargo bench --features internals --bench router`).
#[cfg(feature = "internals")]
pub mod broker;
#[cfg(not(feature = "internals"))]
pub(crate) mod broker;
pub mod client;
pub mod codec;
pub mod config;
#[cfg(feature = "internals")]
pub mod core;
#[cfg(not(feature = "internals"))]
pub(crate) mod core;
pub(crate) mod duration;
pub mod server;
pub mod storage;
pub mod transport;

#[cfg(test)]
mod layering {
    //! Keeps the layering honest: codec and core import neither the runtime, sockets nor the
    //! shell. (The clock, randomness and spawning are compiler checks: `clippy.toml`'s
    //! disallowed methods and types, denied in `codec` and `core`.)

    fn sources(dir: &str) -> Vec<(std::path::PathBuf, String)> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src")
            .join(dir);
        let mut files = Vec::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    // Unit tests at the bottom may make up instants from the real clock.
                    let code = text
                        .split("#[cfg(test)]")
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    files.push((path, code));
                }
            }
        }
        files
    }

    #[test]
    fn codec_and_core_stay_sans_io() {
        let forbidden = ["tokio", "std::net", "crate::broker", "crate::config"];
        for dir in ["codec", "core"] {
            let files = sources(dir);
            assert!(!files.is_empty());
            for (path, text) in files {
                if path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("tests"))
                {
                    continue;
                }
                for word in forbidden {
                    assert!(!text.contains(word), "{} mentions `{word}`", path.display());
                }
            }
        }
        // The client's protocol state and stream policy are sans-IO too.
        for (path, text) in sources("client") {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name != "state.rs" && name != "streams.rs" {
                continue;
            }
            for word in forbidden
                .iter()
                .chain(&["quinn", "crate::client::transport"])
            {
                assert!(!text.contains(word), "{} mentions `{word}`", path.display());
            }
        }
        for (path, text) in sources("codec") {
            assert!(
                !text.contains("crate::core"),
                "{} reaches into core",
                path.display()
            );
        }
    }

    #[test]
    fn storage_plugs_into_the_core_seam_only() {
        for (path, text) in sources("storage") {
            for word in ["crate::broker", "crate::config", "tokio"] {
                assert!(!text.contains(word), "{} mentions `{word}`", path.display());
            }
        }
        for (path, text) in sources("core") {
            assert!(
                !text.contains("crate::storage"),
                "{} reaches into storage",
                path.display()
            );
        }
    }
}
