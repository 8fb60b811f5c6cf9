//! A node of a cluster at run time: the broker's [`Peers`] on NATS (see docs/cluster.md).
//!
//! - **Routing.** Each filter subscribed on this node is one NATS subscription per subject
//!   `subject::subjects_for_filter` gives it, under `<prefix>.live` (a shared subscription's
//!   in a NATS queue group named after its group and filter), opened when the filter's first
//!   subscriber arrives and closed when its last leaves: a message crosses the network once
//!   per interested node, and NATS picks one node per shared group. A message routed here is
//!   forwarded under its topic's subject: QoS 0 at once on core NATS (`<prefix>.live`); QoS
//!   1/2 through the store's next group commit into the JetStream stream `<prefix>_msgs`
//!   (`<prefix>.msg`), so the publisher's acknowledgement waits until JetStream has it; the
//!   stream republishes it to `<prefix>.live` with its sequence.
//! - **Receiving.** Every subscription feeds one task that routes in arrival order: to the
//!   plain subscriptions here (`Broker::route_remote`), once even when several overlapping
//!   filters brought the message (recent message ids are remembered), or, for a queue
//!   group's message, to one member of that group, whichever node published it. The task
//!   also marks, in the store, how far in the stream this node has routed. Retained messages
//!   are not sent as messages: the store's bucket is watched
//!   (`kv::KvHandle::watch_retained`).
//! - **Sessions.** A CONNECT asks the store's bucket which node owns the client; if another,
//!   that node is asked (`<prefix>.node.<node>.takeover`) to close the connection with 0x8E
//!   and file the session, and the session is read back from the bucket here. A node that
//!   does not answer is taken for dead: its last committed state is used, and what the
//!   session missed since that node's mark is replayed from the stream.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::kv::KvHandle;
use super::settings::ClusterSettings;
use super::subject;
use crate::broker::Broker;
use crate::codec::QoS;
use crate::core::fanout::Scope;
use crate::core::hooks::{Claim, Peers, Refused, Ticket};
use crate::core::message::AppMessage;
use crate::core::topic::TopicFilter;
use crate::storage::Embedded;

/// Other nodes' retained changes, as `KvHandle::watch_retained` reports them.
type RetainedChanges = std::pin::Pin<
    Box<
        dyn futures_util::Stream<Item = Result<(String, Option<Bytes>), super::kv::KvError>> + Send,
    >,
>;

/// The wire format's version (first byte of every message between nodes).
const WIRE: u8 = 2;
/// Message ids remembered to drop the copies overlapping filters bring.
const RECENT: usize = 16_384;
/// QoS 0 messages waiting for the NATS connection; past it they are dropped (counted).
const QOS0_QUEUE: usize = 65_536;
/// Messages from NATS waiting to be routed (the subscriptions wait when it is full).
const INCOMING_QUEUE: usize = 8_192;
/// How long after routing a stream message its sequence is marked (see `Cluster::process`).
const MARK_DELAY: Duration = Duration::from_millis(500);
/// How long a new subscription's interest takes to reach every NATS server, allowed for
/// before a replay reads the stream's end.
const INTEREST_SPREAD: Duration = Duration::from_millis(250);

/// One message from a NATS subscription: its frame, its sequence in the message stream
/// (QoS 1/2), and the shared subscription whose queue group brought it.
struct Incoming {
    payload: Bytes,
    seq: Option<u64>,
    group: Option<Arc<TopicFilter>>,
}

/// One filter's NATS subscriptions: how to stop them, and whether they are at the server.
struct Route {
    stop: CancellationToken,
    ready: tokio::sync::watch::Receiver<bool>,
}

