//! Where a run's seed comes from: `NETEM_SEED` if set (to replay a run), otherwise a fresh one;
//! either way it is printed so a failing run can be replayed.

use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable that replays a run.
pub const SEED_VAR: &str = "NETEM_SEED";

/// The seed from `NETEM_SEED`, or a fresh one; prints it to stderr with the replay hint.
pub fn from_env_or_random() -> u64 {
    let (seed, origin) = match std::env::var(SEED_VAR).ok().and_then(|s| parse(&s)) {
        Some(seed) => (seed, "from NETEM_SEED"),
        None => (fresh(), "fresh"),
    };
    eprintln!("netem: seed {seed} ({origin}; replay with {SEED_VAR}={seed})");
    seed
}

/// A decimal or `0x` hexadecimal seed.
pub fn parse(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn fresh() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = crate::rng::Rng::new(nanos ^ u64::from(std::process::id()).rotate_left(32));
    // Keep seeds short enough to type.
    rng.next_u64() % 1_000_000_000
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_decimal_and_hex() {
        assert_eq!(super::parse("42"), Some(42));
        assert_eq!(super::parse("0x2a"), Some(42));
        assert_eq!(super::parse("x"), None);
    }
}
