//! `netem`: the link emulator's command line. Parses arguments, reads the clock and the
//! environment (the seed), and hands everything to the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use netem::spec::{Direction, Distribution, GilbertElliott, Periodic, Profile, Profiles, Stages};
use netem::units::{Probability, Rate, Span, Time};
use netem::{packet, seed, tc, PacketLink, Relay};

#[derive(Parser)]
#[command(
    version,
    about = "Userspace link emulator with Linux netem's semantics"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Relay UDP from --listen to --to through the impaired link (no privileges needed).
    Relay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        #[command(flatten)]
        link: LinkArgs,
    },
    /// Run CMD in a fresh network namespace whose only link (to the host) is impaired (root).
    Packet {
        /// Names the namespace PREFIX-ID and the devices PREFIXIDh / PREFIXIDc.
        #[arg(long, default_value = "netem")]
        prefix: String,
        #[command(flatten)]
        link: LinkArgs,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// List the profiles.
    Profiles {
        #[arg(long)]
        profiles: Option<std::path::PathBuf>,
    },
    /// Print the tc commands that give PROFILE on a machine with sch_netem.
    Tc {
        profile: String,
        #[arg(long)]
        profiles: Option<std::path::PathBuf>,
    },
    /// Remove namespaces and devices left by killed packet-mode runs.
    Cleanup {
        #[arg(long, default_value = "netem")]
        prefix: String,
    },
    /// Measure round trips to a TCP echo server (e.g. across a packet-mode link).
    Probe {
        addr: SocketAddr,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Give up after this long in total.
        #[arg(long, default_value = "10s")]
        timeout: Time,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    Up,
    Down,
    Both,
}

/// A profile, optionally overridden by ad-hoc stages on one or both directions.
#[derive(Args)]
struct LinkArgs {
    /// Profile name (see `netem profiles`); default `clean`.
    #[arg(long)]
    profile: Option<String>,
    /// Read profiles from this TOML file instead of the built-in ones.
    #[arg(long)]
    profiles: Option<std::path::PathBuf>,
    /// Which direction the stage options below apply to.
    #[arg(long, value_enum, default_value = "both")]
    direction: Which,
    /// Seed (else NETEM_SEED, else a fresh one; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    delay: Option<Time>,
    #[arg(long)]
    jitter: Option<Time>,
    #[arg(long)]
    delay_correlation: Option<Probability>,
    #[arg(long, value_enum)]
    distribution: Option<Distribution>,
    #[arg(long)]
    loss: Option<Probability>,
    #[arg(long)]
    loss_correlation: Option<Probability>,
    /// Gilbert–Elliott loss: p,r[,1-h[,1-k]] (e.g. 1%,25%).
    #[arg(long)]
    gemodel: Option<GilbertElliott>,
    #[arg(long)]
    duplicate: Option<Probability>,
    #[arg(long)]
    reorder: Option<Probability>,
    #[arg(long)]
    gap: Option<u32>,
    #[arg(long)]
    corrupt: Option<Probability>,
    #[arg(long)]
    rate: Option<Rate>,
    #[arg(long)]
    limit: Option<u32>,
    /// Blackouts: GAP/DURATION spans, e.g. 20s..60s/5s..30s.
    #[arg(long)]
    blackouts: Option<String>,
    /// Address changes every GAP span, e.g. 10s..30s (relay mode).
    #[arg(long)]
    address_changes: Option<Span>,
}

impl LinkArgs {
    fn profile(&self) -> anyhow::Result<Profile> {
        let profiles = load_profiles(self.profiles.as_deref())?;
        let mut profile = match &self.profile {
            Some(name) => profiles.find(name)?.clone(),
            None => Profile::clean(),
        };
        let directions: &[Direction] = match self.direction {
            Which::Up => &[Direction::Up],
            Which::Down => &[Direction::Down],
            Which::Both => &Direction::BOTH,
        };
        let base = profile.clone();
        for &d in directions {
            self.apply(profile.stages_mut(d));
        }
        if profile.up != base.up || profile.down != base.down {
            profile.name.push_str("+ad-hoc");
        }
        if let Some(b) = &self.blackouts {
            let (gap, duration) = b
                .split_once('/')
                .context("--blackouts takes GAP/DURATION, e.g. 20s..60s/5s..30s")?;
            profile.events.blackouts = Some(Periodic {
                gap: gap.parse()?,
                duration: Some(duration.parse()?),
                count: None,
            });
        }
        if let Some(gap) = self.address_changes {
            profile.events.address_changes = Some(Periodic {
                gap,
                duration: None,
                count: None,
            });
        }
        profile.validate()?;
        Ok(profile)
    }

    fn apply(&self, s: &mut Stages) {
        fn set<T: Copy>(field: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *field = v;
            }
        }
        set(&mut s.delay, self.delay);
        set(&mut s.jitter, self.jitter);
        set(&mut s.delay_correlation, self.delay_correlation);
        set(&mut s.distribution, self.distribution);
        set(&mut s.loss, self.loss);
        set(&mut s.loss_correlation, self.loss_correlation);
        set(&mut s.duplicate, self.duplicate);
        set(&mut s.reorder, self.reorder);
        set(&mut s.corrupt, self.corrupt);
        if self.gemodel.is_some() {
            s.gemodel = self.gemodel;
            s.loss = Probability::ZERO;
        }
        if self.loss.is_some() {
            s.gemodel = None;
        }
        s.gap = self.gap.or(s.gap);
        s.rate = self.rate.or(s.rate);
        s.limit = self.limit.or(s.limit);
    }

    fn seed(&self) -> u64 {
        match self.seed {
            Some(seed) => {
                eprintln!("netem: seed {seed} (from --seed)");
                seed
            }
            None => seed::from_env_or_random(),
        }
    }
}

