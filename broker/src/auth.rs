//! Bearer tokens and the authentication layer.
//!
//! A token is `cs1.<claims>.<mac>`: base64url JSON claims (role, cluster,
//! expiry, the id of the key that signed it) and an HMAC-SHA256 over them
//! with that key. Tokens are stateless — the broker can verify one after a
//! restart with the same key file — and scoped to one cluster and one role.
//!
//! **Key files and rotation.** A key file is either one raw key (at least
//! 32 bytes, `head -c 32 /dev/urandom > key`) or a key ring: a text file
//! whose first line is `credstream-keys v1`, then one standard-base64 key
//! per line (blank lines and `#` comments ignored). The first key signs;
//! every key verifies. A key's id is the first 8 hex digits of the SHA-256
//! of its bytes; tokens carry it (`k`), and a token without one (issued
//! before key rings) is tried against every key. [`TokenKey::reload`]
//! re-reads the file in place (the broker does on SIGHUP), so a key can be
//! added, promoted and removed without a restart.
//!
//! **Tokens on streams.** A token is checked when a call starts and, for
//! the Publish and Subscribe streams, while the stream lasts
//! ([`crate::stream_token`]): the stream ends when its token expires or a
//! reload removes its key, and a peer that keeps renewals is handed fresh
//! ones ([`TokenKey::renew`]). [`TokenKey::changes`] tells streams that the
//! ring was reloaded.
//!
//! **Issued tokens are bound to their issuer's key.** A token from
//! `CreateAgentToken` names (`ik`) the key that signed the token that asked
//! for it; [`TokenKey::verify`] refuses it once that key is gone, so a token
//! of a key being retired cannot be traded, during the rotation overlap, for
//! a token of the new key that survives the old key's removal.
//!
//! [`Authenticator`] is a tower layer in front of every `credstream.v1` service,
//! so no service can forget it: it answers `UNAUTHENTICATED` for a missing,
//! malformed, forged or expired token and `PERMISSION_DENIED` for a valid
//! token used with the wrong service or against the routing header of another
//! cluster, and hands the verified [`Claims`] to the service in the request
//! extensions. Health and reflection stay open, as operators expect.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tonic::Status;
use zeroize::Zeroizing;

use credstream_proto::connect::CLUSTER_HEADER;

use crate::gate::Gate;

const TOKEN_PREFIX: &str = "cs1";
/// The shortest key the broker accepts, in bytes.
pub const MIN_KEY_LEN: usize = 32;

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Publishes to, and inspects, one cluster; the only role that may
    /// issue agent tokens (for its cluster).
    Publisher,
    /// Subscribes to one cluster.
    Agent,
    /// Inspects every cluster (or one, if scoped); never issues tokens.
    Admin,
}

impl Role {
    /// The role with its indefinite article, for messages: "an agent",
    /// "an admin", "a publisher".
    pub fn with_article(self) -> &'static str {
        match self {
            Role::Publisher => "a publisher",
            Role::Agent => "an agent",
            Role::Admin => "an admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Publisher => "publisher",
            Role::Agent => "agent",
            Role::Admin => "admin",
        })
    }
}

/// The verified content of a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The role.
    #[serde(rename = "r")]
    pub role: Role,
    /// The cluster the token is scoped to; `None` only for an admin token
    /// that may inspect every cluster.
    #[serde(rename = "c", default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    #[serde(rename = "exp")]
    pub expires: u64,
    /// For an agent token bound to one agent: the only `agent_id` its
    /// Subscribe hello may carry.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The id of the key that signed the token (absent in tokens issued
    /// before key rings; [`TokenKey::verify`] fills it in with the key that
    /// verified it).
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// When the token was issued, seconds since the Unix epoch (absent in
    /// tokens issued before renewal): a renewal has the same lifetime.
    #[serde(rename = "iat", default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<u64>,
    /// For a token issued by `CreateAgentToken`: the id of the key that
    /// signed the token that asked for it. The token is refused once that
    /// key leaves the ring (see the module documentation).
    #[serde(rename = "ik", default, skip_serializing_if = "Option::is_none")]
    pub issuer_key: Option<String>,
}

