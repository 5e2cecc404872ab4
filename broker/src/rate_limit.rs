//! Per-token limits on new calls (DESIGN §3): a token bucket per bearer
//! token, as a tower layer behind [`Authenticator`](crate::auth::Authenticator), so
//! that only verified tokens are counted and a flood of forged ones costs
//! an HMAC each and no memory.
//!
//! A token may open `burst` calls at once and `per_second` more every
//! second. The defaults let one agent token shared by a 10,000-worker
//! cluster reconnect all at once after a broker restart, and stop a client
//! stuck in a tight reconnect loop from costing the broker more than
//! `per_second` calls a second. A refused call gets `RESOURCE_EXHAUSTED`,
//! which the client and the agent retry with backoff; streams already open
//! are never touched. Messages on open streams are bounded elsewhere (hints
//! per agent, acks coalesced).
//!
//! Buckets are keyed by a SHA-256 prefix of the token, never the token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tonic::Status;

use crate::gate::Gate;

/// How many new calls one token may make.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallRate {
    /// Calls added to the bucket per second.
    pub per_second: f64,
    /// The bucket's size: calls a token may make at once.
    pub burst: f64,
}

impl Default for CallRate {
    fn default() -> Self {
        Self {
            per_second: 200.0,
            burst: 20_000.0,
        }
    }
}

/// Buckets kept before full (idle) ones are forgotten.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug)]
struct Bucket {
    calls: f64,
    updated: Instant,
}

/// The buckets of every token seen recently.
#[derive(Debug)]
pub struct TokenRateLimiter {
    rate: CallRate,
    buckets: Mutex<HashMap<[u8; 16], Bucket>>,
}

impl TokenRateLimiter {
    /// A limiter allowing `rate` per token.
    pub fn new(rate: CallRate) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one call from `token`'s bucket, or says why not.
    pub fn admit(&self, token: &[u8], now: Instant) -> Result<(), Status> {
        let key = key_of(token);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(&key) {
            let rate = self.rate;
            buckets.retain(|_, bucket| refilled(bucket, rate, now) < rate.burst);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            calls: self.rate.burst,
            updated: now,
        });
        bucket.calls = refilled(bucket, self.rate, now);
        bucket.updated = now;
        if bucket.calls >= 1.0 {
            bucket.calls -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.calls) / self.rate.per_second.max(f64::MIN_POSITIVE);
            Err(Status::resource_exhausted(format!(
                "too many new calls with this token (at most {} at once and {} a second); retry in {:.1} s, with backoff",
                self.rate.burst, self.rate.per_second, wait
            )))
        }
    }
}

fn refilled(bucket: &Bucket, rate: CallRate, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.calls + elapsed * rate.per_second).min(rate.burst)
}

fn key_of(token: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(token);
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// Applied with [`GateLayer`](crate::gate::GateLayer) behind authentication:
/// calls that carry a bearer token are counted against it. Calls without
/// one (health, reflection) are not; the authentication gate in front has
/// refused any other call without a token.
impl Gate for Arc<TokenRateLimiter> {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        match request.headers().get(http::header::AUTHORIZATION) {
            Some(token) => TokenRateLimiter::admit(self, token.as_bytes(), Instant::now()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    fn limiter(per_second: f64, burst: f64) -> TokenRateLimiter {
        TokenRateLimiter::new(CallRate { per_second, burst })
    }

    #[test]
    fn a_token_gets_its_burst_then_its_rate() {
        let limiter = limiter(2.0, 3.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.admit(b"token-a", t0).unwrap();
        }
        let refused = limiter.admit(b"token-a", t0).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("retry in 0.5 s"), "{refused:?}");
        // Half a second later one more call is allowed, and only one.
        let later = t0 + Duration::from_millis(500);
        limiter.admit(b"token-a", later).unwrap();
        assert!(limiter.admit(b"token-a", later).is_err());
        // A long pause refills to the burst, not beyond.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.admit(b"token-a", much_later).unwrap();
        }
        assert!(limiter.admit(b"token-a", much_later).is_err());
    }

    #[test]
    fn tokens_have_separate_buckets_and_none_is_kept_in_clear() {
        let limiter = limiter(1.0, 1.0);
        let now = Instant::now();
        limiter.admit(b"Bearer secret-one", now).unwrap();
        assert!(limiter.admit(b"Bearer secret-one", now).is_err());
        limiter.admit(b"Bearer secret-two", now).unwrap();
        let held = format!("{limiter:?}");
        assert!(!held.contains("secret"), "{held}");
    }

    #[test]
    fn idle_buckets_are_forgotten_when_many_tokens_were_seen() {
        let limiter = limiter(1.0, 1.0);
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED {
            limiter.admit(&i.to_be_bytes(), t0).unwrap();
        }
        // Two seconds on, every bucket is full again: a new token makes
        // room by forgetting them.
        limiter
            .admit(b"newcomer", t0 + Duration::from_secs(2))
            .unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }
}
