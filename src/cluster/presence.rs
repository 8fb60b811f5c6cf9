//! Node presence (issue 18): which nodes make up the cluster, for the API, the dashboard and
//! `$SYS/brokers`. A status display, eventually consistent: nothing that routes messages or
//! takes over sessions may decide on it.
//!
//! Every node puts its report (what `/api/v5/nodes` shows of it, with its stats and metrics:
//! whatever the `local` closure returns) in the JetStream KV bucket `<prefix>_nodes`, under a
//! key made from its name ([`node_key`]), every [`HEARTBEAT`]; the bucket keeps one value per
//! key, in memory (the reports are rebuilt within a heartbeat if NATS restarts), and forgets
//! values after [`STALE`]. Every node watches the bucket and keeps the last report of each
//! other node in a [`View`] (sans-IO: time is an argument).
//!
//! A node that leaves cleanly ([`Presence::stop`]) deletes its key: the others drop it at
//! once. One that goes silent (crash, network cut) is shown `"stopped"` once [`STALE`] passes
//! without a report (NATS 2.9 sends no notice when the bucket's age limit removes a value, so
//! each node times its peers itself), and forgotten after [`FORGET`]. A node that starts (or
//! whose watch starts again) reads the bucket's current values: a peer that died less than
//! [`STALE`] ago is shown running until its report is that old.
//!
//! Two nodes with the same name share one key and overwrite each other's report (names must
//! be unique: `cluster.node_name`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{clock, LogEvery};

/// How often a node puts its report.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A report this old means its node stopped (three missed heartbeats); the bucket's age limit.
pub const STALE: Duration = Duration::from_secs(15);
/// A stopped node is listed this long after its last report, then forgotten.
pub const FORGET: Duration = Duration::from_secs(600);
/// The bucket refuses reports larger than this (a report is a few KiB).
const MAX_REPORT: i32 = 64 * 1024;
/// How long `start` waits for the bucket's current values before answering (it answers
/// anyway; the view fills in as they come).
const CATCH_UP: Duration = Duration::from_secs(3);
/// The filter of every key (`watch_all` sees new values only; the history variant starts
/// with the current value of each key).
const ALL_KEYS: &str = ">";
/// How long a graceful leave waits for NATS to take the deletion.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);
/// The pause before watching the bucket again after the watch ended or failed.
const REWATCH: Duration = Duration::from_secs(1);

/// The reports of every node of the cluster: this node's, put in the bucket every
/// [`HEARTBEAT`], and the others', watched. Dropping the last handle stops the heartbeat
/// without a goodbye (the others see the node stop after [`STALE`]); [`Presence::stop`] leaves
/// cleanly.
pub struct Presence {
    node: Arc<str>,
    key: String,
    local: Arc<dyn Fn() -> Value + Send + Sync>,
    store: kv::Store,
    view: Arc<Mutex<View>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Set by the first `stop`: later calls do nothing.
    stopped: std::sync::atomic::AtomicBool,
}