impl Claims {
    /// True if this token may act on `cluster`.
    pub fn covers(&self, cluster: &str) -> bool {
        self.cluster.as_deref().is_none_or(|own| own == cluster)
    }

    /// `PERMISSION_DENIED` unless the token may be used by `agent_id`: a
    /// token bound to one agent serves that agent only.
    pub fn require_agent(&self, agent_id: &str) -> Result<(), Status> {
        match &self.agent_id {
            Some(bound) if bound != agent_id => Err(Status::permission_denied(format!(
                "this agent token is bound to agent {bound:?}, not {agent_id:?}; give each worker its own token"
            ))),
            _ => Ok(()),
        }
    }

    /// Time left before the token expires (zero if it has).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires.saturating_sub(now_secs()))
    }

    /// The token's expiry as a time.
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.expires)
    }

    /// The token's lifetime: from its issue to its expiry, or, for a token
    /// without an issue time, what was left of it at `now_secs` (at least
    /// one second).
    pub fn lifetime(&self) -> Duration {
        let from = self.issued_at.unwrap_or_else(now_secs);
        Duration::from_secs(self.expires.saturating_sub(from).max(1))
    }

    /// `PERMISSION_DENIED` unless the token covers `cluster`.
    pub fn require_cluster(&self, cluster: &str) -> Result<(), Status> {
        if self.covers(cluster) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this {} token is for another cluster, not {cluster:?}",
                self.role
            )))
        }
    }
}

/// Errors loading a key or issuing a token.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read.
    #[error("cannot read token key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The key is too short to be safe.
    #[error(
        "token key file {path} holds {len} bytes; it needs at least {MIN_KEY_LEN} random bytes (create one with `head -c 32 /dev/urandom > {path}`)"
    )]
    TooShort {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// A line of a key ring is not a usable key.
    #[error(
        "token key file {path}, line {line}: {reason} (each line after `credstream-keys v1` is one key of at least {MIN_KEY_LEN} bytes in standard base64: `head -c 32 /dev/urandom | base64 -w0`)"
    )]
    BadRingLine {
        /// The file.
        path: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A key ring without a key.
    #[error(
        "token key file {path} is a key ring with no key; add one line of base64 key after `credstream-keys v1`"
    )]
    EmptyRing {
        /// The file.
        path: String,
    },
    /// A token was requested without the cluster its role needs.
    #[error("a {0} token needs --cluster")]
    ClusterRequired(Role),
    /// An agent id was given for a role other than agent, or is malformed.
    #[error(
        "--agent-id binds an agent token to one agent: it needs --role agent and 1 to 128 characters of [A-Za-z0-9._-] starting with a letter or digit"
    )]
    BadAgentBinding,
}

/// The first line of a key ring file.
pub const KEY_RING_HEADER: &str = "credstream-keys v1";
/// Most keys a ring may hold (each unmarked token may cost one HMAC per key).
pub const MAX_RING_KEYS: usize = 16;

struct Key {
    id: String,
    bytes: Zeroizing<Vec<u8>>,
}

impl Key {
    fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        use sha2::Digest;
        let digest = Sha256::digest(bytes.as_slice());
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Self { id, bytes }
    }
}

