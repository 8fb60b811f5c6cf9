//! Connection admission, decided at accept time before any handshake work:
//! - Limits: the broker's `broker.max_connections`, each listener's `max_connections` and
//!   `broker.max_connections_per_address`. A connection holds a [`Permit`] for its whole life;
//!   dropping it gives the slots back. A socket over a limit is closed at once (QUIC:
//!   refused), counted, and logged at debug (a flood must not raise our warn rate).
//! - Rate: each listener's `max_conn_rate`, a token bucket ([`ConnRate`]); past it the accept
//!   loop pauses (as EMQX's acceptors do) and the kernel's backlog (QUIC: quinn's bounded
//!   queue of incoming connections) holds the rest.
//! - QUIC address validation ([`RetryPolicy`]): a Retry round trip for unvalidated addresses
//!   while more handshakes than `quic.retry_threshold` are in progress ([`Handshakes`]).
//!
//! Everything here is sans-IO: the accept loops pass the time in.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

/// The broker-wide limits and counts.
#[derive(Debug)]
pub struct ConnectionLimits {
    max: usize,
    /// 0: no per-address limit (and no table kept).
    per_address: usize,
    open: AtomicUsize,
    by_address: Mutex<FxHashMap<IpAddr, usize>>,
    /// Sockets refused for a limit.
    pub refused: AtomicUsize,
}

/// One listener's limit and count.
#[derive(Debug)]
pub struct ListenerSlots {
    max: usize,
    open: AtomicUsize,
}

impl ListenerSlots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            open: AtomicUsize::new(0),
        })
    }
}

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Broker,
    Listener,
    Address,
}

/// A connection's slots, given back when it is dropped.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnectionLimits>,
    listener: Arc<ListenerSlots>,
    address: Option<IpAddr>,
}

/// Takes one slot of `open` if it stays within `max`.
fn take(open: &AtomicUsize, max: usize) -> bool {
    open.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
        (n < max).then_some(n + 1)
    })
    .is_ok()
}

impl ConnectionLimits {
    pub fn new(max: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            per_address,
            open: AtomicUsize::new(0),
            by_address: Mutex::new(FxHashMap::default()),
            refused: AtomicUsize::new(0),
        })
    }

    /// A permit for a connection from `ip` on `listener`, or the limit it would break.
    pub fn admit(
        self: &Arc<Self>,
        listener: &Arc<ListenerSlots>,
        ip: IpAddr,
    ) -> Result<Permit, Full> {
        let refused = |full| {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(full)
        };
        if !take(&self.open, self.max) {
            return refused(Full::Broker);
        }
        if !take(&listener.open, listener.max) {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return refused(Full::Listener);
        }
        let mut address = None;
        if self.per_address > 0 {
            let mut table = self
                .by_address
                .lock()
                .expect("address table lock is never poisoned");
            let count = table.entry(ip).or_insert(0);
            if *count >= self.per_address {
                drop(table);
                listener.open.fetch_sub(1, Ordering::AcqRel);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return refused(Full::Address);
            }
            *count += 1;
            address = Some(ip);
        }
        Ok(Permit {
            limits: Arc::clone(self),
            listener: Arc::clone(listener),
            address,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(ip) = self.address {
            let mut table = self
                .limits
                .by_address
                .lock()
                .expect("address table lock is never poisoned");
            if let Some(count) = table.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    table.remove(&ip);
                }
            }
        }
        self.listener.open.fetch_sub(1, Ordering::AcqRel);
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A listener's `max_conn_rate`: a token bucket refilled at `rate` tokens per second and
/// holding at most one second's worth, so a burst of `rate` connections after a quiet spell
/// is accepted at once.
#[derive(Debug)]
pub struct ConnRate {
    rate: NonZeroU32,
    tokens: f64,
    last: Instant,
}

impl ConnRate {
    /// A full bucket at `now`.
    pub fn new(rate: NonZeroU32, now: Instant) -> Self {
        Self {
            rate,
            tokens: f64::from(rate.get()),
            last: now,
        }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(self.rate.get());
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now.max(self.last);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        // At least a microsecond, so a caller's sleep always makes progress.
        let wait = ((1.0 - self.tokens) / rate).max(1e-6);
        Err(Duration::from_secs_f64(wait))
    }
}

/// When a QUIC listener sends a Retry (address validation, RFC 9000 8.1) before any
/// handshake work: `quic.retry = true` is `Always`; otherwise `quic.retry_threshold`
/// (0: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    Never,
    Always,
    /// While at least this many handshakes are in progress on the listener.
    Above(usize),
}

impl RetryPolicy {
    pub fn new(always: bool, threshold: usize) -> Self {
        match (always, threshold) {
            (true, _) => Self::Always,
            (false, 0) => Self::Never,
            (false, n) => Self::Above(n),
        }
    }

