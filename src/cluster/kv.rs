//! The durable store's engine in cluster mode: a JetStream key-value bucket
//! (`<prefix>_store`, history 1, file storage, `cluster.replicas` replicas) instead of the
//! local log, so that sessions, queued and in-flight deliveries, inbound QoS 2 state,
//! retained and delayed messages survive the loss of a node and can move to another.
//!
//! [`KvEngine`] is an [`Engine`] under the same `storage::Embedded` (tickets, group commit):
//! its `apply` runs on the store's writer thread and blocks there on the runtime that opened
//! it. A batch goes out as one pipeline on the NATS connection — every put and delete sent
//! in order without waiting, then every acknowledgement awaited — so a commit costs about one
//! round trip to the stream leader (and its replicas), not one per write. Record keys map to
//! KV keys as `keys` describes; every write carries `Petrel-Node: <node>`. A delete is a KV
//! delete marker (`KV-Operation: DEL`); the markers of per-session and delayed keys are
//! then removed by sequence during the next commit, so that a session's space does not grow
//! with every delivery it acknowledged (retained messages' markers stay: other nodes watch
//! them).
//!
//! What a node restores at start-up ([`Engine::take_records`]) is what is its own: every
//! retained message, its own delayed messages, and the sessions whose owner key
//! (`c.<client>.o`, written with every session record) names it. [`KvHandle`] gives the
//! cluster code the rest: who owns a session, one session's records (to take it over), and
//! the retained changes other nodes make.
//!
//! A write is durable once JetStream acknowledges it: stored by a quorum of the bucket's
//! replicas (a NATS server syncs its files to disk on its own `sync_interval`; the replicas
//! are what survives a lost server). Acknowledgements are awaited up to the JetStream
//! context's timeout (5 s by default); past it, or while NATS is unreachable, commits fail
//! and the store refuses new persistent messages until one succeeds again.
//!
//! Limits (NATS server 2.9): a batch is not atomic — a commit that fails part-way may leave
//! part of it applied (every write is a whole-key put or delete, so a retry converges, and
//! none of it was acknowledged); one value must fit the server's `max_payload` (1 MiB by
//! default), a larger one fails its commit with an error saying so.

pub mod keys;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{self, Context};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{Stream as FutureStream, StreamExt};

use crate::storage::engine::{Engine, Write};
use crate::storage::record;
use keys::{client_filter, delayed_filter, from_kv, owner_key, to_kv};

/// Header naming the node that made a write.
pub const NODE_HEADER: &str = "Petrel-Node";
/// Header carrying the binary key of a record whose KV key is hashed (`keys`).
const KEY_HEADER: &str = "Petrel-Key";
const OPERATION_HEADER: &str = "KV-Operation";
/// Acknowledgements awaited at most at once (below async-nats' 5000 in-flight permits).
const ACK_WINDOW: usize = 1024;
/// A read of the bucket gives up after this long without a message.
const READ_IDLE: Duration = Duration::from_secs(10);
/// Up to this many owned sessions are read one by one at start-up; more, in one pass over
/// every session of the cluster.
const PER_CLIENT_READS: usize = 64;
/// Delete-marker removals in flight at once.
const MARKER_REMOVALS: usize = 64;
/// Room left in a message for its headers.
const HEADER_ROOM: usize = 1024;