/// The broker's signing keys: the first signs, all verify. Clones share
/// the keys, so [`reload`](Self::reload) reaches every holder. `Debug`
/// never shows a key; keys are zeroized on drop.
#[derive(Clone)]
pub struct TokenKey {
    ring: Arc<RwLock<Arc<Vec<Key>>>>,
    path: Option<Arc<Path>>,
    /// Counts reloads: streams compare it with the count they last saw, and
    /// [`changes`](Self::changes) wakes whoever waits for one.
    reloads: Arc<tokio::sync::watch::Sender<u64>>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.keys();
        let lens: Vec<usize> = ring.iter().map(|key| key.bytes.len()).collect();
        match lens.as_slice() {
            [one] => write!(f, "TokenKey(<redacted {one} bytes>)"),
            _ => write!(f, "TokenKey(<{} redacted keys>)", lens.len()),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn read_ring(path: &Path) -> Result<Vec<Key>, KeyError> {
    let shown = || path.display().to_string();
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown(),
        source,
    })?);
    let Some(rest) = bytes.strip_prefix(KEY_RING_HEADER.as_bytes()) else {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort {
                path: shown(),
                len: bytes.len(),
            });
        }
        return Ok(vec![Key::new(bytes)]);
    };
    let text = std::str::from_utf8(rest).map_err(|_| KeyError::BadRingLine {
        path: shown(),
        line: 1,
        reason: "the file is not text",
    })?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason| KeyError::BadRingLine {
            path: shown(),
            line: n + 1,
            reason,
        };
        let key = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|_| bad("not standard base64"))?,
        );
        if key.len() < MIN_KEY_LEN {
            return Err(bad("the key is shorter than 32 bytes"));
        }
        if keys.len() == MAX_RING_KEYS {
            return Err(bad("a key ring holds at most 16 keys"));
        }
        keys.push(Key::new(key));
    }
    if keys.is_empty() {
        return Err(KeyError::EmptyRing { path: shown() });
    }
    Ok(keys)
}

fn mac(key: &Key, payload: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key.bytes).expect("HMAC takes any key length");
    mac.update(TOKEN_PREFIX.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    mac
}

