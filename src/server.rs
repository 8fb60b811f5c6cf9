//! Where the server is wired: from the validated configuration, each subsystem is built from
//! its own settings type (`broker::Settings` and `core::channel::Limits`, `auth::AuthSettings`,
//! each listener's `ListenerConfig` with its `transport` settings), the listeners are bound and
//! the broker's tasks started. `config` only parses, layers and validates; no other module
//! reads the `Config` as a whole.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthService;
use crate::broker::listener::ListenerKind;
use crate::broker::{Broker, Settings};
use crate::codec::QoS;
use crate::config::{Config, Durability};
use crate::core::channel::Limits;
use crate::core::hooks::Hooks;
use crate::storage::Embedded;
use crate::transport::certs::DevCerts;

/// The broker's runtime settings, from the validated configuration.
fn broker_settings(config: &Config) -> anyhow::Result<Settings> {
    let m = &config.mqtt;
    let secs = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
    let limits = Limits {
        max_packet_size: m.max_packet_size,
        max_connect_packet_size: m.max_connect_packet_size,
        receive_maximum: m.receive_maximum,
        max_inflight: m.max_inflight,
        min_inflight: m.min_inflight,
        topic_alias_maximum: m.topic_alias_maximum,
        max_topic_alias_bytes: m.max_topic_alias_bytes,
        max_user_properties: m.max_user_properties,
        max_outbound_buffer: m.max_outbound_buffer,
        max_keepalive: m.max_keepalive,
        maximum_qos: QoS::from_u8(m.maximum_qos).unwrap_or(QoS::ExactlyOnce),
        retain_available: m.retain_available,
        wildcard_subscription_available: m.wildcard_subscription_available,
        shared_subscription_available: m.shared_subscription_available,
        subscription_identifiers_available: m.subscription_identifiers_available,
        max_topic_levels: m.max_topic_levels,
        max_client_id_len: m.max_client_id_len,
        max_subscriptions: m.max_subscriptions,
        connect_timeout: m.connect_timeout,
        v3_session_expiry: secs(config.session.v3_expiry),
        max_session_expiry: secs(config.session.max_expiry),
        exclusive_subscription: m.exclusive_subscription,
        delayed_publish: config.delayed.enable,
        rewrite: config.rewrite_rules()?,
        auto_subscribe: config.auto_subscribe_rules()?,
        durable: config.storage.durability != Durability::None,
    };
    Ok(Settings {
        limits: Arc::new(limits),
        max_queued: config.session.max_queued,
        queue_full: config.session.queue_full,
        max_queued_bytes: config.broker.max_queued_bytes,
        close_linger: config.broker.close_linger,
        quic: Arc::new(config.quic.clone()),
        max_delayed: config.delayed.max_delayed_messages,
        shared_strategy: config.mqtt.shared_subscription_strategy,
        group_strategies: config
            .shared_subscription_group
            .iter()
            .map(|(name, group)| (name.as_str().into(), group.strategy))
            .collect(),
        max_connections: config.broker.max_connections,
        max_connections_per_address: config.broker.max_connections_per_address,
        retain: crate::core::retain::RetainLimits {
            max_messages: config.retainer.max_retained_messages,
            max_bytes: config.retainer.max_retained_bytes,
            max_payload_size: config.retainer.max_payload_size,
        },
        max_sessions: config.broker.max_sessions,
        tcp_keepalive: crate::broker::listener::TcpKeepalive::parse(&config.broker.tcp_keepalive)
            .map_err(|err| anyhow::anyhow!("broker.tcp_keepalive: {err}"))?,
    })
}

/// The development certificate under `<data_dir>/certs/`, made on first use. Its CA is logged
/// so that clients can be pointed at it.
fn dev_certs_in(data_dir: &std::path::Path) -> anyhow::Result<DevCerts> {
    let dir = data_dir.join("certs");
    let dev = DevCerts::ensure(&dir).with_context(|| {
        format!(
            "cannot set up development certificates in {}",
            dir.display()
        )
    })?;
    tracing::info!(
        ca = %dev.ca.display(),
        "TLS listeners without `cert` use the development certificate; trust this CA in clients"
    );
    Ok(dev)
}

