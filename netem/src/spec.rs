//! What a link does, as data: the per-direction stages (Linux netem's parameters), the
//! scheduled events (blackouts, address changes), and named profiles read from TOML.
//!
//! Parsing and validation only; the behaviour lives in `link` and `schedule`.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::units::{Probability, Rate, Span, Time};

/// The profiles shipped with the crate.
pub const BUILTIN_PROFILES: &str = include_str!("../profiles.toml");

/// Which way a packet travels. `Up` is client to server (toward the relay's `--to`, or out of
/// the client namespace); `Down` is server to client, i.e. the server's egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Up,
    Down,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Up, Direction::Down];

    /// Keeps the two directions' random streams apart under one seed.
    pub(crate) fn salt(self) -> u64 {
        match self {
            Direction::Up => 0x5550,
            Direction::Down => 0xD0D0,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Direction::Up => "up",
            Direction::Down => "down",
        })
    }
}

/// The shape of the delay jitter, as tc's `distribution` (netem's default is uniform).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    #[default]
    Uniform,
    Normal,
    Pareto,
}

impl fmt::Display for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distribution::Uniform => "uniform",
            Distribution::Normal => "normal",
            Distribution::Pareto => "pareto",
        })
    }
}

/// Gilbert–Elliott loss, tc's `loss gemodel p [r [1-h [1-k]]]`: `p` is the chance to go from
/// the good to the bad state, `r` back; a packet is lost with `1-h` in the bad state and `1-k`
/// in the good one. With the defaults (`r = 1 - p`, `1-h = 100%`, `1-k = 0%`) it is the simple
/// Gilbert model: loss rate `p / (p + r)`, mean burst length `1 / r`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GilbertElliott {
    pub p: Probability,
    pub r: Option<Probability>,
    pub one_minus_h: Option<Probability>,
    pub one_minus_k: Option<Probability>,
}

impl GilbertElliott {
    pub fn r(&self) -> Probability {
        self.r.unwrap_or_else(|| {
            Probability::from_fraction(1.0 - self.p.fraction()).expect("p is in [0, 1]")
        })
    }

    pub fn one_minus_h(&self) -> Probability {
        self.one_minus_h.unwrap_or(Probability::ONE)
    }

    pub fn one_minus_k(&self) -> Probability {
        self.one_minus_k.unwrap_or(Probability::ZERO)
    }
}

impl FromStr for GilbertElliott {
    type Err = String;

    /// The CLI spelling: `p,r[,1-h[,1-k]]`, e.g. `1%,25%`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<Probability> = s
            .split(',')
            .map(|p| p.parse().map_err(|e| format!("{e}")))
            .collect::<Result<_, _>>()?;
        if parts.is_empty() || parts.len() > 4 {
            return Err(format!("gemodel {s:?}: expected p,r[,1-h[,1-k]]"));
        }
        Ok(Self {
            p: parts[0],
            r: parts.get(1).copied(),
            one_minus_h: parts.get(2).copied(),
            one_minus_k: parts.get(3).copied(),
        })
    }
}

/// One direction's impairments, with netem's names and meanings. Every field defaults to off.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stages {
    /// Base one-way delay.
    #[serde(default)]
    pub delay: Time,
    /// Jitter around `delay`: half-width for uniform, standard deviation for normal/pareto.
    #[serde(default)]
    pub jitter: Time,
    #[serde(default)]
    pub delay_correlation: Probability,
    #[serde(default)]
    pub distribution: Distribution,
    /// Independent (Bernoulli) loss; exclusive with `gemodel`.
    #[serde(default)]
    pub loss: Probability,
    #[serde(default)]
    pub loss_correlation: Probability,
    /// Burst loss; exclusive with `loss`.
    pub gemodel: Option<GilbertElliott>,
    #[serde(default)]
    pub duplicate: Probability,
    #[serde(default)]
    pub duplicate_correlation: Probability,
    /// Chance that a packet skips the delay (netem's `reorder P [corr] gap N`).
    #[serde(default)]
    pub reorder: Probability,
    #[serde(default)]
    pub reorder_correlation: Probability,
    /// Only every `gap`-th packet may be reordered (tc makes 0 into 1 when reorder is set).
    pub gap: Option<u32>,
    /// Chance of flipping one random bit of the packet.
    #[serde(default)]
    pub corrupt: Probability,
    #[serde(default)]
    pub corrupt_correlation: Probability,
    /// Serialization rate; packets wait behind each other.
    pub rate: Option<Rate>,
    /// Packets held at most (netem's `limit`, default 1000); tail drop beyond.
    pub limit: Option<u32>,
}

/// netem's default queue limit, in packets.
pub const DEFAULT_LIMIT: u32 = 1000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("loss and gemodel are exclusive (tc takes one loss model)")]
    TwoLossModels,
    #[error("reordering is not possible without some delay (as in tc)")]
    ReorderWithoutDelay,
    #[error("limit must be at least 1")]
    ZeroLimit,
    #[error("profile {0:?} is not defined")]
    UnknownProfile(String),
    #[error("profile {0:?} is defined twice")]
    DuplicateProfile(String),
    #[error("profile {name:?}: {direction}: {error}")]
    Invalid {
        name: String,
        direction: Direction,
        error: Box<SpecError>,
    },
    #[error("profiles: {0}")]
    Toml(#[from] toml::de::Error),
}