impl Presence {
    /// Opens (or creates) the bucket `<prefix>_nodes` with `replicas` replicas, puts this
    /// node's first report, starts the heartbeat and the watch, and waits (at most
    /// [`CATCH_UP`]) until the view holds the bucket's current reports. `local` makes this
    /// node's report: a JSON object, EMQX's `/api/v5/nodes` entry (`node` and `node_status`
    /// are set here).
    pub async fn start(
        js: async_nats::jetstream::Context,
        prefix: &str,
        replicas: usize,
        node: Arc<str>,
        local: Arc<dyn Fn() -> Value + Send + Sync>,
    ) -> anyhow::Result<Arc<Presence>> {
        anyhow::ensure!(!node.is_empty(), "cluster presence: empty node name");
        let bucket = format!("{prefix}_nodes");
        let store = key_value_bucket(
            &js,
            kv::Config {
                bucket: bucket.clone(),
                description: "Petrel: the nodes of the cluster and their reports".into(),
                history: 1,
                max_age: STALE,
                max_value_size: MAX_REPORT,
                max_bytes: -1,
                storage: async_nats::jetstream::stream::StorageType::Memory,
                num_replicas: replicas,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("cluster presence: cannot open the KV bucket {bucket}"))?;
        let key = node_key(&node);
        let presence = Arc::new(Presence {
            node,
            key,
            local,
            store,
            view: Arc::new(Mutex::new(View::default())),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        presence
            .put()
            .await
            .with_context(|| format!("cluster presence: cannot write to the KV bucket {bucket}"))?;
        let watch = presence
            .store
            .watch_with_history(ALL_KEYS)
            .await
            .with_context(|| format!("cluster presence: cannot watch the KV bucket {bucket}"))?;
        let (caught_up_tx, mut caught_up) = tokio::sync::watch::channel(false);
        presence.tasks.spawn(watcher(
            presence.store.clone(),
            watch,
            Arc::clone(&presence.view),
            Arc::clone(&presence.node),
            caught_up_tx,
            presence.stop.clone(),
        ));
        presence.tasks.spawn(heartbeat(
            presence.store.clone(),
            presence.key.clone(),
            Arc::clone(&presence.local),
            presence.stop.clone(),
        ));
        presence.tasks.close();
        let _ = tokio::time::timeout(CATCH_UP, caught_up.wait_for(|done| *done)).await;
        tracing::info!(node = %presence.node, bucket, "cluster presence");
        Ok(presence)
    }

    /// This node's name.
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Every node's report, sorted by node name: this node's made now, the others' as last
    /// heard, each with `node` and `node_status` (`"running"`, or `"stopped"` when no report
    /// came for [`STALE`]).
    pub fn nodes(&self) -> Vec<Value> {
        let local = (self.local)();
        let now = clock::now();
        self.lock_view().list(&self.node, local, now)
    }

    /// The names of the running nodes, this one included, sorted.
    pub fn running(&self) -> Vec<String> {
        self.lock_view().running(&self.node, clock::now())
    }

    /// Leaves cleanly: stops the heartbeat and the watch, then deletes this node's report
    /// (waiting at most [`LEAVE_TIMEOUT`] for NATS), so that the others drop it at once.
    /// Later calls do nothing.
    pub async fn stop(&self) {
        if self.stopped.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        self.stop.cancel();
        // No heartbeat may land after the deletion.
        self.tasks.wait().await;
        match tokio::time::timeout(LEAVE_TIMEOUT, self.store.delete(&self.key)).await {
            Ok(Ok(())) => tracing::info!(node = %self.node, "cluster presence: left"),
            Ok(Err(err)) => {
                tracing::warn!(node = %self.node, %err, "cluster presence: could not leave")
            }
            Err(_) => tracing::warn!(node = %self.node, "cluster presence: leaving timed out"),
        }
    }

    /// Waits for `shutdown`, then leaves cleanly ([`Presence::stop`]): a task for the
    /// server's tracker.
    pub async fn leave_on(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => self.stop().await,
            // Stopped some other way: nothing to wait for.
            _ = self.stop.cancelled() => {}
        }
    }

    async fn put(&self) -> anyhow::Result<()> {
        put_report(&self.store, &self.key, &(self.local)()).await
    }

    fn lock_view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view
            .lock()
            .expect("presence view lock is never poisoned")
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Creates the KV bucket `config` describes, or updates it to `config`, and opens it.
///
/// async-nats 0.47's own `create_key_value` family first reads the account's JetStream
/// figures, and cannot parse NATS 2.9's answer (it lacks `reserved_memory`); so this makes
/// the bucket's stream itself, with the settings those functions give it (one subject per key,
/// rollups allowed, deletes through markers only, direct gets, new writes refused when full),
/// then opens it with `get_key_value`, which works with 2.9.
pub async fn key_value_bucket(
    js: &async_nats::jetstream::Context,
    config: kv::Config,
) -> anyhow::Result<kv::Store> {
    let stream = async_nats::jetstream::stream::Config {
        description: Some(config.description),
        max_messages_per_subject: config.history.max(1),
        max_bytes: config.max_bytes,
        max_age: config.max_age,
        max_message_size: config.max_value_size,
        storage: config.storage,
        ..super::kv::bucket_stream(&config.bucket, config.num_replicas)
    };
    // Nodes starting together all try to make it; NATS 2.9 may leave some of those
    // requests unanswered or refuse them while another is placed: bind it if it is there,
    // make it if not, and try again a bounded number of times.
    let mut last = None;
    for attempt in 1..=10u32 {
        if let Ok(store) = js.get_key_value(config.bucket.clone()).await {
            return Ok(store);
        }
        match js.create_stream(stream.clone()).await {
            Ok(_) => return Ok(js.get_key_value(config.bucket).await?),
            Err(err) => last = Some(err),
        }
        tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
    }
    Err(last.map_or_else(
        || anyhow::anyhow!("cannot make the bucket"),
        anyhow::Error::from,
    ))
}

async fn put_report(store: &kv::Store, key: &str, report: &Value) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(report).context("cluster presence: report")?;
    store.put(key, Bytes::from(bytes)).await?;
    Ok(())
}

/// Puts this node's report every [`HEARTBEAT`] until `stop`.
async fn heartbeat(
    store: kv::Store,
    key: String,
    local: Arc<dyn Fn() -> Value + Send + Sync>,
    stop: CancellationToken,
) {
    let told = LogEvery::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        let report = local();
        let put = tokio::select! {
            _ = stop.cancelled() => return,
            put = put_report(&store, &key, &report) => put,
        };
        if let Err(err) = put {
            if told.due(clock::now()) {
                tracing::warn!(%err, "cluster presence: cannot put this node's report (at most one line a minute)");
            }
        }
    }
}

/// Feeds the bucket's changes into `view` until `stop`, watching again when the watch ends
/// or fails.
async fn watcher(
    store: kv::Store,
    mut watch: kv::Watch,
    view: Arc<Mutex<View>>,
    node: Arc<str>,
    caught_up: tokio::sync::watch::Sender<bool>,
    stop: CancellationToken,
) {
    let told = LogEvery::default();
    loop {
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = watch.next() => item,
            };
            let entry = match item {
                Some(Ok(entry)) => entry,
                Some(Err(err)) => {
                    tracing::debug!(%err, "cluster presence: watch failed");
                    break;
                }
                None => break,
            };
            if entry.seen_current {
                caught_up.send_replace(true);
            }
            let Some(name) = node_name(&entry.key) else {
                tracing::debug!(key = entry.key, "cluster presence: not a node key");
                continue;
            };
            if *name == *node {
                continue;
            }
            let mut view = view.lock().expect("presence view lock is never poisoned");
            match entry.operation {
                kv::Operation::Put => {
                    if !view.heard(name, &entry.value, clock::now()) {
                        tracing::debug!(key = entry.key, "cluster presence: not a JSON object");
                    }
                }
                kv::Operation::Delete | kv::Operation::Purge => view.left(&name),
            }
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(REWATCH) => {}
            }
            match store.watch_with_history(ALL_KEYS).await {
                Ok(again) => {
                    watch = again;
                    break;
                }
                Err(err) => {
                    if told.due(clock::now()) {
                        tracing::warn!(%err, "cluster presence: cannot watch the nodes (at most one line a minute)");
                    }
                }
            }
        }
    }
}

