//! A cache of recently verified passwords, so a reconnect storm (a fleet coming back after
//! an outage) does not pay the password hash's full cost for every connection: PBKDF2 with
//! a high iteration count or argon2id costs milliseconds of CPU per login by design.
//!
//! What is kept is never the password: per user, an HMAC-SHA256 of the password under a key
//! drawn at start-up and never written anywhere, with the rules' generation and an expiry.
//! A hit needs the same user, the same password (compared in constant time by HMAC
//! verification), the same generation of the rules (a reload empties the cache's meaning at
//! once) and an unexpired entry. Only successes are cached: a wrong password always pays the
//! full hash cost, so the cache is no faster oracle for guessing. Bounded: at `max_size`
//! entries, expired ones are dropped, and if none are, the new entry is not kept.
//!
//! Settings (`[auth]`): `cache_ttl` (default 5 minutes, `0s` turns the cache off) and
//! `cache_max_size` (default 100,000 users).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Default time a verified password stays cached.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// Default number of users whose last verified password is kept.
pub const DEFAULT_MAX_SIZE: usize = 100_000;

struct Entry {
    tag: hmac::Tag,
    generation: u64,
    expires: Instant,
}

/// Verified passwords, per user.
pub struct VerifiedCache {
    key: hmac::Key,
    ttl: Duration,
    max_size: usize,
    entries: Mutex<HashMap<Box<str>, Entry>>,
}

impl std::fmt::Debug for VerifiedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedCache")
            .field("ttl", &self.ttl)
            .field("max_size", &self.max_size)
            .field("len", &self.len())
            .finish()
    }
}

impl VerifiedCache {
    /// A cache keeping `max_size` users for `ttl`; either zero turns it off.
    pub fn new(ttl: Duration, max_size: usize) -> Self {
        let mut secret = [0u8; 32];
        // The system's randomness failing is not something to serve on: without a key the
        // cache would be keyed by zeros, so it stays off instead.
        let ok = SystemRandom::new().fill(&mut secret).is_ok();
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            ttl,
            max_size: if ok { max_size } else { 0 },
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.max_size > 0
    }

    /// Whether `password` was verified for `username` under rules of `generation` less than
    /// `ttl` ago.
    pub fn hit(&self, username: &str, password: &[u8], generation: u64, now: Instant) -> bool {
        if !self.enabled() {
            return false;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(username).is_some_and(|entry| {
            entry.generation == generation
                && now < entry.expires
                && hmac::verify(&self.key, password, entry.tag.as_ref()).is_ok()
        })
    }

    /// Remembers that `password` is right for `username` under rules of `generation`.
    pub fn remember(&self, username: &str, password: &[u8], generation: u64, now: Instant) {
        if !self.enabled() {
            return;
        }
        let tag = hmac::sign(&self.key, password);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.max_size && !entries.contains_key(username) {
            entries.retain(|_, e| now < e.expires && e.generation == generation);
            if entries.len() >= self.max_size {
                return;
            }
        }
        entries.insert(
            username.into(),
            Entry {
                tag,
                generation,
                expires: now + self.ttl,
            },
        );
    }

    /// Users with an entry (expired or not).
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests make up instants from the real clock
mod tests {
    use super::*;

    #[test]
    fn a_verified_password_hits_until_it_expires_or_the_rules_change() {
        let cache = VerifiedCache::new(Duration::from_secs(60), 10);
        let now = Instant::now();
        assert!(!cache.hit("alice", b"secret", 0, now));
        cache.remember("alice", b"secret", 0, now);
        assert!(cache.hit("alice", b"secret", 0, now + Duration::from_secs(59)));
        assert!(!cache.hit("alice", b"wrong", 0, now), "another password");
        assert!(!cache.hit("bob", b"secret", 0, now), "another user");
        assert!(!cache.hit("alice", b"secret", 1, now), "a reload happened");
        assert!(
            !cache.hit("alice", b"secret", 0, now + Duration::from_secs(60)),
            "expired"
        );
        // A changed password replaces the entry.
        cache.remember("alice", b"changed", 0, now);
        assert!(!cache.hit("alice", b"secret", 0, now));
        assert!(cache.hit("alice", b"changed", 0, now));
    }

    #[test]
    fn bounded_and_expired_entries_make_room() {
        let cache = VerifiedCache::new(Duration::from_secs(60), 2);
        let now = Instant::now();
        cache.remember("a", b"1", 0, now);
        cache.remember("b", b"2", 0, now);
        cache.remember("c", b"3", 0, now);
        assert_eq!(cache.len(), 2, "full: the new user is not kept");
        assert!(!cache.hit("c", b"3", 0, now));
        let later = now + Duration::from_secs(61);
        cache.remember("c", b"3", 0, later);
        assert!(cache.hit("c", b"3", 0, later));
        assert_eq!(cache.len(), 1, "the expired ones made room");
    }

    #[test]
    fn zero_ttl_or_size_turns_it_off() {
        let now = Instant::now();
        for cache in [
            VerifiedCache::new(Duration::ZERO, 10),
            VerifiedCache::new(Duration::from_secs(60), 0),
        ] {
            cache.remember("a", b"1", 0, now);
            assert!(!cache.hit("a", b"1", 0, now));
            assert!(cache.is_empty());
        }
    }

    #[test]
    fn the_password_itself_is_not_kept() {
        let cache = VerifiedCache::new(Duration::from_secs(60), 10);
        cache.remember("a", b"hunter2", 0, Instant::now());
        let entries = cache.entries.lock().unwrap();
        let tag = entries.get("a").unwrap().tag.as_ref().to_vec();
        assert_eq!(tag.len(), 32);
        assert!(!tag.windows(7).any(|w| w == b"hunter2"));
    }
}
