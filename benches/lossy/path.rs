//! One run's setting: an in-process broker, the impaired path to it, and the client half on the
//! far side of that path.
//!
//! - **Packet** mode (root): a `netem::PacketLink` puts the clients in a network namespace
//!   whose only route to the broker crosses the emulated link, so TCP, TLS and QUIC all take
//!   exactly the same impaired path. netem offers no way to move a thread into the namespace,
//!   only `PacketLink::command` (`ip netns exec`), so the client half runs as a child process:
//!   this program again in its client role ([`ChildCommand`]), its spec in an environment
//!   variable and its report in a file. The TCP congestion controller is chosen per route
//!   (`congctl`) on both ends, leaving the host's default alone.
//! - **Relay** mode (no privileges, QUIC only): a `netem::Relay` on loopback in front of the
//!   broker's QUIC listener; the client half runs in-process. The relay's address changes
//!   (NAT rebinding) exercise connection migration.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use netem::{LinkStats, PacketLink, Profile, Relay};
use petrel::config::Config;
use petrel::server::RunningBroker;

use super::clients::{self, ClientReport, ClientSpec, QuicCc, Transport, SPEC_VAR};

/// netem's device and namespace prefix for this harness (`netem cleanup --prefix plossy`).
pub const PREFIX: &str = "plossy";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    Packet,
    Relay,
}

/// Where and how one run happens.
#[derive(Debug, Clone)]
pub struct Setup {
    pub profile: Profile,
    pub seed: u64,
    pub via: Via,
    /// TCP congestion controller on both ends of the link (`None`: the host's default).
    pub tcp_cc: Option<&'static str>,
    /// QUIC congestion controller of the broker (and the clients).
    pub quic_cc: QuicCc,
}

/// How to start the client half inside the namespace: this program in its client role.
#[derive(Debug, Clone)]
pub struct ChildCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl ChildCommand {
    /// The running executable with `args` (e.g. `--client-role`).
    pub fn this_program(args: &[&str]) -> anyhow::Result<Self> {
        Ok(Self {
            program: std::env::current_exe().context("the path of this program")?,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
        })
    }
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub report: ClientReport,
    /// The link's time origin as Unix time: its scheduled events count from it.
    pub link_started_unix_us: u64,
    /// The broker's egress direction of the link.
    pub down: LinkStats,
    /// The clients' egress direction (towards the broker).
    pub up: LinkStats,
    /// Address changes the relay made (relay mode).
    pub address_changes: u64,
    /// The broker's view of each client every few ms (with `PETREL_LOSSY_TIMELINE` only).
    pub samples: Vec<BrokerSample>,
}

/// One client's connection as the broker saw it at one instant (Unix µs).
#[derive(Debug, Clone)]
pub struct BrokerSample {
    pub at_us: u64,
    pub client_id: String,
    pub conn_id: u64,
    pub inflight: u32,
    pub window: u32,
    pub received: u64,
    pub sent: u64,
    pub rtt_us: u64,
    pub cwnd: u64,
    pub lost_packets: u64,
}

/// How often `sample_broker` looks.
#[cfg(feature = "internals")]
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Samples the broker's connections every `SAMPLE_EVERY` until the sender is used or dropped,
/// with `PETREL_LOSSY_TIMELINE` set and the broker's internals open (`--features internals`).
#[cfg(not(feature = "internals"))]
fn sample_broker(
    _broker: &RunningBroker,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<BrokerSample>>,
) {
    let (stop, _) = tokio::sync::oneshot::channel::<()>();
    (stop, tokio::spawn(async { Vec::new() }))
}

