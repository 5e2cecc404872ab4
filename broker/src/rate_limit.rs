//! Limits on new calls (see `docs/design.md` §3): a token bucket per
//! connection and one per verified token, as two gates: [`ConnectionCalls`]
//! in front of [`Authenticator`](crate::auth::Authenticator), so that every
//! call to a `credstream.` service counts against its connection whether its
//! token is good or not, and the per-token [`TokenRateLimiter`] behind it,
//! so that only verified tokens get a bucket and a flood of forged ones
//! costs no memory (and, once its connection's burst is spent, no HMAC).
//!
//! A bucket holds `burst` calls and gains `per_second` more every second.
//! A call is taken from its connection's bucket first, then from its
//! token's. A call the connection's bucket refuses takes nothing from the
//! token's, and a call the token's bucket refuses is given back to its
//! connection; a call refused for its token (authentication) is not, so a
//! connection making refused calls in a loop is held to its own rate. One
//! misbehaving holder of a token shared by a whole cluster
//! (one connection opening streams in a tight loop) draws at most its
//! connection's rate from the token's bucket and cannot lock its cluster
//! mates out; a holder opening many connections meets the connection cap
//! (see [`connections`](crate::connections)), and per-agent tokens
//! (`CreateAgentToken` with an `agent_id`) give every worker a bucket of
//! its own. The token defaults let one agent token shared by a
//! 10,000-worker cluster reconnect all at once after a broker restart. A
//! refused call gets `RESOURCE_EXHAUSTED`, which the client and the agent
//! retry with backoff; streams already open are never touched.
//!
//! Token buckets are keyed by the verified token's [`TokenId`], never by
//! the header's spelling (padding cannot buy a fresh burst) and never by
//! the token itself. Their number is bounded by [`MAX_TRACKED`] with two
//! generations of at most half that each, with no scan: when the current
//! generation is full it becomes the previous one and the old previous one
//! is forgotten; a bucket used again moves to the current generation. A
//! forgotten bucket had not been used for a whole generation, so it was
//! full or nearly so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tonic::Status;

use crate::auth::TokenId;
use crate::connections::ConnectionInfo;
use crate::gate::Gate;

/// How many new calls one token, or one connection, may make.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CallRate {
    /// Calls added to the bucket per second.
    pub per_second: f64,
    /// The bucket's size: calls that may be made at once.
    pub burst: f64,
}

impl CallRate {
    /// The default per token.
    pub const TOKEN: CallRate = CallRate {
        per_second: 200.0,
        burst: 20_000.0,
    };
    /// The default per connection: far more than an agent (one Subscribe
    /// per connection), a publisher or a dashboard polling `GetCluster`
    /// needs, far less than a tight loop takes.
    pub const CONNECTION: CallRate = CallRate {
        per_second: 20.0,
        burst: 100.0,
    };
}

impl Default for CallRate {
    fn default() -> Self {
        Self::TOKEN
    }
}

/// Token buckets kept at most.
pub const MAX_TRACKED: usize = 65_536;

/// One token bucket.
#[derive(Debug)]
pub struct Bucket {
    calls: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(rate: CallRate, now: Instant) -> Self {
        Self {
            calls: rate.burst,
            updated: now,
        }
    }

    /// Takes one call, or returns the seconds until one is available.
    pub fn take(&mut self, rate: CallRate, now: Instant) -> Result<(), f64> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.calls = (self.calls + elapsed * rate.per_second).min(rate.burst);
        self.updated = now;
        if self.calls >= 1.0 {
            self.calls -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.calls) / rate.per_second.max(f64::MIN_POSITIVE))
        }
    }

    /// Gives back a call taken by [`take`](Self::take).
    fn give_back(&mut self, rate: CallRate) {
        self.calls = (self.calls + 1.0).min(rate.burst);
    }
}

#[derive(Debug, Default)]
struct Generations {
    current: HashMap<TokenId, Bucket>,
    previous: HashMap<TokenId, Bucket>,
}

/// The limits on new calls: per token and per connection.
#[derive(Debug)]
pub struct TokenRateLimiter {
    token_rate: CallRate,
    connection_rate: CallRate,
    buckets: Mutex<Generations>,
}

