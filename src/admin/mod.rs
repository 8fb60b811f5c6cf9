//! Operations: the HTTP API on 18083 in EMQX's `/api/v5` shapes, Prometheus metrics, the
//! dashboard's pages, and the `$SYS` topics. It reads the broker through `broker::view`
//! and acts only through the broker's own operations (kick, publish, delete a retained
//! message, ban); `core` never imports it.
//!
//! - `settings`: `[api]` and `[sys_topics]`.
//! - `auth`: API keys and dashboard logins.
//! - `api`: the `/api/v5` handlers (`clients`, `messages`, `banned`, `nodes` by family).
//! - `metrics`: stats, counters and the Prometheus exposition.
//! - `sys`: the `$SYS` topics and client events.
//! - `assets`: the dashboard's files, embedded.

mod api;
mod assets;
mod auth;
mod metrics;
mod settings;
mod sys;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use axum::http::{HeaderValue, Method};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use auth::ADMIN_PASSWORD_FILE;
pub use settings::{ApiSettings, SysSettings};

use crate::broker::listener::ListenerKind;
use crate::broker::Broker;
use crate::cluster::presence::Presence;

/// What the handlers share.
pub struct AdminState {
    pub broker: Arc<Broker>,
    /// This node's name (`petrel@host`).
    pub node: Arc<str>,
    pub started: Instant,
    pub version: &'static str,
    pub listeners: Vec<(ListenerKind, SocketAddr)>,
    /// The cluster's nodes (`None`: no cluster, this node alone).
    pub presence: Option<Arc<Presence>>,
    auth: auth::ApiAuth,
    /// Where reloads are asked for (as SIGHUP does); empty until the process serves them.
    reload: ReloadSlot,
    /// The last TCP_INFO snapshot and when it was taken: requests within `TCP_LINKS_FRESH`
    /// of it share it (a dashboard page polls several lists at once), and concurrent ones
    /// wait for one dump rather than each taking their own.
    tcp_links: tokio::sync::Mutex<Option<(Instant, Arc<crate::broker::tcp_info::TcpLinks>)>>,
}

/// How long a TCP_INFO snapshot serves further requests.
const TCP_LINKS_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

impl AdminState {
    /// The kernel's figures of the TCP connections, at most `TCP_LINKS_FRESH` old; `None`
    /// when they cannot be had.
    pub async fn tcp_links(&self) -> Option<Arc<crate::broker::tcp_info::TcpLinks>> {
        let mut cached = self.tcp_links.lock().await;
        let now = crate::broker::clock::now();
        if let Some((at, links)) = &*cached {
            if now.saturating_duration_since(*at) < TCP_LINKS_FRESH {
                return Some(Arc::clone(links));
            }
        }
        let links = Arc::new(crate::broker::tcp_info::measure().await?);
        *cached = Some((now, Arc::clone(&links)));
        Some(links)
    }
}

/// Where `POST /api/v5/reload` sends its requests: set once the process takes them
/// (`RunningBroker::take_reload_requests`); until then the API answers 503 at once.
pub type ReloadSlot = Arc<std::sync::OnceLock<tokio::sync::mpsc::Sender<ReloadRequest>>>;

/// A reload asked for through the API: answered with what happened.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<String, String>>;

