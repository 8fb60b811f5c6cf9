//! The quantities a profile is written in, parsed from tc's spellings into real types:
//! durations (`25ms`), probabilities (`5%`), rates (`1mbit`) and spans (`5s..30s`).
//!
//! Each type deserializes from the same strings the CLI accepts, so the profile file, the
//! command line and `netem tc` share one notation.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{what} {input:?}: {why}")]
pub struct ParseError {
    what: &'static str,
    input: String,
    why: &'static str,
}

impl ParseError {
    fn new(what: &'static str, input: &str, why: &'static str) -> Self {
        Self {
            what,
            input: input.to_owned(),
            why,
        }
    }
}

/// A duration written with a unit, as tc writes them: `500us`, `25ms`, `1.5s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Time(pub Duration);

impl FromStr for Time {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| ParseError::new("duration", s, "needs a unit (us, ms, s)"))?;
        let (number, unit) = t.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| ParseError::new("duration", s, "not a number"))?;
        let scale = match unit.trim() {
            "ns" | "nsec" => 1e-9,
            "us" | "usec" => 1e-6,
            "ms" | "msec" => 1e-3,
            "s" | "sec" | "secs" => 1.0,
            "min" => 60.0,
            _ => return Err(ParseError::new("duration", s, "unknown unit (us, ms, s)")),
        };
        Duration::try_from_secs_f64(value * scale)
            .map(Time)
            .map_err(|_| ParseError::new("duration", s, "out of range"))
    }
}

impl TryFrom<String> for Time {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Time {
    /// The tc spelling: whole microseconds below a millisecond, else milliseconds.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = self.0.as_micros();
        if us % 1000 != 0 {
            write!(f, "{us}us")
        } else if us % 1_000_000 != 0 || us == 0 {
            write!(f, "{}ms", us / 1000)
        } else {
            write!(f, "{}s", us / 1_000_000)
        }
    }
}

/// A probability written as a percentage (`5%`, `0.1%`), stored as a fraction in [0, 1].
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd, Deserialize)]
#[serde(try_from = "String")]
pub struct Probability(f64);

impl Probability {
    pub const ZERO: Self = Self(0.0);
    pub const ONE: Self = Self(1.0);

    pub fn from_fraction(p: f64) -> Option<Self> {
        (0.0..=1.0).contains(&p).then_some(Self(p))
    }

    pub fn fraction(self) -> f64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0.0
    }
}

impl FromStr for Probability {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = s.trim().strip_suffix('%').ok_or_else(|| {
            ParseError::new("probability", s, "write it as a percentage, e.g. 5%")
        })?;
        let percent: f64 = number
            .trim()
            .parse()
            .map_err(|_| ParseError::new("probability", s, "not a number"))?;
        Self::from_fraction(percent / 100.0)
            .ok_or_else(|| ParseError::new("probability", s, "must be between 0% and 100%"))
    }
}

impl TryFrom<String> for Probability {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Probability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Round away float noise (0.1 * 100 = 10.000000000000002).
        let percent = (self.0 * 100.0 * 1e6).round() / 1e6;
        write!(f, "{percent}%")
    }
}

/// A link rate in bits per second, written as tc does: `bit`, `kbit`, `mbit`, `gbit`
/// (decimal multiples). tc's `bps` means *bytes* per second; it is refused here to avoid that trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Rate {
    bits_per_second: u64,
}

impl Rate {
    pub fn from_bits_per_second(bits_per_second: u64) -> Option<Self> {
        (bits_per_second > 0).then_some(Self { bits_per_second })
    }

    pub fn bits_per_second(self) -> u64 {
        self.bits_per_second
    }

    /// How long `bytes` take to serialize at this rate (netem's `packet_time_ns`).
    pub fn transmit_time(self, bytes: usize) -> Duration {
        let nanos = (bytes as u128 * 8 * 1_000_000_000) / u128::from(self.bits_per_second);
        Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64)
    }
}

