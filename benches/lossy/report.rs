//! The report: Markdown tables (printed, or written to `docs/lossy-links.md` with the method
//! and the machine) and SVG charts in `docs/lossy/` drawn with plotters.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;

use crate::analysis::{Latency, BIN_MS};
use crate::clients::{QuicCc, Transport};
use crate::plan::{
    CaseResult, Group, Mode, Status, GOODPUT_PROFILES, GOODPUT_VARIANTS, GOODPUT_WINDOW,
    MATRIX_PROFILES, MATRIX_RATE, PAYLOAD, REFERENCE_RATE, SATURATE_INFLIGHT, TOPICS,
};

/// Bracht 2026 (quinn, tc netem on the broker's egress, TCP CUBIC, Nagle on): p95 / p99 ms.
const BRACHT_TCP: (f64, f64) = (180.0, 355.0);
const BRACHT_QUIC_PER_TOPIC: (f64, f64) = (99.0, 183.0);

pub struct Report<'a> {
    mode: Mode,
    seed: u64,
    elapsed: Duration,
    results: &'a [CaseResult],
}

impl<'a> Report<'a> {
    pub fn new(mode: Mode, seed: u64, elapsed: Duration, results: &'a [CaseResult]) -> Self {
        Self {
            mode,
            seed,
            elapsed,
            results,
        }
    }

