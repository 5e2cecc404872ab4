//! How far ahead of its own clock an agent accepts a version.
//!
//! The broker numbers every change of a cluster with a hybrid clock,
//! `max(previous + 1, its wall clock in microseconds since the Unix
//! epoch)`, so versions keep increasing across broker restarts without
//! stored state, and a version says roughly when it was made. An agent
//! applies an item only if its version is newer than what it holds, so a
//! single version far in the future (2⁶⁴−1) would make it ignore every later
//! change until it restarts. An agent therefore refuses a version more
//! than [`MAX_AHEAD`] ahead of its own clock.
//!
//! Fifteen minutes is the clock difference AWS tolerates on a signed
//! request: a worker whose clock is further off than that cannot use the
//! credentials anyway, and a hostile broker can hold an agent on one
//! version for at most that long (it can always withhold updates instead).
//! A small version (from a broker clock far behind, or a test) is never
//! refused by this rule.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most a version may be ahead of the agent's clock.
pub const MAX_AHEAD: Duration = Duration::from_secs(15 * 60);

/// `time` as a version: microseconds since the Unix epoch (0 before it).
pub fn at(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    })
}

/// How far `version` is ahead of `now`, if that is more than
/// [`MAX_AHEAD`] (`None`: acceptable).
pub fn too_far_ahead(version: u64, now: SystemTime) -> Option<Duration> {
    let ahead = Duration::from_micros(version.saturating_sub(at(now)));
    (ahead > MAX_AHEAD).then_some(ahead)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_versions_far_ahead_of_the_clock_are_refused() {
        let now = SystemTime::now();
        for version in [0, 1, 42, at(now - MAX_AHEAD), at(now), at(now + MAX_AHEAD)] {
            assert_eq!(too_far_ahead(version, now), None, "{version}");
        }
        let just_over = at(now + MAX_AHEAD) + 1;
        assert_eq!(
            too_far_ahead(just_over, now),
            Some(MAX_AHEAD + Duration::from_micros(1))
        );
        assert!(too_far_ahead(u64::MAX, now).is_some());
        assert_eq!(at(UNIX_EPOCH + Duration::from_secs(1)), 1_000_000);
    }
}
