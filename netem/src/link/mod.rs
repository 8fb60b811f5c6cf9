//! One direction of an emulated link as a sans-IO state machine: packets go in with
//! [`Link::send`], come out of [`Link::poll`] when their time has come, and
//! [`Link::next_deadline`] says when to poll next. Time is always an argument.
//!
//! The stages follow Linux `sch_netem.c` (`netem_enqueue` / `netem_dequeue`) so a profile means
//! the same here and under `tc`: the order of decisions (duplicate, loss, corrupt, queue limit,
//! reorder-or-delay, rate), the correlated uniform, the Gilbert–Elliott generator, the rate
//! accounting against the last queued packet, and reordered packets going to the head of the
//! queue. Blackouts drop at entry, as if loss were switched to 100 % for the window.
//! All randomness comes from one generator seeded from the run's seed and the direction.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::rng::{inverse_normal_cdf, pareto_variate, Correlated, Rng};
use crate::schedule::Schedule;
use crate::spec::{Direction, Distribution, LinkSpec, Stages};

/// A packet in flight. `tag` is opaque to the link and comes back with the packet (the relay
/// uses it for the flow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub data: Vec<u8>,
    pub tag: u64,
}

impl Packet {
    pub fn new(data: Vec<u8>, tag: u64) -> Self {
        Self { data, tag }
    }
}

/// What happened to the packets a link was given. `sent` counts `send` calls; a duplicate adds
/// one packet, so `delivered + dropped + queued = sent + duplicated`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub sent: u64,
    /// Bytes of the packets `send` was given (what the sender put on the wire).
    pub sent_bytes: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    /// Dropped by the loss model (Bernoulli or Gilbert–Elliott).
    pub lost: u64,
    /// Dropped because they were sent during a blackout.
    pub blackout_dropped: u64,
    /// Tail-dropped because `limit` packets were already held.
    pub queue_dropped: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    /// Sent immediately, skipping the delay (netem's reorder).
    pub reordered: u64,
}

impl LinkStats {
    pub fn dropped(&self) -> u64 {
        self.lost + self.blackout_dropped + self.queue_dropped
    }
}

/// One direction of the emulated path.
#[derive(Debug)]
pub struct Link {
    direction: Direction,
    stages: Stages,
    rng: Rng,
    delay_cor: Correlated,
    loss_cor: Correlated,
    duplicate_cor: Correlated,
    reorder_cor: Correlated,
    corrupt_cor: Correlated,
    /// Gilbert–Elliott state: in the bad state.
    bad: bool,
    /// Packets delayed normally since the last reordered one (netem's `counter`).
    reorder_counter: u32,
    /// Delayed packets by time to send, then arrival order (netem's `tfifo`).
    tfifo: BTreeMap<(Duration, u64), Packet>,
    /// Reordered packets, ready now; newest first, as netem puts them at the queue's head.
    ready: VecDeque<(Duration, Packet)>,
    arrivals: u64,
    blackouts: Schedule,
    stats: LinkStats,
}

