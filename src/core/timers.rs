//! A deadline table: keys scheduled at instants, popped in order once due.
//!
//! The broker keeps one of these for offline-session expiry and delayed will messages and
//! drives it from one task; tests drive it with made-up instants. It never reads the clock.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// Keys with one deadline each; re-scheduling a key replaces its deadline.
#[derive(Debug)]
pub struct TimerTable<K> {
    by_time: BTreeSet<(Instant, u64)>,
    entries: HashMap<u64, K>,
    by_key: HashMap<K, (Instant, u64)>,
    next_seq: u64,
}

impl<K> Default for TimerTable<K> {
    fn default() -> Self {
        Self {
            by_time: BTreeSet::new(),
            entries: HashMap::new(),
            by_key: HashMap::new(),
            next_seq: 0,
        }
    }
}

impl<K: Clone + Eq + Hash> TimerTable<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedule `key` at `at`, replacing any earlier schedule of the same key.
    pub fn schedule(&mut self, key: K, at: Instant) {
        self.cancel(&key);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_time.insert((at, seq));
        self.entries.insert(seq, key.clone());
        self.by_key.insert(key, (at, seq));
    }

    /// Remove `key`'s deadline; returns whether it had one.
    pub fn cancel(&mut self, key: &K) -> bool {
        match self.by_key.remove(key) {
            Some((at, seq)) => {
                self.by_time.remove(&(at, seq));
                self.entries.remove(&seq);
                true
            }
            None => false,
        }
    }

    /// The earliest deadline, if any: the driver sleeps until then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_time.first().map(|(at, _)| *at)
    }

    /// Remove and return the earliest key whose deadline is at or before `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let &(at, seq) = self.by_time.first()?;
        if at > now {
            return None;
        }
        self.by_time.remove(&(at, seq));
        let key = self.entries.remove(&seq).expect("entries mirror by_time");
        self.by_key.remove(&key);
        Some(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn due_keys_pop_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut t = TimerTable::new();
        t.schedule("b", t0 + Duration::from_secs(2));
        t.schedule("a", t0 + Duration::from_secs(1));
        t.schedule("c", t0 + Duration::from_secs(3));
        assert_eq!(t.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(t.pop_due(t0 + Duration::from_secs(2)), Some("a"));
        assert_eq!(t.pop_due(t0 + Duration::from_secs(2)), Some("b"));
        assert_eq!(t.pop_due(t0 + Duration::from_secs(2)), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn rescheduling_replaces_and_cancel_removes() {
        let t0 = Instant::now();
        let mut t = TimerTable::new();
        t.schedule("a", t0 + Duration::from_secs(1));
        t.schedule("a", t0 + Duration::from_secs(5));
        assert_eq!(t.len(), 1);
        assert_eq!(t.pop_due(t0 + Duration::from_secs(2)), None);
        assert!(t.cancel(&"a"));
        assert!(!t.cancel(&"a"));
        assert!(t.is_empty());
        assert_eq!(t.next_deadline(), None);
    }
}
