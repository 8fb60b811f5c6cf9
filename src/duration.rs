//! Durations in settings: `"500ms"`, `"10s"`, `"5m"`, `"2h"`, `"1d"`, a bare number of
//! seconds, or `"never"`. A leaf module: every settings type (in `config`, `transport`,
//! `auth`) may use it without importing `config`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Durations as `"500ms"`, `"10s"`, `"5m"`, `"2h"`, `"1d"`, a bare number of seconds, or
/// `"never"`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Seconds(secs) => Ok(Duration::from_secs(secs)),
        Raw::Text(text) => parse_duration(&text).map_err(serde::de::Error::custom),
    }
}

pub fn deserialize_some<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize(deserializer).map(Some)
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "never" {
        return Ok(Duration::MAX);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10s, 500ms, 5m, 2h"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        other => {
            return Err(format!(
                "unknown duration unit `{other}` in `{text}` (use ms, s, m, h, d)"
            ))
        }
    };
    Ok(d)
}
