//! Connection limits, taken at accept time before any handshake work: the broker's
//! `broker.max_connections`, each listener's `max_connections` and
//! `broker.max_connections_per_address`. A connection holds a [`Permit`] for its whole life;
//! dropping it gives the slots back. A socket over a limit is closed at once (QUIC: refused),
//! counted, and logged at debug (a flood must not raise our warn rate).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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

#[cfg(test)]
mod tests {
    use super::*;

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
