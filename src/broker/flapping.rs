//! Flapping detection (EMQX's `flapping_detect`): a client id whose connections end more
//! than `max_count` times within `window_time` is flapping, and the shell bans it by client
//! id for `ban_time`. Sans-IO: the time is an argument, and this module only counts; banning,
//! logging and counting bans are the caller's.
//!
//! Memory is bounded: at most [`MAX_TRACKED`] client ids are tracked; when the table is full,
//! windows that are over are dropped first, and a client id that still finds no room is not
//! tracked (a flood of fresh client ids cannot grow the table, and each of them connected
//! only once anyway).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::duration::deserialize as duration;

/// Client ids tracked at once, at most.
pub const MAX_TRACKED: usize = 100_000;

/// `[flapping_detect]`, in EMQX's names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlappingSettings {
    /// On by default (EMQX: off): a client reconnecting every four seconds for a minute is a
    /// broken client or two devices fighting over one client id, and a ban stops the churn.
    pub enable: bool,
    /// Connection ends allowed per window; one more is flapping.
    pub max_count: u32,
    #[serde(deserialize_with = "duration")]
    pub window_time: Duration,
    #[serde(deserialize_with = "duration")]
    pub ban_time: Duration,
}

impl Default for FlappingSettings {
    fn default() -> Self {
        Self {
            enable: true,
            max_count: 15,
            window_time: Duration::from_secs(60),
            ban_time: Duration::from_secs(300),
        }
    }
}

/// One client id's current window.
#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    count: u32,
}

/// The connection ends of recent client ids.
#[derive(Debug)]
pub struct Flapping {
    settings: FlappingSettings,
    windows: HashMap<Box<str>, Window>,
    cap: usize,
}

impl Flapping {
    pub fn new(settings: FlappingSettings) -> Self {
        Self::with_cap(settings, MAX_TRACKED)
    }

    fn with_cap(settings: FlappingSettings, cap: usize) -> Self {
        Self {
            settings,
            windows: HashMap::new(),
            cap,
        }
    }

    pub fn settings(&self) -> &FlappingSettings {
        &self.settings
    }

    /// A connection of `client_id` ended at `now`. Returns `true` when that makes it
    /// flapping (once per window: its count starts again).
    pub fn disconnected(&mut self, client_id: &str, now: Instant) -> bool {
        if !self.settings.enable {
            return false;
        }
        let window_time = self.settings.window_time;
        let over = |w: &Window| now.saturating_duration_since(w.started) >= window_time;
        if let Some(window) = self.windows.get_mut(client_id) {
            if over(window) {
                *window = Window {
                    started: now,
                    count: 1,
                };
            } else {
                window.count += 1;
            }
            if window.count > self.settings.max_count {
                self.windows.remove(client_id);
                return true;
            }
            return false;
        }
        if self.windows.len() >= self.cap {
            self.windows.retain(|_, w| !over(w));
            if self.windows.len() >= self.cap {
                return false;
            }
        }
        self.windows.insert(
            client_id.into(),
            Window {
                started: now,
                count: 1,
            },
        );
        // `max_count` 0: the first end is already one too many.
        if self.settings.max_count == 0 {
            self.windows.remove(client_id);
            return true;
        }
        false
    }

    /// Client ids tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.windows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_count: u32) -> FlappingSettings {
        FlappingSettings {
            enable: true,
            max_count,
            window_time: Duration::from_secs(60),
            ban_time: Duration::from_secs(300),
        }
    }

    #[test]
    fn one_end_past_max_count_within_the_window_is_flapping() {
        let start = Instant::now();
        let mut flapping = Flapping::new(settings(3));
        for i in 0..3 {
            let at = start + Duration::from_secs(i);
            assert!(!flapping.disconnected("c", at), "end {} is allowed", i + 1);
            assert!(!flapping.disconnected("other", at));
        }
        assert!(flapping.disconnected("c", start + Duration::from_secs(59)));
        assert_eq!(
            flapping.tracked(),
            1,
            "its window is dropped once it is banned"
        );
        // Counting starts again.
        assert!(!flapping.disconnected("c", start + Duration::from_secs(59)));
    }

    #[test]
    fn ends_spread_over_more_than_the_window_are_not_flapping() {
        let start = Instant::now();
        let mut flapping = Flapping::new(settings(3));
        for i in 0..100 {
            // Three per window, the window starting afresh every 60 s.
            let at = start + Duration::from_secs(20 * i + 1);
            assert!(!flapping.disconnected("c", at), "end at {i}");
        }
    }

    #[test]
    fn disabled_detects_nothing_and_tracks_nothing() {
        let mut flapping = Flapping::new(FlappingSettings {
            enable: false,
            ..settings(0)
        });
        let now = Instant::now();
        for _ in 0..10 {
            assert!(!flapping.disconnected("c", now));
        }
        assert_eq!(flapping.tracked(), 0);
    }

    #[test]
    fn the_table_is_capped_and_over_windows_make_room() {
        let start = Instant::now();
        let mut flapping = Flapping::with_cap(settings(1), 3);
        for id in ["a", "b", "c", "d"] {
            flapping.disconnected(id, start);
        }
        assert_eq!(flapping.tracked(), 3, "the fourth id found no room");
        // Tracked ids are still counted while the table is full.
        assert!(flapping.disconnected("a", start + Duration::from_secs(1)));
        flapping.disconnected("f", start + Duration::from_secs(1));
        assert_eq!(flapping.tracked(), 3);
        let later = start + Duration::from_secs(61);
        assert!(!flapping.disconnected("e", later));
        assert_eq!(flapping.tracked(), 1, "the over windows were dropped");
    }
}