/// Starts the `$SYS` publisher of a node alone (no cluster); the returned handle changes its
/// interval (on reload).
pub fn start_sys(
    broker: &Arc<Broker>,
    node: Arc<str>,
    settings: &SysSettings,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> tokio::sync::watch::Sender<std::time::Duration> {
    start_sys_in_cluster(broker, node, None, settings, tracker, shutdown)
}

/// [`start_sys`] for a node of a cluster: `$SYS/brokers` lists the running nodes that
/// `presence` knows (`None`: this node alone).
pub fn start_sys_in_cluster(
    broker: &Arc<Broker>,
    node: Arc<str>,
    presence: Option<Arc<Presence>>,
    settings: &SysSettings,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> tokio::sync::watch::Sender<std::time::Duration> {
    sys::start(broker, node, presence, settings, tracker, shutdown)
}

/// How this node reports itself to its cluster: the `local` of
/// `cluster::presence::Presence::start`. Its report is its `/api/v5/nodes` entry, with its
/// `/api/v5/stats` under `stats` and its `/api/v5/metrics` under `metrics`; its uptime counts
/// from this call. Holds the broker weakly: once it is gone, the report is `null`.
pub fn node_report(
    broker: &Arc<Broker>,
    node: Arc<str>,
) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
    let broker = Arc::downgrade(broker);
    let started = crate::broker::clock::now();
    Arc::new(move || match broker.upgrade() {
        Some(broker) => metrics::node_report(&broker, &node, started.elapsed()),
        None => serde_json::Value::Null,
    })
}

/// What the API serves, besides its settings.
pub struct Served {
    pub broker: Arc<Broker>,
    /// This node's name (`petrel@host`).
    pub node: Arc<str>,
    pub listeners: Vec<(ListenerKind, SocketAddr)>,
    /// Where `POST /api/v5/reload` asks the process to reload.
    pub reload: ReloadSlot,
}

/// Binds the API of a node alone (no cluster) and serves it until `shutdown`; returns the
/// address it listens on.
pub async fn start(
    served: Served,
    settings: &ApiSettings,
    data_dir: &Path,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    start_in_cluster(served, None, settings, data_dir, tracker, shutdown).await
}

/// [`start`] for a node of a cluster: the nodes, stats and metrics routes answer for every
/// node that `presence` knows (`None`: this node alone).
pub async fn start_in_cluster(
    served: Served,
    presence: Option<Arc<Presence>>,
    settings: &ApiSettings,
    data_dir: &Path,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let auth = auth::ApiAuth::load(settings, data_dir).context("api")?;
    let state = Arc::new(AdminState {
        broker: served.broker,
        node: served.node,
        started: crate::broker::clock::now(),
        version: env!("CARGO_PKG_VERSION"),
        listeners: served.listeners,
        presence,
        auth,
        reload: served.reload,
        tcp_links: tokio::sync::Mutex::new(None),
    });
    let protected = api::protected().route_layer(axum::middleware::from_fn_with_state(
        Arc::clone(&state),
        api::require_caller,
    ));
    let mut app = axum::Router::new()
        .merge(protected)
        .merge(api::public())
        .merge(assets::routes())
        .with_state(Arc::clone(&state));
    if !settings.cors.is_empty() {
        app = app.layer(cors(&settings.cors)?);
    }
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .with_context(|| format!("api: cannot listen on {} (api.bind)", settings.bind))?;
    let addr = listener.local_addr()?;
    match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let tls =
                crate::transport::tls::TlsAcceptor::new(&crate::transport::tls::TlsSettings {
                    cert: Some(cert.clone()),
                    key: Some(key.clone()),
                    ..Default::default()
                })
                .context("api: TLS (api.cert, api.key)")?;
            let listener = tls_listener::TlsListener::spawn(listener, tls, tracker, shutdown);
            tracker.spawn(serve(listener, app, shutdown.clone()));
        }
        _ => {
            tracker.spawn(serve(listener, app, shutdown.clone()));
        }
    }
    tracing::info!(
        %addr,
        tls = settings.cert.is_some(),
        api_keys = state.auth.key_count(),
        "HTTP API and dashboard"
    );
    Ok(addr)
}

/// Serves `app` on `listener` (plain or TLS) until `shutdown`.
async fn serve<L>(listener: L, app: axum::Router, shutdown: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(err) = served {
        tracing::error!(%err, "api: stopped");
    }
}

fn cors(origins: &[String]) -> anyhow::Result<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list: Result<Vec<HeaderValue>, _> = origins.iter().map(|o| o.parse()).collect();
        AllowOrigin::list(list.context("api.cors: not a valid origin")?)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ]))
}

mod tls_listener {
    //! HTTPS for the API: TLS handshakes run in tasks of their own (bounded in time), so a
    //! slow or silent client cannot hold up the accept loop.

    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio_rustls::server::TlsStream;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use crate::transport::tls::TlsAcceptor;

    const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Handshakes finished and not yet taken by the server.
    const BACKLOG: usize = 64;

    pub struct TlsListener {
        ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        local: SocketAddr,
    }

    impl TlsListener {
        pub fn spawn(
            listener: TcpListener,
            tls: TlsAcceptor,
            tracker: &TaskTracker,
            shutdown: &CancellationToken,
        ) -> Self {
            let (tx, ready) = mpsc::channel(BACKLOG);
            let local = listener
                .local_addr()
                .expect("a bound listener has an address");
            let shutdown = shutdown.clone();
            let handshakes = tracker.clone();
            tracker.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        accepted = listener.accept() => accepted,
                    };
                    let Ok((stream, peer)) = accepted else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let tls = tls.clone();
                    let tx = tx.clone();
                    handshakes.spawn(async move {
                        if let Ok(Ok((stream, _))) =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                        {
                            let _ = tx.send((stream, peer)).await;
                        }
                    });
                }
            });
            Self { ready, local }
        }
    }

    impl axum::serve::Listener for TlsListener {
        type Io = TlsStream<TcpStream>;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            match self.ready.recv().await {
                Some(accepted) => accepted,
                // The accept task ended (shutdown): wait for the server to stop.
                None => std::future::pending().await,
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            Ok(self.local)
        }
    }
}
