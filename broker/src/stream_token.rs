//! [`StreamToken`]: the token a Publish or Subscribe stream runs on, checked
//! for as long as the stream lasts, and renewed before it expires.
//!
//! The authentication gate checks a token once, when the call starts; a
//! stream can last for days. So each stream keeps the claims of its
//! *current* token — the one it was opened with or, for a peer whose hello
//! set `accepts_token_renewal`, the last renewal the broker sent on it —
//! and asks [`StreamToken::step`] whenever it wakes:
//!
//! - **Expiry.** At the current token's expiry the stream ends with
//!   `UNAUTHENTICATED` ([`auth::token_expired`]).
//! - **Key removal.** After a reload of the key ring ([`TokenKey::reloads`]
//!   changed), a current token whose signing key — or, for a token from
//!   `CreateAgentToken`, whose issuer's key — left the ring ends the stream
//!   with `UNAUTHENTICATED` naming the key.
//! - **Renewal** (peers that accept it only). A renewal has the current
//!   token's role, cluster, agent binding and lifetime, and is signed with
//!   the signing key ([`TokenKey::renew`]); an agent stream's renewal is
//!   bound to the stream's agent id. It is sent when less than
//!   [`renewal_lead`] of the lifetime is left (a third; for a token of
//!   less than 15 minutes, half of it or 5 minutes before expiry, whichever
//!   is sooner), at once when the current token is signed by a key other
//!   than the signing key (a token of the old key during a rotation), and
//!   after a reload that made another key the signing key. The last is
//!   what makes a rotation free for connected peers: promote the new key,
//!   every connected peer is handed a token of it, and removing the old
//!   key later ends nothing that is connected.
//! - **Issuer binding across a rotation.** A renewal keeps the current
//!   token's issuer binding, so that connecting cannot launder a token
//!   issued from an old-key token; the one exception is a stream that was
//!   live when the key it is bound to was promoted away from — the binding
//!   then moves to the new signing key, since that stream was legitimately
//!   running on the key that signed at the time.
//!
//! The stream's wake-ups come from its own machinery: the agent body's
//! timer and its cluster's bell (which the server rings on every reload),
//! the publisher task's `select!`. A `StreamToken` holds no task and no
//! timer of its own; [`StreamToken::deadline`] says when to look again.

use std::time::{Duration, SystemTime};

use credstream_proto::convert::timestamp;
use credstream_proto::v1::TokenRenewal;
use tokio::time::Instant;
use tonic::Status;

use crate::auth::{self, Claims, TokenKey};

/// The longest a renewal waits, counted back from expiry, for a token of
/// less than 15 minutes (for longer ones a third of the lifetime is more).
const MAX_SHORT_LEAD: Duration = Duration::from_secs(5 * 60);

/// How long before its expiry a token is renewed: a third of its
/// `lifetime`, but never less than `min(lifetime / 2, 5 minutes)`. A 12 h
/// token is renewed 4 h before it expires, a 10-minute one 5 minutes
/// before, a 3-second one 1.5 s before. The margin lets a peer whose
/// stream broke reconnect with the renewal (through a broker restart, say)
/// long before the token it holds expires.
pub fn renewal_lead(lifetime: Duration) -> Duration {
    (lifetime / 3).max((lifetime / 2).min(MAX_SHORT_LEAD))
}

/// The tokio instant of the wall-clock time `at` (now if it has passed).
fn instant_of(at: SystemTime) -> Instant {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}

/// The token of one stream; see the module documentation.
#[derive(Debug)]
pub struct StreamToken {
    /// The current token's claims (an agent stream's carry its agent id).
    claims: Claims,
    /// The lifetime of every renewal: the lifetime of the token the stream
    /// was opened with.
    lifetime: Duration,
    /// When the current token expires.
    expires_at: Instant,
    /// When to send the next renewal; `None` for a peer that does not
    /// accept renewals.
    renew_at: Option<Instant>,
    /// [`TokenKey::reloads`] when the stream last looked at the ring.
    reloads_seen: u64,
    /// The signing key's id when the stream last looked at the ring.
    signer_seen: String,
}

