//! The reconnect race, sans-IO: when the driver starts a connect attempt during an outage,
//! and which unanswered attempt it gives up to make room. Time and randomness are passed in;
//! the driver owns the attempts themselves (futures) and reports how each ended.
//!
//! Why attempts overlap: a connect attempt that starts while the link is dark loses its first
//! packet, and the transport then waits out its own retransmission backoff (Linux resends a
//! SYN after 1, 3, 7 s; a QUIC Initial is probed after about 1, 3, 7 s with quinn's 333 ms
//! initial RTT). Waiting for such an attempt to time out before starting the next one leaves
//! the client silent for seconds after the link returns. Instead, a fresh attempt starts every
//! [`Overlap::interval`] (jittered) while the older ones are still pending, so one sends its
//! first packet soon after the link returns; the first to get its CONNACK wins and the others
//! are dropped. At most [`Overlap::max_pending`] attempts are pending: beyond that the oldest
//! is dropped, but never before it has had the time the last successful connect took
//! ([`Race::keep_for`]): on a path whose round trip is longer than a few gaps (a satellite's
//! 0.6 s), dropping sooner would drop every attempt before the server could answer it. Once an attempt has heard from the server (`answered`: a TCP connection, a QUIC
//! packet), it goes on alone: the silent ones are dropped and none starts until it ends, so
//! that one CONNECT, not several, reaches the server (each would take the session over).
//!
//! Between starts the race looks at the pending attempts every [`ANSWER_CHECK`], so that an
//! answered attempt has the others dropped before they can be answered too: two attempts
//! whose first packets both went out after the link returned would otherwise each send a
//! CONNECT, and the second would take the session over from the first. With gaps at least
//! `ANSWER_CHECK` apart, no two attempts are answered within one check.
//!
//! The gap is the cost of noticing the link's return: the first packet that goes out after it
//! leaves on average half a gap later (its first SYN or QUIC Initial), so the default keeps it
//! at 0.1–0.2 s, a few dozen bytes per attempt (a QUIC Initial: 1,200) while a round lasts.
//!
//! A round lasts at most the connect timeout: attempts start during it, none after. When the
//! round ends without a connection (or the server refused), the driver waits its
//! [`Backoff`](super::Backoff) delay and starts a new round, so a long outage costs one
//! round per backoff delay, which grows to the backoff's cap.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often the race looks for an answered attempt while several are pending.
pub const ANSWER_CHECK: Duration = Duration::from_millis(10);

/// How connect attempts overlap during an outage (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overlap {
    /// A new attempt starts this long after the previous one while none has connected,
    /// shortened by a random factor in `[1 - jitter, 1]`.
    pub interval: Duration,
    /// Attempts pending at once (at least 1; 1 turns overlapping off).
    pub max_pending: usize,
    /// 0.0 (none) ..= 1.0
    pub jitter: f64,
}

impl Default for Overlap {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(200),
            max_pending: 3,
            jitter: 0.5,
        }
    }
}

impl Overlap {
    /// The time from one attempt's start to the next's, given a random `unit` in `[0, 1)`.
    pub fn gap(&self, unit: f64) -> Duration {
        let jitter = self.jitter.clamp(0.0, 1.0);
        self.interval
            .mul_f64(1.0 - jitter * unit.clamp(0.0, 1.0))
            .max(Duration::from_millis(1))
    }
}

/// Names one attempt of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttemptId(pub u64);

/// What the driver should do now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Attempts to drop (each an unanswered one, to make room).
    pub drop: Vec<AttemptId>,
    /// Start this attempt.
    pub start: Option<AttemptId>,
}

/// One round of overlapping attempts.
#[derive(Debug)]
pub struct Race {
    overlap: Overlap,
    /// No attempt starts at or after this instant.
    closes: Instant,
    /// When the next attempt is due.
    next: Instant,
    /// The pending attempts and their starts, oldest first.
    pending: VecDeque<(AttemptId, Instant)>,
    /// An unanswered attempt is not dropped to make room before it is this old.
    keep_for: Duration,
    /// The cap held every pending attempt (all answered): the next may start when one ends.
    full: bool,
    next_id: u64,
    started: u64,
}

