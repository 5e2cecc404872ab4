//! Exponential backoff with jitter: the agent's and the publisher's
//! reconnects (full jitter) and the broker's refresh retries (equal
//! jitter). Many peers retrying after one incident must spread out rather
//! than arrive together, which is what the jitter is for.

use std::time::Duration;

use rand::Rng;

/// Doubling delays from `base`, capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The bound of the first retry.
    pub base: Duration,
    /// The largest bound.
    pub max: Duration,
}

impl Backoff {
    /// Delays from `base` doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self { base, max }
    }

    /// The bound for retry number `attempt` (0 for the first):
    /// `base · 2^attempt`, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max)
    }

    /// Full jitter: uniform in `[0, ceiling(attempt))`. For reconnects:
    /// spreads a crowd the most; an occasional immediate retry is fine.
    pub fn full_jitter(&self, attempt: u32) -> Duration {
        self.ceiling(attempt)
            .mul_f64(rand::thread_rng().r#gen::<f64>())
    }

    /// Equal jitter: half the ceiling fixed, half uniform. For retries that
    /// should spread out but never happen at once.
    pub fn equal_jitter(&self, attempt: u32) -> Duration {
        let half = self.ceiling(attempt) / 2;
        half + half.mul_f64(rand::thread_rng().r#gen::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

    #[test]
    fn the_ceiling_doubles_up_to_the_cap() {
        assert_eq!(BACKOFF.ceiling(0), Duration::from_millis(250));
        assert_eq!(BACKOFF.ceiling(1), Duration::from_millis(500));
        assert_eq!(BACKOFF.ceiling(6), Duration::from_secs(16));
        assert_eq!(BACKOFF.ceiling(7), Duration::from_secs(30));
        assert_eq!(BACKOFF.ceiling(u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_its_band() {
        for attempt in [0, 3, 40] {
            let ceiling = BACKOFF.ceiling(attempt);
            for _ in 0..200 {
                assert!(BACKOFF.full_jitter(attempt) < ceiling);
                let equal = BACKOFF.equal_jitter(attempt);
                assert!(equal >= ceiling / 2 && equal <= ceiling, "{equal:?}");
            }
        }
    }
}