/// The KV key of a node: its name with every byte other than ASCII letters, digits, `-` and
/// `_` written `=XX` (upper-case hex), so any name makes a valid key (KV keys allow
/// `[-/_=.A-Za-z0-9]`; `.` and `/` are left out to keep the key one NATS token).
/// [`node_name`] reverses it.
pub fn node_key(name: &str) -> String {
    let mut key = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            key.push(char::from(b));
        } else {
            key.push('=');
            key.push(char::from(HEX[usize::from(b >> 4)]));
            key.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    key
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The node name a KV key stands for; `None` for a key [`node_key`] makes for no name.
pub fn node_name(key: &str) -> Option<Arc<str>> {
    let mut bytes = Vec::with_capacity(key.len());
    let mut rest = key.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        match b {
            b'=' => {
                let [hi, lo, tail @ ..] = tail else {
                    return None;
                };
                let digit = |d: u8| HEX.iter().position(|&h| h == d);
                let byte = (digit(*hi)? << 4) | digit(*lo)?;
                let byte = u8::try_from(byte).ok()?;
                // One spelling per name: a byte kept as is is never escaped.
                if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
                    return None;
                }
                bytes.push(byte);
                rest = tail;
            }
            b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' => {
                bytes.push(b);
                rest = tail;
            }
            _ => return None,
        }
    }
    if bytes.is_empty() {
        return None;
    }
    String::from_utf8(bytes).ok().map(Arc::from)
}