/// The stream a KV bucket is, as `nats kv add` makes it (one value per key, rollups, direct
/// gets, deletes denied), with `replicas`: made directly, because async-nats' KV creation
/// first asks for account details that a 2.9 server words otherwise. Callers adjust storage,
/// age and the like.
pub fn bucket_stream(bucket: &str, replicas: usize) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// A failed operation on the bucket: what was being done, and why.
#[derive(Debug, thiserror::Error)]
#[error("JetStream bucket {bucket}: {what}: {source}")]
pub struct KvError {
    bucket: String,
    what: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// The store's engine on a JetStream bucket; see the module documentation.
pub struct KvEngine {
    runtime: tokio::runtime::Handle,
    kv: KvHandle,
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    written: u64,
    /// Delete markers of the last commit, removed during the next one.
    markers: Vec<u64>,
}

/// The bucket, for the cluster code: cheap to clone, usable from any task.
#[derive(Clone)]
pub struct KvHandle {
    js: Context,
    stream: Stream,
    bucket: String,
    /// `$KV.<bucket>.`
    prefix: String,
    node: String,
}

/// Binds (or creates) the bucket `<prefix>_store` and reads what this node restores.
///
/// Call it on the Tokio runtime (multi-threaded) that will serve the store: [`Engine::apply`]
/// blocks on it from the store's own thread.
pub async fn open(
    js: Context,
    prefix: &str,
    replicas: usize,
    node: &str,
) -> anyhow::Result<KvEngine> {
    let runtime = tokio::runtime::Handle::current();
    let kv = KvHandle::bind(js, prefix, replicas, node).await?;
    let started = std::time::Instant::now();
    // A bucket another node has just made may not be known yet to the NATS server this
    // node talks to ("no stream found"): wait for it, a bounded while.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let records = loop {
        match kv.load_own().await {
            Ok(records) => break records,
            Err(err)
                if err.to_string().contains("no stream found")
                    && std::time::Instant::now() < deadline =>
            {
                tracing::debug!(%err, "cluster store: the bucket is not ready yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => return Err(err.into()),
        }
    };
    tracing::info!(
        bucket = %kv.bucket,
        records = records.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "cluster store read"
    );
    Ok(KvEngine {
        runtime,
        kv,
        records,
        written: 0,
        markers: Vec::new(),
    })
}

impl KvEngine {
    /// A handle on the same bucket, for the cluster code (take it before boxing the engine).
    pub fn handle(&self) -> KvHandle {
        self.kv.clone()
    }
}

impl Engine for KvEngine {
    /// Must not be called on a runtime thread (it blocks on the runtime).
    fn apply(&mut self, batch: &[Write]) -> std::io::Result<()> {
        // The last commit's markers go meanwhile: removing a message by its sequence cannot
        // touch anything newer, so it needs no order with this batch.
        let markers = std::mem::take(&mut self.markers);
        let (written, ()) = self.runtime.block_on(async {
            tokio::join!(self.kv.write(batch), self.kv.remove_markers(markers))
        });
        let written = written.map_err(std::io::Error::other)?;
        self.written += written.bytes;
        self.markers = written.markers;
        Ok(())
    }

    fn take_records(&mut self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        std::mem::take(&mut self.records)
    }

    fn bytes_written(&self) -> u64 {
        self.written
    }
}

/// The error and its sources, on one line.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        let more = err.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = err.source();
    }
    text
}

