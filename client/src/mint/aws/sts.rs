//! The STS calls a mint makes: `GetSessionToken`, `AssumeRole`,
//! `GetCallerIdentity` for the principal, and the check of every minted
//! credential (`GetCallerIdentity` signed with it).

use std::time::{Duration, SystemTime};

use aws_config::{Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_sdk_sts::config::timeout::TimeoutConfig;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::get_caller_identity::GetCallerIdentityOutput;
use aws_sdk_sts::types::Tag;
use tracing::{debug, warn};

use super::builder::RoleSettings;
use super::errors::{config_error, expired_locally, failed_check, sts_error};
use super::forwarded::{Forwarded, Principal};
use crate::mint::MintError;
use crate::mint::cloudtrail::identity_name;

/// What most roles allow (`MaxSessionDuration` defaults to 1 hour); used
/// when a role refuses the requested duration.
const ROLE_FALLBACK_DURATION: Duration = Duration::from_secs(3600);
/// STS needs a signing region; without a configured one the global
/// partition's default is used (and no region is forwarded).
const FALLBACK_STS_REGION: &str = "us-east-1";
/// Lifetime assumed for temporary credentials whose expiry nobody recorded
/// (`AWS_SESSION_TOKEN` without `AWS_CREDENTIAL_EXPIRATION`): short, so the
/// broker asks again soon and a dead credential is noticed at the next
/// `GetCallerIdentity`.
const UNKNOWN_EXPIRY_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// Upper bound on one STS call including retries.
const STS_OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// An STS client signing with exactly these credentials.
pub(super) fn client(config: &SdkConfig, credentials: Credentials) -> aws_sdk_sts::Client {
    let mut builder = aws_sdk_sts::config::Builder::from(config)
        .credentials_provider(credentials)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_timeout(STS_OPERATION_TIMEOUT)
                .build(),
        );
    if config.region().is_none() {
        builder = builder.region(Region::from_static(FALLBACK_STS_REGION));
    }
    aws_sdk_sts::Client::from_conf(builder.build())
}

/// `GetCallerIdentity`; a failure is the user's to fix.
pub(super) async fn caller_identity(
    sts: &aws_sdk_sts::Client,
) -> Result<GetCallerIdentityOutput, MintError> {
    sts.get_caller_identity()
        .send()
        .await
        .map_err(|err| sts_error("GetCallerIdentity", err))
}

/// `GetSessionToken` from long-term keys, with `GetCallerIdentity` for
/// the principal (run together; without it the credential is forwarded
/// without a principal).
pub(super) async fn session_token(
    sts: &aws_sdk_sts::Client,
    duration: Duration,
) -> Result<Forwarded, MintError> {
    let (minted, identity) = tokio::join!(
        sts.get_session_token()
            .duration_seconds(duration.as_secs() as i32)
            .send(),
        sts.get_caller_identity().send()
    );
    let minted = minted.map_err(|err| sts_error("GetSessionToken", err))?;
    let principal = match identity {
        Ok(identity) => Principal::of(&identity),
        Err(err) => {
            warn!(error = %DisplayErrorContext(&err), "GetCallerIdentity failed; forwarding without the principal");
            Principal::default()
        }
    };
    Forwarded::issued(minted.credentials(), principal, "GetSessionToken")
}

