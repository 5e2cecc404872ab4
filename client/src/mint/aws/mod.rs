//! AWS: short-lived STS credentials from the user's own AWS identity.
//!
//! The local identity comes from the standard AWS default chain (aws-config):
//! environment variables, `~/.aws` profiles (static keys, SSO,
//! `credential_process`, roles with a source profile), web identity, and the
//! container and instance endpoints. What is forwarded depends on what that
//! chain yields:
//!
//! | local credentials | forwarded |
//! |---|---|
//! | `--aws-role-arn` given | `AssumeRole` (optionally down-scoped by a session policy) |
//! | long-term keys (no session token) | `GetSessionToken(duration)`; the keys themselves never leave the machine |
//! | already temporary (SSO, assumed role, `AWS_SESSION_TOKEN`) | forwarded as they are, with their real expiry |
//!
//! Temporary credentials cannot be exchanged with `GetSessionToken` (AWS
//! answers "Cannot call GetSessionToken with session credentials"), so they
//! are forwarded unchanged; what keeps them fresh is that *every* mint
//! re-resolves the chain from scratch (a new `SdkConfig`, no identity cache):
//! an SSO profile yields newly fetched role credentials each time, a
//! `credential_process` runs again, a renewed `~/.aws` file is read again.
//!
//! Every mint makes real STS calls — two mints are two `GetSessionToken` (or
//! `AssumeRole`) calls — because the broker asks for a refresh exactly when
//! it wants a newer credential. `GetCallerIdentity` fills in the principal
//! ARN and account.
//!
//! **Checked before fan-out.** Every minted credential is tried once with
//! `GetCallerIdentity` signed by the *new* credential before the minter
//! returns it (for forwarded credentials that call is the one above). One
//! that STS does not accept is a [`MintError::Failed`]: the session reports
//! it as a refresh error, nothing reaches an agent, agents keep serving the
//! last good credential, and the broker asks again with backoff.
//!
//! **CloudTrail names the person and the cluster.** `AssumeRole` carries a
//! `SourceIdentity`, transitive session tags and a `RoleSessionName` naming
//! the cluster; see [`super::cloudtrail`].
//!
//! **When access ends.** Each update says, in `access_end`, when minting
//! from the local login will stop working without the user: the end of an
//! SSO session ([`super::sso_cache`]), or the expiry of temporary
//! credentials that nothing renews (`AWS_SESSION_TOKEN` in the environment,
//! a session token in a profile), whether they are forwarded as they are or
//! a role is assumed from them (role chaining, where AWS limits each
//! assumed credential to one hour, so the minter asks for at most that).
//! Long-term keys, `credential_process`, web identity and the instance and
//! container endpoints renew themselves: no end is reported.
//!
//! `AWS_ENDPOINT_URL_STS` and `AWS_ENDPOINT_URL` are honoured by aws-config;
//! [`AwsMinterBuilder::endpoint_url`] sets the same thing in code (tests point
//! it at a local moto server).
//!
//! TLS is rustls with ring (the crypto provider tonic already uses), so the
//! SDK's default aws-lc build is not needed.
//!
//! The files, by job: `builder` checks the settings once; `plan` makes
//! the one decision of what a mint does with the local credentials;
//! `local` asks the default chain and reads what it says about them (their
//! source, when access ends); `sts` makes the STS calls; `forwarded` builds
//! the one credential an update forwards; `errors` turns SDK and chain
//! failures into what the user can do, by the SDK's error types and codes.

mod builder;
mod errors;
mod forwarded;
mod local;
mod plan;
mod sts;

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_config::Region;
use aws_credential_types::provider::SharedCredentialsProvider;
use credstream_proto::v1::{CredentialKind, CredentialUpdate};
use tracing::{debug, instrument};

use super::{MintError, MintFuture, Minter};
use crate::whoami::AwsIdentity;
use builder::RoleSettings;
use plan::Plan;

pub use builder::AwsMinterBuilder;
pub use plan::AwsMintPlan;

const KIND: &str = "AWS";