impl KvHandle {
    async fn bind(js: Context, prefix: &str, replicas: usize, node: &str) -> anyhow::Result<Self> {
        let bucket = format!("{prefix}_store");
        if !bucket
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            anyhow::bail!(
                "cluster.prefix {prefix:?}: bucket name {bucket:?} is not valid in JetStream \
                 (letters, digits, - and _ only)"
            );
        }
        let stream_name = format!("KV_{bucket}");
        let stream = match js.get_stream(&stream_name).await {
            Ok(stream) => {
                let config = &stream.cached_info().config;
                if config.deny_delete {
                    tracing::warn!(
                        %bucket,
                        "the cluster store's bucket denies message deletes (made by `nats kv \
                         add`?): every acknowledged delivery leaves a delete marker until its \
                         session ends; let Petrel create the bucket to avoid that"
                    );
                }
                let have = config.num_replicas;
                if have != replicas {
                    tracing::warn!(
                        %bucket,
                        replicas = have,
                        wanted = replicas,
                        "the cluster store's bucket exists with another replica count; kept \
                         as it is (change it with `nats stream edit`)"
                    );
                }
                stream
            }
            Err(_) => {
                let created = Self::create(&js, &bucket, replicas).await;
                match js.get_stream(&stream_name).await {
                    Ok(stream) => stream,
                    // Another node may have made it meanwhile: then its error does not count.
                    Err(err) => {
                        created?;
                        anyhow::bail!("JetStream bucket {bucket}: created, then not found: {err}")
                    }
                }
            }
        };
        Ok(Self {
            js,
            stream,
            prefix: format!("$KV.{bucket}."),
            bucket,
            node: node.to_owned(),
        })
    }

    async fn create(js: &Context, bucket: &str, replicas: usize) -> anyhow::Result<()> {
        // The stream a KV bucket is (as `nats kv add` makes it), made directly: async-nats'
        // `create_key_value` first asks for account details that a 2.9 server words otherwise.
        let config = jetstream::stream::Config {
            description: Some(
                "Petrel's durable store: sessions, queued deliveries, retained and delayed \
                 messages"
                    .into(),
            ),
            max_messages: -1,
            storage: jetstream::stream::StorageType::File,
            // Unlike `nats kv add`: the delete markers of per-session keys are removed by
            // sequence once written (`remove_markers`).
            deny_delete: false,
            ..bucket_stream(bucket, replicas)
        };
        let Err(err) = js.create_stream(config).await else {
            tracing::info!(%bucket, replicas, "cluster store bucket created");
            return Ok(());
        };
        let text = chain(&err);
        let lower = text.to_ascii_lowercase();
        if replicas > 1
            && ["replica", "peer", "insufficient resources"]
                .iter()
                .any(|w| lower.contains(w))
        {
            anyhow::bail!(
                "JetStream cannot place the {replicas} replicas of bucket {bucket} ({text}); \
                 set cluster.replicas to at most the number of JetStream servers in the NATS \
                 cluster (1 for a single server)"
            );
        }
        anyhow::bail!("JetStream bucket {bucket} cannot be created: {text}")
    }

    /// This node's name.
    #[cfg(test)]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The bucket's name.
    #[cfg(test)]
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn error(
        &self,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> KvError {
        KvError {
            bucket: self.bucket.clone(),
            what: what.into(),
            source: source.into(),
        }
    }

    /// The node that owns `client_id`'s session (the last to store its session record).
    pub async fn owner_of(&self, client_id: &str) -> Result<Option<String>, KvError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let key = owner_key(client_id.as_bytes());
        // One message get from the stream's leader: no consumer to make on every CONNECT.
        match self
            .stream
            .get_last_raw_message_by_subject(&format!("{}{key}", self.prefix))
            .await
        {
            Ok(message) if is_delete(Some(&message.headers)) => Ok(None),
            Ok(message) => Ok(Some(String::from_utf8_lossy(&message.payload).into_owned())),
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(self.error(format!("reading {key}"), err)),
        }
    }

    /// Node `node`'s position in the cluster's message stream (`record::Record::Mark`), if
    /// it wrote one.
    pub async fn mark_of(&self, node: &str) -> Result<Option<u64>, KvError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let key = record::mark_key(node);
        let kv = to_kv(&key, node).key;
        match self
            .stream
            .get_last_raw_message_by_subject(&format!("{}{kv}", self.prefix))
            .await
        {
            Ok(message) if is_delete(Some(&message.headers)) => Ok(None),
            Ok(message) => match record::decode(&key, &message.payload) {
                Ok(record::Record::Mark { seq, .. }) => Ok(Some(seq)),
                _ => Err(self.error(format!("reading {kv}"), "not a mark record")),
            },
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(err) => Err(self.error(format!("reading {kv}"), err)),
        }
    }

    /// Records this node as `client_id`'s owner (a session that the store does not keep,
    /// so that a CONNECT on another node still finds where to take it over from).
    pub async fn set_owner(&self, client_id: &str) -> Result<(), KvError> {
        let mut out = Pipeline::default();
        let owner = Bytes::copy_from_slice(self.node.as_bytes());
        self.publish(
            &mut out,
            owner_key(client_id.as_bytes()),
            None,
            Some(owner),
            false,
        )
        .await?;
        self.settle(&mut out, 0).await
    }

    /// Every record of `client_id`'s session as binary keys and values, ready for
    /// `storage::recover::read` (empty: no session stored).
    pub async fn load_client(
        &self,
        client_id: &str,
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, KvError> {
        let mut records = BTreeMap::new();
        self.read(
            &client_filter(client_id.as_bytes()),
            |key, carried, value| {
                if let Some(key) = from_kv(key, carried) {
                    records.insert(key, value.to_vec());
                }
            },
        )
        .await?;
        Ok(records)
    }

    /// Retained messages set (`Some(record value)`, `record::decode` reads it) or cleared
    /// (`None`) by nodes other than `skip_node`, from now on. An error item is a notice (the
    /// ordered consumer under it recovers by itself and the watch goes on); the stream ends
    /// only when the connection is closed for good. After a gap (a reconnection before the
    /// first change) the consumer may start over and report the current value of every
    /// retained message again: applying changes must be idempotent.
    pub async fn watch_retained(
        &self,
        skip_node: &str,
        again: bool,
    ) -> Result<
        impl FutureStream<Item = Result<(String, Option<Bytes>), KvError>> + Send + 'static,
        KvError,
    > {
        // `again`: after a watch failed, every retained message as it is now (changes
        // missed meanwhile included; applying one twice changes nothing).
        let policy = if again {
            DeliverPolicy::LastPerSubject
        } else {
            DeliverPolicy::New
        };
        let (messages, _) = self.consume("r.>", policy).await?;
        let prefix = self.prefix.clone();
        let skip = skip_node.to_owned();
        let this = self.clone();
        Ok(messages.filter_map(move |message| {
            let change = match message {
                Err(err) => Some(Err(this.error("watching retained messages", err))),
                Ok(message) => retained_change(&prefix, &skip, &message.message).map(Ok),
            };
            std::future::ready(change)
        }))
    }

    /// An ordered consumer over `filter` (a KV key filter), and how many messages it has
    /// to deliver as it starts. Ordered consumers read from the stream's leader: what they
    /// give is what was acknowledged, never a lagging replica's view. A pull consumer, not
    /// a push one: a push consumer may send its first messages before the client's
    /// subscription to its delivery subject is in place, and async-nats notices only after
    /// two missed heartbeats (10 s), then starts again from the stream's first message.
    async fn consume(
        &self,
        filter: &str,
        deliver_policy: DeliverPolicy,
    ) -> Result<(jetstream::consumer::pull::Ordered, u64), KvError> {
        let what = format!("reading {filter}");
        // With a server of the NATS cluster down, 2.9 leaves some consumer creations
        // unanswered: a few tries, each bounded by the JetStream request timeout.
        let mut tries = 0;
        let consumer = loop {
            let created = self
                .stream
                .create_consumer(OrderedConfig {
                    description: Some("petrel store read".into()),
                    filter_subject: format!("{}{filter}", self.prefix),
                    replay_policy: ReplayPolicy::Instant,
                    deliver_policy,
                    ..Default::default()
                })
                .await;
            match created {
                Ok(consumer) => break consumer,
                Err(err) if tries < 2 => {
                    tries += 1;
                    tracing::debug!(%err, filter, "cluster store: a read's consumer was not made; retrying");
                }
                Err(err) => return Err(self.error(what.clone(), err)),
            }
        };
        let pending = consumer.cached_info().num_pending;
        // The consumer's start is fixed at its creation and the client pulls: a watch
        // "from now on" misses nothing written after this returns.
        let messages = consumer.messages().await.map_err(|e| self.error(what, e))?;
        Ok((messages, pending))
    }

    /// Reads the live keys under `filter` as they are now (bounded: stops when caught up),
    /// handing each to `each` as (KV key, `Petrel-Key` header, value).
    async fn read(
        &self,
        filter: &str,
        mut each: impl FnMut(&str, Option<&[u8]>, Bytes),
    ) -> Result<(), KvError> {
        let what = format!("reading {filter}");
        let (mut messages, pending) = self.consume(filter, DeliverPolicy::LastPerSubject).await?;
        if pending == 0 {
            return Ok(());
        }
        // nats-server 2.9 may report one pending on the last message a last-per-subject
        // consumer delivers: the count at creation ends the read too.
        let mut left = pending;
        loop {
            let next = tokio::time::timeout(READ_IDLE, messages.next())
                .await
                .map_err(|_| self.error(what.clone(), format!("no message for {READ_IDLE:?}")))?;
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => return Err(self.error(what, err)),
                None => {
                    return Err(self.error(what, "the consumer ended"));
                }
            };
            let pending = message
                .info()
                .map_err(|e| self.error(what.clone(), e))?
                .pending;
            let message = message.message;
            if !is_delete(message.headers.as_ref()) {
                if let Some(key) = message.subject.as_str().strip_prefix(&self.prefix) {
                    let carried = carried_key(message.headers.as_ref());
                    each(key, carried.as_deref(), message.payload);
                }
            }
            left = left.saturating_sub(1);
            if pending == 0 || left == 0 {
                return Ok(());
            }
        }
    }

    /// What this node restores: retained messages, its delayed messages, its sessions, and
    /// the format record (written if the bucket has none).
    async fn load_own(&self) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, KvError> {
        let mut records = BTreeMap::new();
        let mut keep = |key: &str, carried: Option<&[u8]>, value: Bytes| {
            if let Some(key) = from_kv(key, carried) {
                records.insert(key, value.to_vec());
            }
        };
        self.read("x.>", &mut keep).await?;
        self.read("r.>", &mut keep).await?;
        self.read(&delayed_filter(&self.node), &mut keep).await?;
        let mut owned = Vec::new();
        self.read("c.*.o", |key, _, value| {
            if value == self.node.as_bytes() {
                if let Some(token) = key.split('.').nth(1) {
                    owned.push(token.to_owned());
                }
            }
        })
        .await?;
        if owned.len() <= PER_CLIENT_READS {
            for token in &owned {
                self.read(&format!("c.{token}.>"), &mut keep).await?;
            }
        } else {
            let owned: HashSet<String> = owned.into_iter().collect();
            self.read("c.>", |key, carried, value| {
                if key.split('.').nth(1).is_some_and(|t| owned.contains(t)) {
                    keep(key, carried, value);
                }
            })
            .await?;
        }
        if !records.contains_key(record::META) {
            let meta = Write::Put {
                key: record::META.to_vec(),
                value: record::meta_value(),
            };
            self.write(std::slice::from_ref(&meta)).await?;
            records.insert(record::META.to_vec(), record::meta_value().to_vec());
        }
        Ok(records)
    }

    /// Sends `batch` in order as one pipeline and awaits every acknowledgement.
    async fn write(&self, batch: &[Write]) -> Result<Written, KvError> {
        let mut out = Pipeline::default();
        for write in batch {
            match write {
                Write::Put { key, value } => {
                    self.send(&mut out, key, Some(value.clone())).await?;
                    if let Some(client) = key.strip_prefix(&[record::SESSION]) {
                        let owner = Bytes::copy_from_slice(self.node.as_bytes());
                        self.publish(&mut out, owner_key(client), None, Some(owner), false)
                            .await?;
                    }
                }
                Write::Delete(keys) => {
                    for key in keys {
                        self.send(&mut out, key, None).await?;
                    }
                }
                Write::Publish { subject, payload } => {
                    // A message committed to the cluster's message stream (`cluster::node`),
                    // in the same pipeline as the records routing it wrote.
                    let ack = self
                        .js
                        .send_publish(
                            subject.clone(),
                            PublishMessage::build().payload(payload.clone()),
                        )
                        .await
                        .map_err(|e| self.error(format!("publishing on {subject}"), e))?;
                    out.acks.push_back((ack, false));
                    self.settle(&mut out, ACK_WINDOW).await?;
                    out.done.bytes += payload.len() as u64;
                }
                Write::EndSession { key, .. } => {
                    // In order: what came before is in before the purge, what comes after
                    // goes after it.
                    self.settle(&mut out, 0).await?;
                    let client = key.strip_prefix(&[record::SESSION]).unwrap_or(key);
                    let filter = client_filter(client);
                    let what = format!("purging {filter}");
                    let response = self
                        .stream
                        .purge()
                        .filter(format!("{}{filter}", self.prefix))
                        .await
                        .map_err(|e| self.error(what.clone(), e))?;
                    if !response.success {
                        return Err(self.error(what, "the server refused"));
                    }
                }
            }
        }
        self.settle(&mut out, 0).await?;
        Ok(out.done)
    }

    /// Sends one record's put (`Some`) or delete (`None`).
    async fn send(
        &self,
        out: &mut Pipeline,
        key: &[u8],
        value: Option<Bytes>,
    ) -> Result<(), KvError> {
        let kv = to_kv(key, &self.node);
        let carried = kv.carried.then(|| keys::hex(key));
        // Delete markers of retained messages stay: other nodes' watches must see them.
        let removable = value.is_none() && key.first() != Some(&record::RETAINED);
        self.publish(out, kv.key, carried, value, removable).await
    }

    async fn publish(
        &self,
        out: &mut Pipeline,
        key: String,
        carried: Option<String>,
        value: Option<Bytes>,
        removable: bool,
    ) -> Result<(), KvError> {
        let mut headers = HeaderMap::new();
        headers.insert(NODE_HEADER, self.node.as_str());
        let carried_len = carried.as_ref().map_or(0, String::len);
        if let Some(carried) = carried {
            headers.insert(KEY_HEADER, carried);
        }
        let payload = match value {
            Some(value) => value,
            None => {
                headers.insert(OPERATION_HEADER, "DEL");
                Bytes::new()
            }
        };
        let max = self.js.client().server_info().max_payload;
        let size = payload.len() + carried_len + self.node.len() + HEADER_ROOM;
        if max > 0 && size > max {
            return Err(self.error(
                format!("writing {key}"),
                format!(
                    "{} bytes do not fit the NATS server's max_payload of {max} bytes (raise \
                     max_payload in the NATS server configuration)",
                    payload.len()
                ),
            ));
        }
        out.done.bytes += (key.len() + payload.len()) as u64;
        let subject = format!("{}{key}", self.prefix);
        let ack = self
            .js
            .send_publish(
                subject,
                PublishMessage::build().payload(payload).headers(headers),
            )
            .await
            .map_err(|e| self.error(format!("writing {key}"), e))?;
        out.acks.push_back((ack, removable));
        self.settle(out, ACK_WINDOW).await
    }

    /// Awaits acknowledgements, oldest first, until at most `keep` are outstanding.
    async fn settle(&self, out: &mut Pipeline, keep: usize) -> Result<(), KvError> {
        while out.acks.len() > keep {
            let (ack, removable) = out.acks.pop_front().expect("not empty");
            let ack = ack
                .await
                .map_err(|e| self.error("a write's acknowledgement", e))?;
            if removable {
                out.done.markers.push(ack.sequence);
            }
        }
        Ok(())
    }

    /// Removes delete markers (by stream sequence) that a commit left: a deleted key then
    /// holds no message at all, so that a session's bucket space does not grow with every
    /// delivery it ever acknowledged. Best effort: a marker left is only garbage (a session's
    /// end purges it).
    async fn remove_markers(&self, markers: Vec<u64>) {
        if markers.is_empty() {
            return;
        }
        let subject = format!("STREAM.MSG.DELETE.KV_{}", self.bucket);
        let left = futures_util::stream::iter(markers)
            .map(|seq| {
                let subject = subject.clone();
                async move {
                    let request = serde_json::json!({ "seq": seq, "no_erase": true });
                    self.js
                        .request::<_, _, serde_json::Value>(subject, &request)
                        .await
                }
            })
            .buffer_unordered(MARKER_REMOVALS)
            .filter(|response| {
                let removed = matches!(response, Ok(v) if v["success"] == serde_json::json!(true));
                std::future::ready(!removed)
            })
            .count()
            .await;
        if left > 0 {
            tracing::debug!(bucket = %self.bucket, left, "delete markers not removed");
        }
    }
}