impl StreamToken {
    /// The token of a stream opened with `claims`. `renews`: the peer's
    /// hello set `accepts_token_renewal`. `agent_id`: the agent id of an
    /// agent stream, which every renewal is bound to.
    pub fn new(key: &TokenKey, mut claims: Claims, renews: bool, agent_id: Option<&str>) -> Self {
        if let Some(agent) = agent_id {
            claims.agent_id = Some(agent.to_owned());
        }
        let signer = key.signer_id();
        let expires_at = instant_of(claims.expires_at());
        let lifetime = claims.lifetime();
        let renew_at = renews.then(|| {
            if claims.key_id.as_deref() == Some(signer.as_str()) {
                expires_at
                    .checked_sub(renewal_lead(lifetime))
                    .unwrap_or_else(Instant::now)
            } else {
                // A token of another key: renew it now, so that the key can
                // be removed without ending this stream.
                Instant::now()
            }
        });
        Self {
            claims,
            lifetime,
            expires_at,
            renew_at,
            reloads_seen: key.reloads(),
            signer_seen: signer,
        }
    }

    /// When [`step`](Self::step) has something to do next, unless a reload
    /// of the key ring comes first: the renewal point or the expiry.
    pub fn deadline(&self) -> Instant {
        self.renew_at
            .map_or(self.expires_at, |at| at.min(self.expires_at))
    }

