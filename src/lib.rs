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
//! - [`admin`]: operations: the HTTP API on 18083 (EMQX's `/api/v5`), Prometheus, the
//!   dashboard's pages and the `$SYS` topics; reads the broker through `broker::view`.
//! - `duration`: durations in settings (`"10s"`, `"never"`), shared by every settings type.
//! - `cluster`: clustering on NATS JetStream (`[cluster]`): the store's engine on a
//!   replicated KV bucket, routing between nodes on NATS subjects, sessions handed over
//!   between nodes, node presence (docs/cluster.md).
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
pub(crate) mod cluster;
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
    fn admin_reads_the_broker_through_its_views_and_nothing_imports_admin() {
        for (path, text) in sources("admin") {
            for word in [
                "crate::config",
                "crate::storage",
                "core::registry",
                "core::router",
            ] {
                assert!(!text.contains(word), "{} mentions `{word}`", path.display());
            }
        }
        for dir in ["codec", "core", "broker", "storage", "auth", "transport"] {
            for (path, text) in sources(dir) {
                assert!(
                    !text.contains("crate::admin"),
                    "{} reaches into admin",
                    path.display()
                );
            }
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

#[cfg(test)]
mod packaging {
    //! The Dockerfile's build stage copies everything cargo reads to load the workspace. No
    //! container engine runs where the tests run, so this compares the build stage's `COPY`
    //! lines with what the manifests name: members, declared targets, build scripts, path
    //! dependencies, and files the sources `include_str!`; and that `.dockerignore` keeps
    //! none of them out of the build context.

    use std::collections::BTreeSet;
    use std::path::{Component, Path, PathBuf};

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    /// `base/relative` with `.` and `..` resolved by hand (the path need not exist), relative
    /// to the build context.
    fn join(base: &Path, relative: &str) -> PathBuf {
        let mut out = PathBuf::new();
        for part in base.join(relative).components() {
            match part {
                Component::CurDir => {}
                Component::ParentDir => assert!(
                    out.pop(),
                    "{relative} (from {}) is outside the build context",
                    base.display()
                ),
                other => out.push(other),
            }
        }
        out
    }

    /// The sources of the build stage's `COPY`/`ADD` instructions (those before the second
    /// `FROM`), relative to the build context; `.` is the whole context.
    fn build_stage_sources(dockerfile: &str) -> Vec<PathBuf> {
        let mut instructions = Vec::new();
        let mut current = String::new();
        for line in dockerfile.lines().map(str::trim) {
            // Docker drops comment lines, also inside a continued instruction.
            if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(part) => {
                    current.push_str(part);
                    current.push(' ');
                }
                None => {
                    current.push_str(line);
                    instructions.push(std::mem::take(&mut current));
                }
            }
        }
        let mut stages = 0;
        let mut sources = Vec::new();
        for instruction in instructions {
            let Some((keyword, rest)) = instruction.split_once(char::is_whitespace) else {
                continue;
            };
            if keyword.eq_ignore_ascii_case("FROM") {
                stages += 1;
                if stages == 2 {
                    break;
                }
                continue;
            }
            if !keyword.eq_ignore_ascii_case("COPY") && !keyword.eq_ignore_ascii_case("ADD") {
                continue;
            }
            let mut rest = rest.trim();
            let mut from_elsewhere = false;
            while let Some(flagged) = rest.strip_prefix("--") {
                let (flag, after) = flagged
                    .split_once(char::is_whitespace)
                    .unwrap_or((flagged, ""));
                from_elsewhere |= flag.starts_with("from=");
                rest = after.trim_start();
            }
            if from_elsewhere {
                continue;
            }
            let mut words: Vec<String> = if rest.starts_with('[') {
                serde_json::from_str(rest).expect("a COPY in JSON form")
            } else {
                rest.split_whitespace().map(str::to_owned).collect()
            };
            words.pop(); // the destination
            sources.extend(words.iter().map(|source| join(Path::new(""), source)));
        }
        sources
    }

    /// Every path, relative to the root, that cargo reads to load the workspace.
    fn needed_paths() -> BTreeSet<PathBuf> {
        let mut needed = BTreeSet::from([PathBuf::from("Cargo.lock")]);
        let mut packages = vec![PathBuf::new()];
        let mut seen = BTreeSet::new();
        while let Some(dir) = packages.pop() {
            if !seen.insert(dir.clone()) {
                continue;
            }
            let manifest_path = dir.join("Cargo.toml");
            let text = std::fs::read_to_string(root().join(&manifest_path))
                .unwrap_or_else(|e| panic!("{}: {e}", manifest_path.display()));
            let manifest: toml::Table = toml::from_str(&text).unwrap();
            needed.insert(manifest_path);
            let workspace = manifest.get("workspace").and_then(toml::Value::as_table);
            for member in strings(workspace.and_then(|w| w.get("members"))) {
                assert!(
                    !member.contains('*'),
                    "glob member {member}: teach this test globs"
                );
                packages.push(join(&dir, &member));
            }
            for deps in dependency_tables(&manifest) {
                for dep in deps.values() {
                    if let Some(path) = dep.get("path").and_then(toml::Value::as_str) {
                        packages.push(join(&dir, path));
                    }
                }
            }
            if let Some(package) = manifest.get("package").and_then(toml::Value::as_table) {
                needed.extend(targets(&dir, package, &manifest));
                needed.extend(included_files(&dir.join("src")));
            }
        }
        needed
    }

    /// A manifest's dependency tables: plain, dev, build, per target, and the workspace's.
    fn dependency_tables(manifest: &toml::Table) -> Vec<&toml::Table> {
        let kinds = ["dependencies", "dev-dependencies", "build-dependencies"];
        let mut tables: Vec<&toml::Table> = Vec::new();
        let mut scopes = vec![manifest];
        if let Some(targets) = manifest.get("target").and_then(toml::Value::as_table) {
            scopes.extend(targets.values().filter_map(toml::Value::as_table));
        }
        for scope in scopes {
            tables.extend(kinds.iter().filter_map(|k| scope.get(*k)?.as_table()));
        }
        if let Some(workspace) = manifest.get("workspace").and_then(toml::Value::as_table) {
            tables.extend(
                workspace
                    .get("dependencies")
                    .and_then(toml::Value::as_table),
            );
        }
        tables
    }

    /// The files of the package in `dir` that are its targets' roots: declared ones (their
    /// `path`, or cargo's default) and the ones cargo finds by itself, and the build script.
    fn targets(dir: &Path, package: &toml::Table, manifest: &toml::Table) -> Vec<PathBuf> {
        let exists = |relative: &str| root().join(dir).join(relative).exists();
        let mut files: Vec<PathBuf> = ["src/lib.rs", "src/main.rs", "src/bin", "build.rs"]
            .into_iter()
            .filter(|path| exists(path))
            .map(|path| dir.join(path))
            .collect();
        if let Some(build) = package.get("build").and_then(toml::Value::as_str) {
            files.push(join(dir, build));
        }
        if let Some(path) = manifest
            .get("lib")
            .and_then(|lib| lib.get("path"))
            .and_then(toml::Value::as_str)
        {
            files.push(join(dir, path));
        }
        for (kind, default_dir) in [
            ("bin", "src/bin"),
            ("bench", "benches"),
            ("test", "tests"),
            ("example", "examples"),
        ] {
            let Some(list) = manifest.get(kind).and_then(toml::Value::as_array) else {
                continue;
            };
            for target in list {
                let path = match target.get("path").and_then(toml::Value::as_str) {
                    Some(path) => path.to_owned(),
                    None => {
                        let name = target.get("name").and_then(toml::Value::as_str);
                        let name = name.expect("a declared target without `path` has a `name`");
                        let nested = format!("{default_dir}/{name}/main.rs");
                        if exists(&nested) {
                            nested
                        } else {
                            format!("{default_dir}/{name}.rs")
                        }
                    }
                };
                files.push(join(dir, &path));
            }
        }
        files
    }

    /// Files named by `include_str!`/`include_bytes!` with a literal path in the sources
    /// under `dir`, which need not live beside them.
    fn included_files(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(root().join(&dir)).unwrap() {
                let entry = entry.unwrap();
                let relative = dir.join(entry.file_name());
                if entry.path().is_dir() {
                    stack.push(relative);
                    continue;
                }
                if relative.extension().is_none_or(|e| e != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(entry.path()).unwrap();
                for macro_call in ["include_str!(\"", "include_bytes!(\""] {
                    for (at, _) in text.match_indices(macro_call) {
                        let literal = &text[at + macro_call.len()..];
                        let path = &literal[..literal.find('"').unwrap_or(0)];
                        files.push(join(relative.parent().unwrap(), path));
                    }
                }
            }
        }
        files
    }

    fn strings(value: Option<&toml::Value>) -> Vec<String> {
        let values = value
            .and_then(toml::Value::as_array)
            .cloned()
            .unwrap_or_default();
        values
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// The needed paths that no build-stage `COPY` source covers (a directory covers
    /// everything under it).
    fn uncopied(dockerfile: &str) -> Vec<PathBuf> {
        let sources = build_stage_sources(dockerfile);
        needed_paths()
            .into_iter()
            .filter(|path| !sources.iter().any(|source| path.starts_with(source)))
            .collect()
    }

    /// Whether a `.dockerignore` line keeps `path` out of the build context. Only the forms
    /// we use are understood: a path (and everything under it) and `**/name`.
    fn ignored(pattern: &str, path: &Path) -> bool {
        if let Some(name) = pattern.strip_prefix("**/") {
            assert!(
                !name.contains(['*', '?', '[']),
                "teach this test `{pattern}`"
            );
            return path.components().any(|c| c.as_os_str() == name);
        }
        assert!(
            !pattern.contains(['*', '?', '[', '!']),
            "teach this test `{pattern}`"
        );
        path.starts_with(join(Path::new(""), pattern))
    }

    #[test]
    fn dockerfile_build_stage_copies_everything_cargo_reads() {
        let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
        let missing = uncopied(&dockerfile);
        assert!(
            missing.is_empty(),
            "the Dockerfile's build stage does not COPY {missing:?}, which the workspace \
             manifests need"
        );
        let dockerignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
        for pattern in dockerignore.lines().map(str::trim) {
            if pattern.is_empty() || pattern.starts_with('#') {
                continue;
            }
            let excluded: Vec<_> = needed_paths()
                .into_iter()
                .filter(|path| ignored(pattern, path))
                .collect();
            assert!(
                excluded.is_empty(),
                ".dockerignore's `{pattern}` keeps {excluded:?} out of the build"
            );
        }
    }

    #[test]
    fn a_build_stage_without_the_members_and_benches_is_caught() {
        // The Dockerfile as it was before netem and the benches were copied; the runtime
        // stage's COPY does not count for the build.
        let old = "FROM rust:1-bookworm AS build\n\
                   COPY Cargo.toml Cargo.lock ./\n\
                   COPY src ./src\n\
                   RUN cargo build --release --locked --bin petrel\n\
                   FROM debian:bookworm-slim\n\
                   COPY netem benches /opt/\n";
        let missing = uncopied(old);
        for path in ["netem/Cargo.toml", "netem/src/lib.rs", "benches/codec.rs"] {
            assert!(
                missing.contains(&PathBuf::from(path)),
                "{path}: {missing:?}"
            );
        }
        assert!(
            !missing.contains(&PathBuf::from("src/main.rs")),
            "{missing:?}"
        );
        let continued = "FROM a AS build\nCOPY --chown=1:1 [\"Cargo.toml\", \"Cargo.lock\", \
                         \"./\"]\nCOPY src \\\n  # a comment\n  netem benches ./\nFROM b\n";
        assert_eq!(uncopied(continued), Vec::<PathBuf>::new());
    }
}