impl TokenKey {
    fn from_keys(keys: Vec<Key>, path: Option<&Path>) -> Self {
        Self {
            ring: Arc::new(RwLock::new(Arc::new(keys))),
            path: path.map(Arc::from),
            reloads: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    /// A fresh random key (for `--dev` and tests).
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), key.as_mut_slice());
        Self::from_keys(vec![Key::new(Zeroizing::new(key))], None)
    }

    /// Reads a key file: one raw key of at least [`MIN_KEY_LEN`] bytes, or
    /// a key ring (see the module documentation).
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        Ok(Self::from_keys(read_ring(path)?, Some(path)))
    }

    /// Re-reads the key file this key came from, for every clone; on an
    /// error the keys in use stay. Returns the key ids, signing key first.
    pub fn reload(&self) -> Result<Vec<String>, KeyError> {
        let Some(path) = &self.path else {
            return Ok(self.key_ids());
        };
        let keys = read_ring(path)?;
        *self.ring.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        self.reloads.send_modify(|count| *count += 1);
        Ok(self.key_ids())
    }

    /// How many reloads have succeeded: a stream that saw another count
    /// looks at the ring again.
    pub fn reloads(&self) -> u64 {
        *self.reloads.borrow()
    }

    /// Changes with every successful [`reload`](Self::reload).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// The id of the signing key.
    pub fn signer_id(&self) -> String {
        self.keys()[0].id.clone()
    }

    /// True if the ring holds the key with id `id`.
    pub fn holds(&self, id: &str) -> bool {
        self.keys().iter().any(|key| key.id == id)
    }

    /// The ids of the keys, signing key first.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys().iter().map(|key| key.id.clone()).collect()
    }

    fn keys(&self) -> Arc<Vec<Key>> {
        self.ring.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Issues a token. Publisher and agent tokens need a cluster.
    pub fn issue(
        &self,
        role: Role,
        cluster: Option<&str>,
        ttl: Duration,
    ) -> Result<String, KeyError> {
        self.issue_for_agent(role, cluster, None, ttl)
    }

    /// Issues a token; an agent token may be bound to one `agent_id`.
    pub fn issue_for_agent(
        &self,
        role: Role,
        cluster: Option<&str>,
        agent_id: Option<&str>,
        ttl: Duration,
    ) -> Result<String, KeyError> {
        if cluster.is_none() && role != Role::Admin {
            return Err(KeyError::ClusterRequired(role));
        }
        if let Some(agent) = agent_id
            && (role != Role::Agent || crate::limits::check_id("agent_id", agent).is_err())
        {
            return Err(KeyError::BadAgentBinding);
        }
        let now = now_secs();
        let claims = Claims {
            role,
            cluster: cluster.map(str::to_owned),
            expires: now.saturating_add(ttl.as_secs()),
            agent_id: agent_id.map(str::to_owned),
            key_id: None,
            issued_at: Some(now),
            issuer_key: None,
        };
        Ok(self.sign(claims).0)
    }

    /// Issues an agent token for `CreateAgentToken`, bound to
    /// `issuer_key`, the key of the token that asked for it (see the
    /// module documentation).
    pub fn issue_bound_agent(
        &self,
        cluster: &str,
        agent_id: Option<&str>,
        ttl: Duration,
        issuer_key: &str,
    ) -> Result<(String, Claims), KeyError> {
        if agent_id.is_some_and(|agent| crate::limits::check_id("agent_id", agent).is_err()) {
            return Err(KeyError::BadAgentBinding);
        }
        let now = now_secs();
        Ok(self.sign(Claims {
            role: Role::Agent,
            cluster: Some(cluster.to_owned()),
            expires: now.saturating_add(ttl.as_secs()),
            agent_id: agent_id.map(str::to_owned),
            key_id: None,
            issued_at: Some(now),
            issuer_key: Some(issuer_key.to_owned()),
        }))
    }

    /// A fresh token with the claims of `current` (role, cluster, agent
    /// binding, issuer binding) and `lifetime` from now, signed with the
    /// signing key: what a stream's peer is handed to replace its token.
    pub fn renew(&self, current: &Claims, lifetime: Duration) -> (String, Claims) {
        let now = now_secs();
        let claims = Claims {
            expires: now.saturating_add(lifetime.as_secs()),
            issued_at: Some(now),
            key_id: None,
            ..current.clone()
        };
        self.sign(claims)
    }

    /// Signs `claims` with the signing key (setting `key_id` to it).
    fn sign(&self, mut claims: Claims) -> (String, Claims) {
        let keys = self.keys();
        let signer = &keys[0];
        claims.key_id = Some(signer.id.clone());
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let tag = URL_SAFE_NO_PAD.encode(mac(signer, &payload).finalize().into_bytes());
        (format!("{TOKEN_PREFIX}.{payload}.{tag}"), claims)
    }

    /// Verifies a token; the error is the `UNAUTHENTICATED` status to send.
    pub fn verify(&self, token: &str) -> Result<Claims, Status> {
        let malformed = || {
            Status::unauthenticated("malformed bearer token: expected a credstream token (cs1.…)")
        };
        let mut parts = token.split('.');
        let (Some(TOKEN_PREFIX), Some(payload), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| malformed())?;
        // The claims are parsed before the MAC is checked only to learn
        // which key to check it with; nothing else is read from them
        // until it holds.
        let mut claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or_else(malformed)?;
        let keys = self.keys();
        let signer = keys
            .iter()
            .filter(|key| claims.key_id.as_deref().is_none_or(|id| id == key.id))
            .find(|key| mac(key, payload).verify_slice(&tag).is_ok());
        let Some(signer) = signer else {
            return Err(Status::unauthenticated(
                "bearer token signature is invalid (issued by another broker key, or by a key since removed from the key file?)",
            ));
        };
        claims.key_id = Some(signer.id.clone());
        if let Some(issuer) = &claims.issuer_key
            && !keys.iter().any(|key| key.id == *issuer)
        {
            return Err(issuer_key_removed(issuer));
        }
        if claims.expires <= now_secs() {
            return Err(Status::unauthenticated(
                "bearer token has expired; issue a new one with `credstream-broker token`",
            ));
        }
        Ok(claims)
    }
}

/// The status that ends a stream whose token expired: the peer may hold a
/// renewal the stream was not opened with, so it is told to reconnect.
pub fn token_expired(claims: &Claims) -> Status {
    Status::unauthenticated(format!(
        "the {} token expired at {}; reconnect with a renewed token (credstream-agent and credstream keep the broker's renewals), or issue a new one with `credstream-broker token`",
        claims.role,
        humantime::format_rfc3339_seconds(claims.expires_at())
    ))
}