impl Link {
    /// A link for `spec.direction`. The same spec and seed replay the same run.
    pub fn new(spec: &LinkSpec, seed: u64) -> Self {
        let s = &spec.stages;
        Self {
            direction: spec.direction,
            rng: Rng::derived(seed, spec.direction.salt()),
            delay_cor: Correlated::new(s.delay_correlation.fraction()),
            loss_cor: Correlated::new(s.loss_correlation.fraction()),
            duplicate_cor: Correlated::new(s.duplicate_correlation.fraction()),
            reorder_cor: Correlated::new(s.reorder_correlation.fraction()),
            corrupt_cor: Correlated::new(s.corrupt_correlation.fraction()),
            stages: s.clone(),
            bad: false,
            reorder_counter: 0,
            tfifo: BTreeMap::new(),
            ready: VecDeque::new(),
            arrivals: 0,
            blackouts: Schedule::blackouts(&spec.events, seed),
            stats: LinkStats::default(),
        }
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Packets held (delayed or ready).
    pub fn queued(&self) -> usize {
        self.tfifo.len() + self.ready.len()
    }

    /// Whether `now` is inside a blackout window.
    pub fn in_blackout(&mut self, now: Duration) -> bool {
        self.blackouts.contains(now)
    }

    /// Hands a packet to the link at `now` (`now` must not go backwards).
    pub fn send(&mut self, now: Duration, packet: Packet) {
        self.stats.sent += 1;
        self.stats.sent_bytes += packet.data.len() as u64;
        if self.blackouts.contains(now) {
            self.stats.blackout_dropped += 1;
            return;
        }
        self.enqueue(now, packet, true);
    }

    /// The next packet whose time has come, if any.
    pub fn poll(&mut self, now: Duration) -> Option<Packet> {
        let packet = if let Some((_, packet)) = self.ready.pop_front() {
            packet
        } else {
            let entry = self.tfifo.first_entry()?;
            if entry.key().0 > now {
                return None;
            }
            entry.remove()
        };
        self.stats.delivered += 1;
        self.stats.delivered_bytes += packet.data.len() as u64;
        Some(packet)
    }

    /// When `poll` will next have something (possibly already past).
    pub fn next_deadline(&self) -> Option<Duration> {
        let ready = self.ready.iter().map(|(t, _)| *t).min();
        let delayed = self.tfifo.keys().next().map(|(t, _)| *t);
        match (ready, delayed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// netem_enqueue: duplicate, loss, corrupt, limit, then reorder or delay (+ rate).
    fn enqueue(&mut self, now: Duration, mut packet: Packet, may_duplicate: bool) {
        let mut count = 1;
        let duplicate = self.stages.duplicate.fraction();
        if may_duplicate && duplicate > 0.0 && self.duplicate_cor.next(&mut self.rng) < duplicate {
            count += 1;
        }
        if self.loss_event() {
            count -= 1;
        }
        if count == 0 {
            self.stats.lost += 1;
            return;
        }
        if count > 1 {
            // As netem: the copy goes through the whole path again, with duplication disabled.
            self.stats.duplicated += 1;
            self.enqueue(now, packet.clone(), false);
        }
        let corrupt = self.stages.corrupt.fraction();
        if corrupt > 0.0
            && self.corrupt_cor.next(&mut self.rng) < corrupt
            && !packet.data.is_empty()
        {
            let byte = self.rng.below(packet.data.len() as u64) as usize;
            let bit = self.rng.below(8);
            packet.data[byte] ^= 1 << bit;
            self.stats.corrupted += 1;
        }
        if self.queued() >= self.stages.limit() as usize {
            self.stats.queue_dropped += 1;
            return;
        }
        let reorder = self.stages.reorder.fraction();
        let delay_normally = reorder == 0.0
            || self.reorder_counter < self.stages.gap() - 1
            || self.reorder_cor.next(&mut self.rng) >= reorder;
        if delay_normally {
            let time_to_send = self.time_to_send(now, packet.data.len());
            self.reorder_counter += 1;
            self.arrivals += 1;
            self.tfifo.insert((time_to_send, self.arrivals), packet);
        } else {
            self.reorder_counter = 0;
            self.stats.reordered += 1;
            self.ready.push_front((now, packet));
        }
    }

    /// netem's `loss_event`: Bernoulli with correlation, or the Gilbert–Elliott generator
    /// (the loss decision uses the state the packet found, the transition happens first).
    fn loss_event(&mut self) -> bool {
        if let Some(ge) = self.stages.gemodel {
            let rng = &mut self.rng;
            if self.bad {
                if rng.unit() < ge.r().fraction() {
                    self.bad = false;
                }
                rng.unit() < ge.one_minus_h().fraction()
            } else {
                if rng.unit() < ge.p.fraction() {
                    self.bad = true;
                }
                rng.unit() < ge.one_minus_k().fraction()
            }
        } else {
            let loss = self.stages.loss.fraction();
            loss > 0.0 && self.loss_cor.next(&mut self.rng) < loss
        }
    }

    /// Delay drawn from the distribution (netem's `tabledist`), then the rate: a packet waits for
    /// the last queued one and its own serialization time. A negative draw means "now", which
    /// reorders packets exactly as jitter does under netem.
    fn time_to_send(&mut self, now: Duration, len: usize) -> Duration {
        let now_ns = now.as_nanos() as i128;
        let mut delay = self.draw_delay();
        let mut base = now_ns;
        if let Some(rate) = self.stages.rate {
            if let Some(&(last, _)) = self.tfifo.keys().next_back() {
                let last = last.as_nanos() as i128;
                delay = (delay - (last - now_ns)).max(0);
                base = last;
            }
            delay += rate.transmit_time(len).as_nanos() as i128;
        }
        let t = (base + delay).max(0);
        Duration::from_nanos(u64::try_from(t).unwrap_or(u64::MAX))
    }

    fn draw_delay(&mut self) -> i128 {
        let mu = self.stages.delay.0.as_nanos() as f64;
        let sigma = self.stages.jitter.0.as_nanos() as f64;
        if sigma == 0.0 {
            return mu as i128;
        }
        let u = self.delay_cor.next(&mut self.rng);
        let z = match self.stages.distribution {
            Distribution::Uniform => 2.0 * u - 1.0,
            Distribution::Normal => inverse_normal_cdf(u),
            Distribution::Pareto => pareto_variate(u),
        };
        (mu + sigma * z) as i128
    }
}

#[cfg(test)]
mod tests;
