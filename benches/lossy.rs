//! The lossy-link harness (issue #5): Petrel in-process, publishers and subscribers on
//! `petrel::client`, and the `netem` link emulator between them, over tcp, tls, QUIC with one
//! stream and QUIC with a stream per topic, across link profiles and QoS levels.
//!
//! ```text
//! cargo bench --bench lossy                 # the quick form (about 30 s), printed
//! cargo bench --bench lossy -- --full       # the whole matrix (about 16 min), printed
//! cargo bench --bench lossy -- --report     # the whole matrix, written to docs/lossy-links.md
//! NETEM_SEED=N cargo bench --bench lossy -- --report   # replays a run's links
//! cargo bench --bench lossy -- --only blackout         # one group of the full run, printed
//! LOSSY_FIXED_WINDOWS=1 cargo bench --bench lossy -- --only matrix   # MQTT windows fixed
//!                                           # at 128 out / 100 in, as before they adapted
//! PETREL_LOSSY_TIMELINE=1 cargo bench --bench lossy -- --only blackout  # + each client's
//!                                     # connection events around each blackout, the backlog's
//!                                     # arrivals and the publisher's completions per 100 ms
//! PETREL_LOSSY_TIMELINE=1 cargo bench --features internals --bench lossy -- --only blackout
//!                                     # + the broker's view of each client every 20 ms
//!                                     # (window, in flight, RTT, congestion window)
//! PETREL_LOSSY_TRACE=petrel::client=debug ...  # tracing on stderr (each connect attempt),
//!                                     # stamped in µs of Unix time like the timeline's end
//! LOSSY_PROFILE=3g cargo bench --bench lossy -- --only matrix  # one profile's cases only
//! LOSSY_MATRIX_QUIC_CC=cubic cargo bench --bench lossy -- --only matrix  # the matrix's QUIC
//!                                     # rows with another controller than the default
//! LOSSY_MATRIX_PHASES=2 cargo bench --bench lossy -- --only matrix  # the matrix's phases by
//!                                     # index (0-2: QoS 0-2 paced, 3: saturation), e.g. to
//!                                     # read the link's packet and byte counts of one
//! ```
//!
//! Packet-mode rows (every TCP and TLS row, and the QUIC rows that share their path) need root;
//! without it they are skipped with the reason printed. The client half of a packet-mode run is
//! this program again with `--client-role` inside the link's namespace (see `path`).
//!
//! - `clients`: the client half (publisher, subscriber, probes; counting every message).
//! - `path`: broker, link and where the client half runs.
//! - `analysis`: percentiles, head-of-line spread, goodput, connect times, recovery.
//! - `plan`: which runs make up the quick form and the full report.
//! - `report`: Markdown tables and SVG charts.

#[path = "lossy/analysis.rs"]
mod analysis;
#[path = "lossy/clients.rs"]
mod clients;
#[path = "lossy/path.rs"]
mod path;
#[path = "lossy/plan.rs"]
mod plan;
#[path = "lossy/report.rs"]
mod report;

use std::time::Instant;

use anyhow::Context as _;

use plan::{Case, CaseResult, Mode};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--client-role") {
        return clients::child_main();
    }
    let mode = if args.iter().any(|a| a == "--report") {
        Mode::Report
    } else if args.iter().any(|a| a == "--full") {
        Mode::Full
    } else {
        Mode::Quick
    };
    // `--only GROUP`: the full run's cases of one group, printed (a figure to look at while
    // working; the report always runs everything).
    let only = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(plan::Group::parse(args.get(i + 1).map(String::as_str))?),
        None => None,
    };
    if let Some(unknown) = args.iter().enumerate().find_map(|(i, a)| {
        let value_of_only = i > 0 && args[i - 1] == "--only";
        (!value_of_only
            && !matches!(
                a.as_str(),
                "--report" | "--full" | "--quick" | "--bench" | "--only"
            ))
        .then_some(a)
    }) {
        anyhow::bail!(
            "unknown argument {unknown:?}: use --quick (default), --full, --report or --only GROUP"
        );
    }
    if only.is_some() && mode == Mode::Report {
        anyhow::bail!("--only runs part of the matrix: it cannot write the report");
    }
    let mode = if only.is_some() { Mode::Full } else { mode };
    let seed = netem::seed::from_env_or_random();
    clients::trace_from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(mode, only, seed))
}