impl TokenRateLimiter {
    /// A limiter allowing `token_rate` per token and `connection_rate` per
    /// connection.
    pub fn new(token_rate: CallRate, connection_rate: CallRate) -> Self {
        Self {
            token_rate,
            connection_rate,
            buckets: Mutex::new(Generations::default()),
        }
    }

    /// Takes one call from `token`'s bucket, or says why not.
    pub fn admit_token(&self, token: TokenId, now: Instant) -> Result<(), Status> {
        let rate = self.token_rate;
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let generations = &mut *buckets;
        if !generations.current.contains_key(&token) {
            let bucket = generations
                .previous
                .remove(&token)
                .unwrap_or_else(|| Bucket::full(rate, now));
            if generations.current.len() >= MAX_TRACKED / 2 {
                generations.previous = std::mem::take(&mut generations.current);
            }
            generations.current.insert(token, bucket);
        }
        let bucket = generations.current.get_mut(&token).expect("inserted above");
        bucket.take(rate, now).map_err(|wait| {
            Status::resource_exhausted(format!(
                "too many new calls with this token (at most {} at once and {} a second); retry in {wait:.1} s, with backoff",
                rate.burst, rate.per_second
            ))
        })
    }

    /// Takes one call from `connection`'s bucket, or says why not.
    pub fn admit_connection(
        &self,
        connection: &ConnectionInfo,
        now: Instant,
    ) -> Result<(), Status> {
        let rate = self.connection_rate;
        let mut bucket = connection.calls.lock().unwrap_or_else(|e| e.into_inner());
        bucket.take(rate, now).map_err(|wait| {
            Status::resource_exhausted(format!(
                "too many new calls on this connection (at most {} at once and {} a second); retry in {wait:.1} s, with backoff",
                rate.burst, rate.per_second
            ))
        })
    }

    /// Gives back a call [`admit_connection`](Self::admit_connection) took.
    pub fn give_back(&self, connection: &ConnectionInfo) {
        connection
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .give_back(self.connection_rate);
    }

    /// Takes one call from the connection's bucket, then from the token's;
    /// a call either refuses takes nothing from the other.
    pub fn admit(
        &self,
        token: TokenId,
        connection: Option<&ConnectionInfo>,
        now: Instant,
    ) -> Result<(), Status> {
        let Some(connection) = connection else {
            return self.admit_token(token, now);
        };
        self.admit_connection(connection, now)?;
        self.admit_token(token, now)
            .inspect_err(|_| self.give_back(connection))
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        let buckets = self.buckets.lock().unwrap();
        buckets.current.len() + buckets.previous.len()
    }
}

/// The per-connection gate, applied with
/// [`GateLayer`](crate::gate::GateLayer) in front of authentication: every
/// call authentication guards (a `credstream.` service) takes one call from
/// its connection's bucket, verified or not. Health and reflection are not
/// counted.
#[derive(Clone, Debug)]
pub struct ConnectionCalls(pub Arc<TokenRateLimiter>);

/// Marks a request whose connection's call was taken, so that the token
/// gate may give it back.
#[derive(Clone, Copy, Debug)]
struct ConnectionCallTaken;

impl Gate for ConnectionCalls {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        if !crate::auth::guarded(request.uri().path()) {
            return Ok(());
        }
        let Some(connection) = request.extensions().get::<ConnectionInfo>() else {
            return Ok(());
        };
        self.0.admit_connection(connection, Instant::now())?;
        request.extensions_mut().insert(ConnectionCallTaken);
        Ok(())
    }
}