/// A commit's writes in flight.
#[derive(Default)]
struct Pipeline {
    /// Acknowledgements awaited, oldest first, each with whether it is a removable marker.
    acks: VecDeque<(PublishAckFuture, bool)>,
    done: Written,
}

/// What a commit wrote.
#[derive(Default)]
struct Written {
    bytes: u64,
    /// Stream sequences of delete markers to remove.
    markers: Vec<u64>,
}

/// Whether a KV message is a delete or purge marker.
fn is_delete(headers: Option<&HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get(OPERATION_HEADER))
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}

/// The binary key a message carries in `Petrel-Key`, if any.
fn carried_key(headers: Option<&HeaderMap>) -> Option<Vec<u8>> {
    keys::unhex(headers?.get(KEY_HEADER)?.as_str())
}

/// A retained message's change as the watch reports it; `None` for this node's own writes
/// and for what is not a retained record.
fn retained_change(
    prefix: &str,
    skip: &str,
    message: &async_nats::Message,
) -> Option<(String, Option<Bytes>)> {
    let headers = message.headers.as_ref();
    if headers
        .and_then(|h| h.get(NODE_HEADER))
        .is_some_and(|n| n.as_str() == skip)
    {
        return None;
    }
    let key = message.subject.as_str().strip_prefix(prefix)?;
    let key = from_kv(key, carried_key(headers).as_deref())?;
    let topic = String::from_utf8(key.strip_prefix(&[record::RETAINED])?.to_vec()).ok()?;
    let value = (!is_delete(headers)).then(|| message.payload.clone());
    Some((topic, value))
}

#[cfg(test)]
mod tests;