impl Race {
    /// A round that starts its first attempt at `now` and no attempt after `now + budget`.
    pub fn new(now: Instant, overlap: Overlap, budget: Duration) -> Self {
        Self {
            overlap,
            closes: now + budget,
            next: now,
            pending: VecDeque::new(),
            keep_for: Duration::ZERO,
            full: false,
            next_id: 0,
            started: 0,
        }
    }

    /// An attempt is not dropped to make room before it is `age` old: the time a connect on
    /// this path takes (the last successful one's, attempt start to CONNACK), so that the
    /// server has had the time to answer it. Zero (the default): the oldest goes whenever
    /// room is needed.
    pub fn keep_for(mut self, age: Duration) -> Self {
        self.keep_for = age;
        self
    }

    /// Attempts started so far in this round.
    #[cfg(test)]
    pub fn started(&self) -> u64 {
        self.started
    }

    /// The attempts still pending, oldest first.
    #[cfg(test)]
    pub fn pending(&self) -> impl Iterator<Item = AttemptId> + '_ {
        self.pending.iter().map(|&(id, _)| id)
    }

    /// What is due at `now`; `unit` is a random number in `[0, 1)` for the next gap, and
    /// `answered` tells whether an attempt has heard from the server.
    pub fn poll(&mut self, now: Instant, unit: f64, answered: impl Fn(AttemptId) -> bool) -> Step {
        let mut step = Step::default();
        if self.pending.iter().any(|&(id, _)| answered(id)) {
            // The server is reachable: the answered attempt goes on alone (a second CONNECT
            // would take the session over from the first), and the silent ones are pointless.
            // Looked at on every poll, not only when an attempt is due (see `ANSWER_CHECK`).
            let (keep, drop): (VecDeque<_>, VecDeque<_>) =
                self.pending.iter().partition(|&&(id, _)| answered(id));
            self.pending = keep;
            step.drop.extend(drop.into_iter().map(|(id, _)| id));
            self.next = now + self.overlap.gap(unit);
            self.full = true;
            return step;
        }
        if now < self.next || now >= self.closes {
            return step;
        }
        if self.pending.len() >= self.overlap.max_pending.max(1) {
            // Make room: the oldest attempt heard nothing (none did, see above), but it may
            // still be on its way: not before it had the time a connect takes here.
            if let Some(&(id, started)) = self.pending.front() {
                let droppable = started + self.keep_for;
                if now < droppable {
                    self.next = droppable;
                    return step;
                }
                self.pending.pop_front();
                step.drop.push(id);
            }
        }
        let id = AttemptId(self.next_id);
        self.next_id += 1;
        self.started += 1;
        self.pending.push_back((id, now));
        self.next = now + self.overlap.gap(unit);
        step.start = Some(id);
        step
    }

    /// An attempt ended at `now` (failed or timed out); a connected one ends the round
    /// instead. When the cap was holding the next attempt back, it may start at once.
    pub fn ended(&mut self, now: Instant, id: AttemptId) {
        self.pending.retain(|&(p, _)| p != id);
        if std::mem::take(&mut self.full) {
            self.next = self.next.min(now);
        }
    }

    /// When `poll` has something to do next, if attempts may still start: the next start,
    /// or sooner, every [`ANSWER_CHECK`] from `now`, while more than one attempt is pending
    /// (one answered attempt must have the others dropped before they are answered too).
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        let start = (self.next < self.closes).then_some(self.next);
        if self.pending.len() > 1 {
            let check = now + ANSWER_CHECK;
            return Some(start.map_or(check, |start| start.min(check)));
        }
        start
    }

    /// The round is over: nothing pending and no attempt may start any more.
    pub fn over(&self, now: Instant) -> bool {
        self.pending.is_empty() && (now >= self.closes || self.next >= self.closes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn overlap(interval_ms: u64, max_pending: usize, jitter: f64) -> Overlap {
        Overlap {
            interval: ms(interval_ms),
            max_pending,
            jitter,
        }
    }

    /// Runs a race over a dark link (no attempt ever answers or ends) and returns the start
    /// times (ms from the round's start) and drops seen, stepping to each deadline.
    fn dark(race: &mut Race, t0: Instant, units: &mut impl FnMut() -> f64) -> (Vec<u64>, u64) {
        let (mut starts, mut drops) = (Vec::new(), 0);
        let mut now = t0;
        // Bounded: a round closes after its budget.
        for _ in 0..10_000 {
            let step = race.poll(now, units(), |_| false);
            drops += step.drop.len() as u64;
            if step.start.is_some() {
                starts.push((now - t0).as_millis() as u64);
            }
            assert!(race.pending().count() <= 3.max(race.overlap.max_pending));
            match race.deadline(now) {
                Some(next) if next < race.closes => now = next,
                _ => return (starts, drops),
            }
        }
        panic!("the race never closed");
    }

    #[test]
    fn over_a_dark_link_a_fresh_attempt_starts_every_interval_until_the_budget_is_spent() {
        let t0 = Instant::now();
        let mut race = Race::new(t0, overlap(400, 3, 0.0), ms(2000));
        let (starts, drops) = dark(&mut race, t0, &mut || 0.5);
        assert_eq!(starts, vec![0, 400, 800, 1200, 1600]);
        // Three pending at most: the 4th and 5th starts each dropped the oldest silent one.
        assert_eq!(drops, 2);
        assert_eq!(race.pending().count(), 3);
        assert!(!race.over(t0 + ms(2000)), "attempts are still pending");
        for id in race.pending().collect::<Vec<_>>() {
            race.ended(t0 + ms(2000), id);
        }
        assert!(race.over(t0 + ms(2000)));
    }

    #[test]
    fn jitter_keeps_every_gap_within_its_range() {
        let seed = 0x5eed_u64;
        println!("seed {seed}");
        let mut x = seed;
        let mut units = move || {
            // xorshift64*: a reproducible unit in [0, 1).
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        let t0 = Instant::now();
        let mut race = Race::new(t0, overlap(400, 3, 0.5), ms(60_000));
        let (starts, _) = dark(&mut race, t0, &mut units);
        assert!(starts.len() > 100);
        for pair in starts.windows(2) {
            let gap = pair[1] - pair[0];
            assert!((200..=400).contains(&gap), "gap {gap} ms out of [200, 400]");
        }
        let (lo, hi) = (
            starts.windows(2).map(|p| p[1] - p[0]).min().unwrap(),
            starts.windows(2).map(|p| p[1] - p[0]).max().unwrap(),
        );
        assert!(hi - lo > 100, "the jitter spreads the gaps ({lo}..{hi} ms)");
    }

    #[test]
    fn an_answered_attempt_goes_on_alone() {
        let t0 = Instant::now();
        let mut race = Race::new(t0, overlap(100, 3, 0.0), ms(10_000));
        let a = race.poll(t0, 0.0, |_| false).start.unwrap();
        let b = race.poll(t0 + ms(100), 0.0, |_| false).start.unwrap();
        let c = race.poll(t0 + ms(200), 0.0, |_| false).start.unwrap();
        // `b` heard from the server (TCP connected, say): `a` and `c` are dropped, and no
        // new attempt starts while `b` is pending.
        let step = race.poll(t0 + ms(300), 0.0, |id| id == b);
        assert_eq!(step.drop, vec![a, c]);
        assert_eq!(step.start, None);
        assert_eq!(race.pending().collect::<Vec<_>>(), vec![b]);
        for at in [400, 500, 5000] {
            assert_eq!(race.poll(t0 + ms(at), 0.0, |_| true), Step::default());
        }
        // `b` failed after all: the next attempt starts at once.
        race.ended(t0 + ms(5050), b);
        assert!(race.poll(t0 + ms(5050), 0.0, |_| false).start.is_some());
    }

    #[test]
    fn an_attempt_answered_between_starts_has_the_others_dropped_at_the_next_check() {
        let t0 = Instant::now();
        let mut race = Race::new(t0, overlap(100, 3, 0.0), ms(10_000));
        let a = race.poll(t0, 0.0, |_| false).start.unwrap();
        // One pending: nothing to check, the next start is the deadline.
        assert_eq!(race.deadline(t0), Some(t0 + ms(100)));
        let b = race.poll(t0 + ms(100), 0.0, |_| false).start.unwrap();
        // Two pending: the race looks again within ANSWER_CHECK, long before the next start.
        let check = race.deadline(t0 + ms(120)).unwrap();
        assert!(check <= t0 + ms(120) + ANSWER_CHECK && check < t0 + ms(200));
        // Nothing answered yet at a check: nothing to do.
        assert_eq!(race.poll(t0 + ms(125), 0.0, |_| false), Step::default());
        // `a` was answered (say its SYN's retransmission got through) before `b`'s start was
        // due: `b` is dropped now, before it can be answered and send a second CONNECT.
        let step = race.poll(check, 0.0, |id| id == a);
        assert_eq!(step.drop, vec![b]);
        assert_eq!(step.start, None);
        assert_eq!(race.pending().collect::<Vec<_>>(), vec![a]);
        // Alone and answered: no start and no further checks until it ends.
        assert_eq!(race.poll(t0 + ms(200), 0.0, |_| true), Step::default());
        assert!(race.deadline(t0 + ms(200)).unwrap() > t0 + ms(200));
    }

    #[test]
    fn the_default_overlap_starts_an_attempt_every_100_to_200_ms() {
        let o = Overlap::default();
        for unit in [0.0, 0.25, 0.5, 0.75, 0.999] {
            let gap = o.gap(unit);
            assert!((ms(100)..=ms(200)).contains(&gap), "{gap:?}");
            assert!(gap >= ANSWER_CHECK * 2, "checks fit between starts");
        }
        assert_eq!(o.max_pending, 3);
    }

    #[test]
    fn one_pending_attempt_is_the_classic_sequential_reconnect() {
        let t0 = Instant::now();
        let mut race = Race::new(t0, overlap(100, 1, 0.0), ms(1000));
        let a = race.poll(t0, 0.0, |_| true).start.unwrap();
        // Answered and still pending: no second attempt, however long it takes.
        for at in [100, 200, 900] {
            assert_eq!(race.poll(t0 + ms(at), 0.0, |_| true), Step::default());
        }
        race.ended(t0 + ms(950), a);
        // Within the budget a failed attempt is followed by the next one.
        let b = race.poll(t0 + ms(950), 0.0, |_| true).start.unwrap();
        assert_ne!(a, b);
        race.ended(t0 + ms(990), b);
        assert!(race.poll(t0 + ms(1000), 0.0, |_| true).start.is_none());
        assert!(race.over(t0 + ms(1000)));
        assert_eq!(race.started(), 2);
    }

    /// A satellite path (connects take 1.1 s): with attempts every 100 ms and three pending,
    /// the oldest would be dropped at 300 ms, long before any server could answer it. Kept
    /// for a connect's time, each attempt gets its chance and the next starts when one may
    /// be dropped.
    #[test]
    fn an_attempt_is_kept_for_the_time_a_connect_takes_on_this_path() {
        /// Start and drop times (ms from the round's start) over a dark link.
        fn run(race: &mut Race, t0: Instant) -> (Vec<u64>, Vec<u64>) {
            let (mut starts, mut drops) = (Vec::new(), Vec::new());
            let mut now = t0;
            for _ in 0..10_000 {
                let step = race.poll(now, 0.0, |_| false);
                let at = (now - t0).as_millis() as u64;
                drops.extend(step.drop.iter().map(|_| at));
                if step.start.is_some() {
                    starts.push(at);
                }
                match race.deadline(now) {
                    Some(next) if next < race.closes => now = next,
                    _ => return (starts, drops),
                }
            }
            panic!("the race never closed");
        }
        let t0 = Instant::now();
        let mut race = Race::new(t0, overlap(100, 3, 0.0), ms(10_000)).keep_for(ms(1_100));
        let (starts, drops) = run(&mut race, t0);
        assert_eq!(&starts[..3], &[0, 100, 200], "three start one gap apart");
        assert!(
            starts.len() > 10,
            "attempts go on through the round: {starts:?}"
        );
        // The k-th drop is of the k-th attempt, which had lived at least 1.1 s.
        for (k, dropped_at) in drops.iter().enumerate() {
            assert!(*dropped_at >= starts[k] + 1_100, "{starts:?} {drops:?}");
        }
        // Without the hint the oldest goes as soon as room is needed.
        let mut eager = Race::new(t0, overlap(100, 3, 0.0), ms(10_000));
        let (_, drops) = run(&mut eager, t0);
        assert_eq!(drops[0], 300);
    }
}