#[cfg(feature = "internals")]
fn sample_broker(
    broker: &RunningBroker,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<BrokerSample>>,
) {
    let broker = std::sync::Arc::clone(&broker.broker);
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut samples = Vec::new();
        if std::env::var_os("PETREL_LOSSY_TIMELINE").is_none() {
            return samples;
        }
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tokio::select! {
                _ = &mut stopped => return samples,
                _ = tick.tick() => {}
            }
            let tcp = petrel::broker::tcp_info::snapshot().ok();
            let at_us = clients::unix_us();
            for info in broker.clients.all() {
                use std::sync::atomic::Ordering::Relaxed;
                let q = info.link_quality_with(tcp.as_ref()).unwrap_or_default();
                samples.push(BrokerSample {
                    at_us,
                    client_id: info.client_id.to_string(),
                    conn_id: info.conn_id,
                    inflight: info.inflight.load(Relaxed),
                    window: info.inflight_max.load(Relaxed),
                    received: info.recv_msg.load(Relaxed),
                    sent: info.send_msg.load(Relaxed),
                    rtt_us: q.rtt_us,
                    cwnd: q.cwnd,
                    lost_packets: q.lost_packets,
                });
            }
        }
    });
    (stop, task)
}

/// Why packet mode cannot run here, if it cannot.
pub fn packet_unavailable() -> Option<String> {
    netem::packet::available().err().map(|e| e.to_string())
}

/// Starts a broker with the one listener `spec.transport` needs, the path, and the clients;
/// fills in `spec.server` and `spec.ca_file`.
pub async fn run(
    setup: &Setup,
    mut spec: ClientSpec,
    child: &ChildCommand,
) -> anyhow::Result<Outcome> {
    let data_dir = std::env::temp_dir().join(format!(
        "petrel-lossy-{}-{}",
        std::process::id(),
        clients::unix_us()
    ));
    std::fs::create_dir_all(&data_dir)?;
    let result = match setup.via {
        Via::Packet => run_packet(setup, &mut spec, child, &data_dir).await,
        Via::Relay => run_relay(setup, &mut spec, &data_dir).await,
    };
    let _ = std::fs::remove_dir_all(&data_dir);
    result.with_context(|| {
        format!(
            "{} over {} ({:?}), seed {} (replay with NETEM_SEED={})",
            spec.transport.label(),
            setup.profile.name,
            setup.via,
            setup.seed,
            setup.seed
        )
    })
}

async fn start_broker(
    setup: &Setup,
    transport: Transport,
    ip: IpAddr,
    data_dir: &std::path::Path,
) -> anyhow::Result<(RunningBroker, SocketAddr)> {
    let mut config = Config::default();
    config.replace_listeners([(transport.listener(), SocketAddr::new(ip, 0))]);
    config.broker.data_dir = data_dir.to_path_buf();
    config.broker.close_linger = Duration::from_millis(500);
    config.quic = setup.quic_cc.settings();
    // Packet-mode clients connect from the emulated link's namespace, not from loopback, and
    // carry no credentials: the harness measures links, not authentication.
    config.auth.allow_anonymous = Some(true);
    // The harness measures links: no HTTP API, no `$SYS` traffic on them.
    config.api.enable = false;
    config.sys_topics.interval = Duration::ZERO;
    // `LOSSY_FIXED_WINDOWS=1`: the MQTT windows as they were before they followed the path
    // (outbound fixed at 128, Receive Maximum 100), for a before/after in one build.
    if std::env::var_os("LOSSY_FIXED_WINDOWS").is_some() {
        config.mqtt.receive_maximum = 100;
        config.mqtt.max_inflight = 128;
        config.mqtt.min_inflight = 128;
    }
    config.validate()?;
    let broker = RunningBroker::start(&config).await?;
    let addr = broker
        .addr(transport.listener())
        .context("the listener is configured")?;
    Ok((broker, addr))
}