    /// Whether a client whose address is not yet validated is sent a Retry, with `in_progress`
    /// handshakes under way. A validated client (it came back with our Retry token) never is.
    pub fn retry(self, in_progress: usize, validated: bool) -> bool {
        !validated
            && match self {
                Self::Never => false,
                Self::Always => true,
                Self::Above(threshold) => in_progress >= threshold,
            }
    }
}

/// The QUIC handshakes in progress on one listener: from the accept of a client's first
/// packet until its handshake completes or fails.
#[derive(Debug, Default)]
pub struct Handshakes {
    in_progress: AtomicUsize,
}

/// One handshake in progress; dropping it ends it.
#[derive(Debug)]
pub struct InProgress(Arc<Handshakes>);

impl Handshakes {
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Relaxed)
    }

    pub fn begin(self: &Arc<Self>) -> InProgress {
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        InProgress(Arc::clone(self))
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_allows_a_second_of_burst_then_one_token_per_interval() {
        let start = Instant::now();
        let mut rate = ConnRate::new(NonZeroU32::new(10).unwrap(), start);
        for _ in 0..10 {
            assert!(rate.take(start).is_ok());
        }
        let wait = rate.take(start).unwrap_err();
        assert!(wait > Duration::from_millis(99) && wait <= Duration::from_millis(100));
        // Half an interval later: still none, and half the wait left.
        let half = start + Duration::from_millis(50);
        let left = rate.take(half).unwrap_err();
        assert!(left > Duration::from_millis(49) && left <= Duration::from_millis(50));
        assert!(rate.take(start + Duration::from_millis(100)).is_ok());
        assert!(rate.take(start + Duration::from_millis(100)).is_err());
        // A long quiet spell refills one second's worth, no more.
        let later = start + Duration::from_secs(60);
        for _ in 0..10 {
            assert!(rate.take(later).is_ok());
        }
        assert!(rate.take(later).is_err());
    }

    #[test]
    fn retry_switches_on_at_the_threshold_and_off_below_it() {
        let policy = RetryPolicy::new(false, 3);
        assert_eq!(policy, RetryPolicy::Above(3));
        let handshakes = Arc::new(Handshakes::default());
        let mut held = Vec::new();
        for _ in 0..2 {
            assert!(!policy.retry(handshakes.in_progress(), false));
            held.push(handshakes.begin());
        }
        assert!(!policy.retry(handshakes.in_progress(), false));
        held.push(handshakes.begin());
        assert!(policy.retry(handshakes.in_progress(), false), "at 3: on");
        assert!(
            !policy.retry(handshakes.in_progress(), true),
            "a validated address is never retried"
        );
        held.pop();
        assert!(!policy.retry(handshakes.in_progress(), false), "below: off");
        assert!(RetryPolicy::new(true, 0).retry(0, false));
        assert!(!RetryPolicy::new(false, 0).retry(usize::MAX, false));
    }

    #[test]
    fn each_limit_refuses_past_it_and_a_dropped_permit_gives_its_slots_back() {
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let limits = ConnectionLimits::new(3, 2);
        let a = ListenerSlots::new(2);
        let b = ListenerSlots::new(10);
        let first = limits.admit(&a, ip(1)).unwrap();
        let _second = limits.admit(&a, ip(2)).unwrap();
        assert_eq!(limits.admit(&a, ip(3)).unwrap_err(), Full::Listener);
        let third = limits.admit(&b, ip(1)).unwrap();
        assert_eq!(limits.admit(&b, ip(4)).unwrap_err(), Full::Broker);
        drop(first);
        // ip(1) still has `third`; one more from it is within its 2.
        let again = limits.admit(&b, ip(1)).unwrap();
        drop(third);
        drop(again);
        let _one = limits.admit(&b, ip(1)).unwrap();
        let _two = limits.admit(&b, ip(1)).unwrap();
        assert_eq!(limits.admit(&b, ip(5)).unwrap_err(), Full::Broker);
        assert_eq!(limits.refused.load(Ordering::Relaxed), 3);
        assert_eq!(limits.open.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn the_address_limit_counts_each_address_alone() {
        let limits = ConnectionLimits::new(100, 1);
        let slots = ListenerSlots::new(100);
        let here = IpAddr::from([127, 0, 0, 1]);
        let _held = limits.admit(&slots, here).unwrap();
        assert_eq!(limits.admit(&slots, here).unwrap_err(), Full::Address);
        assert!(limits.admit(&slots, IpAddr::from([127, 0, 0, 2])).is_ok());
        assert_eq!(
            slots.open.load(Ordering::Relaxed),
            1,
            "the refused slot was given back"
        );
    }
}