/// The other nodes' last reports and when each came (sans-IO: `now` is an argument).
#[derive(Debug, Default)]
pub struct View {
    remote: BTreeMap<Arc<str>, Heard>,
}

#[derive(Debug)]
struct Heard {
    report: serde_json::Map<String, Value>,
    at: Instant,
}

impl View {
    /// Takes a report of `node` (its bytes as found in the bucket); `false` (and the previous
    /// report kept) when it is not a JSON object.
    pub fn heard(&mut self, node: Arc<str>, report: &[u8], now: Instant) -> bool {
        let Ok(Value::Object(report)) = serde_json::from_slice(report) else {
            return false;
        };
        self.remote.insert(node, Heard { report, at: now });
        true
    }

    /// `node` left cleanly: it is no longer listed.
    pub fn left(&mut self, node: &str) {
        self.remote.remove(node);
    }

    /// Every node's report, sorted by name: `local` for `node` (this one), the others' last
    /// reports, each with `node` and `node_status` set. Forgets nodes silent for [`FORGET`].
    pub fn list(&mut self, node: &Arc<str>, local: Value, now: Instant) -> Vec<Value> {
        self.forget(now);
        let mut all: Vec<(Arc<str>, Value)> = Vec::with_capacity(self.remote.len() + 1);
        all.push((Arc::clone(node), with_status(local, node, "running")));
        for (name, heard) in &self.remote {
            if name == node {
                continue;
            }
            let status = if fresh(heard, now) {
                "running"
            } else {
                "stopped"
            };
            all.push((
                Arc::clone(name),
                with_status(Value::Object(heard.report.clone()), name, status),
            ));
        }
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all.into_iter().map(|(_, report)| report).collect()
    }

    /// The names of the running nodes, `node` (this one) included, sorted.
    pub fn running(&self, node: &str, now: Instant) -> Vec<String> {
        let mut names: Vec<String> = self
            .remote
            .iter()
            .filter(|(name, heard)| &***name != node && fresh(heard, now))
            .map(|(name, _)| name.to_string())
            .collect();
        names.push(node.to_owned());
        names.sort();
        names
    }

    fn forget(&mut self, now: Instant) {
        self.remote
            .retain(|_, heard| now.saturating_duration_since(heard.at) <= FORGET);
    }
}

fn fresh(heard: &Heard, now: Instant) -> bool {
    now.saturating_duration_since(heard.at) <= STALE
}

