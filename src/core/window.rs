//! The outbound in-flight window of one connection, sized to the path it measures.
//!
//! How many QoS 1/2 deliveries may await their acknowledgement at once. A fixed window caps a
//! flow at `window / hold` messages per second, where `hold` is how long a packet id stays
//! taken (one round trip for QoS 1, PUBLISH to PUBACK; two for QoS 2, PUBLISH to PUBCOMP):
//! on a 560 ms satellite path 128 ids carry at most 114 QoS 2 messages a second. This window
//! starts at `mqtt.min_inflight` and moves between it and `mqtt.max_inflight` (and never past
//! the client's Receive Maximum), from what the channel itself observes, so it works alike on
//! every transport:
//!
//! - **hold**: one delivery at a time is timed from its PUBLISH to the acknowledgement that
//!   frees its id, and smoothed (7/8 old, 1/8 new, as TCP's SRTT);
//! - **rate**: acknowledgements per second, counted over an epoch of one `hold`;
//! - **grow**: while the window was full at some point of the current epoch (the shell had
//!   more to send than it allowed), each acknowledging packet adds one (PUBACK; PUBREC and
//!   PUBCOMP): the window doubles per round trip for QoS 1 (as TCP's slow start) and triples
//!   per two for QoS 2, for as long as the demand fills it;
//! - **shrink**: an epoch in which it never filled ends with the window brought down to
//!   `HEADROOM` times the ids the flow needed (`rate * hold`, Little's law: the bandwidth-delay
//!   product in messages), never below the minimum.
//!
//! Nothing here touches a message: a smaller window only holds deliveries back in the session's
//! queue (bounded by `session.max_queued` and `broker.max_queued_bytes`) until acknowledgements
//! make room; ids stay with their messages until those complete. Time is passed in.

use std::time::{Duration, Instant};

use crate::codec::PacketId;

/// The window left after an epoch that did not fill it, as a multiple of the ids in use.
pub const HEADROOM: u32 = 2;

/// An epoch is at least this long, so a loopback client (µs round trips) does not recompute
/// the window on every acknowledgement.
const MIN_EPOCH: Duration = Duration::from_millis(10);

/// The adaptive window (see the module docs).
#[derive(Debug, Clone)]
pub struct Window {
    size: u16,
    min: u16,
    max: u16,
    /// The delivery being timed: its id and when it went out.
    probe: Option<(PacketId, Instant)>,
    /// Smoothed time from PUBLISH to the acknowledgement that frees the id.
    hold: Option<Duration>,
    epoch_start: Instant,
    epoch_acks: u32,
    /// The window was full at some point of this epoch.
    filled: bool,
}

impl Window {
    /// A window between `min` and `max` (`min` raised to 1, lowered to `max`), starting at
    /// `min`.
    pub fn new(min: u16, max: u16, now: Instant) -> Self {
        let max = max.max(1);
        let min = min.clamp(1, max);
        Self {
            size: min,
            min,
            max,
            probe: None,
            hold: None,
            epoch_start: now,
            epoch_acks: 0,
            filled: false,
        }
    }

    /// How many deliveries may be in flight now.
    pub fn size(&self) -> usize {
        usize::from(self.size)
    }

    /// A QoS 1/2 delivery went out under `id` at `now`; `inflight` counts it. Times it when no
    /// other is being timed, and notes a window that is now full.
    pub fn on_sent(&mut self, now: Instant, id: PacketId, inflight: usize) {
        if self.probe.is_none() {
            self.probe = Some((id, now));
        }
        if inflight >= self.size() {
            self.filled = true;
        }
    }

    /// The delivery under `id` completed at `now` (PUBACK, or PUBCOMP for QoS 2).
    pub fn on_completed(&mut self, now: Instant, id: PacketId) {
        if let Some((probe, sent)) = self.probe {
            if probe == id {
                self.probe = None;
                let sample = now.saturating_duration_since(sent);
                self.hold = Some(match self.hold {
                    None => sample,
                    Some(hold) => (hold * 7 + sample) / 8,
                });
            }
        }
        self.epoch_acks = self.epoch_acks.saturating_add(1);
        self.on_round_trip();
        let Some(hold) = self.hold else { return };
        let elapsed = now.saturating_duration_since(self.epoch_start);
        if elapsed < hold.max(MIN_EPOCH) {
            return;
        }
        if !self.filled {
            // Little's law: ids in use = acknowledgements per second * seconds each is held.
            let needed = f64::from(self.epoch_acks) * hold.as_secs_f64() / elapsed.as_secs_f64();
            let target = (needed * f64::from(HEADROOM)).ceil();
            if target < f64::from(self.size) {
                // `target` is below `size`, a u16: the cast cannot truncate.
                self.size = (target as u16).max(self.min);
            }
        }
        self.epoch_start = now;
        self.epoch_acks = 0;
        self.filled = false;
    }

