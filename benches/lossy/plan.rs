//! Which runs make up the quick form and the full report, and what each run's outcome means.
//!
//! Seeds: one base seed (`NETEM_SEED` replays it) and per-run seeds derived from it so that
//! every transport of a comparison crosses the same loss pattern: the reference runs of seed
//! `k` share `base + k`, the matrix runs of one profile share `base + 100 + profile`.

use std::time::Duration;

use netem::schedule::Schedule;
use netem::spec::{Events, Periodic};
use netem::units::Span;
use netem::{Profile, Profiles};

use crate::analysis::{recovery, ConnectTimes, PhaseSummary, Recovery};
use crate::clients::{ClientSpec, Load, Phase, QuicCc, Transport};
use crate::path::{Outcome, Setup, Via};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Quick,
    Full,
    Report,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    /// Bracht's condition: lossy-5, 8 topics, 500 msg/s, QoS 0, 256 B, several seeds.
    Reference,
    /// Every profile x transport x QoS, goodput and connect times.
    Matrix,
    /// Persistent sessions across blackouts.
    Blackout,
    /// QUIC across address changes (NAT rebinding by the relay, client-side rebind).
    Migration,
    /// QoS 1 goodput at saturation per congestion controller, clean and lossy.
    Goodput,
}

impl Group {
    /// A group by its name on the command line (`--only GROUP`).
    pub fn parse(name: Option<&str>) -> anyhow::Result<Self> {
        match name {
            Some("reference") => Ok(Self::Reference),
            Some("matrix") => Ok(Self::Matrix),
            Some("blackout") => Ok(Self::Blackout),
            Some("migration") => Ok(Self::Migration),
            Some("goodput") => Ok(Self::Goodput),
            other => anyhow::bail!(
                "--only takes reference, matrix, blackout, migration or goodput, not {other:?}"
            ),
        }
    }
}

/// The reference condition's load.
pub const TOPICS: u16 = 8;
pub const PAYLOAD: usize = 256;
pub const REFERENCE_RATE: f64 = 500.0;
/// The matrix's paced load: the reference's would exceed the 3G uplink (768 kbit/s).
pub const MATRIX_RATE: f64 = 200.0;
pub const SATURATE_INFLIGHT: usize = 64;
/// The goodput group's end-to-end window (published, not yet delivered): far beyond any
/// profile's bandwidth-delay product, within the subscriber's queue (`session.max_queued`,
/// 1,000) plus its in-flight window, so the path, not a window or a queue, bounds the flow.
pub const GOODPUT_WINDOW: usize = 1000;
/// The goodput group's profiles and variants (transport, TCP controller, QUIC controller).
pub const GOODPUT_PROFILES: [&str; 3] = ["clean", "lossy-5", "lossy-10"];
pub const GOODPUT_VARIANTS: [(Transport, &str, QuicCc); 5] = [
    (Transport::Tcp, "cubic", QuicCc::Cubic),
    (Transport::Tcp, "bbr", QuicCc::Cubic),
    (Transport::QuicSingle, "cubic", QuicCc::Bbr),
    (Transport::QuicPerTopic, "cubic", QuicCc::Bbr),
    (Transport::QuicPerTopic, "cubic", QuicCc::Cubic),
];
/// Petrel's default QUIC congestion controller (`[quic] congestion`).
pub const DEFAULT_CC: QuicCc = QuicCc::Bbr;

/// Run lengths: chosen so that `--full` stays near 15 minutes on 2 cores.
struct Lengths {
    reference_seconds: f64,
    reference_seeds: u64,
    matrix_seconds: f64,
    saturate_seconds: f64,
    probes: u32,
    blackout_seconds: f64,
    migration_seconds: f64,
    goodput_seconds: f64,
}

const FULL: Lengths = Lengths {
    reference_seconds: 10.0,
    reference_seeds: 3,
    matrix_seconds: 3.0,
    saturate_seconds: 2.0,
    probes: 1,
    blackout_seconds: 12.0,
    migration_seconds: 6.0,
    goodput_seconds: 4.0,
};

/// The full report's run lengths, in words (for the report's method).
pub fn lengths() -> String {
    let l = FULL;
    format!(
        "reference: {} seeds of {:.0} s per variant; matrix: {:.0} s per QoS phase, {:.0} s of \
         saturation and {} takeover per cell; blackouts: {:.0} s per QoS level; address changes: \
         {:.0} s per QoS level; goodput per controller: {:.0} s per cell",
        l.reference_seeds,
        l.reference_seconds,
        l.matrix_seconds,
        l.saturate_seconds,
        l.probes,
        l.blackout_seconds,
        l.migration_seconds,
        l.goodput_seconds
    )
}