async fn run(mode: Mode, only: Option<plan::Group>, seed: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let packet_unavailable = path::packet_unavailable();
    if let Some(why) = &packet_unavailable {
        eprintln!(
            "lossy: skipping every packet-mode row (TCP, TLS, QUIC on the packet link): {why}"
        );
    }
    let child = path::ChildCommand::this_program(&["--client-role"])?;
    let mut cases = plan::cases(mode, seed);
    if let Some(group) = only {
        cases.retain(|case| case.group == group);
    }
    if let Some(name) = std::env::var_os("LOSSY_PROFILE") {
        if mode == Mode::Report {
            anyhow::bail!("LOSSY_PROFILE runs part of the matrix: it cannot write the report");
        }
        cases.retain(|case| std::ffi::OsStr::new(case.setup.profile.name.as_str()) == name);
        anyhow::ensure!(!cases.is_empty(), "no case runs on the profile {name:?}");
    }
    let total = cases.len();
    let mut results = Vec::with_capacity(total);
    for (i, case) in cases.into_iter().enumerate() {
        if case.setup.via == path::Via::Packet {
            if let Some(why) = &packet_unavailable {
                results.push(CaseResult::skipped(case, why.clone()));
                continue;
            }
        }
        eprintln!(
            "lossy: [{}/{total}] {:>5.0} s  {}",
            i + 1,
            started.elapsed().as_secs_f64(),
            case.title()
        );
        let result = run_case(case, &child).await;
        if let Some(outcome) = result.outcome() {
            // The link's own count, both directions (bytes as the senders put them on it).
            let (up, down) = (&outcome.up, &outcome.down);
            eprintln!(
                "lossy:        link up {} packets {} B, down {} packets {} B",
                up.sent, up.sent_bytes, down.sent, down.sent_bytes
            );
        }
        results.push(result);
    }
    let elapsed = started.elapsed();
    let failures: Vec<String> = results.iter().flat_map(CaseResult::failures).collect();
    let report = report::Report::new(mode, seed, elapsed, &results);
    match mode {
        Mode::Report => {
            let written = report.write(std::path::Path::new(env!("CARGO_MANIFEST_DIR")))?;
            for file in written {
                eprintln!("lossy: wrote {}", file.display());
            }
        }
        Mode::Quick | Mode::Full => println!("{}", report.tables()),
    }
    eprintln!(
        "lossy: {} runs in {:.0} s (seed {seed}; replay with NETEM_SEED={seed})",
        results.len(),
        elapsed.as_secs_f64()
    );
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("lossy: FAILED {f}");
        }
        anyhow::bail!(
            "{} delivery guarantees failed (seed {seed}; replay with NETEM_SEED={seed})",
            failures.len()
        );
    }
    Ok(())
}

async fn run_case(case: Case, child: &path::ChildCommand) -> CaseResult {
    let outcome = path::run(&case.setup, case.spec.clone(), child)
        .await
        .context("run failed");
    let result = CaseResult::new(case, outcome);
    if std::env::var_os("PETREL_LOSSY_TIMELINE").is_some() {
        print_timeline(&result);
    }
    result
}

/// Where the time goes across each blackout of a run: every connection event of both clients
/// (connected, disconnected with the reason, reconnecting), the first delivery after the
/// blackout and when the backlog cleared, in ms from the end of the blackout (negative: in it).
fn print_timeline(result: &CaseResult) {
    let Some(outcome) = result.outcome() else {
        return;
    };
    for (phase, (start, end), recovery) in &result.recoveries {
        let rel = |us: u64| (us as f64 - *end as f64) / 1000.0;
        eprintln!(
            "timeline {}: dark {:.0}..0 ms (the end at {} µs Unix time)",
            result.case.title(),
            rel(*start),
            outcome.report.started_unix_us + end
        );
        for e in &outcome.report.events {
            eprintln!("  {:>9.0} ms  {:<4} {}", rel(e.at_us), e.who, e.what);
        }
        eprintln!(
            "  first delivery after {:?} ms, caught up after {:?} ms",
            recovery.first_delivery_ms, recovery.backlog_cleared_ms
        );
        // The backlog (sent before the end) as it arrived, per 100 ms from the end.
        if let Some(p) = outcome.report.phases.get(*phase) {
            let arrivals: Vec<u64> = p
                .deliveries
                .iter()
                .filter(|d| d[2] < *end && d[2] + d[3] >= *end)
                .map(|d| (d[2] + d[3] - end) / 100_000)
                .collect();
            let bins = arrivals.iter().max().map_or(0, |m| m + 1);
            let mut counts = vec![0u64; bins as usize];
            for a in arrivals {
                counts[a as usize] += 1;
            }
            eprintln!("  backlog arrivals per 100 ms from the end: {counts:?}");
            // The publisher's side: PUBACK (QoS 1) or PUBCOMP (QoS 2) per 100 ms.
            let mut acks = vec![0u64; bins as usize + 5];
            for &at in p.acked_us.iter().filter(|&&at| at >= *end) {
                let bin = ((at - end) / 100_000) as usize;
                if let Some(slot) = acks.get_mut(bin) {
                    *slot += 1;
                }
            }
            eprintln!("  publisher completions per 100 ms from the end: {acks:?}");
            // The broker's view, every 100 ms from 100 ms before the end until caught up.
            let unix_end = outcome.report.started_unix_us + end;
            let until = recovery.backlog_cleared_ms.unwrap_or(3000.0) + 200.0;
            let mut next = -100.0;
            for s in &outcome.samples {
                let at = (s.at_us as f64 - unix_end as f64) / 1000.0;
                if at < next - 10.0 || at > until {
                    continue;
                }
                if s.client_id.starts_with("sub") || at >= next {
                    eprintln!(
                        "  {at:>6.0} ms broker {:<3} conn {} in {} sent {} inflight {}/{} rtt {:.0} ms cwnd {} B lost {}",
                        &s.client_id[..3],
                        s.conn_id,
                        s.received,
                        s.sent,
                        s.inflight,
                        s.window,
                        s.rtt_us as f64 / 1000.0,
                        s.cwnd,
                        s.lost_packets
                    );
                }
                if s.client_id.starts_with("sub") && at >= next {
                    next += 100.0;
                }
            }
        }
    }
}
