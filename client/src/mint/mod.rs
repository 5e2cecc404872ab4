//! Minting: turning the user's local identity into a short-lived credential.
//!
//! One [`Minter`] per credential kind. The session (`crate::session`) calls
//! [`Minter::mint`] when the broker sends a `RefreshRequest` for that kind (and
//! on its own only when no broker is reachable and its last credential is
//! near expiry). Each call must return a *fresh* credential, not a cached one
//! about to expire.
//!
//! - [`aws`]: [`aws::AwsMinter`], STS from the default AWS credential chain.
//! - [`gcp`]: [`gcp::GcpMinter`], OAuth2 access tokens from Google's
//!   application default credentials.
//! - `gcp_fixed`: a fixed GCP access token (`GOOGLE_OAUTH_ACCESS_TOKEN`),
//!   described by Google's token info endpoint.
//! - [`cloudtrail`]: what `AssumeRole` carries so that CloudTrail names the
//!   person and the cluster (source identity, session tags, session name).
//! - [`sso_cache`]: when an AWS SSO login ends, from the SSO token cache.
//!
//! A minter also says in the update's `access_end` when minting from the
//! local login will stop working without the user (an SSO session that
//! ends, temporary credentials nothing renews, a fixed GCP token); `None`
//! while it can renew itself.

pub mod aws;
pub mod cloudtrail;
pub mod gcp;
mod gcp_fixed;
pub mod sso_cache;

use std::future::Future;
use std::pin::Pin;

use credstream_proto::v1::{CredentialKind, CredentialUpdate};

/// A boxed future returned by [`Minter::mint`].
pub type MintFuture<'a> =
    Pin<Box<dyn Future<Output = Result<CredentialUpdate, MintError>> + Send + 'a>>;

/// Mints credentials of one kind.
pub trait Minter: Send + Sync + 'static {
    /// The kind this minter produces.
    fn kind(&self) -> CredentialKind;

    /// Mints a new credential. The returned update has `expires_at` set and
    /// `version` / `refresh_request_id` left empty (the session fills in the
    /// request id).
    fn mint(&self) -> MintFuture<'_>;
}

/// Why minting failed. Every message says what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// No local credentials of this kind were found.
    #[error("no local {kind} credentials: {hint}")]
    NoCredentials {
        /// `AWS` or `GCP`.
        kind: &'static str,
        /// What to do (log in, set a profile, …).
        hint: String,
    },
    /// The identity provider refused (access denied, expired SSO session, …).
    #[error("{kind} refused to mint: {message}")]
    Refused {
        /// `AWS` or `GCP`.
        kind: &'static str,
        /// The provider's message and the fix.
        message: String,
    },
    /// The minter's own settings are wrong (an unreadable session policy, a
    /// duration out of range, an unsupported credentials file): fix the flag
    /// or file the message names. Retrying will not help.
    #[error("{kind} minting is misconfigured: {message}")]
    InvalidConfig {
        /// `AWS` or `GCP`.
        kind: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The identity provider could not be reached or answered nonsense.
    #[error("{kind} minting failed: {message}")]
    Failed {
        /// `AWS` or `GCP`.
        kind: &'static str,
        /// What happened.
        message: String,
    },
}

impl MintError {
    /// True if retrying cannot fix it without the user acting: no local
    /// credentials, a refusal (access denied, an expired login) or a
    /// misconfiguration. The session reports such failures as permanent, and
    /// the broker stops asking for the kind until the publisher reconnects;
    /// only [`MintError::Failed`] (unreachable, a nonsense answer) is
    /// retried.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, MintError::Failed { .. })
    }
}