/// `report` with its `node` and `node_status` (a report that is no object becomes one).
fn with_status(report: Value, node: &str, status: &str) -> Value {
    let mut report = match report {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    report.insert("node".into(), Value::from(node));
    report.insert("node_status".into(), Value::from(status));
    Value::Object(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::test_nats::Server as NatsServer;
    use serde_json::json;

    #[test]
    fn node_keys_are_valid_kv_keys_and_reverse() {
        for name in [
            "petrel@host.example",
            "n1",
            "a b/c=d",
            "ünï",
            "=",
            "-_",
            "a.b.c",
        ] {
            let key = node_key(name);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{key}"
            );
            assert_eq!(node_name(&key).as_deref(), Some(name), "{key}");
        }
        assert_eq!(node_key("petrel@h.x"), "petrel=40h=2Ex");
    }

    #[test]
    fn keys_no_name_makes_are_refused() {
        for key in ["", "a=4", "=", "=41", "a.b", "=ZZ", "=2e", "=FF", "a/b"] {
            assert_eq!(node_name(key), None, "{key}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_name_round_trips(name in "\\PC{1,40}") {
            let back = node_name(&node_key(&name));
            proptest::prop_assert_eq!(back.as_deref(), Some(name.as_str()));
        }
    }

    fn names(list: &[Value]) -> Vec<(&str, &str)> {
        list.iter()
            .map(|n| {
                (
                    n["node"].as_str().unwrap(),
                    n["node_status"].as_str().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_view_lists_every_node_sorted_with_its_status() {
        let t0 = Instant::now();
        let me: Arc<str> = "b".into();
        let mut view = View::default();
        assert!(view.heard("c".into(), br#"{"connections": 3}"#, t0));
        assert!(view.heard("a".into(), br#"{"node": "a", "version": "1"}"#, t0));
        let list = view.list(&me, json!({"connections": 1}), t0);
        assert_eq!(
            names(&list),
            [("a", "running"), ("b", "running"), ("c", "running")]
        );
        assert_eq!(list[1]["connections"], 1);
        assert_eq!(list[2]["connections"], 3);
        assert_eq!(view.running("b", t0), ["a", "b", "c"]);

        // `a` goes on reporting; `c` goes silent.
        let later = t0 + STALE + Duration::from_secs(1);
        assert!(view.heard(
            "a".into(),
            br#"{"version": "2"}"#,
            later - Duration::from_secs(2)
        ));
        let list = view.list(&me, json!({}), later);
        assert_eq!(
            names(&list),
            [("a", "running"), ("b", "running"), ("c", "stopped")]
        );
        assert_eq!(list[0]["version"], "2");
        assert_eq!(view.running("b", later), ["a", "b"]);

        // `a` leaves cleanly; `c` is forgotten after FORGET.
        view.left("a");
        let much_later = t0 + FORGET + Duration::from_secs(1);
        assert_eq!(
            names(&view.list(&me, json!({}), much_later)),
            [("b", "running")]
        );
        assert_eq!(view.running("b", much_later), ["b"]);
    }

    #[test]
    fn a_report_that_is_no_json_object_is_ignored() {
        let t0 = Instant::now();
        let mut view = View::default();
        assert!(view.heard("a".into(), br#"{"connections": 1}"#, t0));
        assert!(!view.heard("a".into(), b"[1, 2]", t0));
        assert!(!view.heard("a".into(), b"\xff not json", t0));
        let list = view.list(&"b".into(), json!(null), t0);
        assert_eq!(list[0]["connections"], 1);
        // A local report that is no object still lists the node.
        assert_eq!(names(&list), [("a", "running"), ("b", "running")]);
    }

    fn report(name: &'static str) -> Arc<dyn Fn() -> Value + Send + Sync> {
        Arc::new(move || json!({"node": name, "version": "test", "connections": 0}))
    }

    /// Polls `nodes` until it lists `want` (bounded: 10 s).
    async fn until_listed(presence: &Presence, want: &[(&str, &str)]) {
        let mut last = Vec::new();
        for _ in 0..100 {
            last = presence.nodes();
            if names(&last) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} lists {last:?}, not {want:?}", presence.node());
    }

    #[tokio::test]
    async fn two_nodes_see_each_other_and_a_leaving_one_goes() {
        let nats = NatsServer::start("two").await;
        let js_a = async_nats::jetstream::new(nats.connect().await);
        let js_b = async_nats::jetstream::new(nats.connect().await);
        let a = Presence::start(js_a, "t", 1, "petrel@a".into(), report("petrel@a"))
            .await
            .unwrap();
        let b = Presence::start(js_b, "t", 1, "petrel@b".into(), report("petrel@b"))
            .await
            .unwrap();
        let both = [("petrel@a", "running"), ("petrel@b", "running")];
        until_listed(&a, &both).await;
        until_listed(&b, &both).await;
        assert_eq!(a.running(), ["petrel@a", "petrel@b"]);
        assert_eq!(b.nodes()[0]["version"], "test");

        b.stop().await;
        until_listed(&a, &[("petrel@a", "running")]).await;
        assert_eq!(a.running(), ["petrel@a"]);
        // A second stop does nothing; `a` is unaffected.
        b.stop().await;
        a.stop().await;
    }
}