    /// A round trip ended: PUBREC for a QoS 2 delivery (its PUBCOMP ends the second, in
    /// `on_completed`). Grows a window that filled in this epoch.
    pub fn on_round_trip(&mut self) {
        if self.filled {
            self.size = self.size.saturating_add(1).min(self.max);
        }
    }

    /// The id being timed was given up (its message abandoned): a later message under the
    /// same id must not be timed from this one's send.
    pub fn forget(&mut self, id: PacketId) {
        if self.probe.is_some_and(|(probe, _)| probe == id) {
            self.probe = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender in virtual time: messages arrive into a backlog, go out while the window
    /// allows, and are acknowledged `hold` after they went out.
    struct Sim {
        window: Window,
        now: Instant,
        next_id: u16,
        /// Ids in flight with when they complete.
        in_flight: Vec<(PacketId, Instant)>,
        backlog: usize,
    }

    impl Sim {
        fn new(min: u16, max: u16) -> Self {
            #[allow(clippy::disallowed_methods)] // a starting instant; time is virtual after
            let now = Instant::now();
            Self {
                window: Window::new(min, max, now),
                now,
                next_id: 1,
                in_flight: Vec::new(),
                backlog: 0,
            }
        }

        /// Advances by `tick`: `arrivals` new messages, acknowledgements due, then sends while
        /// the window allows.
        fn step(&mut self, tick: Duration, arrivals: usize, hold: Duration) {
            self.now += tick;
            self.backlog += arrivals;
            let now = self.now;
            let (done, pending): (Vec<_>, Vec<_>) =
                self.in_flight.drain(..).partition(|&(_, at)| at <= now);
            self.in_flight = pending;
            for (id, _) in done {
                self.window.on_completed(now, id);
            }
            while self.backlog > 0 && self.in_flight.len() < self.window.size() {
                let id = PacketId(self.next_id);
                self.next_id = self.next_id.wrapping_add(1).max(1);
                self.in_flight.push((id, now + hold));
                self.window.on_sent(now, id, self.in_flight.len());
                self.backlog -= 1;
            }
        }
    }

    const TICK: Duration = Duration::from_millis(5);

    #[test]
    fn grows_to_the_bandwidth_delay_product_of_a_long_path() {
        // 200 msg/s (one per 5 ms) over a 1.12 s hold (QoS 2 on a 560 ms path) needs 224 ids.
        let mut sim = Sim::new(32, 1024);
        let hold = Duration::from_millis(1120);
        for _ in 0..2000 {
            sim.step(TICK, 1, hold);
            assert!(sim.window.size() <= 1024 && sim.window.size() >= 32);
        }
        let size = sim.window.size();
        assert!(size >= 224, "the window covers the path: {size}");
        assert!(
            sim.backlog <= 1,
            "nothing waits once it does: {}",
            sim.backlog
        );
        assert!(size <= 2 * 224 + 64, "and stays near twice it: {size}");
    }

    #[test]
    fn never_exceeds_its_maximum_nor_falls_below_its_minimum() {
        let mut sim = Sim::new(16, 100);
        let hold = Duration::from_millis(2000);
        for _ in 0..4000 {
            sim.step(TICK, 3, hold);
            assert!(sim.window.size() <= 100);
            assert!(sim.in_flight.len() <= 100);
        }
        assert_eq!(
            sim.window.size(),
            100,
            "a demand past the maximum holds it there"
        );
        // Then a trickle on a short path: back down, to the minimum and not below.
        for i in 0..4000 {
            sim.step(TICK, usize::from(i % 20 == 0), TICK);
            assert!(sim.window.size() >= 16);
        }
        assert_eq!(
            sim.window.size(),
            16,
            "an idle-ish flow shrinks to the minimum"
        );
    }

    #[test]
    fn a_short_path_keeps_the_minimum() {
        // 200 msg/s over 1 ms: the minimum is plenty and the window never grows.
        let mut sim = Sim::new(32, 1024);
        for _ in 0..2000 {
            sim.step(TICK, 1, Duration::from_millis(1));
        }
        assert_eq!(sim.window.size(), 32);
        assert_eq!(
            sim.window.hold,
            Some(TICK),
            "acks are seen on the next tick"
        );
    }

    #[test]
    fn bounds_are_normalised() {
        #[allow(clippy::disallowed_methods)]
        let now = Instant::now();
        assert_eq!(Window::new(0, 10, now).size(), 1);
        assert_eq!(Window::new(50, 10, now).size(), 10);
        assert_eq!(Window::new(5, 0, now).size(), 1);
    }
}