/// Joins the cluster `[cluster]` names: NATS connected, the store on its JetStream bucket
/// (what this node restores read back), the message stream ready.
async fn join_cluster(
    config: &Config,
    node: &Arc<str>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(
    Arc<Embedded>,
    crate::storage::Recovered,
    Arc<crate::cluster::node::Cluster>,
    async_nats::jetstream::Context,
)> {
    let settings = &config.cluster;
    let (client, js) = crate::cluster::node::connect(settings, node).await?;
    let engine =
        crate::cluster::kv::open(js.clone(), &settings.prefix, settings.replicas, node).await?;
    let kv = engine.handle();
    let (store, recovered) = crate::storage::open_with(Box::new(engine), &config.storage)?;
    let cluster = crate::cluster::node::Cluster::start(
        settings,
        Arc::clone(node),
        client,
        &js,
        kv,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(
        %node,
        nats = %settings.nats.join(","),
        replicas = settings.replicas,
        "joined the cluster"
    );
    Ok((store, recovered, cluster, js))
}

/// A started broker: its listeners' addresses and the handle to stop it.
pub struct RunningBroker {
    pub broker: Arc<Broker>,
    /// The durable store, unless `storage.durability = "none"`.
    pub store: Option<Arc<Embedded>>,
    listeners: Vec<(ListenerKind, SocketAddr)>,
    /// Where the HTTP API listens, unless `api.enable = false`.
    api: Option<SocketAddr>,
    node: Arc<str>,
    /// The `$SYS` publisher's interval (changed on reload).
    sys_interval: tokio::sync::watch::Sender<Duration>,
    /// Reloads asked for through the API, for the process to carry out.
    reload: crate::admin::ReloadSlot,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl RunningBroker {
    /// Binds every configured listener and starts serving.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let settings = broker_settings(config)?;
        let auth = AuthService::load(&config.auth)
            .map_err(|err| anyhow::anyhow!("authentication: {err}"))?;
        tracing::info!("authentication: {}", auth.describe());
        std::fs::create_dir_all(&config.broker.data_dir).with_context(|| {
            format!(
                "cannot create data_dir {}",
                config.broker.data_dir.display()
            )
        })?;
        let banned =
            crate::auth::banned::Banned::load(&config.broker.data_dir.join("banned.json"))?;
        let auth = auth.with_banned(banned);
        let mut broker = Broker::new(settings)
            .with_auth(Arc::new(auth))
            .with_flapping(config.flapping_detect.clone());
        let shutdown = CancellationToken::new();
        let node: Arc<str> = config.node().into();
        let mut store = None;
        let mut recovered = None;
        let mut cluster = None;
        let mut cluster_js = None;
        if config.cluster.enabled() {
            // The store's records live in JetStream, and messages travel on NATS.
            let (opened, read, joined, js) = join_cluster(config, &node, &shutdown).await?;
            cluster_js = Some(js);
            broker = broker.with_hooks(Hooks {
                store: Some(Arc::clone(&opened) as Arc<dyn crate::core::hooks::Store>),
                peers: Some(Arc::clone(&joined) as Arc<dyn crate::core::hooks::Peers>),
                ..Hooks::default()
            });
            store = Some(opened);
            recovered = Some(read);
            cluster = Some(joined);
        } else if config.storage.durability != Durability::None {
            let (opened, read) = crate::storage::open(&config.broker.data_dir, &config.storage)?;
            broker = broker.with_hooks(Hooks {
                store: Some(Arc::clone(&opened) as Arc<dyn crate::core::hooks::Store>),
                ..Hooks::default()
            });
            store = Some(opened);
            recovered = Some(read);
        }
        let broker = Arc::new(broker);
        if let Some(cluster) = &cluster {
            cluster.attach(&broker, store.clone()).await?;
        }
        let restored_at = std::time::Instant::now();
        if let Some(recovered) = recovered {
            broker.restore(recovered, crate::broker::clock::now());
        }
        if let Some(cluster) = &cluster {
            // Before any client connects: what the restored sessions missed while down.
            cluster.catch_up_restored(restored_at).await;
        }
        let tracker = TaskTracker::new();
        let mut listeners = Vec::new();
        let mut dev_certs = None;
        for listener in &config.listeners {
            let mut listener = listener.clone();
            if listener.kind.uses_tls() && listener.tls.cert.is_none() {
                let dev = match &dev_certs {
                    Some(dev) => dev,
                    None => dev_certs.insert(dev_certs_in(&config.broker.data_dir)?),
                };
                listener.tls.cert = Some(dev.cert.clone());
                listener.tls.key = Some(dev.key.clone());
            }
            match crate::broker::listener::spawn(&broker, &listener, &tracker, &shutdown).await {
                Ok(addr) => listeners.push((listener.kind, addr)),
                Err(err) => {
                    shutdown.cancel();
                    return Err(err);
                }
            }
        }
        tracker.spawn(Arc::clone(&broker).run_timers(shutdown.clone()));
        let mut presence = None;
        if let Some(js) = cluster_js {
            // (Making its bucket retries on its own: nodes start together.)
            let started = crate::cluster::presence::Presence::start(
                js,
                &config.cluster.prefix,
                config.cluster.replicas,
                Arc::clone(&node),
                crate::admin::node_report(&broker, Arc::clone(&node)),
            )
            .await;
            match started {
                Ok(started) => {
                    tracker.spawn(Arc::clone(&started).leave_on(shutdown.clone()));
                    presence = Some(started);
                }
                Err(err) => {
                    shutdown.cancel();
                    return Err(err);
                }
            }
        }
        let sys_interval = crate::admin::start_sys_in_cluster(
            &broker,
            Arc::clone(&node),
            presence.clone(),
            &config.sys_topics,
            &tracker,
            &shutdown,
        );
        let mut api = None;
        let reload = crate::admin::ReloadSlot::default();
        if config.api.enable {
            let served = crate::admin::Served {
                broker: Arc::clone(&broker),
                node: Arc::clone(&node),
                listeners: listeners.clone(),
                reload: Arc::clone(&reload),
            };
            let started = crate::admin::start_in_cluster(
                served,
                presence.clone(),
                &config.api,
                &config.broker.data_dir,
                &tracker,
                &shutdown,
            )
            .await;
            match started {
                Ok(addr) => api = Some(addr),
                Err(err) => {
                    shutdown.cancel();
                    return Err(err);
                }
            }
        }
        Ok(Self {
            broker,
            store,
            listeners,
            api,
            node,
            sys_interval,
            reload,
            shutdown,
            tracker,
        })
    }

    pub fn listeners(&self) -> &[(ListenerKind, SocketAddr)] {
        &self.listeners
    }

    /// Reads the password and ACL files again (the old rules stay on error); returns what
    /// is now in force.
    pub fn broker_auth_reload(&self) -> Result<String, String> {
        let auth = self.broker.auth();
        auth.reload()?;
        Ok(auth.describe())
    }

    /// Applies what can change without a restart: the protocol limits (`[mqtt]`, rewrite
    /// and auto-subscribe rules; new connections get them, open ones keep theirs) and the
    /// `$SYS` interval. (Authentication, ACL and the log level are reloaded by their owners.)
    pub fn apply(&self, config: &Config) -> anyhow::Result<()> {
        // Checked whole before anything changes.
        let settings = broker_settings(config)?;
        self.broker.set_limits(settings.limits);
        if *self.sys_interval.borrow() != config.sys_topics.interval {
            tracing::info!(interval = ?config.sys_topics.interval, "$SYS interval changed");
            self.sys_interval.send_replace(config.sys_topics.interval);
        }
        Ok(())
    }

    /// Serves the reloads asked for through the API (`POST /api/v5/reload`, `petrel ctl
    /// reload`): whoever takes the receiver answers each with what happened. Until it is
    /// taken (and once it is dropped) the API answers 503. `None` the second time.
    pub fn take_reload_requests(
        &mut self,
    ) -> Option<tokio::sync::mpsc::Receiver<crate::admin::ReloadRequest>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        self.reload.set(tx).ok()?;
        Some(rx)
    }

    /// This node's name (`$SYS/brokers/<node>`, the API's `node`).
    pub fn broker_node(&self) -> &str {
        &self.node
    }

    /// Where the HTTP API and dashboard listen.
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api
    }

    /// The first listener of `kind`.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, a)| *a)
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, tells every client (v5: DISCONNECT 0x8B) and waits for the tasks.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        let linger = self.broker.settings().close_linger + Duration::from_secs(1);
        if tokio::time::timeout(linger, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some connections did not close in time");
        }
        // Every session is filed: commit what is queued and stop the writer.
        if let Some(store) = &self.store {
            store.close();
        }
    }
}