fn load_profiles(path: Option<&std::path::Path>) -> anyhow::Result<Profiles> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(Profiles::parse(&text).with_context(|| format!("in {}", path.display()))?)
        }
        None => Ok(Profiles::builtin()),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NETEM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("netem: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Relay { listen, to, link } => {
            let profile = link.profile()?;
            let seed = link.seed();
            relay(listen, to, &profile, seed)?;
        }
        Cmd::Packet { prefix, link, cmd } => {
            let profile = link.profile()?;
            let seed = link.seed();
            return packet_mode(&prefix, &profile, seed, &cmd);
        }
        Cmd::Profiles { profiles } => {
            for p in load_profiles(profiles.as_deref())?.list {
                println!("{:<14} {}", p.name, p.description);
                for d in [Direction::Up, Direction::Down] {
                    let args = tc::netem_args(p.stages(d));
                    let args = if args.is_empty() { "-".into() } else { args };
                    println!("{:<14}   {d:<4}  {args}", "");
                }
                println!("{:<14}   source: {}", "", p.source);
            }
        }
        Cmd::Tc { profile, profiles } => {
            print!(
                "{}",
                tc::script(load_profiles(profiles.as_deref())?.find(&profile)?)
            );
        }
        Cmd::Cleanup { prefix } => {
            for removed in packet::cleanup(&prefix)? {
                println!("removed {removed}");
            }
        }
        Cmd::Probe {
            addr,
            count,
            size,
            timeout,
        } => return probe(addr, count, size, timeout.0),
    }
    Ok(ExitCode::SUCCESS)
}

fn relay(listen: SocketAddr, to: SocketAddr, profile: &Profile, seed: u64) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let handle = Relay::start_profile(listen, to, profile, seed).await?;
        eprintln!(
            "netem: relaying {} -> {to} with profile {:?}; Ctrl-C stops",
            handle.local_addr(),
            profile.name
        );
        tokio::signal::ctrl_c().await?;
        eprintln!("netem: {:#?}", handle.stats());
        handle.shutdown().await;
        Ok(())
    })
}

fn packet_mode(
    prefix: &str,
    profile: &Profile,
    seed: u64,
    cmd: &[String],
) -> anyhow::Result<ExitCode> {
    let link = PacketLink::start_profile(prefix, profile, seed)?;
    eprintln!(
        "netem: namespace {} ({}), host end {} with profile {:?}",
        link.namespace(),
        link.client_addr(),
        link.host_addr(),
        profile.name
    );
    let status = link
        .command(&cmd[0])
        .args(&cmd[1..])
        .env("NETEM_HOST_ADDR", link.host_addr().to_string())
        .status()
        .with_context(|| format!("running {:?}", cmd[0]));
    eprintln!("netem: {:#?}", link.stats());
    link.shutdown()?;
    let status = status?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

fn probe(addr: SocketAddr, count: u32, size: usize, limit: Duration) -> anyhow::Result<ExitCode> {
    use std::io::{Read, Write};
    let start = Instant::now();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)?;
    stream.set_nodelay(true)?;
    let mut rtts = Vec::new();
    let mut reply = vec![0u8; size];
    for i in 0..count {
        let left = limit.checked_sub(start.elapsed()).unwrap_or_default();
        if left.is_zero() {
            bail!("timed out after {}/{count} round trips", rtts.len());
        }
        stream.set_read_timeout(Some(left))?;
        let message = vec![i as u8; size];
        let sent = Instant::now();
        stream.write_all(&message)?;
        stream
            .read_exact(&mut reply)
            .with_context(|| format!("round trip {i}"))?;
        if reply != message {
            bail!("round trip {i}: the echo differs");
        }
        rtts.push(sent.elapsed().as_secs_f64() * 1e3);
    }
    let min = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let max = rtts.iter().copied().fold(0.0, f64::max);
    let avg = rtts.iter().sum::<f64>() / rtts.len().max(1) as f64;
    println!(
        "probe {addr}: {}/{count} echoed, rtt min {min:.1} avg {avg:.1} max {max:.1} ms",
        rtts.len()
    );
    Ok(ExitCode::SUCCESS)
}