/// The status that ends a stream, or refuses a call, whose token's signing
/// key `id` left the key ring.
pub fn signing_key_removed(id: &str) -> Status {
    Status::unauthenticated(format!(
        "the token's signing key {id} was removed from the broker's key ring; reconnect with a token of a key the broker still holds (a renewal, or a new token from `credstream-broker token`)"
    ))
}

/// The status for a token from `CreateAgentToken` whose issuer's key `id`
/// left the key ring.
pub fn issuer_key_removed(id: &str) -> Status {
    Status::unauthenticated(format!(
        "this agent token was issued by a token whose signing key {id} was removed from the broker's key ring; ask the cluster's publisher for a new agent token"
    ))
}

/// A verified token's identity: the first 16 bytes of the SHA-256 of its
/// canonical text (what was verified, after trimming), inserted in the
/// request extensions beside the [`Claims`]. Every spelling of the same
/// token in the header (`Bearer  T`, `Bearer T `) has the same id, so the
/// per-token call limit cannot be bypassed by padding; and the id names a
/// token in logs without revealing it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId(pub [u8; 16]);

impl TokenId {
    /// The id of the token whose canonical text is `canonical`.
    pub fn of(canonical: &str) -> Self {
        use sha2::Digest;
        let digest = Sha256::digest(canonical.as_bytes());
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        Self(id)
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..6] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// The path of `AdminService.CreateAgentToken`, the one admin call that
/// grants access instead of describing it.
pub const CREATE_AGENT_TOKEN: &str = "/credstream.v1.AdminService/CreateAgentToken";

/// The refusal of `CreateAgentToken` to any token but a publisher's. An
/// admin token inspects; issuing an agent token hands out read access to
/// a cluster's credentials, which only the cluster's publisher (who owns
/// them) may grant (docs/design.md §3).
pub fn issuing_needs_a_publisher(role: Role) -> Status {
    Status::permission_denied(format!(
        "issuing agent tokens (CreateAgentToken) needs a publisher token of the cluster; {} token may not issue them (admin tokens only inspect). Call it with the cluster's publisher token, or have the broker's operator run `credstream-broker token --role agent --cluster ID`",
        role.with_article()
    ))
}

/// Which role may call which service (and, for `CreateAgentToken`,
/// which method).
fn role_allowed(path: &str, role: Role) -> Option<bool> {
    if path == CREATE_AGENT_TOKEN {
        return Some(role == Role::Publisher);
    }
    let service = path.strip_prefix('/')?.split('/').next()?;
    Some(match service {
        "credstream.v1.PublisherService" => role == Role::Publisher,
        "credstream.v1.AgentService" => role == Role::Agent,
        "credstream.v1.AdminService" => matches!(role, Role::Admin | Role::Publisher),
        _ if service.starts_with("credstream.") => false,
        _ => return None,
    })
}

/// True for a call authentication guards: one to a `credstream.` service
/// (health and reflection stay open).
pub fn guarded(path: &str) -> bool {
    path.strip_prefix('/')
        .is_some_and(|p| p.starts_with("credstream."))
}

fn authenticate<B>(
    key: &TokenKey,
    request: &http::Request<B>,
) -> Result<Option<(Claims, TokenId)>, Status> {
    let path = request.uri().path();
    if !guarded(path) {
        return Ok(None);
    }
    let header = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| {
            Status::unauthenticated("missing `authorization: Bearer <token>` metadata")
        })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "))
        .ok_or_else(|| {
            Status::unauthenticated("the authorization metadata must be `Bearer <token>`")
        })?;
    let token = token.trim();
    let claims = key.verify(token)?;
    if path == CREATE_AGENT_TOKEN && claims.role != Role::Publisher {
        return Err(issuing_needs_a_publisher(claims.role));
    }
    if role_allowed(path, claims.role) != Some(true) {
        return Err(Status::permission_denied(format!(
            "{} token may not call {path}",
            claims.role.with_article()
        )));
    }
    if let Some(cluster) = request
        .headers()
        .get(CLUSTER_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        claims.require_cluster(cluster)?;
    }
    Ok(Some((claims, TokenId::of(token))))
}