pub const MATRIX_PROFILES: [&str; 8] = [
    "clean",
    "wifi-good",
    "lte",
    "lte-edge",
    "3g",
    "satellite-geo",
    "lossy-5",
    "lossy-10",
];

/// One run.
#[derive(Debug, Clone)]
pub struct Case {
    pub group: Group,
    pub setup: Setup,
    pub spec: ClientSpec,
    /// Short description of the variant (congestion controller, migration kind).
    pub variant: String,
    /// Blackout windows in the link's time (µs from its start).
    pub blackouts: Vec<(u64, u64)>,
}

impl Case {
    pub fn transport(&self) -> Transport {
        self.spec.transport
    }

    pub fn title(&self) -> String {
        format!(
            "{:?} {} {} ({}) seed {}",
            self.group,
            self.setup.profile.name,
            self.transport().label(),
            self.variant,
            self.setup.seed
        )
    }
}

pub enum Status {
    Ran(Box<Outcome>),
    Skipped(String),
    Failed(String),
}

/// A run and what it measured.
pub struct CaseResult {
    pub case: Case,
    pub status: Status,
    pub phases: Vec<PhaseSummary>,
    pub connect: Option<ConnectTimes>,
    /// Per phase that contained a blackout: the window (client time, µs) and the recovery.
    pub recoveries: Vec<(usize, (u64, u64), Recovery)>,
}

impl CaseResult {
    pub fn new(case: Case, outcome: anyhow::Result<Outcome>) -> Self {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                return Self {
                    case,
                    status: Status::Failed(format!("{e:#}")),
                    phases: Vec::new(),
                    connect: None,
                    recoveries: Vec::new(),
                }
            }
        };
        let report = &outcome.report;
        let phases = report.phases.iter().map(PhaseSummary::of).collect();
        let offset = report
            .started_unix_us
            .saturating_sub(outcome.link_started_unix_us);
        let mut recoveries = Vec::new();
        for (i, phase) in report.phases.iter().enumerate() {
            for &(a, b) in &case.blackouts {
                let window = (a.saturating_sub(offset), b.saturating_sub(offset));
                if window.0 >= phase.start_us && window.0 < phase.end_us {
                    recoveries.push((i, window, recovery(phase, window)));
                }
            }
        }
        Self {
            connect: Some(ConnectTimes::of(report)),
            status: Status::Ran(Box::new(outcome)),
            case,
            phases,
            recoveries,
        }
    }

    pub fn skipped(case: Case, why: String) -> Self {
        Self {
            case,
            status: Status::Skipped(why),
            phases: Vec::new(),
            connect: None,
            recoveries: Vec::new(),
        }
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.status {
            Status::Ran(o) => Some(o),
            _ => None,
        }
    }

    /// Broken guarantees: a QoS 1/2 message lost or a publish failed, a QoS 2 duplicate, a
    /// persistent session not resumed, a migration that reconnected, a run that failed.
    pub fn failures(&self) -> Vec<String> {
        let title = self.case.title();
        let mut out = Vec::new();
        match &self.status {
            Status::Failed(why) => out.push(format!("{title}: {why}")),
            Status::Skipped(_) => {}
            Status::Ran(outcome) => {
                for (p, raw) in self.phases.iter().zip(&outcome.report.phases) {
                    if p.qos > 0 && (p.lost > 0 || p.publish_errors > 0) {
                        out.push(format!(
                            "{title}: QoS {} lost {} of {}; {} publishes failed {:?}",
                            p.qos, p.lost, p.expected, p.publish_errors, raw.first_errors
                        ));
                    }
                    if p.qos == 2 && p.duplicates > 0 {
                        out.push(format!(
                            "{title}: QoS 2 delivered {} duplicates",
                            p.duplicates
                        ));
                    }
                }
                if outcome.report.sessions_lost > 0 {
                    out.push(format!(
                        "{title}: {} reconnects found no session",
                        outcome.report.sessions_lost
                    ));
                }
                if self.case.group == Group::Migration && outcome.report.reconnects > 0 {
                    out.push(format!(
                        "{title}: {} reconnects across address changes",
                        outcome.report.reconnects
                    ));
                }
            }
        }
        out
    }
}

fn profile(name: &str) -> Profile {
    Profiles::builtin()
        .find(name)
        .expect("a built-in profile")
        .clone()
}

fn template(transport: Transport, quic_cc: QuicCc, phases: Vec<Phase>) -> ClientSpec {
    ClientSpec {
        transport,
        server: "0.0.0.0:0".parse().expect("an address"),
        ca_file: Default::default(),
        quic_cc,
        topics: TOPICS,
        payload: PAYLOAD,
        phases,
        keep_alive: 30,
        drain: 20.0,
        reconnect_probes: 0,
        rebind_every: None,
        result_file: None,
    }
}