    fn group(&self, group: Group) -> impl Iterator<Item = &'a CaseResult> {
        self.results.iter().filter(move |r| r.case.group == group)
    }

    /// Every table, as Markdown.
    pub fn tables(&self) -> String {
        let mut s = String::new();
        self.reference(&mut s);
        self.matrix(&mut s);
        self.goodput_and_connect(&mut s);
        self.goodput_per_controller(&mut s);
        self.blackouts(&mut s);
        self.migration(&mut s);
        self.guarantees(&mut s);
        s
    }

    /// Writes `docs/lossy-links.md` and its charts under `root`; returns the files written.
    pub fn write(&self, root: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let dir = root.join("docs").join("lossy");
        std::fs::create_dir_all(&dir)?;
        let mut written = Vec::new();
        let latency = dir.join("latency-percentiles.svg");
        self.latency_chart(&latency)?;
        written.push(latency);
        let blackout = dir.join("blackout-delivery.svg");
        self.blackout_chart(&blackout)?;
        written.push(blackout);
        let doc = root.join("docs").join("lossy-links.md");
        std::fs::write(&doc, self.document())?;
        written.push(doc);
        Ok(written)
    }

    fn document(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            include_str!("method.md"),
            topics = TOPICS,
            rate = REFERENCE_RATE,
            payload = PAYLOAD,
            matrix_rate = MATRIX_RATE,
            inflight = SATURATE_INFLIGHT,
            goodput_window = GOODPUT_WINDOW,
            lengths = crate::plan::lengths(),
        );
        self.machine(&mut s);
        s.push_str(
            "\n![Latency percentiles by transport and profile](lossy/latency-percentiles.svg)\n\n",
        );
        s.push_str(&self.tables());
        s.push_str("\n![Deliveries over time across a blackout](lossy/blackout-delivery.svg)\n");
        s.push_str(include_str!("findings.md"));
        s
    }

    fn machine(&self, s: &mut String) {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = read("/proc/sys/kernel/osrelease");
        let tcp_cc = read("/proc/sys/net/ipv4/tcp_congestion_control");
        let run = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        let _ = writeln!(
            s,
            "## The machine and the run\n\n\
             - CPU: {cpu}, {cores} cores; Linux {}; host default TCP congestion control: {} \
             (each run sets its own per route, see the tables).\n\
             - {}; Petrel at commit `{}`.\n\
             - This report: `{}`, {} runs in {:.0} s, base seed {} (replay: `NETEM_SEED={} cargo bench --bench lossy -- --report`).",
            kernel.trim(),
            tcp_cc.trim(),
            run("rustc", &["-V"]),
            run("git", &["rev-parse", "--short", "HEAD"]),
            match self.mode {
                Mode::Report => "cargo bench --bench lossy -- --report",
                Mode::Full => "cargo bench --bench lossy -- --full",
                Mode::Quick => "cargo bench --bench lossy",
            },
            self.results.len(),
            self.elapsed.as_secs_f64(),
            self.seed,
            self.seed,
        );
    }

    fn reference(&self, s: &mut String) {
        let runs: Vec<&CaseResult> = self.group(Group::Reference).collect();
        if runs.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n## The reference condition\n\n\
             lossy-5 (25 ms delay and 5 % loss on the broker's egress), {TOPICS} topics, \
             {REFERENCE_RATE:.0} msg/s in total, QoS 0, {PAYLOAD} B payloads; every variant \
             crossed the same seeds. Percentiles over all seeds' messages; the ranges are the \
             spread of the per-seed values. *link loss*: the share of the broker's egress \
             packets the link dropped, as measured. *egress B/msg*: bytes the broker put on \
             the link (IP packets, every copy and retransmission, acks for the client's \
             data) per message delivered.\n\n\
             | transport | congestion control | seeds | messages | lost | link loss | p50 | p95 | p99 | p99.9 | max | p95 per seed | p99 per seed | cross-topic delay | egress B/msg |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        let mut variants: Vec<(Transport, String)> = Vec::new();
        for r in &runs {
            let key = (r.case.transport(), r.case.variant.clone());
            if !variants.contains(&key) {
                variants.push(key);
            }
        }
        for (transport, variant) in variants {
            let same: Vec<&&CaseResult> = runs
                .iter()
                .filter(|r| r.case.transport() == transport && r.case.variant == variant)
                .collect();
            let outcomes: Vec<_> = same.iter().filter_map(|r| r.outcome()).collect();
            if outcomes.is_empty() {
                continue;
            }
            let phases: Vec<_> = outcomes
                .iter()
                .flat_map(|o| o.report.phases.iter())
                .collect();
            let all = Latency::of(
                phases
                    .iter()
                    .flat_map(|p| p.deliveries.iter().map(|d| d[3])),
            );
            let per_seed: Vec<&Latency> = same
                .iter()
                .filter_map(|r| r.phases.first()?.latency.as_ref())
                .collect();
            let range = |f: fn(&Latency) -> f64| {
                let lo = per_seed.iter().map(|l| f(l)).fold(f64::INFINITY, f64::min);
                let hi = per_seed.iter().map(|l| f(l)).fold(0.0, f64::max);
                format!("{}–{}", fmt_ms(lo), fmt_ms(hi))
            };
            let hol: Vec<f64> = same
                .iter()
                .filter_map(|r| r.phases.first()?.cross_topic_ms)
                .collect();
            let expected: u64 = phases.iter().map(|p| p.expected()).sum();
            let lost: u64 = phases.iter().map(|p| p.lost()).sum();
            let (down_lost, down_sent) = outcomes
                .iter()
                .fold((0, 0), |(l, n), o| (l + o.down.lost, n + o.down.sent));
            let down_bytes: u64 = outcomes.iter().map(|o| o.down.sent_bytes).sum();
            let delivered = expected.saturating_sub(lost).max(1);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.2} % | {:.1} % | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
                transport.label(),
                variant,
                outcomes.len(),
                expected,
                100.0 * lost as f64 / expected.max(1) as f64,
                100.0 * down_lost as f64 / down_sent.max(1) as f64,
                all.map_or("–".into(), |l| fmt_ms(l.p50)),
                all.map_or("–".into(), |l| fmt_ms(l.p95)),
                all.map_or("–".into(), |l| fmt_ms(l.p99)),
                all.map_or("–".into(), |l| fmt_ms(l.p999)),
                all.map_or("–".into(), |l| fmt_ms(l.max)),
                range(|l| l.p95),
                range(|l| l.p99),
                if hol.is_empty() {
                    "–".into()
                } else {
                    format!("{:.1}", hol.iter().sum::<f64>() / hol.len() as f64)
                },
                down_bytes as f64 / delivered as f64,
            );
        }
        let _ = writeln!(
            s,
            "| *Bracht 2026: TCP* | cubic, Nagle on | | | | | {} | {} | | | | | | |\n\
             | *Bracht 2026: QUIC per topic* | quinn cubic | | | | | {} | {} | | | | | | |",
            fmt_ms(BRACHT_TCP.0),
            fmt_ms(BRACHT_TCP.1),
            fmt_ms(BRACHT_QUIC_PER_TOPIC.0),
            fmt_ms(BRACHT_QUIC_PER_TOPIC.1),
        );
    }

    fn matrix(&self, s: &mut String) {
        let runs: Vec<&CaseResult> = self.group(Group::Matrix).collect();
        if runs.is_empty() {
            return;
        }
        let rate = if self.mode == Mode::Quick {
            REFERENCE_RATE
        } else {
            MATRIX_RATE
        };
        let _ = writeln!(
            s,
            "\n## Delivery and latency per profile\n\n\
             {TOPICS} topics, {rate:.0} msg/s in total, {PAYLOAD} B, paced; each transport \
             names its congestion controller: TCP with CUBIC and with BBR, TLS with CUBIC, QUIC \
             with quinn's {} (Petrel's default). *delivered* counts distinct \
             messages by sequence number; *dup* counts extra copies. Latency in ms, publish to \
             delivery. *topic p99* is the best and worst topic's p99; *cross-topic delay* the mean \
             extra delay (ms) that a held-up message's topic imposed on the other topics (see \
             the method).",
            crate::plan::DEFAULT_CC.label().to_uppercase()
        );
        let mut profiles: Vec<String> = Vec::new();
        for r in &runs {
            if !profiles.contains(&r.case.setup.profile.name) {
                profiles.push(r.case.setup.profile.name.clone());
            }
        }
        for profile in profiles {
            let _ = writeln!(
                s,
                "\n### {profile}\n\n\
                 | QoS | transport | delivered | lost | dup | p50 | p95 | p99 | p99.9 | max | topic p99 | cross-topic delay |\n\
                 |---|---|---|---|---|---|---|---|---|---|---|---|"
            );
            let of_profile: Vec<&&CaseResult> = runs
                .iter()
                .filter(|r| r.case.setup.profile.name == profile)
                .collect();
            for qos in 0..=2u8 {
                for r in &of_profile {
                    let Some(p) = r.phases.iter().find(|p| p.qos == qos && !p.saturating) else {
                        continue;
                    };
                    let l = p.latency;
                    let cell =
                        |f: fn(&Latency) -> f64| l.as_ref().map_or("–".into(), |l| fmt_ms(f(l)));
                    let _ = writeln!(
                        s,
                        "| {qos} | {} {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        r.case.transport().label(),
                        r.case.variant,
                        p.delivered,
                        p.expected,
                        if qos == 0 {
                            format!("{:.2} %", 100.0 * p.loss_ratio())
                        } else {
                            p.lost.to_string()
                        },
                        p.duplicates,
                        cell(|l| l.p50),
                        cell(|l| l.p95),
                        cell(|l| l.p99),
                        cell(|l| l.p999),
                        cell(|l| l.max),
                        p.topic_p99_range.map_or("–".into(), |(lo, hi)| format!(
                            "{}–{}",
                            fmt_ms(lo),
                            fmt_ms(hi)
                        )),
                        p.cross_topic_ms.map_or("–".into(), |h| format!("{h:.1}")),
                    );
                }
            }
        }
    }

    /// QoS 1 goodput at saturation per congestion controller: what the path allows each.
    fn goodput_per_controller(&self, s: &mut String) {
        let runs: Vec<&CaseResult> = self.group(Group::Goodput).collect();
        if runs.is_empty() {
            return;
        }
        let _ = write!(
            s,
            "\n## Goodput per congestion controller\n\n\
             QoS 1 at saturation, closed loop end to end: one publisher keeping at most \
             {GOODPUT_WINDOW} messages published and not yet delivered, {TOPICS} topics, \
             {PAYLOAD} B, Petrel's other defaults. Distinct messages that arrived while the \
             publisher saturated, per second (and \
             lost); *x tcp-cubic* is the ratio to TCP with CUBIC on the same profile and seed.\n\n\
             | profile |"
        );
        let label = |(t, tcp_cc, quic_cc): (Transport, &str, QuicCc)| {
            if t.is_quic() {
                format!("{} {}", t.label(), quic_cc.label())
            } else {
                format!("{} {tcp_cc}", t.label())
            }
        };
        for v in GOODPUT_VARIANTS {
            let _ = write!(s, " {} |", label(v));
        }
        s.push_str("\n|---|");
        for _ in GOODPUT_VARIANTS {
            s.push_str("---|");
        }
        s.push('\n');
        let goodput = |profile: &str, (t, tcp_cc, quic_cc): (Transport, &str, QuicCc)| {
            runs.iter()
                .find(|r| {
                    r.case.setup.profile.name == profile
                        && r.case.transport() == t
                        && if t.is_quic() {
                            r.case.setup.quic_cc == quic_cc
                        } else {
                            r.case.setup.tcp_cc == Some(tcp_cc)
                        }
                })
                .and_then(|r| r.phases.iter().find(|p| p.saturating))
                .map(|p| (p.goodput, p.lost))
        };
        for profile in GOODPUT_PROFILES {
            let base = goodput(profile, GOODPUT_VARIANTS[0]).map(|(g, _)| g);
            let _ = write!(s, "| {profile} |");
            for v in GOODPUT_VARIANTS {
                let cell = match goodput(profile, v) {
                    None => "–".to_owned(),
                    Some((g, lost)) => {
                        let mut cell = format!("{g:.0}");
                        if lost > 0 {
                            let _ = write!(cell, " ({lost} lost)");
                        }
                        if let Some(b) = base.filter(|b| *b > 0.0 && v != GOODPUT_VARIANTS[0]) {
                            let _ = write!(cell, " ({:.1}x)", g / b);
                        }
                        cell
                    }
                };
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
    }

    fn goodput_and_connect(&self, s: &mut String) {
        // One column per transport, each with its default controller (TCP with BBR is in
        // the goodput-per-controller table).
        let runs: Vec<&CaseResult> = self
            .group(Group::Matrix)
            .filter(|r| r.case.transport().is_quic() || r.case.setup.tcp_cc == Some("cubic"))
            .collect();
        if runs.iter().all(|r| r.connect.is_none()) {
            return;
        }
        let profiles: Vec<&str> = MATRIX_PROFILES
            .iter()
            .copied()
            .filter(|p| runs.iter().any(|r| r.case.setup.profile.name == *p))
            .collect();
        let header = |s: &mut String, title: &str| {
            let _ = write!(s, "\n| {title} |");
            for t in Transport::ALL {
                let _ = write!(s, " {} |", t.label());
            }
            let _ = write!(s, "\n|---|");
            for _ in Transport::ALL {
                s.push_str("---|");
            }
            s.push('\n');
        };
        let cell = |profile: &str, t: Transport, f: &dyn Fn(&CaseResult) -> Option<String>| {
            runs.iter()
                .find(|r| r.case.setup.profile.name == profile && r.case.transport() == t)
                .and_then(|r| f(r))
                .unwrap_or_else(|| "–".into())
        };
        let saturated = runs.iter().any(|r| r.phases.iter().any(|p| p.saturating));
        if saturated {
            let _ = writeln!(
                s,
                "\n## Goodput at saturation\n\n\
             QoS 1, one publisher keeping {SATURATE_INFLIGHT} publishes awaiting PUBACK, \
             {TOPICS} topics, {PAYLOAD} B: distinct messages that arrived while the publisher \
             saturated, per second (and lost)."
            );
            header(s, "profile");
            for p in &profiles {
                let _ = write!(s, "| {p} |");
                for t in Transport::ALL {
                    let v = cell(p, t, &|r| {
                        let g = r.phases.iter().find(|p| p.saturating)?;
                        Some(if g.lost > 0 {
                            format!("{:.0} ({} lost)", g.goodput, g.lost)
                        } else {
                            format!("{:.0}", g.goodput)
                        })
                    });
                    let _ = write!(s, " {v} |");
                }
                s.push('\n');
            }
        }
        let _ = writeln!(
            s,
            "\n## Connect time to CONNACK\n\n\
             Median ms. *cold*: a fresh client (new TCP/TLS or QUIC handshake, no ticket). \
             *warm*: the same client resuming after a takeover (TLS session resumption; QUIC \
             0-RTT, the count of resumptions that went out in 0-RTT in brackets)."
        );
        header(s, "profile");
        for p in &profiles {
            let _ = write!(s, "| {p} |");
            for t in Transport::ALL {
                let v = cell(p, t, &|r| {
                    let c = r.connect?;
                    let warm = c.warm_ms.map_or("–".into(), fmt_ms);
                    Some(if t.is_quic() {
                        format!(
                            "{} / {} ({}/{} 0-RTT)",
                            c.cold_ms.map_or("–".into(), fmt_ms),
                            warm,
                            c.zero_rtt,
                            c.warm_samples
                        )
                    } else {
                        format!("{} / {}", c.cold_ms.map_or("–".into(), fmt_ms), warm)
                    })
                });
                let _ = write!(s, " {v} |");
            }
            s.push('\n');
        }
    }

    fn blackouts(&self, s: &mut String) {
        let runs: Vec<&CaseResult> = self.group(Group::Blackout).collect();
        let Some(first) = runs.first() else {
            return;
        };
        let _ = writeln!(
            s,
            "\n## Blackouts\n\n\
             Profile `{}`'s link with one blackout (both directions dark) at a fixed time, \
             {MATRIX_RATE:.0} msg/s over {TOPICS} topics, persistent sessions, MQTT keep-alive \
             {} s. *first after*: from the end of the blackout to the first delivery; \
             *caught up*: until everything published before its end had arrived.\n\n\
             | QoS | transport | blackout | delivered | dup | reconnects | sessions resumed | first after | caught up | p99 | max |\n\
             |---|---|---|---|---|---|---|---|---|---|---|",
            first.case.setup.profile.name,
            first.case.spec.keep_alive,
        );
        for r in &runs {
            let Some(o) = r.outcome() else { continue };
            for (i, window, rec) in &r.recoveries {
                let p = &r.phases[*i];
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} s | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
                    p.qos,
                    r.case.transport().label(),
                    (window.1 - window.0) as f64 / 1e6,
                    p.delivered,
                    p.expected,
                    p.duplicates,
                    o.report.reconnects,
                    if o.report.reconnects == 0 {
                        "(no reconnect)".to_owned()
                    } else if o.report.sessions_lost == 0 {
                        "all".to_owned()
                    } else {
                        format!("{} lost", o.report.sessions_lost)
                    },
                    rec.first_delivery_ms.map_or("–".into(), fmt_ms),
                    rec.backlog_cleared_ms.map_or("never".into(), fmt_ms),
                    p.latency.map_or("–".into(), |l| fmt_ms(l.p99)),
                    p.latency.map_or("–".into(), |l| fmt_ms(l.max)),
                );
            }
        }
    }

    fn migration(&self, s: &mut String) {
        let runs: Vec<&CaseResult> = self.group(Group::Migration).collect();
        if runs.is_empty() {
            return;
        }
        let _ = writeln!(
            s,
            "\n## Address changes (QUIC)\n\n\
             Over the UDP relay with the `lte` link figures. *NAT rebinding*: the relay moves \
             the clients to a new source port (the broker sees a new address, replies to the \
             old one are lost). *client rebind*: both clients move to a new UDP socket \
             (`Client::rebind`). TCP and TLS cannot keep a connection across an address change \
             (they reconnect by design), so they have no rows here.\n\n\
             | change | transport | QoS | changes | reconnects | delivered | dup | p99 | max |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for r in &runs {
            let Some(o) = r.outcome() else { continue };
            let changes = o.address_changes + o.report.rebinds;
            for p in &r.phases {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
                    r.case.variant,
                    r.case.transport().label(),
                    p.qos,
                    changes,
                    o.report.reconnects,
                    p.delivered,
                    p.expected,
                    p.duplicates,
                    p.latency.map_or("–".into(), |l| fmt_ms(l.p99)),
                    p.latency.map_or("–".into(), |l| fmt_ms(l.max)),
                );
            }
        }
    }

    /// Every broken guarantee, and the runs that did not complete.
    fn guarantees(&self, s: &mut String) {
        let ran = self.results.iter().filter(|r| r.outcome().is_some());
        let phases: usize = ran
            .map(|r| r.phases.iter().filter(|p| p.qos > 0).count())
            .sum();
        let mut lines: Vec<String> = self
            .results
            .iter()
            .flat_map(CaseResult::failures)
            .map(|f| format!("- {f}"))
            .collect();
        lines.extend(self.results.iter().filter_map(|r| match &r.status {
            Status::Skipped(why) => Some(format!("- skipped {}: {why}", r.case.title())),
            _ => None,
        }));
        let _ = writeln!(
            s,
            "\n## Guarantees\n\n\
             {phases} QoS 1/2 phases ran; the checks (every message delivered, QoS 2 without \
             duplicates, no publish failed, sessions resumed, no reconnect on an address change) \
             {}",
            if lines.is_empty() {
                "all held.".to_owned()
            } else {
                format!("found:\n\n{}", lines.join("\n"))
            }
        );
    }

    /// One panel per profile (QoS 0 of the matrix) plus the reference condition: latency at
    /// p50, p95, p99, p99.9 and max, one line per transport, log scale.
    fn latency_chart(&self, file: &Path) -> anyhow::Result<()> {
        let mut panels: Vec<(String, Vec<(String, Latency)>)> = Vec::new();
        let mut reference: Vec<(String, Latency)> = Vec::new();
        for r in self.group(Group::Reference) {
            let label = format!("{} {}", r.case.transport().label(), r.case.variant);
            if reference.iter().any(|(l, _)| *l == label) {
                continue;
            }
            let all = Latency::of(
                self.group(Group::Reference)
                    .filter(|o| {
                        o.case.transport() == r.case.transport() && o.case.variant == r.case.variant
                    })
                    .filter_map(|o| o.outcome())
                    .flat_map(|o| o.report.phases.iter())
                    .flat_map(|p| p.deliveries.iter().map(|d| d[3])),
            );
            if let Some(all) = all {
                reference.push((label, all));
            }
        }
        if !reference.is_empty() {
            panels.push(("reference: lossy-5, 500 msg/s, QoS 0".into(), reference));
        }
        for profile in MATRIX_PROFILES {
            let series: Vec<(String, Latency)> = self
                .group(Group::Matrix)
                .filter(|r| r.case.setup.profile.name == profile)
                .filter_map(|r| {
                    let l = r
                        .phases
                        .iter()
                        .find(|p| p.qos == 0 && !p.saturating)?
                        .latency?;
                    Some((
                        format!("{} {}", r.case.transport().label(), r.case.variant),
                        l,
                    ))
                })
                .collect();
            if !series.is_empty() {
                panels.push((format!("{profile}, QoS 0"), series));
            }
        }
        let cols = 3;
        let rows = panels.len().div_ceil(cols).max(1);
        let root = SVGBackend::new(file, (1200, 330 * rows as u32)).into_drawing_area();
        root.fill(&WHITE)?;
        let names = ["p50", "p95", "p99", "p99.9", "max"];
        for (area, (title, series)) in root.split_evenly((rows, cols)).iter().zip(&panels) {
            let top = series.iter().map(|(_, l)| l.max).fold(1.0, f64::max) * 1.5;
            let bottom = series
                .iter()
                .map(|(_, l)| l.p50)
                .fold(f64::INFINITY, f64::min)
                / 1.5;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 15))
                .margin(10)
                .x_label_area_size(25)
                .y_label_area_size(50)
                .build_cartesian_2d(0i32..4i32, (bottom.max(0.1)..top).log_scale())?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .y_labels(8)
                .y_label_formatter(&|v| fmt_ms(*v))
                .x_labels(5)
                .x_label_formatter(&|x| names.get(*x as usize).copied().unwrap_or("").to_owned())
                .y_desc("ms")
                .draw()?;
            for (i, (label, l)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                let points: Vec<(i32, f64)> = [l.p50, l.p95, l.p99, l.p999, l.max]
                    .iter()
                    .enumerate()
                    .map(|(x, y)| (x as i32, y.max(0.1)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                    .label(label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 11))
                .draw()?;
        }
        root.present()?;
        Ok(())
    }

    /// Deliveries per second over time for each transport across its blackout (QoS 1 runs),
    /// the blackout shaded.
    fn blackout_chart(&self, file: &Path) -> anyhow::Result<()> {
        let runs: Vec<&CaseResult> = self
            .group(Group::Blackout)
            .filter(|r| r.phases.first().is_some_and(|p| p.qos == 1))
            .collect();
        let root = SVGBackend::new(file, (1000, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let per_second = 1000.0 / BIN_MS as f64;
        let series: Vec<Timeline> = runs
            .iter()
            .filter_map(|r| {
                let (_, (a, b), rec) = r.recoveries.first()?;
                let start = r.outcome()?.report.phases.first()?.start_us;
                let seconds = |t: &u64| t.saturating_sub(start) as f64 / 1e6;
                Some(Timeline {
                    label: r.case.transport().label().to_owned(),
                    points: rec
                        .delivered_over_time
                        .iter()
                        .map(|&(t, n)| (t + BIN_MS as f64 / 2000.0, n as f64 * per_second))
                        .collect(),
                    blackout: (seconds(a), seconds(b)),
                })
            })
            .collect();
        let x_max = series
            .iter()
            .flat_map(|t| t.points.last().map(|l| l.0))
            .fold(1.0, f64::max);
        let y_max = series
            .iter()
            .flat_map(|t| t.points.iter().map(|q| q.1))
            .fold(1.0, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Deliveries across a blackout (QoS 1, persistent session; blackout shaded)",
                ("sans-serif", 16),
            )
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the phase started")
            .y_desc("messages delivered per second")
            .draw()?;
        if let Some(Timeline {
            blackout: (a, b), ..
        }) = series.first()
        {
            let (a, b) = (*a, *b);
            chart.draw_series(std::iter::once(Rectangle::new(
                [(a, 0.0), (b, y_max)],
                BLACK.mix(0.1).filled(),
            )))?;
        }
        for (i, t) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(t.points.clone(), color.stroke_width(2)))?
                .label(t.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()?;
        root.present()?;
        Ok(())
    }
}

/// One transport's deliveries per second across its blackout (seconds from the phase start).
struct Timeline {
    label: String,
    points: Vec<(f64, f64)>,
    blackout: (f64, f64),
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}