/// The per-token gate, applied behind authentication: calls with a
/// verified token are counted against it; one it refuses is given back to
/// its connection ([`ConnectionCalls`] took it). Calls without one (health,
/// reflection) are not; the authentication gate in front has refused any
/// other call without a token.
impl Gate for Arc<TokenRateLimiter> {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let Some(token) = request.extensions().get::<TokenId>() else {
            return Ok(());
        };
        self.admit_token(*token, Instant::now()).inspect_err(|_| {
            if request.extensions().get::<ConnectionCallTaken>().is_some()
                && let Some(connection) = request.extensions().get::<ConnectionInfo>()
            {
                self.give_back(connection);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;

    use super::*;

    fn rate(per_second: f64, burst: f64) -> CallRate {
        CallRate { per_second, burst }
    }

    fn id(n: u64) -> TokenId {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&n.to_be_bytes());
        TokenId(bytes)
    }

    #[test]
    fn a_token_gets_its_burst_then_its_rate() {
        let limiter = TokenRateLimiter::new(rate(2.0, 3.0), CallRate::CONNECTION);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.admit_token(id(1), t0).unwrap();
        }
        let refused = limiter.admit_token(id(1), t0).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("retry in 0.5 s"), "{refused:?}");
        let later = t0 + Duration::from_millis(500);
        limiter.admit_token(id(1), later).unwrap();
        assert!(limiter.admit_token(id(1), later).is_err());
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.admit_token(id(1), much_later).unwrap();
        }
        assert!(limiter.admit_token(id(1), much_later).is_err());
        // Another token has its own bucket.
        limiter.admit_token(id(2), much_later).unwrap();
    }

    #[test]
    fn a_connection_over_its_rate_takes_nothing_from_its_token() {
        let limiter = TokenRateLimiter::new(rate(1.0, 10.0), rate(1.0, 2.0));
        let now = Instant::now();
        let noisy = ConnectionInfo::for_tests(1);
        for _ in 0..2 {
            limiter.admit(id(7), Some(&noisy), now).unwrap();
        }
        for _ in 0..100 {
            let refused = limiter.admit(id(7), Some(&noisy), now).unwrap_err();
            assert!(
                refused.message().contains("on this connection"),
                "{refused:?}"
            );
        }
        // The token's bucket lost only the two calls that were served, so
        // its other eight calls go to other connections.
        for n in 0..8 {
            limiter
                .admit(id(7), Some(&ConnectionInfo::for_tests(10 + n)), now)
                .unwrap();
        }
        let refused = limiter
            .admit(id(7), Some(&ConnectionInfo::for_tests(99)), now)
            .unwrap_err();
        assert!(refused.message().contains("with this token"), "{refused:?}");
    }

    #[test]
    fn every_guarded_call_counts_against_its_connection_token_or_not() {
        let limiter = Arc::new(TokenRateLimiter::new(rate(1.0, 10.0), rate(0.001, 2.0)));
        let connection = ConnectionInfo::for_tests(1);
        let gate = ConnectionCalls(limiter.clone());
        let call = |path: &str| {
            let mut request = http::Request::builder().uri(path).body(()).unwrap();
            request.extensions_mut().insert(connection.clone());
            gate.admit(&mut request)
        };
        // No token at all (authentication, behind, would refuse them).
        call("/credstream.v1.AgentService/Subscribe").unwrap();
        call("/credstream.v1.AdminService/ListClusters").unwrap();
        let refused = call("/credstream.v1.AgentService/Subscribe").unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused.message().contains("on this connection"),
            "{refused:?}"
        );
        // Health and reflection stay uncounted.
        call("/grpc.health.v1.Health/Check").unwrap();
        // The spent connection keeps verified tokens out too.
        assert!(
            TokenRateLimiter::admit(&limiter, id(1), Some(&connection), Instant::now()).is_err()
        );
    }

    #[test]
    fn the_number_of_buckets_is_bounded_without_losing_live_ones() {
        let limiter = TokenRateLimiter::new(rate(1.0, 2.0), CallRate::CONNECTION);
        let t0 = Instant::now();
        // A token that has spent its burst...
        limiter.admit_token(id(0), t0).unwrap();
        limiter.admit_token(id(0), t0).unwrap();
        // ...then far more tokens than the bound, the spent one used every
        // quarter of the bound, as a live token is.
        for n in 1..(2 * MAX_TRACKED as u64) {
            limiter.admit_token(id(n), t0).unwrap();
            assert!(limiter.tracked() <= MAX_TRACKED);
            if n % (MAX_TRACKED as u64 / 4) == 0 {
                assert!(limiter.admit_token(id(0), t0).is_err());
            }
        }
        // Still spent: the flood of other tokens did not refill it.
        assert!(limiter.admit_token(id(0), t0).is_err());
    }
}