/// Packet mode for everything, so TCP and QUIC cross exactly the same path.
fn packet_case(
    group: Group,
    profile: Profile,
    seed: u64,
    transport: Transport,
    tcp_cc: &'static str,
    quic_cc: QuicCc,
    spec: ClientSpec,
) -> Case {
    let variant = if transport.is_quic() {
        quic_cc.label()
    } else {
        tcp_cc
    };
    let blackouts = blackout_windows(&profile.events, seed);
    Case {
        group,
        setup: Setup {
            profile,
            seed,
            via: Via::Packet,
            tcp_cc: Some(tcp_cc),
            quic_cc,
        },
        spec,
        variant: variant.to_owned(),
        blackouts,
    }
}

/// The blackout windows the link will draw from `seed` (at most 16).
fn blackout_windows(events: &Events, seed: u64) -> Vec<(u64, u64)> {
    let mut schedule = Schedule::blackouts(events, seed);
    let mut windows = Vec::new();
    while let Some((a, b)) = schedule.upcoming() {
        windows.push((a.as_micros() as u64, b.as_micros() as u64));
        if windows.len() >= 16 {
            break;
        }
        schedule.contains(b);
    }
    windows
}

/// `tunnel`'s link with one blackout of `duration` seconds, `after` seconds into the link's
/// life: fixed, so that every transport meets the same blackout inside its phase.
fn tunnel(after: f64, duration: f64) -> Profile {
    let mut p = profile("tunnel");
    p.events.blackouts = Some(Periodic {
        gap: Span::fixed(Duration::from_secs_f64(after)),
        duration: Some(Span::fixed(Duration::from_secs_f64(duration))),
        count: Some(1),
    });
    p
}

fn handover(every: f64) -> Profile {
    let mut p = profile("handover");
    p.events.address_changes = Some(Periodic {
        gap: Span::fixed(Duration::from_secs_f64(every)),
        duration: None,
        count: None,
    });
    p
}

fn migration_cases(base: u64, seconds: f64, transports: &[Transport]) -> Vec<Case> {
    let mut cases = Vec::new();
    for (kind, profile, rebind) in [
        ("NAT rebinding every 3 s", handover(3.0), None),
        ("client rebind every 3 s", profile("lte"), Some(3.0)),
    ] {
        for &transport in transports {
            let mut spec = template(
                transport,
                DEFAULT_CC,
                vec![
                    Phase::paced(1, MATRIX_RATE, seconds),
                    Phase::paced(2, MATRIX_RATE, seconds),
                ],
            );
            spec.rebind_every = rebind;
            cases.push(Case {
                group: Group::Migration,
                setup: Setup {
                    profile: profile.clone(),
                    seed: base + 300,
                    via: Via::Relay,
                    tcp_cc: None,
                    quic_cc: DEFAULT_CC,
                },
                spec,
                variant: kind.to_owned(),
                blackouts: Vec::new(),
            });
        }
    }
    cases
}

/// One run per transport and QoS level: a persistent session crossing one blackout, with a
/// keep-alive short enough that both ends notice it.
fn blackout_cases(
    base: u64,
    transports: &[Transport],
    qos: &[u8],
    (after, duration, seconds): (f64, f64, f64),
    keep_alive: u64,
) -> Vec<Case> {
    let mut cases = Vec::new();
    for &q in qos {
        for &transport in transports {
            let mut spec = template(
                transport,
                DEFAULT_CC,
                vec![Phase::paced(q, MATRIX_RATE, seconds)],
            );
            spec.keep_alive = keep_alive;
            spec.drain = 40.0;
            cases.push(packet_case(
                Group::Blackout,
                tunnel(after, duration),
                base + 200,
                transport,
                "cubic",
                DEFAULT_CC,
                spec,
            ));
        }
    }
    cases
}

/// The runs of a mode, in order.
pub fn cases(mode: Mode, base: u64) -> Vec<Case> {
    match mode {
        Mode::Quick => quick(base),
        Mode::Full | Mode::Report => full(base),
    }
}

/// The matrix's QUIC controller: the default, or `LOSSY_MATRIX_QUIC_CC` (`cubic`,
/// `newreno`, `bbr`) to look at a profile with another.
fn matrix_quic_cc() -> QuicCc {
    match std::env::var("LOSSY_MATRIX_QUIC_CC").as_deref() {
        Ok("cubic") => QuicCc::Cubic,
        Ok("newreno") => QuicCc::NewReno,
        Ok("bbr") => QuicCc::Bbr,
        Ok(other) => panic!("LOSSY_MATRIX_QUIC_CC takes cubic, newreno or bbr, not {other:?}"),
        Err(_) => DEFAULT_CC,
    }
}

