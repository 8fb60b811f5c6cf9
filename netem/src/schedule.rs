//! Scheduled events in time passed in: the windows of a blackout schedule and the instants of
//! address changes, drawn lazily from their own seeded stream.
//!
//! Both directions of a path build their blackout schedule from the same seed and salt, so they
//! go dark together. Time must not go backwards between calls.

use std::time::Duration;

use crate::rng::Rng;
use crate::spec::{Events, Periodic};

const BLACKOUT_SALT: u64 = 0xB1AC;
const ADDRESS_SALT: u64 = 0xADD5;

/// A sequence of windows `[start, end)`: each starts a drawn `gap` after the previous one ended.
#[derive(Debug, Clone)]
pub struct Schedule {
    spec: Option<Periodic>,
    rng: Rng,
    current: Option<(Duration, Duration)>,
    drawn: u32,
}

impl Schedule {
    pub fn blackouts(events: &Events, seed: u64) -> Self {
        Self::new(events.blackouts, Rng::derived(seed, BLACKOUT_SALT))
    }

    pub fn address_changes(events: &Events, seed: u64) -> Self {
        Self::new(events.address_changes, Rng::derived(seed, ADDRESS_SALT))
    }

    fn new(spec: Option<Periodic>, rng: Rng) -> Self {
        let mut schedule = Self {
            spec,
            rng,
            current: None,
            drawn: 0,
        };
        schedule.current = schedule.draw(Duration::ZERO);
        schedule
    }

    fn draw(&mut self, after: Duration) -> Option<(Duration, Duration)> {
        let spec = self.spec?;
        if spec.count.is_some_and(|count| self.drawn >= count) {
            return None;
        }
        self.drawn += 1;
        let gap = self.span(spec.gap.min, spec.gap.max);
        let duration = spec
            .duration
            .map_or(Duration::ZERO, |d| self.span(d.min, d.max));
        let start = after + gap;
        Some((start, start + duration))
    }

    fn span(&mut self, min: Duration, max: Duration) -> Duration {
        Duration::from_secs_f64(self.rng.between(min.as_secs_f64(), max.as_secs_f64()))
    }

    /// Whether `now` falls inside a window (for blackouts).
    pub fn contains(&mut self, now: Duration) -> bool {
        while let Some((start, end)) = self.current {
            if now < end {
                return now >= start;
            }
            self.current = self.draw(end);
        }
        false
    }

    /// True once per window whose start has passed (for instantaneous events).
    pub fn poll(&mut self, now: Duration) -> bool {
        match self.current {
            Some((start, end)) if now >= start => {
                self.current = self.draw(end);
                true
            }
            _ => false,
        }
    }

    /// When the next window starts (or, inside one, when it ends).
    pub fn next_deadline(&self) -> Option<Duration> {
        self.current.map(|(start, _)| start)
    }

    /// The window in force or coming next.
    pub fn upcoming(&self) -> Option<(Duration, Duration)> {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Span;

    fn every(gap: &str, duration: Option<&str>, count: Option<u32>) -> Events {
        let periodic = Periodic {
            gap: gap.parse().unwrap(),
            duration: duration.map(|d| d.parse::<Span>().unwrap()),
            count,
        };
        Events {
            blackouts: Some(periodic),
            address_changes: Some(periodic),
        }
    }

    #[test]
    fn blackout_windows_follow_the_spans() {
        let events = every("10s..20s", Some("5s..30s"), None);
        let mut schedule = Schedule::blackouts(&events, 3);
        let mut t = Duration::ZERO;
        let mut dark = Duration::ZERO;
        let step = Duration::from_millis(100);
        let total = Duration::from_secs(3600);
        while t < total {
            if schedule.contains(t) {
                dark += step;
            }
            t += step;
        }
        // Mean gap 15 s, mean blackout 17.5 s: dark about 54 % of the time.
        let share = dark.as_secs_f64() / total.as_secs_f64();
        assert!((0.45..0.63).contains(&share), "{share}");
    }

    #[test]
    fn count_bounds_the_events_and_fixed_spans_are_exact() {
        let events = every("1s", Some("500ms"), Some(2));
        let mut blackouts = Schedule::blackouts(&events, 1);
        assert!(!blackouts.contains(Duration::from_millis(999)));
        assert!(blackouts.contains(Duration::from_millis(1000)));
        assert!(blackouts.contains(Duration::from_millis(1499)));
        assert!(!blackouts.contains(Duration::from_millis(1500)));
        assert!(blackouts.contains(Duration::from_millis(2600)));
        assert!(!blackouts.contains(Duration::from_secs(60)));
        let mut changes = Schedule::address_changes(&every("1s", None, Some(2)), 1);
        let fired: Vec<u64> = (0..100)
            .map(|i| i * 100)
            .filter(|&ms| changes.poll(Duration::from_millis(ms)))
            .collect();
        assert_eq!(fired, vec![1000, 2000]);
        assert_eq!(changes.next_deadline(), None);
    }
}
