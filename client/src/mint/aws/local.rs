//! The local credentials: asked of the default chain afresh on every mint,
//! and what the marks aws-config leaves on them say (where they came from,
//! when minting from them ends).

use std::time::SystemTime;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::credential_feature::AwsCredentialFeature;
use aws_credential_types::provider::ProvideCredentials;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_sts::primitives::{DateTime, DateTimeFormat};
use credstream_proto::convert::timestamp;
use credstream_proto::v1::AccessEnd;
use tracing::{debug, instrument};

use super::AwsMinter;
use super::errors::{credentials_error, no_credentials};
use super::plan::Plan;
use crate::mint::{MintError, sso_cache};

impl AwsMinter {
    /// A fresh `SdkConfig`: the whole default chain is rebuilt on every call
    /// so nothing cached (profile files, an identity cache) outlives a mint.
    /// The region is passed explicitly (resolved once in `build`).
    pub(super) async fn sdk_config(&self) -> SdkConfig {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(self.http_client.clone())
            .region(self.region.clone());
        if let Some(profile) = &self.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        if let Some(credentials) = &self.credentials {
            loader = loader.credentials_provider(credentials.clone());
        }
        loader.load().await
    }

    /// Asks the chain for the local credentials.
    #[instrument(level = "debug", skip_all)]
    pub(super) async fn local_credentials(
        &self,
        config: &SdkConfig,
    ) -> Result<Credentials, MintError> {
        let provider = config.credentials_provider().ok_or_else(no_credentials)?;
        let credentials = match provider.provide_credentials().await {
            Ok(credentials) => credentials,
            Err(err) => {
                // Only a provider's failure asks which login the profile uses.
                let sso = matches!(err, CredentialsError::ProviderError(_))
                    && sso_cache::uses_sso(self.profile.as_deref()).await;
                return Err(credentials_error(err, sso));
            }
        };
        debug!(
            source = %self.describe_source(&credentials),
            temporary = credentials.session_token().is_some(),
            "local aws credentials resolved"
        );
        Ok(credentials)
    }

    /// When minting from `local` will stop working without the user (see
    /// the module documentation); `None` while it can renew itself.
    pub(super) async fn access_end(
        &self,
        local: &Credentials,
        plan: &Plan<'_>,
        forwarded_expiry: SystemTime,
    ) -> Option<AccessEnd> {
        local.session_token()?;
        use AwsCredentialFeature as F;
        let has = |f: AwsCredentialFeature| features(local).contains(&f);
        let end = |at: SystemTime, reason: &str| AccessEnd {
            at: Some(timestamp(at)),
            reason: reason.to_owned(),
        };
        if has(F::CredentialsProfileSso) || has(F::CredentialsSso) {
            let at = sso_cache::session_end(self.profile.as_deref()).await?;
            return Some(end(at, "your SSO session ends then"));
        }
        // Temporary credentials nothing renews: keys in the environment or
        // in a profile, or handed over by the embedding program.
        let fixed = self.credentials.is_some()
            || has(F::CredentialsEnvVars)
            || (has(F::CredentialsProfile)
                && !has(F::CredentialsProfileSourceProfile)
                && !has(F::CredentialsProfileProcess));
        if !fixed {
            return None;
        }
        match plan {
            Plan::Forward { .. } => Some(end(
                forwarded_expiry,
                "your temporary AWS credentials expire then",
            )),
            Plan::AssumeRole { .. } => {
                let at = local.expiry().or_else(expiry_from_env)?;
                Some(end(
                    at,
                    "the temporary AWS credentials the role is assumed from expire then",
                ))
            }
            Plan::SessionToken { .. } => None,
        }
    }

    /// Where the local credentials came from, from the provider marks
    /// aws-config leaves on them.
    pub(super) fn describe_source(&self, credentials: &Credentials) -> String {
        let profile = self
            .profile
            .clone()
            .or_else(|| std::env::var("AWS_PROFILE").ok())
            .unwrap_or_else(|| "default".to_owned());
        use AwsCredentialFeature as F;
        let has = |f: AwsCredentialFeature| features(credentials).contains(&f);
        if self.credentials.is_some() {
            "credentials supplied by the embedding program".to_owned()
        } else if has(F::CredentialsProfileSso) || has(F::CredentialsSso) {
            format!("SSO (profile {profile})")
        } else if has(F::CredentialsProfileProcess) || has(F::CredentialsProcess) {
            format!("credential_process (profile {profile})")
        } else if has(F::CredentialsEnvVarsStsWebIdToken)
            || has(F::CredentialsProfileStsWebIdToken)
            || has(F::CredentialsStsAssumeRoleWebId)
        {
            "web identity token (AWS_WEB_IDENTITY_TOKEN_FILE)".to_owned()
        } else if has(F::CredentialsProfileSourceProfile) || has(F::CredentialsStsAssumeRole) {
            format!("role assumed by profile {profile}")
        } else if has(F::CredentialsProfileLogin) || has(F::CredentialsLogin) {
            format!("aws login (profile {profile})")
        } else if has(F::CredentialsProfile) {
            format!("keys in profile {profile} (~/.aws)")
        } else if has(F::CredentialsEnvVars) {
            "environment variables (AWS_ACCESS_KEY_ID)".to_owned()
        } else if has(F::CredentialsHttp) {
            "container credentials endpoint".to_owned()
        } else if has(F::CredentialsImds) {
            "EC2 instance metadata".to_owned()
        } else {
            "the default credential chain".to_owned()
        }
    }
}

/// The marks aws-config leaves on credentials: which providers gave them.
fn features(credentials: &Credentials) -> &[AwsCredentialFeature] {
    credentials
        .get_property::<Vec<AwsCredentialFeature>>()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// `AWS_CREDENTIAL_EXPIRATION` (RFC 3339), which botocore and tools such as
/// aws-vault use to say when `AWS_SESSION_TOKEN` expires; aws-config's
/// environment provider does not read it.
pub(super) fn expiry_from_env() -> Option<SystemTime> {
    let text = std::env::var("AWS_CREDENTIAL_EXPIRATION").ok()?;
    let parsed = DateTime::from_str(text.trim(), DateTimeFormat::DateTime).ok()?;
    SystemTime::try_from(parsed).ok()
}
