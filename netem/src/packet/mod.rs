//! Packet mode: a network namespace for the client side, joined to the root namespace by two
//! TUN devices whose packets cross the model, so TCP, TLS, WebSocket and QUIC all take the same
//! impaired path. Needs root and `/dev/net/tun`.
//!
//! ```text
//!  root namespace                          namespace PREFIX-ID
//!  10.213.ID.1 dev PREFIXIDh  <== netem ==>  dev PREFIXIDc 10.213.ID.2
//!              (down: host -> namespace; up: namespace -> host)
//! ```
//! Each side has only the point-to-point route to the other: nothing in the namespace can reach
//! beyond the host end. The ID (1..=254) is claimed through an abstract Unix socket, so links
//! of any prefix never share addresses. The devices are non-persistent (they vanish with their
//! files, even on a crash); the namespace is removed by [`PacketLink::shutdown`] or `Drop`, and
//! leftovers of a killed process by [`cleanup`] (`netem cleanup`).
//!
//! The driver runs on its own thread with a current-thread tokio runtime, so the link works the
//! same under a sync caller or inside another runtime.

mod tun;

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::link::{Link, LinkStats, Packet};
use crate::spec::{Direction, LinkSpec, Profile};

/// Largest IP packet read from a TUN device (the devices keep the default 1500 MTU).
const MAX_PACKET: usize = 65_535;
/// Packets read from one device per wake-up before the other gets a turn.
const READ_BURST: usize = 64;
const FIRST_OCTETS: [u8; 2] = [10, 213];

#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    #[error("packet mode unavailable: {0}")]
    Unavailable(String),
    #[error("prefix {0:?} must be 1 to 8 characters of a-z and 0-9")]
    BadPrefix(String),
    #[error("no free link id (all of 1..=254 are claimed)")]
    NoFreeId,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PacketError {
    let what = what.into();
    move |source| PacketError::Io { what, source }
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketStats {
    pub up: LinkStats,
    pub down: LinkStats,
}

/// Why packet mode cannot run here, if it cannot: not root, no `/dev/net/tun`, no `ip`.
pub fn available() -> Result<(), PacketError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if euid != Some("0") {
        return Err(PacketError::Unavailable("not running as root".into()));
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Err(PacketError::Unavailable(
            "/dev/net/tun does not exist".into(),
        ));
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Err(PacketError::Unavailable(
            "the `ip` command (iproute2) is missing".into(),
        ));
    }
    Ok(())
}

/// A running packet-mode link. Dropping it tears everything down.
pub struct PacketLink {
    namespace: String,
    host_dev: String,
    id: u8,
    stats: Arc<Mutex<PacketStats>>,
    stop: Option<oneshot::Sender<()>>,
    driver: Option<JoinHandle<()>>,
    torn_down: bool,
    _claim: UnixListener,
}