impl FromStr for Rate {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| ParseError::new("rate", s, "needs a unit (kbit, mbit, gbit)"))?;
        let (number, unit) = t.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| ParseError::new("rate", s, "not a number"))?;
        let scale = match unit {
            "bit" => 1.0,
            "kbit" => 1e3,
            "mbit" => 1e6,
            "gbit" => 1e9,
            u if u.ends_with("bps") => {
                return Err(ParseError::new(
                    "rate",
                    s,
                    "tc's bps means bytes/s; write kbit/mbit",
                ))
            }
            _ => {
                return Err(ParseError::new(
                    "rate",
                    s,
                    "unknown unit (kbit, mbit, gbit)",
                ))
            }
        };
        Self::from_bits_per_second((value * scale).round() as u64)
            .ok_or_else(|| ParseError::new("rate", s, "must be positive"))
    }
}

impl TryFrom<String> for Rate {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.bits_per_second;
        if b % 1_000_000_000 == 0 {
            write!(f, "{}gbit", b / 1_000_000_000)
        } else if b % 1_000_000 == 0 {
            write!(f, "{}mbit", b / 1_000_000)
        } else if b % 1000 == 0 {
            write!(f, "{}kbit", b / 1000)
        } else {
            write!(f, "{b}bit")
        }
    }
}

/// A duration drawn uniformly from `min..max` (written `5s..30s`), or a fixed one (`10s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Span {
    pub min: Duration,
    pub max: Duration,
}

impl Span {
    pub fn fixed(d: Duration) -> Self {
        Self { min: d, max: d }
    }
}

impl FromStr for Span {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (a.parse::<Time>()?.0, b.parse::<Time>()?.0),
            None => {
                let d = s.parse::<Time>()?.0;
                (d, d)
            }
        };
        if min > max {
            return Err(ParseError::new("span", s, "min is above max"));
        }
        Ok(Self { min, max })
    }
}

impl TryFrom<String> for Span {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", Time(self.min))
        } else {
            write!(f, "{}..{}", Time(self.min), Time(self.max))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tc_spellings() {
        assert_eq!("25ms".parse::<Time>().unwrap().0, Duration::from_millis(25));
        assert_eq!(
            "1.5s".parse::<Time>().unwrap().0,
            Duration::from_millis(1500)
        );
        assert_eq!(
            "500us".parse::<Time>().unwrap().0,
            Duration::from_micros(500)
        );
        assert!("25".parse::<Time>().is_err());
        assert_eq!("5%".parse::<Probability>().unwrap().fraction(), 0.05);
        assert!("5".parse::<Probability>().is_err());
        assert!("101%".parse::<Probability>().is_err());
        assert_eq!(
            "1mbit".parse::<Rate>().unwrap().bits_per_second(),
            1_000_000
        );
        assert_eq!(
            "1.5Mbit".parse::<Rate>().unwrap().bits_per_second(),
            1_500_000
        );
        assert!("1mbps".parse::<Rate>().is_err());
        let span: Span = "5s..30s".parse().unwrap();
        assert_eq!((span.min.as_secs(), span.max.as_secs()), (5, 30));
        assert!("30s..5s".parse::<Span>().is_err());
    }

    #[test]
    fn displays_round_trip() {
        for s in ["25ms", "500us", "2s", "0ms"] {
            assert_eq!(s.parse::<Time>().unwrap().to_string(), s);
        }
        for s in ["5%", "0.1%", "100%"] {
            assert_eq!(s.parse::<Probability>().unwrap().to_string(), s);
        }
        for s in ["1mbit", "768kbit", "10gbit"] {
            assert_eq!(s.parse::<Rate>().unwrap().to_string(), s);
        }
        assert_eq!(
            Rate::from_bits_per_second(8000)
                .unwrap()
                .transmit_time(1000),
            Duration::from_secs(1)
        );
    }
}
