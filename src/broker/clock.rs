//! The one place that reads the time. Everything else is handed `now`.
//!
//! It reads tokio's clock (converted to `std::time::Instant`) so that tests which pause
//! tokio's time drive the whole broker in virtual time.

use std::time::Instant;

pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

pub async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
}

/// The wall clock, for what operators read as a date (a client's connection time, `$SYS`
/// datetime); never for deadlines.
pub fn wall() -> std::time::SystemTime {
    std::time::SystemTime::now()
}