async fn run_packet(
    setup: &Setup,
    spec: &mut ClientSpec,
    child: &ChildCommand,
    data_dir: &std::path::Path,
) -> anyhow::Result<Outcome> {
    let link = PacketLink::start_profile(PREFIX, &setup.profile, setup.seed)?;
    let link_started_unix_us = clients::unix_us();
    if let Some(cc) = setup.tcp_cc {
        set_congestion_control(&link, cc)?;
    }
    let (broker, addr) = start_broker(
        setup,
        spec.transport,
        IpAddr::V4(link.host_addr()),
        data_dir,
    )
    .await?;
    spec.server = addr;
    spec.ca_file = data_dir.join("certs").join("ca.pem");
    let result_file = data_dir.join("client-report.json");
    spec.result_file = Some(result_file.clone());
    let mut command = link.command(&child.program);
    command
        .args(&child.args)
        .env(SPEC_VAR, serde_json::to_string(spec)?)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut process = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .context("starting the client half in the namespace")?;
    let (stop_sampling, sampling) = sample_broker(&broker);
    let status = tokio::time::timeout(deadline(spec), process.wait()).await;
    let _ = stop_sampling.send(());
    let samples = sampling.await.unwrap_or_default();
    let stats = link.stats();
    broker.shutdown().await;
    link.shutdown()?;
    let status = status
        .map_err(|_| anyhow::anyhow!("the client half did not finish in time"))?
        .context("waiting for the client half")?;
    anyhow::ensure!(status.success(), "the client half failed: {status}");
    let report = serde_json::from_slice(
        &std::fs::read(&result_file).context("the client half wrote no report")?,
    )?;
    Ok(Outcome {
        report,
        link_started_unix_us,
        down: stats.down,
        up: stats.up,
        address_changes: 0,
        samples,
    })
}

async fn run_relay(
    setup: &Setup,
    spec: &mut ClientSpec,
    data_dir: &std::path::Path,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        spec.transport.is_quic(),
        "the UDP relay carries QUIC only, not {}",
        spec.transport.label()
    );
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (broker, addr) = start_broker(setup, spec.transport, loopback, data_dir).await?;
    let link_started_unix_us = clients::unix_us();
    let relay = Relay::start_profile(
        SocketAddr::new(loopback, 0),
        addr,
        &setup.profile,
        setup.seed,
    )
    .await?;
    spec.server = relay.local_addr();
    spec.ca_file = data_dir.join("certs").join("ca.pem");
    let report = tokio::time::timeout(deadline(spec), clients::run(spec))
        .await
        .map_err(|_| anyhow::anyhow!("the clients did not finish in time"));
    let stats = relay.stats();
    relay.shutdown().await;
    broker.shutdown().await;
    Ok(Outcome {
        report: report??,
        link_started_unix_us,
        down: stats.down,
        up: stats.up,
        address_changes: stats.address_changes,
        samples: Vec::new(),
    })
}

/// A generous bound on the client half: every phase with its drain, connects and probes.
fn deadline(spec: &ClientSpec) -> Duration {
    let phases: f64 = spec
        .phases
        .iter()
        .map(|p| p.seconds + spec.drain + 5.0)
        .sum();
    Duration::from_secs_f64(60.0 + phases + 15.0 * f64::from(spec.reconnect_probes))
}

/// Sets `congctl` on the link's two routes: the broker's sockets follow the host-side route,
/// the clients' the namespace-side one.
fn set_congestion_control(link: &PacketLink, cc: &str) -> anyhow::Result<()> {
    let host_dev = link.host_device();
    let client_dev = format!("{}c", host_dev.trim_end_matches('h'));
    let (host, client) = (link.host_addr().to_string(), link.client_addr().to_string());
    let routes = [
        (None, client.as_str(), host_dev, host.as_str()),
        (
            Some(link.namespace()),
            host.as_str(),
            client_dev.as_str(),
            client.as_str(),
        ),
    ];
    for (namespace, to, dev, src) in routes {
        let mut command = std::process::Command::new("ip");
        if let Some(ns) = namespace {
            command.args(["-n", ns]);
        }
        let output = command
            .args(["route", "replace", to, "dev", dev, "proto", "kernel"])
            .args(["scope", "link", "src", src, "congctl", cc])
            .output()
            .context("running ip route")?;
        anyhow::ensure!(
            output.status.success(),
            "setting congctl {cc}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