/// This node's membership of the cluster; see the module documentation.
pub struct Cluster {
    me: Weak<Cluster>,
    node: Arc<str>,
    prefix: String,
    /// `<prefix>.msg`: where QoS 1/2 messages are committed (the stream's subjects).
    msg_prefix: String,
    /// `<prefix>.live`: where messages reach the nodes (QoS 0 published there, QoS 1/2
    /// republished there by the stream with their sequence).
    live_prefix: String,
    /// The message stream, for catching up (`Cluster::replay`).
    stream: async_nats::jetstream::stream::Stream,
    /// What the subscriptions bring, to the one task that routes it in arrival order.
    incoming: tokio::sync::mpsc::Sender<Incoming>,
    incoming_rx: Mutex<Option<tokio::sync::mpsc::Receiver<Incoming>>>,
    client: async_nats::Client,
    kv: KvHandle,
    request_timeout: Duration,
    /// This process's id in message ids (a restarted node is a new origin).
    instance: u64,
    counter: AtomicU64,
    broker: OnceLock<Weak<Broker>>,
    store: OnceLock<Arc<Embedded>>,
    routes: Mutex<HashMap<Box<str>, Route>>,
    recent: Mutex<Recent>,
    qos0: tokio::sync::mpsc::Sender<(String, Bytes)>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
}

/// Connects to NATS as `settings` say; the error names what failed.
pub async fn connect(
    settings: &ClusterSettings,
    node: &str,
) -> anyhow::Result<(async_nats::Client, async_nats::jetstream::Context)> {
    use anyhow::Context as _;
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("petrel {node}"))
        .connection_timeout(settings.connect_timeout)
        .request_timeout(Some(settings.request_timeout));
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.clone());
    }
    if let Some(creds) = &settings.creds_file {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("cluster.creds_file {}", creds.display()))?;
    }
    if let Some(ca) = &settings.tls_ca_file {
        options = options.require_tls(true).add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
        options = options
            .require_tls(true)
            .add_client_certificate(cert.clone(), key.clone());
    }
    let urls = settings.nats.join(",");
    let client = options
        .connect(settings.nats.as_slice())
        .await
        .with_context(|| format!("cannot connect to NATS at {urls} (cluster.nats)"))?;
    let mut js = async_nats::jetstream::new(client.clone());
    // Creating a replicated stream while other nodes do the same can take seconds (a
    // commit's acknowledgement normally takes milliseconds); reads retry on their own.
    js.set_timeout(settings.connect_timeout.min(Duration::from_secs(5)));
    Ok((client, js))
}

/// The stream QoS 1/2 messages are committed to before their publisher is acknowledged.
async fn message_stream(
    js: &async_nats::jetstream::Context,
    settings: &ClusterSettings,
) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    use async_nats::jetstream::stream;
    let config = stream::Config {
        name: format!("{}_msgs", settings.prefix),
        subjects: vec![format!("{}.msg.>", settings.prefix)],
        // Each stored message reaches the nodes on `<prefix>.live.…` with its sequence.
        republish: Some(stream::Republish {
            source: format!("{}.msg.>", settings.prefix),
            destination: format!("{}.live.>", settings.prefix),
            headers_only: false,
        }),
        max_age: settings.message_retention,
        max_bytes: settings.message_max_bytes,
        num_replicas: settings.replicas,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    let stream = js.get_or_create_stream(config).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot create the JetStream stream {}_msgs with {} replicas: {err} (does the NATS \
             cluster have JetStream on and at least cluster.replicas servers?)",
            settings.prefix,
            settings.replicas
        )
    })?;
    Ok(stream)
}