impl PacketLink {
    /// Creates the namespace and devices and starts moving packets through `up` and `down`.
    pub fn start(
        prefix: &str,
        up: LinkSpec,
        down: LinkSpec,
        seed: u64,
    ) -> Result<Self, PacketError> {
        available()?;
        if prefix.is_empty()
            || prefix.len() > 8
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(PacketError::BadPrefix(prefix.to_owned()));
        }
        let (id, claim) = claim_id()?;
        let namespace = format!("{prefix}-{id}");
        let host_dev = format!("{prefix}{id}h");
        let client_dev = format!("{prefix}{id}c");
        // A namespace of this name without the claim held is a leftover of a killed run.
        let _ = ip(&["netns", "del", &namespace]);
        ip(&["netns", "add", &namespace])?;
        let devices = match setup(&namespace, &host_dev, &client_dev, id) {
            Ok(devices) => devices,
            Err(e) => {
                let _ = ip(&["netns", "del", &namespace]);
                return Err(e);
            }
        };
        let stats = Arc::new(Mutex::new(PacketStats::default()));
        let (stop, stop_rx) = oneshot::channel();
        let driver_stats = stats.clone();
        let up = Link::new(&up, seed);
        let down = Link::new(&down, seed);
        let driver = std::thread::Builder::new()
            .name(format!("netem-{namespace}"))
            .spawn(move || drive(devices, up, down, stop_rx, driver_stats))
            .map_err(io_err("spawning the driver thread"))?;
        tracing::debug!(%namespace, seed, "packet link started");
        Ok(Self {
            namespace,
            host_dev,
            id,
            stats,
            stop: Some(stop),
            driver: Some(driver),
            torn_down: false,
            _claim: claim,
        })
    }

    /// [`PacketLink::start`] with both directions of `profile`.
    pub fn start_profile(prefix: &str, profile: &Profile, seed: u64) -> Result<Self, PacketError> {
        Self::start(
            prefix,
            profile.link(Direction::Up),
            profile.link(Direction::Down),
            seed,
        )
    }

    /// The client-side namespace's name (for `ip netns exec`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The host end, in the root namespace: servers listen here, clients in the namespace dial it.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(FIRST_OCTETS[0], FIRST_OCTETS[1], self.id, 1)
    }

    /// The namespace end: the address the host sees clients come from.
    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(FIRST_OCTETS[0], FIRST_OCTETS[1], self.id, 2)
    }

    /// The host-side device's name.
    pub fn host_device(&self) -> &str {
        &self.host_dev
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NS program`); add
    /// arguments and spawn it as usual (or convert it into a `tokio::process::Command`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program);
        command
    }

    pub fn stats(&self) -> PacketStats {
        *self.stats.lock().expect("stats lock is never poisoned")
    }

    /// Stops the driver, closes the devices and removes the namespace.
    pub fn shutdown(mut self) -> Result<(), PacketError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), PacketError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(driver) = self.driver.take() {
            let _ = driver.join();
        }
        // The devices went with the driver's files; the namespace is ours to remove.
        ip(&["netns", "del", &self.namespace])
    }
}

impl Drop for PacketLink {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(namespace = %self.namespace, error = %e, "packet link teardown");
        }
    }
}

/// Removes namespaces `PREFIX-N` and devices `PREFIXNh` / `PREFIXNc` left by killed runs.
/// Returns what it removed. Links still running under the prefix lose their namespace too.
pub fn cleanup(prefix: &str) -> Result<Vec<String>, PacketError> {
    let mut removed = Vec::new();
    let numbered = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let list = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(io_err("ip netns list"))?;
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(numbered)
        {
            ip(&["netns", "del", name])?;
            removed.push(format!("namespace {name}"));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/class/net") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_ours = name
                .strip_prefix(prefix)
                .and_then(|r| r.strip_suffix('h').or_else(|| r.strip_suffix('c')))
                .is_some_and(numbered);
            if is_ours {
                ip(&["link", "del", &name])?;
                removed.push(format!("device {name}"));
            }
        }
    }
    Ok(removed)
}

fn claim_id() -> Result<(u8, UnixListener), PacketError> {
    for id in 1..=254u8 {
        let addr = UnixAddr::from_abstract_name(format!("petrel-netem-link-{id}"))
            .map_err(io_err("abstract socket name"))?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => return Ok((id, listener)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(io_err("claiming a link id")(e)),
        }
    }
    Err(PacketError::NoFreeId)
}

fn ip(args: &[&str]) -> Result<(), PacketError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(io_err("running ip"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(PacketError::Command {
            command: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

struct Devices {
    host: File,
    client: File,
}

fn setup(
    namespace: &str,
    host_dev: &str,
    client_dev: &str,
    id: u8,
) -> Result<Devices, PacketError> {
    let host = tun::create(host_dev).map_err(io_err(format!("creating TUN {host_dev}")))?;
    let client = tun::create(client_dev).map_err(io_err(format!("creating TUN {client_dev}")))?;
    let [a, b] = FIRST_OCTETS;
    let host_addr = format!("{a}.{b}.{id}.1");
    let client_addr = format!("{a}.{b}.{id}.2");
    ip(&["link", "set", client_dev, "netns", namespace])?;
    // No IPv6 link-local addresses: no router solicitations or DAD crossing the link unasked.
    ip(&["link", "set", host_dev, "addrgenmode", "none"])?;
    ip(&[
        "addr",
        "add",
        &host_addr,
        "peer",
        &client_addr,
        "dev",
        host_dev,
    ])?;
    ip(&["link", "set", host_dev, "up"])?;
    ip(&["-n", namespace, "link", "set", "lo", "up"])?;
    ip(&[
        "-n",
        namespace,
        "link",
        "set",
        client_dev,
        "addrgenmode",
        "none",
    ])?;
    ip(&[
        "-n",
        namespace,
        "addr",
        "add",
        &client_addr,
        "peer",
        &host_addr,
        "dev",
        client_dev,
    ])?;
    ip(&["-n", namespace, "link", "set", client_dev, "up"])?;
    Ok(Devices { host, client })
}

/// The driver thread: host-device packets go down, namespace-device packets go up.
fn drive(
    devices: Devices,
    mut up: Link,
    mut down: Link,
    mut stop: oneshot::Receiver<()>,
    stats: Arc<Mutex<PacketStats>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(error = %e, "packet link runtime");
            return;
        }
    };
    runtime.block_on(async move {
        let (host, client) = match (tun::register(devices.host), tun::register(devices.client)) {
            (Ok(h), Ok(c)) => (h, c),
            _ => {
                tracing::warn!("packet link cannot register its devices");
                return;
            }
        };
        let start = Instant::now();
        let mut buf = vec![0u8; MAX_PACKET];
        loop {
            let deadline = match (up.next_deadline(), down.next_deadline()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                _ = &mut stop => break,
                ready = host.readable() => {
                    let Ok(mut guard) = ready else { break };
                    read_burst(&mut guard, &mut buf, &mut down, start);
                }
                ready = client.readable() => {
                    let Ok(mut guard) = ready else { break };
                    read_burst(&mut guard, &mut buf, &mut up, start);
                }
                () = tokio::time::sleep_until(start + deadline.unwrap_or_default()), if deadline.is_some() => {}
            }
            let now = start.elapsed();
            while let Some(packet) = down.poll(now) {
                write_packet(client.get_ref(), &packet);
            }
            while let Some(packet) = up.poll(now) {
                write_packet(host.get_ref(), &packet);
            }
            *stats.lock().expect("stats lock is never poisoned") = PacketStats {
                up: up.stats(),
                down: down.stats(),
            };
        }
    });
}

fn read_burst(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, File>,
    buf: &mut [u8],
    link: &mut Link,
    start: Instant,
) {
    for _ in 0..READ_BURST {
        match guard.try_io(|fd| {
            let mut file: &File = fd.get_ref();
            file.read(buf)
        }) {
            Ok(Ok(n)) => link.send(start.elapsed(), Packet::new(buf[..n].to_vec(), 0)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TUN read");
                return;
            }
            Err(_would_block) => return,
        }
    }
}

/// Writes one packet; a device that cannot take it now drops it, as a full NIC queue would.
fn write_packet(mut file: &File, packet: &Packet) {
    if let Err(e) = file.write(&packet.data) {
        tracing::debug!(error = %e, "TUN write");
    }
}
