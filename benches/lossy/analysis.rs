//! From what the client half saw to the report's figures: latency percentiles (HdrHistogram),
//! delivery counts, head-of-line spread, goodput, connect times and blackout recovery.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::clients::{ClientReport, Load, PhaseReport};

/// A message counts as held up when it arrives this much later than the fastest one.
const STALL_US: u64 = 20_000;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub n: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(values_us: impl IntoIterator<Item = u64>) -> Option<Self> {
        let mut h =
            Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        for v in values_us {
            h.saturating_record(v.max(1));
        }
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        (!h.is_empty()).then(|| Self {
            n: h.len(),
            p50: ms(0.50),
            p95: ms(0.95),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        })
    }
}

/// One phase, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    pub qos: u8,
    pub saturating: bool,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub publish_errors: u64,
    pub latency: Option<Latency>,
    /// The worst topic's p99 and the best topic's (ms).
    pub topic_p99_range: Option<(f64, f64)>,
    /// See [`cross_topic_delay`] (ms).
    pub cross_topic_ms: Option<f64>,
    /// Distinct deliveries per second of publishing.
    pub goodput: f64,
}

impl PhaseSummary {
    pub fn of(phase: &PhaseReport) -> Self {
        let latency = Latency::of(phase.deliveries.iter().map(|d| d[3]));
        let topics = phase.sent.len();
        let per_topic: Vec<f64> = (0..topics as u64)
            .filter_map(|t| {
                Latency::of(phase.deliveries.iter().filter(|d| d[0] == t).map(|d| d[3]))
            })
            .map(|l| l.p99)
            .collect();
        let seconds = (phase.end_us.saturating_sub(phase.start_us)) as f64 / 1e6;
        Self {
            qos: phase.phase.qos,
            saturating: matches!(
                phase.phase.load,
                Load::Saturate { .. } | Load::Closed { .. }
            ),
            expected: phase.expected(),
            delivered: phase.deliveries.len() as u64,
            lost: phase.lost(),
            duplicates: phase.duplicates,
            reordered: phase.reordered,
            publish_errors: phase.publish_errors,
            latency,
            topic_p99_range: per_topic
                .iter()
                .copied()
                .fold(None, |acc: Option<(f64, f64)>, p| {
                    Some(acc.map_or((p, p), |(lo, hi)| (lo.min(p), hi.max(p))))
                }),
            cross_topic_ms: cross_topic_delay(&phase.deliveries),
            // What arrived while the publisher was saturating: messages still queued in the
            // client when the phase ended (the deeper its window, the more) do not count.
            goodput: if seconds > 0.0 {
                phase
                    .deliveries
                    .iter()
                    .filter(|d| d[2] + d[3] <= phase.end_us)
                    .count() as f64
                    / seconds
            } else {
                0.0
            },
        }
    }

    pub fn loss_ratio(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost as f64 / self.expected as f64
        }
    }
}

/// How much a loss on one topic delays the others: for every message held up (arriving more
/// than `STALL_US` later than the fastest message of the phase) right after one that was not
/// (in send order: the message a lost packet carried, as near as the data tells), the mean
/// extra delay (over that fastest message) of the *other* topics' messages sent while it was
/// held up. On one ordered byte stream they wait behind the same hole; on independent
/// per-topic streams they should not wait at all. In ms; `None` without a held-up message.
pub fn cross_topic_delay(deliveries: &[[u64; 4]]) -> Option<f64> {
    let floor = deliveries.iter().map(|d| d[3]).min()?;
    let mut by_sent: Vec<&[u64; 4]> = deliveries.iter().collect();
    by_sent.sort_by_key(|d| d[2]);
    let held = |d: &[u64; 4]| d[3] > floor + STALL_US;
    let (mut total, mut n) = (0u64, 0u64);
    for (i, origin) in by_sent.iter().enumerate() {
        if !held(origin) || (i > 0 && held(by_sent[i - 1])) {
            continue;
        }
        let until = origin[2] + origin[3];
        for other in by_sent[i + 1..].iter().take_while(|d| d[2] < until) {
            if other[0] != origin[0] {
                total += other[3] - floor;
                n += 1;
            }
        }
    }
    (n > 0).then(|| total as f64 / n as f64 / 1000.0)
}

/// Blackout recovery in one phase, the window given in the client half's time (µs).
#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    /// From the end of the blackout to the first message delivered after it (ms).
    pub first_delivery_ms: Option<f64>,
    /// From the end of the blackout until everything sent before its end had arrived (ms).
    pub backlog_cleared_ms: Option<f64>,
    /// Deliveries per bin of `BIN_MS`, by arrival time from the phase start: (seconds, count).
    pub delivered_over_time: Vec<(f64, u64)>,
}

pub const BIN_MS: u64 = 250;

pub fn recovery(phase: &PhaseReport, blackout: (u64, u64)) -> Recovery {
    let (_, end) = blackout;
    let arrival = |d: &[u64; 4]| d[2] + d[3];
    let first = phase
        .deliveries
        .iter()
        .map(arrival)
        .filter(|&a| a >= end)
        .min();
    let all_before_arrived = phase.lost() == 0;
    let backlog = phase
        .deliveries
        .iter()
        .filter(|d| d[2] < end)
        .map(arrival)
        .max();
    let mut bins: std::collections::BTreeMap<u64, u64> = Default::default();
    for d in &phase.deliveries {
        *bins
            .entry(arrival(d).saturating_sub(phase.start_us) / (BIN_MS * 1000))
            .or_default() += 1;
    }
    let last = bins.keys().next_back().copied().unwrap_or(0);
    let delivered_over_time = (0..=last)
        .map(|b| {
            (
                (b * BIN_MS) as f64 / 1000.0,
                bins.get(&b).copied().unwrap_or(0),
            )
        })
        .collect();
    let after = |t: u64| t.saturating_sub(end) as f64 / 1000.0;
    Recovery {
        first_delivery_ms: first.map(after),
        backlog_cleared_ms: backlog.filter(|_| all_before_arrived).map(after),
        delivered_over_time,
    }
}

/// Median of samples (ms), if any.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| {
        let mid = v.len() / 2;
        if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        }
    })
}

/// Connect times of a run: medians of cold connects and of resumptions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConnectTimes {
    pub cold_ms: Option<f64>,
    pub warm_ms: Option<f64>,
    pub warm_samples: usize,
    pub zero_rtt: u32,
}

impl ConnectTimes {
    pub fn of(report: &ClientReport) -> Self {
        Self {
            cold_ms: median(&report.cold_connect_ms),
            warm_ms: median(&report.warm_connect_ms),
            warm_samples: report.warm_connect_ms.len(),
            zero_rtt: report.warm_zero_rtt,
        }
    }
}