fn quick(base: u64) -> Vec<Case> {
    let mut cases = Vec::new();
    for transport in [Transport::Tcp, Transport::QuicPerTopic] {
        let mut spec = template(
            transport,
            DEFAULT_CC,
            (0..=2)
                .map(|q| Phase::paced(q, REFERENCE_RATE, 2.0))
                .collect(),
        );
        spec.reconnect_probes = 1;
        cases.push(packet_case(
            Group::Matrix,
            profile("lossy-5"),
            base + 106,
            transport,
            "cubic",
            DEFAULT_CC,
            spec,
        ));
    }
    cases.extend(blackout_cases(
        base,
        &[Transport::Tcp],
        &[1],
        (2.0, 3.0, 6.0),
        1,
    ));
    cases.extend(
        migration_cases(base, 3.0, &[Transport::QuicPerTopic])
            .into_iter()
            .take(1),
    );
    cases
}

fn full(base: u64) -> Vec<Case> {
    let l = FULL;
    let mut cases = Vec::new();
    let variants: [(Transport, &'static str, QuicCc); 8] = [
        (Transport::Tcp, "cubic", QuicCc::Cubic),
        (Transport::Tcp, "bbr", QuicCc::Cubic),
        (Transport::Tls, "cubic", QuicCc::Cubic),
        (Transport::QuicSingle, "cubic", QuicCc::Bbr),
        (Transport::QuicPerTopic, "cubic", QuicCc::Bbr),
        (Transport::QuicPerTopic, "cubic", QuicCc::Cubic),
        (Transport::QuicPerTopic, "cubic", QuicCc::NewReno),
        (Transport::QuicDatagram, "cubic", QuicCc::Bbr),
    ];
    for k in 0..l.reference_seeds {
        for (transport, tcp_cc, quic_cc) in variants {
            let spec = template(
                transport,
                quic_cc,
                vec![Phase::paced(0, REFERENCE_RATE, l.reference_seconds)],
            );
            cases.push(packet_case(
                Group::Reference,
                profile("lossy-5"),
                base + k,
                transport,
                tcp_cc,
                quic_cc,
                spec,
            ));
        }
    }
    for (i, name) in MATRIX_PROFILES.iter().enumerate() {
        // Every transport with its default controller, and TCP with BBR beside it: the best
        // TCP a tuned host offers, which QUIC's default must beat.
        let variants = Transport::ALL
            .into_iter()
            .map(|t| (t, "cubic"))
            .chain([(Transport::Tcp, "bbr")]);
        for (transport, tcp_cc) in variants {
            let mut phases: Vec<Phase> = (0..=2)
                .map(|q| Phase::paced(q, MATRIX_RATE, l.matrix_seconds))
                .collect();
            phases.push(Phase {
                qos: 1,
                load: Load::Saturate {
                    inflight: SATURATE_INFLIGHT,
                },
                seconds: l.saturate_seconds,
            });
            // `LOSSY_MATRIX_PHASES=2`: only the paced QoS 2 phase, say (a link's packet and
            // byte counts are the run's, so this is how they are had per QoS level).
            if let Ok(keep) = std::env::var("LOSSY_MATRIX_PHASES") {
                let mut i = 0;
                phases.retain(|_| {
                    i += 1;
                    keep.split(',').any(|k| k.trim() == (i - 1).to_string())
                });
            }
            let quic_cc = matrix_quic_cc();
            let mut spec = template(transport, quic_cc, phases);
            spec.reconnect_probes = l.probes;
            cases.push(packet_case(
                Group::Matrix,
                profile(name),
                base + 100 + i as u64,
                transport,
                tcp_cc,
                quic_cc,
                spec,
            ));
        }
    }
    for (i, name) in GOODPUT_PROFILES.iter().enumerate() {
        for (transport, tcp_cc, quic_cc) in GOODPUT_VARIANTS {
            let spec = template(
                transport,
                quic_cc,
                vec![Phase {
                    qos: 1,
                    load: Load::Closed {
                        window: GOODPUT_WINDOW,
                    },
                    seconds: l.goodput_seconds,
                }],
            );
            cases.push(packet_case(
                Group::Goodput,
                profile(name),
                base + 200 + i as u64,
                transport,
                tcp_cc,
                quic_cc,
                spec,
            ));
        }
    }
    cases.extend(blackout_cases(
        base,
        &Transport::ALL,
        &[1, 2],
        (3.0, 6.0, l.blackout_seconds),
        3,
    ));
    cases.extend(migration_cases(
        base,
        l.migration_seconds,
        &[Transport::QuicSingle, Transport::QuicPerTopic],
    ));
    cases
}