/// Authenticates every `credstream.v1` call (a [`Gate`], applied with
/// [`GateLayer`](crate::gate::GateLayer)) and hands the verified [`Claims`]
/// to the service in the request extensions.
#[derive(Clone, Debug)]
pub struct Authenticator {
    key: TokenKey,
}

impl Authenticator {
    /// Verifies tokens with `key`.
    pub fn new(key: TokenKey) -> Self {
        Self { key }
    }
}

impl Gate for Authenticator {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        if let Some((claims, id)) = authenticate(&self.key, request)? {
            request.extensions_mut().insert(claims);
            request.extensions_mut().insert(id);
        }
        Ok(())
    }
}

/// The verified claims of a request (inserted by [`Authenticator`]).
pub fn claims<T>(request: &tonic::Request<T>) -> Result<Claims, Status> {
    request
        .extensions()
        .get::<Claims>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified token on this call"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_carry_their_scope() {
        let key = TokenKey::generate();
        let token = key
            .issue(Role::Agent, Some("c1"), Duration::from_secs(60))
            .unwrap();
        let claims = key.verify(&token).unwrap();
        assert_eq!(claims.role, Role::Agent);
        assert_eq!(claims.cluster.as_deref(), Some("c1"));
        assert!(claims.covers("c1") && !claims.covers("c2"));
    }

    #[test]
    fn forged_expired_and_foreign_tokens_are_unauthenticated() {
        let key = TokenKey::generate();
        let other = TokenKey::generate();
        let foreign = other
            .issue(Role::Admin, None, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            key.verify(&foreign).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let expired = key.issue(Role::Admin, None, Duration::ZERO).unwrap();
        let err = key.verify(&expired).unwrap_err();
        assert!(err.message().contains("expired"), "{err:?}");
        assert_eq!(
            key.verify("nonsense").unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        // Changing the claims breaks the signature.
        let token = key
            .issue(Role::Agent, Some("a"), Duration::from_secs(60))
            .unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"r":"admin","exp":99999999999}"#);
        parts[1] = &forged_claims;
        assert!(key.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn bound_agent_tokens_serve_their_agent_only() {
        let key = TokenKey::generate();
        let token = key
            .issue_for_agent(Role::Agent, Some("c"), Some("w-1"), Duration::from_secs(60))
            .unwrap();
        let claims = key.verify(&token).unwrap();
        assert!(claims.require_agent("w-1").is_ok());
        let refused = claims.require_agent("w-2").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        // An unbound token serves any agent; binding needs the agent role.
        let shared = key
            .issue(Role::Agent, Some("c"), Duration::from_secs(60))
            .unwrap();
        assert!(key.verify(&shared).unwrap().require_agent("w-2").is_ok());
        for (role, agent) in [(Role::Publisher, "w-1"), (Role::Agent, "bad id")] {
            assert!(matches!(
                key.issue_for_agent(role, Some("c"), Some(agent), Duration::from_secs(60)),
                Err(KeyError::BadAgentBinding)
            ));
        }
    }

    #[test]
    fn padded_spellings_of_a_token_have_one_id() {
        let key = TokenKey::generate();
        let token = key
            .issue(Role::Admin, None, Duration::from_secs(60))
            .unwrap();
        let ids: Vec<TokenId> = [
            format!("Bearer {token}"),
            format!("Bearer  {token}"),
            format!("Bearer {token}  "),
        ]
        .iter()
        .map(|header| {
            let mut request = http::Request::builder()
                .uri("/credstream.v1.AdminService/ListClusters")
                .header(http::header::AUTHORIZATION, header)
                .body(())
                .unwrap();
            Authenticator::new(key.clone()).admit(&mut request).unwrap();
            *request.extensions().get::<TokenId>().unwrap()
        })
        .collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert!(!format!("{:?}", ids[0]).contains(&token[4..20]));
    }

    #[test]
    fn only_a_publisher_may_issue_agent_tokens() {
        let key = TokenKey::generate();
        let call = |role, cluster| {
            let token = key.issue(role, cluster, Duration::from_secs(60)).unwrap();
            let mut request = http::Request::builder()
                .uri(CREATE_AGENT_TOKEN)
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .body(())
                .unwrap();
            Authenticator::new(key.clone()).admit(&mut request)
        };
        assert!(call(Role::Publisher, Some("c")).is_ok());
        for (role, cluster) in [
            (Role::Admin, None),
            (Role::Admin, Some("c")),
            (Role::Agent, Some("c")),
        ] {
            let refused = call(role, cluster).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
            assert!(
                refused.message().contains("needs a publisher token"),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn cluster_scoped_roles_need_a_cluster() {
        let key = TokenKey::generate();
        assert!(
            key.issue(Role::Publisher, None, Duration::from_secs(1))
                .is_err()
        );
        assert!(key.issue(Role::Admin, None, Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn a_key_ring_signs_with_its_first_key_and_verifies_with_all() {
        use base64::engine::general_purpose::STANDARD;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (old, new) = ([1u8; 32], [2u8; 32]);
        std::fs::write(&path, old).unwrap();
        let key = TokenKey::from_file(&path).unwrap();
        let old_token = key
            .issue(Role::Admin, None, Duration::from_secs(60))
            .unwrap();
        // Add the new key as a verifier, then promote it.
        let ring = |keys: &[&[u8; 32]]| {
            let lines: Vec<String> = keys.iter().map(|k| STANDARD.encode(k)).collect();
            format!("{KEY_RING_HEADER}\n# rotated\n{}\n", lines.join("\n"))
        };
        std::fs::write(&path, ring(&[&new, &old])).unwrap();
        let ids = key.reload().unwrap();
        assert_eq!(ids.len(), 2);
        let new_token = key
            .issue(Role::Admin, None, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            key.verify(&new_token).unwrap().key_id.as_deref(),
            Some(ids[0].as_str())
        );
        assert!(
            key.verify(&old_token).is_ok(),
            "old tokens verify while their key stays"
        );
        // Remove the old key: its tokens end, the new ones live on.
        std::fs::write(&path, ring(&[&new])).unwrap();
        key.reload().unwrap();
        let err = key.verify(&old_token).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(key.verify(&new_token).is_ok());
        // A broken file keeps the keys in use.
        std::fs::write(&path, format!("{KEY_RING_HEADER}\nnot base64!\n")).unwrap();
        let err = key.reload().unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("base64"), "{err}");
        assert!(key.verify(&new_token).is_ok());
    }

    #[test]
    fn short_key_files_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, b"short").unwrap();
        let err = TokenKey::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("head -c 32 /dev/urandom"), "{err}");
    }

    #[test]
    fn debug_hides_the_key() {
        let key = TokenKey::from_file(&{
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("key");
            std::fs::write(&path, "k".repeat(40)).unwrap();
            std::mem::forget(dir);
            path
        })
        .unwrap();
        assert_eq!(format!("{key:?}"), "TokenKey(<redacted 40 bytes>)");
    }

    /// Issue 32: "an agent token", not "a agent token".
    #[test]
    fn refusals_name_the_role_with_its_article() {
        let key = TokenKey::generate();
        let refusal = |role| {
            let token = key.issue(role, Some("c"), Duration::from_secs(60)).unwrap();
            let request = http::Request::builder()
                .uri("/credstream.v1.PublisherService/Publish")
                .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
                .body(())
                .unwrap();
            authenticate(&key, &request)
                .unwrap_err()
                .message()
                .to_owned()
        };
        assert!(
            refusal(Role::Agent).starts_with("an agent token may not call"),
            "{}",
            refusal(Role::Agent)
        );
        assert!(refusal(Role::Admin).starts_with("an admin token may not call"));
        let issuing = issuing_needs_a_publisher(Role::Admin);
        assert!(
            issuing
                .message()
                .contains("; an admin token may not issue them"),
            "{}",
            issuing.message()
        );
    }
}