/// Lifetime asked of STS when none is given: 12 hours, `GetSessionToken`'s
/// own default.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(12 * 3600);
/// Shortest lifetime STS issues: 15 minutes.
pub const MIN_DURATION: Duration = Duration::from_secs(15 * 60);
/// Longest lifetime `GetSessionToken` issues for an IAM user: 36 hours.
pub const MAX_SESSION_TOKEN_DURATION: Duration = Duration::from_secs(36 * 3600);
/// Longest lifetime `AssumeRole` issues (and only if the role allows it): 12 hours.
pub const MAX_ASSUME_ROLE_DURATION: Duration = Duration::from_secs(12 * 3600);

/// Mints AWS credentials; see the module documentation for what it
/// forwards. Create it with [`AwsMinter::builder`].
pub struct AwsMinter {
    profile: Option<String>,
    role: Option<RoleSettings>,
    duration: Duration,
    region: Option<Region>,
    endpoint_url: Option<String>,
    credentials: Option<SharedCredentialsProvider>,
    http_client: aws_sdk_sts::config::SharedHttpClient,
}

impl fmt::Debug for AwsMinter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsMinter")
            .field("profile", &self.profile)
            .field("role_arn", &self.role.as_ref().map(|r| &r.arn))
            .field(
                "role_session_name",
                &self.role.as_ref().map(|r| &r.session_name),
            )
            .field("duration", &self.duration)
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url)
            .finish_non_exhaustive()
    }
}

impl AwsMinter {
    /// Starts a builder with every default.
    pub fn builder() -> AwsMinterBuilder {
        AwsMinterBuilder::default()
    }

    /// The region credentials are forwarded with, if one is configured.
    pub fn region(&self) -> Option<&str> {
        self.region.as_ref().map(|r| r.as_ref())
    }

    #[instrument(name = "mint_aws", skip_all, fields(profile = ?self.profile))]
    async fn mint_aws(&self) -> Result<CredentialUpdate, MintError> {
        let config = self.sdk_config().await;
        let local = self.local_credentials(&config).await?;
        let plan = Plan::decide(self.role.as_ref(), self.duration, &local);
        let client = sts::client(&config, local.clone());
        let forwarded = match &plan {
            Plan::AssumeRole { role, duration } => {
                let minted = sts::assume_role(&client, role, *duration).await?;
                sts::check(&config, minted, "AssumeRole").await?
            }
            Plan::SessionToken { duration } => {
                let minted = sts::session_token(&client, *duration).await?;
                sts::check(&config, minted, "GetSessionToken").await?
            }
            // Forwarded credentials are the local ones: `forward` calls
            // GetCallerIdentity with them, which is their check.
            Plan::Forward { expires_at } => sts::forward(&client, &local, *expires_at).await?,
        };
        debug!(
            access_key_id = %forwarded.access_key_id(),
            principal = %forwarded.principal_arn(),
            temporary_source = local.session_token().is_some(),
            expires_in_s = forwarded
                .expires_at()
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs(),
            "minted aws credentials"
        );
        let access_end = self.access_end(&local, &plan, forwarded.expires_at()).await;
        if let Some(end) = &access_end {
            debug!(reason = %end.reason, "minting from this login ends");
        }
        forwarded.into_update(self.region(), access_end)
    }

    /// The local identity for `whoami`: `GetCallerIdentity` with the local
    /// credentials, where they came from, and what a mint would do.
    #[instrument(level = "debug", skip_all)]
    pub(crate) async fn local_identity(&self) -> Result<AwsIdentity, MintError> {
        let config = self.sdk_config().await;
        let local = self.local_credentials(&config).await?;
        let source = self.describe_source(&local);
        let plan = AwsMintPlan::from(&Plan::decide(self.role.as_ref(), self.duration, &local));
        let identity = sts::caller_identity(&sts::client(&config, local)).await?;
        Ok(AwsIdentity {
            arn: identity.arn().unwrap_or_default().to_owned(),
            account: identity.account().unwrap_or_default().to_owned(),
            user_id: identity.user_id().unwrap_or_default().to_owned(),
            source,
            region: self.region().map(str::to_owned),
            plan,
        })
    }
}

impl Minter for AwsMinter {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Aws
    }

    fn mint(&self) -> MintFuture<'_> {
        Box::pin(self.mint_aws())
    }
}