/// `AssumeRole` for `duration`, retried once at one hour if the role does
/// not allow it (most roles keep the 1-hour default maximum).
pub(super) async fn assume_role(
    sts: &aws_sdk_sts::Client,
    role: &RoleSettings,
    duration: Duration,
) -> Result<Forwarded, MintError> {
    let source_identity = match &role.source_identity {
        Some(name) => Some(name.clone()),
        None => {
            let identity = caller_identity(sts).await?;
            let arn = identity.arn().unwrap_or_default();
            let name = identity_name(arn);
            if name.is_none() {
                warn!(principal = %arn, "no identity name in the local principal's ARN; assuming the role without a source identity (set --aws-source-identity)");
            }
            name
        }
    };
    let tags: Vec<Tag> = role
        .tags
        .iter()
        .map(|(key, value)| Tag::builder().key(key).value(value).build())
        .collect::<Result<_, _>>()
        .map_err(|err| config_error(format!("a session tag is incomplete: {err}")))?;
    let transitive: Vec<String> = role.tags.iter().map(|(key, _)| key.clone()).collect();
    let call = |duration: Duration| {
        sts.assume_role()
            .role_arn(&role.arn)
            .role_session_name(&role.session_name)
            .set_policy(role.policy.clone())
            .set_source_identity(source_identity.clone())
            .set_tags((!tags.is_empty()).then(|| tags.clone()))
            .set_transitive_tag_keys((!transitive.is_empty()).then(|| transitive.clone()))
            .duration_seconds(duration.as_secs() as i32)
            .send()
    };
    let answer = match call(duration).await {
        // A duration above the role's MaxSessionDuration is STS's
        // `ValidationError`, and the only one left once `build` has
        // checked the names, tags and policy; any other fails again at one
        // hour and is reported as it is.
        Err(err @ SdkError::ServiceError(_))
            if duration > ROLE_FALLBACK_DURATION && err.code() == Some("ValidationError") =>
        {
            warn!(
                role = %role.arn,
                requested = %humantime::format_duration(duration),
                "the role does not allow this duration; asking for 1h (set --aws-duration 1h to silence this)"
            );
            call(ROLE_FALLBACK_DURATION).await
        }
        other => other,
    }
    .map_err(|err| sts_error("AssumeRole", err))?;
    let principal = Principal::from_arn(
        answer
            .assumed_role_user()
            .map(|user| user.arn().to_owned())
            .unwrap_or_default(),
    );
    Forwarded::issued(answer.credentials(), principal, "AssumeRole")
}

/// Forwards temporary credentials unchanged, after `GetCallerIdentity`
/// proves they still work and names their principal. Expired ones are
/// refused before any call; ones whose expiry nobody recorded are given a
/// short lifetime.
pub(super) async fn forward(
    sts: &aws_sdk_sts::Client,
    local: &Credentials,
    expires_at: Option<SystemTime>,
) -> Result<Forwarded, MintError> {
    let now = SystemTime::now();
    let expires_at = match expires_at {
        Some(at) if at <= now => return Err(expired_locally()),
        Some(at) => at,
        None => {
            warn!(
                assumed = %humantime::format_duration(UNKNOWN_EXPIRY_LIFETIME),
                "the local temporary credentials do not say when they expire (set AWS_CREDENTIAL_EXPIRATION); assuming a short lifetime"
            );
            now + UNKNOWN_EXPIRY_LIFETIME
        }
    };
    let principal = match sts.get_caller_identity().send().await {
        Ok(identity) => Principal::of(&identity),
        Err(err @ SdkError::ServiceError(_)) => return Err(sts_error("GetCallerIdentity", err)),
        Err(err) => {
            warn!(error = %DisplayErrorContext(&err), "GetCallerIdentity failed; forwarding without the principal");
            Principal::default()
        }
    };
    let account = local.account_id().map(|a| a.as_str());
    Ok(Forwarded::local(local, principal, expires_at).or_account(account))
}

/// Tries a freshly minted credential with `GetCallerIdentity` signed by
/// it, before anyone else sees it. On success the credential gets the
/// account STS names (and the principal, if it had none).
pub(super) async fn check(
    config: &SdkConfig,
    minted: Forwarded,
    operation: &str,
) -> Result<Forwarded, MintError> {
    let identity = client(config, minted.signing_credentials())
        .get_caller_identity()
        .send()
        .await
        .map_err(|err| failed_check(operation, err))?;
    debug!(principal = %identity.arn().unwrap_or_default(), "the minted credential works");
    Ok(minted.confirmed(Principal::of(&identity)))
}