impl Stages {
    pub fn validate(&self) -> Result<(), SpecError> {
        if !self.loss.is_zero() && self.gemodel.is_some() {
            return Err(SpecError::TwoLossModels);
        }
        if !self.reorder.is_zero() && self.delay.0.is_zero() {
            return Err(SpecError::ReorderWithoutDelay);
        }
        if self.limit == Some(0) {
            return Err(SpecError::ZeroLimit);
        }
        Ok(())
    }

    pub fn limit(&self) -> u32 {
        self.limit.unwrap_or(DEFAULT_LIMIT)
    }

    pub fn gap(&self) -> u32 {
        self.gap.unwrap_or(1).max(1)
    }

    pub fn is_clean(&self) -> bool {
        *self == Stages::default()
    }
}

/// A recurring event: quiet for a `gap` drawn from its span, then (for blackouts) down for a
/// `duration` drawn from its span; at most `count` times if given.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Periodic {
    pub gap: Span,
    pub duration: Option<Span>,
    pub count: Option<u32>,
}

/// Events that hit the whole path (both directions) at the same moments.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// Every packet sent during a blackout is dropped, in both directions.
    pub blackouts: Option<Periodic>,
    /// The client's address changes (the relay moves it to a new upstream port).
    pub address_changes: Option<Periodic>,
}

/// Everything one direction's `Link` needs: its stages and the path's events.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkSpec {
    pub direction: Direction,
    pub stages: Stages,
    pub events: Events,
}

impl LinkSpec {
    pub fn clean(direction: Direction) -> Self {
        Self {
            direction,
            stages: Stages::default(),
            events: Events::default(),
        }
    }
}

/// A named pair of directions plus events, with where its figures come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Where the figures come from (a measurement, a standard, a tool's preset, or "assumption").
    pub source: String,
    #[serde(default)]
    pub up: Stages,
    #[serde(default)]
    pub down: Stages,
    #[serde(default)]
    pub events: Events,
}

impl Profile {
    pub fn clean() -> Self {
        Self {
            name: "clean".into(),
            description: "no impairment".into(),
            source: "-".into(),
            up: Stages::default(),
            down: Stages::default(),
            events: Events::default(),
        }
    }

    pub fn stages(&self, direction: Direction) -> &Stages {
        match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    pub fn stages_mut(&mut self, direction: Direction) -> &mut Stages {
        match direction {
            Direction::Up => &mut self.up,
            Direction::Down => &mut self.down,
        }
    }

    pub fn link(&self, direction: Direction) -> LinkSpec {
        LinkSpec {
            direction,
            stages: self.stages(direction).clone(),
            events: self.events.clone(),
        }
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        for direction in Direction::BOTH {
            self.stages(direction)
                .validate()
                .map_err(|error| SpecError::Invalid {
                    name: self.name.clone(),
                    direction,
                    error: Box::new(error),
                })?;
        }
        Ok(())
    }
}

/// A list of profiles in file order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profiles {
    #[serde(rename = "profile")]
    pub list: Vec<Profile>,
}

impl Profiles {
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_PROFILES).expect("the shipped profiles.toml is valid (tested)")
    }

    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let profiles: Profiles = toml::from_str(text)?;
        for (i, p) in profiles.list.iter().enumerate() {
            p.validate()?;
            if profiles.list[..i].iter().any(|q| q.name == p.name) {
                return Err(SpecError::DuplicateProfile(p.name.clone()));
            }
        }
        Ok(profiles)
    }

    pub fn find(&self, name: &str) -> Result<&Profile, SpecError> {
        self.list
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| SpecError::UnknownProfile(name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_profiles_parse_and_cover_the_issue() {
        let profiles = Profiles::builtin();
        for name in [
            "clean",
            "wifi-good",
            "lte",
            "lte-edge",
            "3g",
            "satellite-geo",
            "lossy-5",
            "lossy-10",
            "tunnel",
            "handover",
        ] {
            let p = profiles.find(name).unwrap();
            assert!(!p.source.trim().is_empty(), "{name} names its source");
        }
        let reference = profiles.find("lossy-5").unwrap();
        assert_eq!(reference.down.delay.0.as_millis(), 25);
        assert_eq!(reference.down.loss.fraction(), 0.05);
        assert!(reference.up.is_clean());
        assert!(profiles.find("tunnel").unwrap().events.blackouts.is_some());
        assert!(profiles
            .find("handover")
            .unwrap()
            .events
            .address_changes
            .is_some());
    }

    #[test]
    fn rejects_what_tc_rejects() {
        let two = "[[profile]]\nname='x'\ndescription=''\nsource=''\n[profile.up]\nloss='1%'\ngemodel={p='1%'}\n";
        assert!(matches!(
            Profiles::parse(two),
            Err(SpecError::Invalid { .. })
        ));
        let reorder =
            "[[profile]]\nname='x'\ndescription=''\nsource=''\n[profile.up]\nreorder='1%'\n";
        assert!(matches!(
            Profiles::parse(reorder),
            Err(SpecError::Invalid { .. })
        ));
        let unknown = "[[profile]]\nname='x'\ndescription=''\nsource=''\n[profile.up]\nlos='1%'\n";
        assert!(matches!(Profiles::parse(unknown), Err(SpecError::Toml(_))));
    }

    #[test]
    fn gemodel_cli_spelling() {
        let ge: GilbertElliott = "1%,25%".parse().unwrap();
        assert_eq!(ge.p.fraction(), 0.01);
        assert_eq!(ge.r().fraction(), 0.25);
        assert_eq!(ge.one_minus_h().fraction(), 1.0);
        let default_r: GilbertElliott = "10%".parse().unwrap();
        assert!((default_r.r().fraction() - 0.9).abs() < 1e-12);
    }
}