impl Cluster {
    /// Joins: makes the message stream if missing and starts the QoS 0 sender. The broker
    /// and store are attached later ([`Cluster::attach`]): the broker is built with this as
    /// its peers.
    pub async fn start(
        settings: &ClusterSettings,
        node: Arc<str>,
        client: async_nats::Client,
        js: &async_nats::jetstream::Context,
        kv: KvHandle,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let stream = message_stream(js, settings).await?;
        let (incoming, incoming_rx) = tokio::sync::mpsc::channel(INCOMING_QUEUE);
        let (qos0, mut outbox) = tokio::sync::mpsc::channel::<(String, Bytes)>(QOS0_QUEUE);
        let sender = client.clone();
        tokio::spawn(async move {
            while let Some((subject, payload)) = outbox.recv().await {
                if let Err(err) = sender.publish(subject, payload).await {
                    tracing::warn!(%err, "cluster: a QoS 0 message was not sent to NATS");
                }
            }
        });
        let instance = {
            use std::hash::BuildHasher as _;
            std::collections::hash_map::RandomState::new().hash_one(std::process::id())
        };
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            msg_prefix: format!("{}.msg", settings.prefix),
            live_prefix: format!("{}.live", settings.prefix),
            stream,
            incoming,
            incoming_rx: Mutex::new(Some(incoming_rx)),
            prefix: settings.prefix.clone(),
            node,
            client,
            kv,
            request_timeout: settings.request_timeout,
            instance,
            counter: AtomicU64::new(0),
            broker: OnceLock::new(),
            store: OnceLock::new(),
            routes: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::default()),
            qos0,
            runtime: tokio::runtime::Handle::current(),
            shutdown,
        }))
    }

    /// Attaches the broker and its store, and starts answering other nodes' takeovers and
    /// following their retained messages.
    pub async fn attach(
        self: &Arc<Self>,
        broker: &Arc<Broker>,
        store: Option<Arc<Embedded>>,
    ) -> anyhow::Result<()> {
        let _ = self.broker.set(Arc::downgrade(broker));
        if let Some(store) = store {
            let _ = self.store.set(store);
        }
        let takeovers = self
            .client
            .subscribe(takeover_subject(&self.prefix, &self.node))
            .await
            .map_err(|err| anyhow::anyhow!("cluster: cannot subscribe to NATS: {err}"))?;
        tokio::spawn(Arc::clone(self).serve_takeovers(takeovers));
        if let Some(incoming) = self.incoming_rx.lock().expect("never poisoned").take() {
            tokio::spawn(Arc::clone(self).process(incoming));
        }
        let retained = self.kv.watch_retained(&self.node, false).await?;
        tokio::spawn(Arc::clone(self).follow_retained(Box::pin(retained)));
        Ok(())
    }

    fn broker(&self) -> Option<Arc<Broker>> {
        self.broker.get().and_then(Weak::upgrade)
    }

    /// Answers other nodes' requests for a session: hands it over, waits until the store
    /// has filed it, and says so.
    async fn serve_takeovers(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        loop {
            let request = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                request = requests.next() => match request {
                    Some(request) => request,
                    None => return,
                },
            };
            let this = Arc::clone(&self);
            tokio::spawn(async move {
                let (Some(reply), Ok(client_id)) =
                    (request.reply, std::str::from_utf8(&request.payload))
                else {
                    return;
                };
                let Some(broker) = this.broker() else { return };
                let client_id: Arc<str> = client_id.into();
                let answer = match broker
                    .hand_over(&client_id, crate::broker::clock::now())
                    .await
                {
                    Some(ticket) => match broker.durable(ticket).await {
                        Ok(()) => "moved",
                        Err(_) => "failed",
                    },
                    None => "none",
                };
                broker
                    .metrics
                    .peers_takeovers_answered
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%client_id, answer, "cluster: session asked for by another node");
                let _ = this
                    .client
                    .publish(reply, Bytes::from_static(answer.as_bytes()))
                    .await;
            });
        }
    }

    /// Keeps this node's retained messages in step with what other nodes set and clear.
    async fn follow_retained(self: Arc<Self>, mut changes: RetainedChanges) {
        loop {
            let (topic, value) = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                change = changes.next() => match change {
                    Some(Ok(change)) => change,
                    failed => {
                        // A NATS server lost, a missed heartbeat: watch again, from what is
                        // retained now.
                        match failed {
                            Some(Err(err)) => tracing::warn!(%err, "cluster: watching retained messages failed; watching again"),
                            _ => tracing::warn!("cluster: the retained messages' watch ended; watching again"),
                        }
                        match self.watch_retained_again().await {
                            Some(again) => changes = again,
                            None => return,
                        }
                        continue;
                    }
                },
            };
            let Some(broker) = self.broker() else { return };
            let message = match value {
                None => None,
                Some(value) => {
                    let key = crate::storage::record::retained_key(&topic);
                    match crate::storage::record::decode(&key, &value) {
                        Ok(crate::storage::record::Record::Retained(stored)) => {
                            crate::storage::recover::app_message(
                                stored,
                                crate::broker::clock::now(),
                                crate::storage::wall_ms(),
                            )
                            .map(|m| Arc::new(m.detached()))
                        }
                        _ => {
                            tracing::warn!(%topic, "cluster: an unreadable retained record");
                            continue;
                        }
                    }
                }
            };
            broker.retained_from_peer(&topic, message);
        }
    }

    /// A new watch of other nodes' retained messages, starting from all of them; tries
    /// until it works or the node stops (`None`).
    async fn watch_retained_again(&self) -> Option<RetainedChanges> {
        let mut wait = Duration::from_millis(200);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.kv.watch_retained(&self.node, true).await {
                Ok(watch) => return Some(Box::pin(watch)),
                Err(err) => {
                    tracing::warn!(%err, "cluster: cannot watch retained messages yet");
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Brings `client_id`'s session here if another node owns it (see the module
    /// documentation), and records this node as its owner.
    async fn claim_session(self: Arc<Self>, client_id: Arc<str>) {
        let owner = match self.kv.owner_of(&client_id).await {
            Ok(owner) => owner,
            Err(err) => {
                tracing::warn!(%client_id, %err, "cluster: cannot read the session's owner");
                None
            }
        };
        let owner = match owner {
            None => {
                self.record_owner(&client_id).await;
                return;
            }
            Some(owner) if *owner == *self.node => return,
            Some(owner) => owner,
        };
        if let Some(broker) = self.broker() {
            broker
                .metrics
                .peers_takeovers_asked
                .fetch_add(1, Ordering::Relaxed);
        }
        let asked = tokio::time::timeout(
            self.request_timeout,
            self.client.request(
                takeover_subject(&self.prefix, &owner),
                Bytes::copy_from_slice(client_id.as_bytes()),
            ),
        )
        .await;
        let dead = !matches!(asked, Ok(Ok(_)));
        match asked {
            Ok(Ok(answer)) => tracing::debug!(
                %client_id,
                %owner,
                answer = %String::from_utf8_lossy(&answer.payload),
                "cluster: session handed over"
            ),
            // No responders, or no answer in time: the owner is gone; what it committed is
            // what there is.
            Ok(Err(err)) => {
                tracing::info!(%client_id, %owner, %err, "cluster: the session's node did not answer; resuming what it stored")
            }
            Err(_) => {
                tracing::warn!(%client_id, %owner, "cluster: the session's node did not answer in cluster.request_timeout; resuming what it stored")
            }
        }
        self.record_owner(&client_id).await;
        let Some(broker) = self.broker() else { return };
        if broker.knows_client(&client_id) {
            return;
        }
        let records = match self.kv.load_client(&client_id).await {
            Ok(records) => records,
            Err(err) => {
                tracing::warn!(%client_id, %err, "cluster: cannot read the session from JetStream");
                return;
            }
        };
        if records.is_empty() {
            return;
        }
        match crate::storage::recover::read(records) {
            Ok(recovered) => {
                if let Some(store) = self.store.get() {
                    store.raise_next_key(recovered.next_key);
                }
                let restored_at = std::time::Instant::now();
                broker.restore(recovered, crate::broker::clock::now());
                if dead {
                    self.catch_up(&client_id, &owner, restored_at).await;
                }
            }
            Err(err) => {
                tracing::warn!(%client_id, %err, "cluster: the stored session cannot be read")
            }
        }
    }

    /// Makes this node `client_id`'s owner (a persistent session's record does it too).
    async fn record_owner(&self, client_id: &str) {
        if let Err(err) = self.kv.set_owner(client_id).await {
            tracing::warn!(%client_id, %err, "cluster: cannot record the session's owner");
        }
    }

    /// Opens the NATS subscriptions of one filter and routes what they bring, until
    /// `stop`.
    async fn serve_filter(
        self: Arc<Self>,
        filter: TopicFilter,
        stop: CancellationToken,
        ready: tokio::sync::watch::Sender<bool>,
    ) {
        let subjects = subject::subjects_for_filter(&self.live_prefix, filter.filter());
        let group = filter
            .share_group()
            .map(|name| queue_group(name, filter.filter()));
        let mut subscribers = Vec::with_capacity(subjects.len());
        for subject in subjects {
            let subscribed = match &group {
                Some(queue) => self.client.queue_subscribe(subject, queue.clone()).await,
                None => self.client.subscribe(subject).await,
            };
            match subscribed {
                Ok(s) => subscribers.push(s),
                Err(err) => {
                    tracing::warn!(filter = filter.as_str(), %err, "cluster: cannot subscribe in NATS");
                    return;
                }
            }
        }
        // At the server once flushed (interest then spreads through the NATS cluster).
        if self.client.flush().await.is_ok() {
            let _ = ready.send(true);
        }
        let group = group.map(|_| Arc::new(filter.clone()));
        let mut messages = futures_util::stream::select_all(subscribers);
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.shutdown.cancelled() => return,
                message = messages.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let seq = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
                .and_then(|v| v.as_str().parse().ok());
            let incoming = Incoming {
                payload: message.payload,
                seq,
                group: group.clone(),
            };
            if self.incoming.send(incoming).await.is_err() {
                return;
            }
        }
    }

    /// Routes what the subscriptions bring, in arrival order, and records how far in the
    /// message stream this node has routed (`record::Record::Mark`): a sequence is marked
    /// once it was routed `MARK_DELAY` ago (time enough for anything earlier to arrive
    /// through another subscription), after what routing it stored.
    async fn process(self: Arc<Self>, mut incoming: tokio::sync::mpsc::Receiver<Incoming>) {
        let mut routed: VecDeque<(std::time::Instant, u64)> = VecDeque::new();
        let mut marked = 0u64;
        let mut tick = tokio::time::interval(MARK_DELAY / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                next = incoming.recv() => {
                    let Some(next) = next else { return };
                    self.receive(&next.payload, next.group.as_deref());
                    if let Some(seq) = next.seq {
                        routed.push_back((std::time::Instant::now(), seq));
                    }
                }
                _ = tick.tick() => {
                    let Some(cutoff) = std::time::Instant::now().checked_sub(MARK_DELAY) else {
                        continue;
                    };
                    let mut upto = None;
                    while let Some(&(at, seq)) = routed.front() {
                        if at > cutoff {
                            break;
                        }
                        upto = Some(upto.map_or(seq, |u: u64| u.max(seq)));
                        routed.pop_front();
                    }
                    if let (Some(seq), Some(store)) = (upto, self.store.get()) {
                        if seq > marked {
                            marked = seq;
                            store.mark(&self.node, seq);
                        }
                    }
                }
            }
        }
    }

    /// Routes the stream's messages from `from` up to its last one now into the plain
    /// subscriptions of `client` (or of every session here, `None`): what a session missed
    /// while the node that held it was down. Messages this node already had live are
    /// skipped; the rest may repeat what the dead node delivered in its last `MARK_DELAY`
    /// (at least once). Returns how many were routed.
    async fn replay(
        &self,
        from: u64,
        client: Option<&str>,
        since: std::time::Instant,
    ) -> anyhow::Result<u64> {
        use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy, ReplayPolicy};
        let mut stream = self.stream.clone();
        let last = stream.info().await?.state.last_sequence;
        if last < from {
            return Ok(0);
        }
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: format!("{}.>", self.msg_prefix),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let Some(broker) = self.broker() else {
            return Ok(0);
        };
        let mut count = 0;
        loop {
            let next = tokio::time::timeout(self.request_timeout * 2, messages.next())
                .await
                .map_err(|_| anyhow::anyhow!("the message stream stopped answering"))?;
            let Some(next) = next else { break };
            let next = next?;
            let seq = next
                .info()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .stream_sequence;
            if let Some((instance, counter, _, stored)) = decode(&next.payload) {
                // Routed live since the session's subscriptions were back: it has it.
                let seen = self
                    .recent
                    .lock()
                    .expect("never poisoned")
                    .seen_since((instance, counter), since);
                let now = crate::broker::clock::now();
                if let (false, Some(message)) = (
                    seen,
                    crate::storage::recover::app_message(stored, now, crate::storage::wall_ms()),
                ) {
                    let scope = match client {
                        Some(client) => Scope::Client(client),
                        None => Scope::Plain,
                    };
                    broker.route_remote(Arc::new(message), scope, now);
                    broker
                        .metrics
                        .peers_replayed
                        .fetch_add(1, Ordering::Relaxed);
                    count += 1;
                }
            }
            if seq >= last {
                break;
            }
        }
        Ok(count)
    }

    /// After a session was read back from a node that did not answer: waits until its
    /// subscriptions here are live in NATS, then replays what it missed since that node's
    /// mark.
    async fn catch_up(&self, client_id: &str, owner: &str, since: std::time::Instant) {
        let filters = self
            .broker()
            .map(|b| b.offline_filters(client_id))
            .unwrap_or_default();
        self.wait_ready(filters.iter().filter(|f| f.share_group().is_none()))
            .await;
        let mark = match self.kv.mark_of(owner).await {
            Ok(Some(mark)) => mark,
            Ok(None) => {
                tracing::info!(%client_id, %owner, "cluster: the dead node left no mark in the message stream; nothing replayed");
                return;
            }
            Err(err) => {
                tracing::warn!(%client_id, %owner, %err, "cluster: cannot read the dead node's mark; nothing replayed");
                return;
            }
        };
        match self.replay(mark + 1, Some(client_id), since).await {
            Ok(n) => {
                tracing::info!(%client_id, %owner, from = mark + 1, replayed = n, "cluster: session caught up from the message stream")
            }
            Err(err) => {
                tracing::warn!(%client_id, %owner, %err, "cluster: catching the session up failed")
            }
        }
    }

    /// After a restart: the sessions this node restored missed what was published while
    /// it was down; replays it from this node's own mark.
    pub async fn catch_up_restored(&self, since: std::time::Instant) {
        let filters: Vec<TopicFilter> = self
            .routes
            .lock()
            .expect("never poisoned")
            .keys()
            .filter_map(|f| TopicFilter::parse(f, 0).ok())
            .filter(|f| f.share_group().is_none())
            .collect();
        if filters.is_empty() {
            return;
        }
        self.wait_ready(filters.iter()).await;
        match self.kv.mark_of(&self.node).await {
            Ok(Some(mark)) => match self.replay(mark + 1, None, since).await {
                Ok(n) => tracing::info!(
                    from = mark + 1,
                    replayed = n,
                    "cluster: restored sessions caught up from the message stream"
                ),
                Err(err) => tracing::warn!(%err, "cluster: catching restored sessions up failed"),
            },
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(%err, "cluster: cannot read this node's mark; nothing replayed")
            }
        }
    }

    /// Waits (bounded) until these filters' NATS subscriptions are at the server, and a
    /// little more for the interest to spread through the NATS cluster.
    async fn wait_ready<'a>(&self, filters: impl Iterator<Item = &'a TopicFilter>) {
        let waits: Vec<_> = {
            let routes = self.routes.lock().expect("never poisoned");
            filters
                .filter_map(|f| routes.get(f.as_str()).map(|r| r.ready.clone()))
                .collect()
        };
        let all = async {
            for mut ready in waits {
                let _ = ready.wait_for(|r| *r).await;
            }
        };
        let _ = tokio::time::timeout(self.request_timeout, all).await;
        tokio::time::sleep(INTEREST_SPREAD).await;
    }

    /// Routes one message from the cluster here.
    fn receive(&self, frame: &[u8], group: Option<&TopicFilter>) {
        let Some((instance, counter, served, stored)) = decode(frame) else {
            tracing::warn!("cluster: an unreadable message from NATS was dropped");
            return;
        };
        if let Some(group) = group {
            // The publisher's node gave it to a member of this group itself (`local`).
            if served.iter().any(|s| s == group.as_str()) {
                return;
            }
        } else {
            // This node routed its own messages when they were published.
            if instance == self.instance {
                return;
            }
            let mut recent = self.recent.lock().expect("never poisoned");
            if !recent.first_time((instance, counter)) {
                drop(recent);
                if let Some(broker) = self.broker() {
                    broker
                        .metrics
                        .peers_duplicates
                        .fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
        }
        let Some(broker) = self.broker() else { return };
        let now = crate::broker::clock::now();
        let Some(message) =
            crate::storage::recover::app_message(stored, now, crate::storage::wall_ms())
        else {
            return;
        };
        let scope = match group {
            Some(filter) => Scope::Group(filter),
            None => Scope::Plain,
        };
        broker.route_remote(Arc::new(message), scope, now);
    }
}

impl Peers for Cluster {
    fn forward(
        &self,
        message: &Arc<AppMessage>,
        served: &[Arc<TopicFilter>],
    ) -> Result<Ticket, Refused> {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let frame = encode(self.instance, counter, served, message);
        let broker = self.broker();
        if let Some(broker) = &broker {
            broker
                .metrics
                .peers_forwarded
                .fetch_add(1, Ordering::Relaxed);
        }
        match (message.qos, self.store.get()) {
            (QoS::AtMostOnce, _) | (_, None) => {
                let subject = subject::subject_of(&self.live_prefix, &message.topic);
                if self.qos0.try_send((subject, frame)).is_err() {
                    if let Some(broker) = &broker {
                        broker.metrics.peers_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(0)
            }
            (_, Some(store)) => {
                store.publish(subject::subject_of(&self.msg_prefix, &message.topic), frame)
            }
        }
    }

    fn interest(&self, filter: &TopicFilter, subscribed: bool) {
        let mut routes = self.routes.lock().expect("never poisoned");
        if subscribed {
            let stop = CancellationToken::new();
            let (ready_tx, ready) = tokio::sync::watch::channel(false);
            let route = Route {
                stop: stop.clone(),
                ready,
            };
            if let Some(old) = routes.insert(filter.as_str().into(), route) {
                old.stop.cancel();
            }
            if let Some(this) = self.this() {
                self.runtime
                    .spawn(this.serve_filter(filter.clone(), stop, ready_tx));
            }
        } else if let Some(route) = routes.remove(filter.as_str()) {
            route.stop.cancel();
        }
    }

    fn dispatches_shared(&self) -> bool {
        true
    }

    fn claim(&self, client_id: &Arc<str>) -> Option<Claim> {
        let this = self.this()?;
        Some(Box::pin(this.claim_session(Arc::clone(client_id))))
    }
}

impl Cluster {
    /// This node as an `Arc` (the broker holds it as its peers).
    fn this(&self) -> Option<Arc<Self>> {
        self.me.upgrade()
    }
}

/// The subject on which `node` answers takeovers.
fn takeover_subject(prefix: &str, node: &str) -> String {
    format!(
        "{prefix}.node.{}.takeover",
        super::kv::keys::hex(node.as_bytes())
    )
}

/// A NATS queue group for one shared subscription: its name and filter, hashed (queue
/// names are tokens; the hash keeps them short and valid).
fn queue_group(name: &str, filter: &str) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes().chain(std::iter::once(0)).chain(filter.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("share-{h:016x}")
}

/// One message between nodes: the wire version, its origin's process id and counter (for
/// duplicate suppression), the shared groups the origin served itself (`local` strategy),
/// then the message as the store writes it.
fn encode(instance: u64, counter: u64, served: &[Arc<TopicFilter>], message: &AppMessage) -> Bytes {
    let mut out = BytesMut::with_capacity(48 + message.topic.len() + message.payload.len());
    out.put_u8(WIRE);
    out.put_u64(instance);
    out.put_u64(counter);
    // A filter is at most 65,535 bytes, like any MQTT string.
    let served = &served[..served.len().min(usize::from(u16::MAX))];
    out.put_u16(served.len() as u16);
    for group in served {
        let text = group.as_str().as_bytes();
        let text = &text[..text.len().min(usize::from(u16::MAX))];
        out.put_u16(text.len() as u16);
        out.put_slice(text);
    }
    crate::storage::record::put_message(&mut out, crate::storage::message_ref(message));
    out.freeze()
}

/// A frame read back: origin process id, counter, served groups, message.
type Frame = (u64, u64, Vec<String>, crate::storage::record::StoredMessage);

fn decode(mut frame: &[u8]) -> Option<Frame> {
    if frame.len() < 19 || frame.get_u8() != WIRE {
        return None;
    }
    let instance = frame.get_u64();
    let counter = frame.get_u64();
    let n = usize::from(frame.get_u16());
    let mut served = Vec::new();
    for _ in 0..n {
        if frame.len() < 2 {
            return None;
        }
        let len = usize::from(frame.get_u16());
        let text = frame.get(..len)?;
        served.push(String::from_utf8(text.to_vec()).ok()?);
        frame.advance(len);
    }
    let message = crate::storage::record::read_message(frame).ok()?;
    Some((instance, counter, served, message))
}

/// The message ids seen last, with when, oldest forgotten first.
#[derive(Default)]
struct Recent {
    seen: HashMap<(u64, u64), std::time::Instant, rustc_hash::FxBuildHasher>,
    order: VecDeque<(u64, u64)>,
}

impl Recent {
    /// Whether `id` was routed here at or after `since`.
    fn seen_since(&self, id: (u64, u64), since: std::time::Instant) -> bool {
        self.seen.get(&id).is_some_and(|&at| at >= since)
    }

    /// Whether `id` is new (it is remembered).
    fn first_time(&mut self, id: (u64, u64)) -> bool {
        if self.seen.contains_key(&id) {
            return false;
        }
        self.seen.insert(id, std::time::Instant::now());
        self.order.push_back(id);
        if self.order.len() > RECENT {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::test_nats::{free_port, Server};

    #[tokio::test]
    async fn nats_credentials_are_used_and_a_refusal_is_named() {
        let extra = [
            "--user".to_owned(),
            "petrel".into(),
            "--pass".into(),
            "s3cret".into(),
        ];
        let server = Server::spawn("auth", free_port(), &extra).await;
        let mut settings = ClusterSettings {
            nats: vec![server.url()],
            connect_timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let anonymous = connect(&settings, "n1").await;
        assert!(anonymous.is_err(), "the server wants credentials");
        settings.user = Some("petrel".into());
        settings.password = Some("wrong".into());
        let Err(refused) = connect(&settings, "n1").await else {
            panic!("a wrong password is refused");
        };
        assert!(
            format!("{refused:#}").contains("cluster.nats"),
            "names the setting: {refused:#}"
        );
        settings.password = Some("s3cret".into());
        let (client, _) = connect(&settings, "n1").await.expect("connects");
        client.flush().await.expect("the connection works");
    }

    #[tokio::test]
    async fn tls_to_nats_verifies_the_server_against_the_given_ca() {
        let dir = std::env::temp_dir().join(format!("petrel-nats-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = crate::transport::certs::DevCerts::ensure(&dir).expect("certificates");
        let extra = [
            "--tls".to_owned(),
            "--tlscert".into(),
            certs.cert.display().to_string(),
            "--tlskey".into(),
            certs.key.display().to_string(),
        ];
        let server = Server::spawn("tls", free_port(), &extra).await;
        let mut settings = ClusterSettings {
            nats: vec![format!("tls://127.0.0.1:{}", server.port)],
            connect_timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let Err(untrusted) = connect(&settings, "n1").await else {
            panic!("a server certificate no trusted CA signed is refused");
        };
        assert!(format!("{untrusted:#}").contains("cluster.nats"));
        settings.tls_ca_file = Some(certs.ca.clone());
        let (client, _) = connect(&settings, "n1")
            .await
            .expect("TLS with the given CA");
        client.flush().await.expect("the connection works");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_message_between_nodes_reads_back_with_its_id() {
        let topic = crate::core::topic::TopicName::parse("a/b".to_owned(), 0).unwrap();
        let publish = crate::codec::Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: "a/b".into(),
            packet_id: None,
            properties: Default::default(),
            payload: Bytes::from_static(b"payload"),
        };
        let message = AppMessage::from_publish(
            topic,
            publish,
            Some("pub".into()),
            crate::broker::clock::now(),
        );
        let group = Arc::new(TopicFilter::parse("$share/g/a/+", 0).unwrap());
        let frame = encode(7, 42, &[group], &message);
        let (instance, counter, served, stored) = decode(&frame).expect("reads back");
        assert_eq!((instance, counter), (7, 42));
        assert_eq!(served, ["$share/g/a/+"]);
        assert_eq!(stored.topic, "a/b");
        assert_eq!(&stored.payload[..], b"payload");
        assert!(stored.retain);
        assert_eq!(stored.publisher.as_deref(), Some("pub"));
        assert!(
            decode(&frame[..10]).is_none(),
            "a truncated frame is refused"
        );
        let mut other = frame.to_vec();
        other[0] = 9;
        assert!(decode(&other).is_none(), "another wire version is refused");
    }

    #[test]
    fn recent_ids_are_bounded_and_remember_when() {
        let mut recent = Recent::default();
        let t0 = std::time::Instant::now();
        assert!(recent.first_time((1, 1)));
        assert!(!recent.first_time((1, 1)));
        assert!(recent.seen_since((1, 1), t0));
        assert!(!recent.seen_since((1, 2), t0));
        for i in 0..(RECENT as u64 + 10) {
            recent.first_time((2, i));
        }
        assert!(recent.seen.len() <= RECENT);
        assert!(!recent.seen_since((1, 1), t0), "the oldest is forgotten");
    }
}