    /// The current token's claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// Looks at the token now: `Err` is the status that ends the stream;
    /// `Ok(Some)` a renewal to send (it is the stream's token from now on);
    /// `Ok(None)` nothing to do before [`deadline`](Self::deadline) or the
    /// next reload.
    pub fn step(&mut self, key: &TokenKey) -> Result<Option<TokenRenewal>, Status> {
        let mut rebind_from = None;
        if key.reloads() != self.reloads_seen {
            self.reloads_seen = key.reloads();
            if let Some(id) = self.claims.key_id.as_deref()
                && !key.holds(id)
            {
                return Err(auth::signing_key_removed(id));
            }
            if let Some(id) = self.claims.issuer_key.as_deref()
                && !key.holds(id)
            {
                return Err(auth::issuer_key_removed(id));
            }
            let signer = key.signer_id();
            if signer != self.signer_seen {
                let before = std::mem::replace(&mut self.signer_seen, signer);
                if let Some(at) = &mut self.renew_at {
                    *at = Instant::now();
                }
                rebind_from = Some(before);
            }
        }
        let now = Instant::now();
        if now >= self.expires_at {
            return Err(auth::token_expired(&self.claims));
        }
        if self.renew_at.is_none_or(|at| now < at) {
            return Ok(None);
        }
        let mut template = self.claims.clone();
        if let Some(before) = rebind_from
            && template.issuer_key.as_deref() == Some(before.as_str())
        {
            template.issuer_key = Some(self.signer_seen.clone());
        }
        let (token, claims) = key.renew(&template, self.lifetime);
        self.expires_at = instant_of(claims.expires_at());
        self.renew_at = Some(
            self.expires_at
                .checked_sub(renewal_lead(self.lifetime))
                .unwrap_or(now),
        );
        let expires_at = Some(timestamp(claims.expires_at()));
        self.claims = claims;
        Ok(Some(TokenRenewal { token, expires_at }))
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use super::*;
    use crate::auth::{KEY_RING_HEADER, Role};

    fn ring(path: &std::path::Path, keys: &[[u8; 32]]) {
        let lines: Vec<String> = keys.iter().map(|k| STANDARD.encode(k)).collect();
        std::fs::write(path, format!("{KEY_RING_HEADER}\n{}\n", lines.join("\n"))).unwrap();
    }

    fn agent_claims(key: &TokenKey, ttl: Duration) -> Claims {
        let token = key.issue(Role::Agent, Some("c"), ttl).unwrap();
        key.verify(&token).unwrap()
    }

    #[test]
    fn the_renewal_lead_is_a_third_and_never_short() {
        let lead = |secs| renewal_lead(Duration::from_secs(secs)).as_secs_f64();
        assert_eq!(lead(12 * 3600), 4.0 * 3600.0);
        assert_eq!(lead(600), 300.0);
        assert_eq!(lead(3), 1.5);
        assert_eq!(lead(15 * 60), 300.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewing_stream_is_renewed_at_its_renewal_point_and_never_expires() {
        let key = TokenKey::generate();
        let lifetime = Duration::from_secs(3600);
        let mut stream = StreamToken::new(&key, agent_claims(&key, lifetime), true, Some("w-1"));
        let renew_in = lifetime - renewal_lead(lifetime);
        // Up to the renewal point nothing happens (whole seconds: the
        // token's expiry is rounded down to one).
        tokio::time::advance(renew_in - Duration::from_secs(2)).await;
        assert!(stream.step(&key).unwrap().is_none());
        tokio::time::sleep_until(stream.deadline()).await;
        let renewal = stream.step(&key).unwrap().expect("renewed at the point");
        let claims = key.verify(&renewal.token).unwrap();
        assert_eq!(claims.role, Role::Agent);
        assert_eq!(claims.cluster.as_deref(), Some("c"));
        assert_eq!(
            claims.agent_id.as_deref(),
            Some("w-1"),
            "bound to its agent"
        );
        assert_eq!(claims.lifetime(), lifetime);
        assert!(!format!("{renewal:?}").contains(&renewal.token));
        // Renewal after renewal, the stream outlives any one token.
        for _ in 0..5 {
            assert!(stream.step(&key).unwrap().is_none());
            tokio::time::sleep_until(stream.deadline()).await;
            assert!(stream.step(&key).unwrap().is_some());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_takes_no_renewals_ends_when_its_token_expires() {
        let key = TokenKey::generate();
        let claims = agent_claims(&key, Duration::from_secs(600));
        let mut stream = StreamToken::new(&key, claims, false, None);
        let expiry = stream.deadline();
        tokio::time::advance(expiry - Instant::now() - Duration::from_millis(1)).await;
        assert!(stream.step(&key).unwrap().is_none(), "not before expiry");
        tokio::time::advance(Duration::from_millis(1)).await;
        let ended = stream.step(&key).unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Unauthenticated);
        assert!(
            ended.message().contains("expired at") && ended.message().contains("reconnect"),
            "{ended:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_promoted_key_renews_at_once_and_a_removed_key_ends_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (old, new) = ([1u8; 32], [2u8; 32]);
        ring(&path, &[old]);
        let key = TokenKey::from_file(&path).unwrap();
        let old_id = key.signer_id();
        let hour = Duration::from_secs(3600);
        let mut renewing = StreamToken::new(&key, agent_claims(&key, hour), true, None);
        let mut fixed = StreamToken::new(&key, agent_claims(&key, hour), false, None);
        // An issued token bound to the old key, on a live renewing stream.
        let (issued, _) = key.issue_bound_agent("c", None, hour, &old_id).unwrap();
        let mut bound = StreamToken::new(&key, key.verify(&issued).unwrap(), true, None);

        ring(&path, &[new, old]);
        key.reload().unwrap();
        let new_id = key.signer_id();
        let renewed = renewing
            .step(&key)
            .unwrap()
            .expect("renewed at the promotion");
        assert_eq!(
            key.verify(&renewed.token).unwrap().key_id,
            Some(new_id.clone())
        );
        assert!(fixed.step(&key).unwrap().is_none());
        let rebound = bound.step(&key).unwrap().expect("renewed too");
        assert_eq!(
            key.verify(&rebound.token).unwrap().issuer_key,
            Some(new_id.clone()),
            "live across the promotion: the binding moves with it"
        );
        // A token issued from an old-key token during the overlap keeps
        // its binding, even on a stream that is renewed.
        let (late, _) = key.issue_bound_agent("c", None, hour, &old_id).unwrap();
        let mut late = StreamToken::new(&key, key.verify(&late).unwrap(), true, None);
        assert!(late.step(&key).unwrap().is_none(), "signed by the signer");

        ring(&path, &[new]);
        key.reload().unwrap();
        assert!(renewing.step(&key).unwrap().is_none(), "on the new key");
        assert!(bound.step(&key).unwrap().is_none(), "rebound");
        let ended = fixed.step(&key).unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Unauthenticated);
        assert!(ended.message().contains(&old_id), "{ended:?}");
        assert!(ended.message().contains("removed"), "{ended:?}");
        let ended = late.step(&key).unwrap_err();
        assert!(ended.message().contains(&old_id), "{ended:?}");
        assert!(key.verify(&issued).is_err(), "the issued token is refused");
    }

    #[test]
    fn a_stream_token_is_small() {
        // Per agent stream, inline in its body (plus its strings: cluster,
        // agent id, two 8-digit key ids).
        assert!(
            std::mem::size_of::<StreamToken>() <= 256,
            "{}",
            std::mem::size_of::<StreamToken>()
        );
    }
}
