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

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::credential_feature::AwsCredentialFeature;
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_sts::config::timeout::TimeoutConfig;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sts::primitives::{DateTime, DateTimeFormat};
use aws_sdk_sts::types::Tag;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use credstream_proto::convert::timestamp;
use credstream_proto::v1::{AwsCredential, CredentialKind, CredentialUpdate, credential_update};
use tracing::{debug, instrument, warn};

use super::cloudtrail::{self, check_name, identity_name, session_name_for_cluster};
use super::{MintError, MintFuture, Minter, sso_cache};
use crate::whoami::AwsIdentity;
use credstream_proto::v1::AccessEnd;

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
/// What most roles allow (`MaxSessionDuration` defaults to 1 hour); used
/// when a role refuses the requested duration.
const ROLE_FALLBACK_DURATION: Duration = Duration::from_secs(3600);
/// AWS limits a role assumed with temporary credentials (role chaining) to
/// one hour.
const ROLE_CHAINING_MAX_DURATION: Duration = Duration::from_secs(3600);
/// Longest session policy AWS accepts, in characters of plain text.
const MAX_SESSION_POLICY_CHARS: usize = 2048;
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

const NO_CREDENTIALS_HINT: &str = "run `aws configure` or `aws sso login`, or set AWS_PROFILE";

/// Builds an [`AwsMinter`]. Every setting is optional; the defaults mint
/// 12-hour credentials from the default chain.
#[derive(Default)]
pub struct AwsMinterBuilder {
    profile: Option<String>,
    role_arn: Option<String>,
    role_session_name: Option<String>,
    session_policy: Option<PolicySource>,
    duration: Option<Duration>,
    region: Option<String>,
    endpoint_url: Option<String>,
    credentials: Option<SharedCredentialsProvider>,
    cluster: Option<String>,
    source_identity: Option<String>,
    tags: Vec<(String, String)>,
}

enum PolicySource {
    File(PathBuf),
    Inline(String),
}

impl AwsMinterBuilder {
    /// Uses this `~/.aws` profile instead of `AWS_PROFILE` / `default`.
    pub fn profile(mut self, name: impl Into<String>) -> Self {
        self.profile = Some(name.into());
        self
    }

    /// Forwards credentials of this role (`AssumeRole`) instead of the
    /// user's own identity.
    pub fn role_arn(mut self, arn: impl Into<String>) -> Self {
        self.role_arn = Some(arn.into());
        self
    }

    /// The `RoleSessionName` for `AssumeRole` (default
    /// `credstream-<cluster>` with [`cluster`](Self::cluster), else
    /// `credstream-<user>`); it shows up in CloudTrail and in the
    /// assumed-role ARN.
    pub fn role_session_name(mut self, name: impl Into<String>) -> Self {
        self.role_session_name = Some(name.into());
        self
    }

    /// Down-scopes the assumed role with the IAM policy in this JSON file
    /// (the effective permissions are the intersection). Needs
    /// [`role_arn`](Self::role_arn): `GetSessionToken` takes no policy.
    pub fn session_policy_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.session_policy = Some(PolicySource::File(path.into()));
        self
    }

    /// Like [`session_policy_file`](Self::session_policy_file), with the
    /// policy JSON given directly.
    pub fn session_policy(mut self, json: impl Into<String>) -> Self {
        self.session_policy = Some(PolicySource::Inline(json.into()));
        self
    }

    /// The lifetime to ask STS for (default 12 h, at least 15 min; at most
    /// 36 h, or 12 h with a role).
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }

    /// The region to use and forward, instead of the one configured locally
    /// (`AWS_REGION`, the profile's `region`).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sends STS calls to this endpoint (what `AWS_ENDPOINT_URL_STS` does).
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// The cluster the credentials are for: `AssumeRole` tags the session
    /// `credstream-cluster=<id>` (transitive) and names it
    /// `credstream-<id>`, so CloudTrail shows the cluster behind every call.
    pub fn cluster(mut self, id: impl Into<String>) -> Self {
        self.cluster = Some(id.into());
        self
    }

    /// The `SourceIdentity` `AssumeRole` carries (default: the name in the
    /// ARN `GetCallerIdentity` gives for the local credentials). Needs
    /// [`role_arn`](Self::role_arn).
    pub fn source_identity(mut self, name: impl Into<String>) -> Self {
        self.source_identity = Some(name.into());
        self
    }

    /// Adds a transitive session tag to `AssumeRole` (beside
    /// `credstream-cluster`). Needs [`role_arn`](Self::role_arn).
    pub fn session_tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.push((key.into(), value.into()));
        self
    }

    /// Uses these credentials as the local identity instead of the default
    /// chain (for embedding and tests). They are still asked again on every
    /// mint.
    pub fn credentials_provider(mut self, provider: impl ProvideCredentials + 'static) -> Self {
        self.credentials = Some(SharedCredentialsProvider::new(provider));
        self
    }

    /// Checks the settings, reads the session policy and resolves the region
    /// once (the region chain may ask the instance metadata service, which
    /// is slow off EC2). No credentials are looked up yet: a missing login
    /// shows at the first mint, where the session can report it.
    pub async fn build(self) -> Result<AwsMinter, MintError> {
        let duration = self.duration.unwrap_or(DEFAULT_DURATION);
        let max = if self.role_arn.is_some() {
            MAX_ASSUME_ROLE_DURATION
        } else {
            MAX_SESSION_TOKEN_DURATION
        };
        if duration < MIN_DURATION || duration > max {
            return Err(config_error(format!(
                "duration {} is out of range: STS issues credentials for {} to {}{}",
                humantime::format_duration(duration),
                humantime::format_duration(MIN_DURATION),
                humantime::format_duration(max),
                if self.role_arn.is_some() {
                    " with a role"
                } else {
                    ""
                },
            )));
        }
        let role = match self.role_arn {
            Some(arn) => {
                if !arn.starts_with("arn:") || !arn.contains(":role/") {
                    return Err(config_error(format!(
                        "{arn:?} is not a role ARN (arn:aws:iam::<account>:role/<name>)"
                    )));
                }
                let session_name = match self.role_session_name {
                    Some(name) => {
                        check_name("role session name", &name)?;
                        name
                    }
                    None => match &self.cluster {
                        Some(cluster) => session_name_for_cluster(cluster),
                        None => default_session_name(),
                    },
                };
                if let Some(name) = &self.source_identity {
                    check_name("source identity", name)?;
                }
                let tags = cloudtrail::session_tags(self.cluster.as_deref(), self.tags)?;
                let policy = match self.session_policy {
                    Some(source) => Some(load_policy(source)?),
                    None => None,
                };
                Some(RoleSettings {
                    arn,
                    session_name,
                    policy,
                    source_identity: self.source_identity,
                    tags,
                })
            }
            None if self.session_policy.is_some() => {
                return Err(config_error(
                    "a session policy needs a role ARN (--aws-role-arn): GetSessionToken cannot be down-scoped",
                ));
            }
            None if self.source_identity.is_some() || !self.tags.is_empty() => {
                return Err(config_error(
                    "a source identity or session tags need a role ARN (--aws-role-arn): GetSessionToken takes neither",
                ));
            }
            None => None,
        };

        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let region = match self.region {
            Some(region) => Some(Region::new(region)),
            None => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest())
                    .http_client(http_client.clone());
                if let Some(profile) = &self.profile {
                    loader = loader.profile_name(profile);
                }
                loader.load().await.region().cloned()
            }
        };
        debug!(region = ?region, profile = ?self.profile, "aws minter configured");
        Ok(AwsMinter {
            profile: self.profile,
            role,
            duration,
            region,
            endpoint_url: self.endpoint_url,
            credentials: self.credentials,
            http_client,
        })
    }
}

/// `credstream-<login name>`, reduced to the characters STS allows.
fn default_session_name() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("USERNAME"))
        .unwrap_or_default();
    let mut name: String = format!("credstream-{user}")
        .chars()
        .filter(|c| cloudtrail::identity_char(*c))
        .collect();
    name.truncate(64);
    name
}

/// Reads a session policy, checks it is a JSON object, and minifies it: AWS
/// counts the characters of what is sent.
fn load_policy(source: PolicySource) -> Result<String, MintError> {
    let (text, origin) = match source {
        PolicySource::File(path) => {
            let text = std::fs::read_to_string(&path).map_err(|err| {
                config_error(format!(
                    "cannot read the session policy {}: {err}",
                    path.display()
                ))
            })?;
            (text, format!("session policy {}", path.display()))
        }
        PolicySource::Inline(text) => (text, "session policy".to_owned()),
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|err| {
        config_error(format!(
            "the {origin} is not valid JSON (line {}, column {})",
            err.line(),
            err.column()
        ))
    })?;
    if !value.is_object() {
        return Err(config_error(format!(
            "the {origin} must be a JSON object (an IAM policy document)"
        )));
    }
    let packed = value.to_string();
    if packed.chars().count() > MAX_SESSION_POLICY_CHARS {
        return Err(config_error(format!(
            "the {origin} has {} characters without spaces; AWS accepts at most {MAX_SESSION_POLICY_CHARS}",
            packed.chars().count()
        )));
    }
    Ok(packed)
}

struct RoleSettings {
    arn: String,
    session_name: String,
    policy: Option<String>,
    /// Given by the user; else derived from the local identity per mint.
    source_identity: Option<String>,
    /// Transitive session tags, `credstream-cluster` first.
    tags: Vec<(String, String)>,
}

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

/// How a mint turns the local credentials into forwarded ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AwsMintPlan {
    /// `AssumeRole` on this role.
    AssumeRole {
        /// The role ARN.
        role_arn: String,
        /// Whether a session policy down-scopes it.
        session_policy: bool,
        /// The lifetime asked for.
        duration: Duration,
    },
    /// `GetSessionToken` from long-term keys.
    SessionToken {
        /// The lifetime asked for.
        duration: Duration,
    },
    /// Temporary credentials forwarded as they are.
    Forward {
        /// Their expiry, if the source recorded it.
        expires_at: Option<SystemTime>,
    },
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

    /// A fresh `SdkConfig`: the whole default chain is rebuilt on every call
    /// so nothing cached (profile files, an identity cache) outlives a mint.
    /// The region is passed explicitly (resolved once in `build`).
    async fn sdk_config(&self) -> SdkConfig {
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
    async fn local_credentials(&self, config: &SdkConfig) -> Result<Credentials, MintError> {
        let provider = config
            .credentials_provider()
            .ok_or_else(|| MintError::NoCredentials {
                kind: KIND,
                hint: NO_CREDENTIALS_HINT.to_owned(),
            })?;
        let credentials = provider
            .provide_credentials()
            .await
            .map_err(credentials_error)?;
        debug!(
            source = %self.describe_source(&credentials),
            temporary = credentials.session_token().is_some(),
            "local aws credentials resolved"
        );
        Ok(credentials)
    }

    /// An STS client signing with exactly these credentials.
    fn sts(&self, config: &SdkConfig, credentials: Credentials) -> aws_sdk_sts::Client {
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

    fn plan(&self, credentials: &Credentials) -> AwsMintPlan {
        match &self.role {
            Some(role) => AwsMintPlan::AssumeRole {
                role_arn: role.arn.clone(),
                session_policy: role.policy.is_some(),
                duration: self.role_duration(credentials),
            },
            None if credentials.session_token().is_some() => AwsMintPlan::Forward {
                expires_at: credentials.expiry(),
            },
            None => AwsMintPlan::SessionToken {
                duration: self.duration,
            },
        }
    }

    /// The lifetime to ask `AssumeRole` for: at most one hour when the
    /// local credentials are temporary (role chaining).
    fn role_duration(&self, local: &Credentials) -> Duration {
        if local.session_token().is_some() {
            self.duration.min(ROLE_CHAINING_MAX_DURATION)
        } else {
            self.duration
        }
    }

    #[instrument(name = "mint_aws", skip_all, fields(profile = ?self.profile))]
    async fn mint_aws(&self) -> Result<CredentialUpdate, MintError> {
        let config = self.sdk_config().await;
        let local = self.local_credentials(&config).await?;
        let plan = self.plan(&local);
        let temporary = local.session_token().is_some();
        let sts = self.sts(&config, local.clone());
        let (credential, expires_at) = match (&self.role, &plan) {
            (Some(role), _) => {
                let (minted, expires_at) = self.assume_role(&sts, role, &local).await?;
                (
                    self.checked(&config, minted, "AssumeRole").await?,
                    expires_at,
                )
            }
            // Forwarded credentials are the local ones: `forward` has just
            // called GetCallerIdentity with them.
            (None, AwsMintPlan::Forward { .. }) => forward(&sts, local.clone()).await?,
            (None, _) => {
                let (minted, expires_at) = self.session_token(&sts).await?;
                (
                    self.checked(&config, minted, "GetSessionToken").await?,
                    expires_at,
                )
            }
        };
        if credential.session_token.is_empty() {
            // Never ship long-term keys, whatever a provider returned.
            return Err(MintError::Failed {
                kind: KIND,
                message:
                    "STS returned credentials without a session token; refusing to forward them"
                        .into(),
            });
        }
        let mut credential = credential;
        credential.region = self.region().unwrap_or_default().to_owned();
        debug!(
            access_key_id = %credential.access_key_id,
            principal = %credential.principal_arn,
            temporary_source = temporary,
            expires_in_s = expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs(),
            "minted aws credentials"
        );
        let access_end = self.access_end(&local, &plan, expires_at).await;
        if let Some(end) = &access_end {
            debug!(reason = %end.reason, "minting from this login ends");
        }
        Ok(CredentialUpdate {
            credential: Some(credential_update::Credential::Aws(credential)),
            issued_at: Some(timestamp(SystemTime::now())),
            expires_at: Some(timestamp(expires_at)),
            access_end,
            ..Default::default()
        })
    }

    /// Tries a freshly minted credential with `GetCallerIdentity` signed by
    /// it, before anyone else sees it. On success the credential gets the
    /// account STS names (and the principal, if it had none).
    async fn checked(
        &self,
        config: &SdkConfig,
        mut credential: AwsCredential,
        operation: &str,
    ) -> Result<AwsCredential, MintError> {
        let minted = Credentials::new(
            credential.access_key_id.clone(),
            credential.secret_access_key.clone(),
            Some(credential.session_token.clone()),
            None,
            "credstream-minted",
        );
        let identity = self
            .sts(config, minted)
            .get_caller_identity()
            .send()
            .await
            .map_err(|err| {
                let what = match &err {
                    SdkError::ServiceError(_) => {
                        let (code, message) = sts_code_and_message(&err);
                        format!("STS refused it ({code}: {message})")
                    }
                    _ => format!("STS could not be reached ({})", DisplayErrorContext(&err)),
                };
                MintError::Failed {
                    kind: KIND,
                    message: format!(
                        "the credential {operation} just issued failed its check (GetCallerIdentity signed with it): {what}; it was not published, and agents keep the last good one"
                    ),
                }
            })?;
        let arn = identity.arn().unwrap_or_default();
        debug!(principal = %arn, "the minted credential works");
        if credential.principal_arn.is_empty() && !arn.is_empty() {
            credential.principal_arn = arn.to_owned();
        }
        if let Some(account) = identity.account().filter(|a| !a.is_empty()) {
            credential.account_id = account.to_owned();
        }
        Ok(credential)
    }

    /// When minting from `local` will stop working without the user (see
    /// the module documentation); `None` while it can renew itself.
    async fn access_end(
        &self,
        local: &Credentials,
        plan: &AwsMintPlan,
        forwarded_expiry: SystemTime,
    ) -> Option<AccessEnd> {
        local.session_token()?;
        let features = local
            .get_property::<Vec<AwsCredentialFeature>>()
            .map(Vec::as_slice)
            .unwrap_or_default();
        use AwsCredentialFeature as F;
        let has = |f: AwsCredentialFeature| features.contains(&f);
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
            AwsMintPlan::Forward { .. } => Some(end(
                forwarded_expiry,
                "your temporary AWS credentials expire then",
            )),
            AwsMintPlan::AssumeRole { .. } => {
                let at = local.expiry().or_else(expiry_from_env)?;
                Some(end(
                    at,
                    "the temporary AWS credentials the role is assumed from expire then",
                ))
            }
            AwsMintPlan::SessionToken { .. } => None,
        }
    }

    /// `GetSessionToken` from long-term keys, with `GetCallerIdentity` for
    /// the principal (run together).
    async fn session_token(
        &self,
        sts: &aws_sdk_sts::Client,
    ) -> Result<(AwsCredential, SystemTime), MintError> {
        let seconds = self.duration.as_secs() as i32;
        let (minted, identity) = tokio::join!(
            sts.get_session_token().duration_seconds(seconds).send(),
            sts.get_caller_identity().send()
        );
        let minted = minted.map_err(|err| sts_error("GetSessionToken", err))?;
        let c = minted
            .credentials()
            .ok_or_else(|| empty_answer("GetSessionToken"))?;
        let expires_at = system_time(c.expiration(), "GetSessionToken")?;
        let (principal_arn, account_id) = match identity {
            Ok(identity) => (
                identity.arn().unwrap_or_default().to_owned(),
                identity.account().unwrap_or_default().to_owned(),
            ),
            Err(err) => {
                warn!(error = %DisplayErrorContext(&err), "GetCallerIdentity failed; forwarding without the principal");
                (String::new(), String::new())
            }
        };
        Ok((
            AwsCredential {
                access_key_id: c.access_key_id().to_owned(),
                secret_access_key: c.secret_access_key().to_owned(),
                session_token: c.session_token().to_owned(),
                principal_arn,
                account_id,
                region: String::new(),
            },
            expires_at,
        ))
    }

    /// `AssumeRole`, retried once at one hour if the role does not allow
    /// the requested duration (most roles keep the 1-hour default maximum,
    /// and role chaining is limited to one hour).
    async fn assume_role(
        &self,
        sts: &aws_sdk_sts::Client,
        role: &RoleSettings,
        local: &Credentials,
    ) -> Result<(AwsCredential, SystemTime), MintError> {
        let source_identity = match &role.source_identity {
            Some(name) => Some(name.clone()),
            None => {
                let identity = sts
                    .get_caller_identity()
                    .send()
                    .await
                    .map_err(|err| sts_error("GetCallerIdentity", err))?;
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
        let duration = self.role_duration(local);
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
            Err(err)
                if duration > ROLE_FALLBACK_DURATION
                    && err.code() == Some("ValidationError")
                    && err.message().is_some_and(|m| m.contains("DurationSeconds")) =>
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
        let c = answer
            .credentials()
            .ok_or_else(|| empty_answer("AssumeRole"))?;
        let expires_at = system_time(c.expiration(), "AssumeRole")?;
        let principal_arn = answer
            .assumed_role_user()
            .map(|user| user.arn().to_owned())
            .unwrap_or_default();
        let account_id = account_of(&principal_arn).unwrap_or_default().to_owned();
        Ok((
            AwsCredential {
                access_key_id: c.access_key_id().to_owned(),
                secret_access_key: c.secret_access_key().to_owned(),
                session_token: c.session_token().to_owned(),
                principal_arn,
                account_id,
                region: String::new(),
            },
            expires_at,
        ))
    }

    /// The local identity for `whoami`: `GetCallerIdentity` with the local
    /// credentials, where they came from, and what a mint would do.
    #[instrument(level = "debug", skip_all)]
    pub(crate) async fn local_identity(&self) -> Result<AwsIdentity, MintError> {
        let config = self.sdk_config().await;
        let local = self.local_credentials(&config).await?;
        let source = self.describe_source(&local);
        let plan = self.plan(&local);
        let sts = self.sts(&config, local);
        let identity = sts
            .get_caller_identity()
            .send()
            .await
            .map_err(|err| sts_error("GetCallerIdentity", err))?;
        Ok(AwsIdentity {
            arn: identity.arn().unwrap_or_default().to_owned(),
            account: identity.account().unwrap_or_default().to_owned(),
            user_id: identity.user_id().unwrap_or_default().to_owned(),
            source,
            region: self.region().map(str::to_owned),
            plan,
        })
    }

    /// Where the local credentials came from, from the provider marks
    /// aws-config leaves on them.
    fn describe_source(&self, credentials: &Credentials) -> String {
        let profile = self
            .profile
            .clone()
            .or_else(|| std::env::var("AWS_PROFILE").ok())
            .unwrap_or_else(|| "default".to_owned());
        let features = credentials
            .get_property::<Vec<AwsCredentialFeature>>()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let has = |f: AwsCredentialFeature| features.contains(&f);
        use AwsCredentialFeature as F;
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

impl Minter for AwsMinter {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Aws
    }

    fn mint(&self) -> MintFuture<'_> {
        Box::pin(self.mint_aws())
    }
}

/// Forwards temporary credentials unchanged, after `GetCallerIdentity`
/// proves they still work and names their principal.
async fn forward(
    sts: &aws_sdk_sts::Client,
    local: Credentials,
) -> Result<(AwsCredential, SystemTime), MintError> {
    let now = SystemTime::now();
    let expires_at = match local.expiry().or_else(expiry_from_env) {
        Some(at) if at <= now => {
            return Err(MintError::Refused {
                kind: KIND,
                message: "the local temporary credentials have expired: run `aws sso login` (or renew the credentials in your environment or profile)".into(),
            });
        }
        Some(at) => at,
        None => {
            warn!(
                assumed = %humantime::format_duration(UNKNOWN_EXPIRY_LIFETIME),
                "the local temporary credentials do not say when they expire (set AWS_CREDENTIAL_EXPIRATION); assuming a short lifetime"
            );
            now + UNKNOWN_EXPIRY_LIFETIME
        }
    };
    let (principal_arn, account_id) = match sts.get_caller_identity().send().await {
        Ok(identity) => (
            identity.arn().unwrap_or_default().to_owned(),
            identity.account().unwrap_or_default().to_owned(),
        ),
        Err(err) if matches!(err, SdkError::ServiceError(_)) => {
            return Err(sts_error("GetCallerIdentity", err));
        }
        Err(err) => {
            warn!(error = %DisplayErrorContext(&err), "GetCallerIdentity failed; forwarding without the principal");
            (String::new(), String::new())
        }
    };
    let account_id = if account_id.is_empty() {
        local
            .account_id()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default()
    } else {
        account_id
    };
    Ok((
        AwsCredential {
            access_key_id: local.access_key_id().to_owned(),
            secret_access_key: local.secret_access_key().to_owned(),
            session_token: local.session_token().unwrap_or_default().to_owned(),
            principal_arn,
            account_id,
            region: String::new(),
        },
        expires_at,
    ))
}

/// `AWS_CREDENTIAL_EXPIRATION` (RFC 3339), which botocore and tools such as
/// aws-vault use to say when `AWS_SESSION_TOKEN` expires; aws-config's
/// environment provider does not read it.
fn expiry_from_env() -> Option<SystemTime> {
    let text = std::env::var("AWS_CREDENTIAL_EXPIRATION").ok()?;
    let parsed = DateTime::from_str(text.trim(), DateTimeFormat::DateTime).ok()?;
    SystemTime::try_from(parsed).ok()
}

/// The account field of an ARN (`arn:aws:sts::123456789012:assumed-role/…`).
fn account_of(arn: &str) -> Option<&str> {
    arn.split(':')
        .nth(4)
        .filter(|a| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()))
}

fn system_time(at: &DateTime, operation: &str) -> Result<SystemTime, MintError> {
    SystemTime::try_from(*at).map_err(|_| MintError::Failed {
        kind: KIND,
        message: format!("{operation} returned an expiry that is not a valid time"),
    })
}

fn empty_answer(operation: &str) -> MintError {
    MintError::Failed {
        kind: KIND,
        message: format!("{operation} answered without credentials"),
    }
}

fn config_error(message: impl Into<String>) -> MintError {
    MintError::InvalidConfig {
        kind: KIND,
        message: message.into(),
    }
}

/// Maps a credential-chain failure to what the user can do.
fn credentials_error(err: CredentialsError) -> MintError {
    let detail = DisplayErrorContext(&err).to_string();
    match &err {
        CredentialsError::CredentialsNotLoaded(_) => MintError::NoCredentials {
            kind: KIND,
            hint: NO_CREDENTIALS_HINT.to_owned(),
        },
        CredentialsError::ProviderTimedOut(_) => MintError::Failed {
            kind: KIND,
            message: format!(
                "timed out looking up the local credentials ({detail}); check the network, or {NO_CREDENTIALS_HINT}"
            ),
        },
        CredentialsError::InvalidConfiguration(_) => MintError::InvalidConfig {
            kind: KIND,
            message: format!(
                "the local AWS configuration is invalid: {detail}; check ~/.aws/config and AWS_PROFILE"
            ),
        },
        // The instance metadata service is the chain's last resort: when it
        // is what failed, nothing earlier in the chain had credentials, and
        // its error dump would only bury that.
        CredentialsError::ProviderError(_) if detail.to_ascii_lowercase().contains("imds") => {
            MintError::NoCredentials {
                kind: KIND,
                hint: NO_CREDENTIALS_HINT.to_owned(),
            }
        }
        CredentialsError::ProviderError(_) => {
            let lower = detail.to_ascii_lowercase();
            let hint =
                if lower.contains("sso") || lower.contains("expired") || lower.contains("token") {
                    "run `aws sso login` (with --profile if you use one)"
                } else {
                    NO_CREDENTIALS_HINT
                };
            MintError::Refused {
                kind: KIND,
                message: format!("could not get the local credentials: {detail}; {hint}"),
            }
        }
        _ => MintError::Failed {
            kind: KIND,
            message: format!("could not get the local credentials: {detail}"),
        },
    }
}

/// The text of the first `<tag>` element of an XML body (no entities
/// beyond the five predefined ones are expected in STS errors).
fn xml_text(body: &str, tag: &str) -> Option<String> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let end = start + body[start..].find(&format!("</{tag}>"))?;
    let text = body[start..end]
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&");
    Some(text).filter(|t| !t.is_empty())
}

/// The error code and message of an STS service error.
fn sts_code_and_message<E>(err: &SdkError<E>) -> (String, String)
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let raw = err
        .raw_response()
        .and_then(|r| r.body().bytes())
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    // Some STS emulators (moto's auth layer) wrap the error in `<Errors>`,
    // which the SDK's parser does not read; fall back to the first `<Code>`
    // / `<Message>` of the body.
    let code = err
        .code()
        .map(str::to_owned)
        .or_else(|| xml_text(&raw, "Code"))
        .unwrap_or_else(|| "Unknown".to_owned());
    let message = err
        .message()
        .map(str::to_owned)
        .or_else(|| xml_text(&raw, "Message"))
        .unwrap_or_else(|| "no message".to_owned());
    (code, message)
}

/// Maps an STS failure to what the user can do. STS error messages carry
/// no secrets (they name principals and actions).
fn sts_error<E>(operation: &str, err: SdkError<E>) -> MintError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(_) => {
            let (code, message) = sts_code_and_message(&err);
            let fix = match code.as_str() {
                "ExpiredToken" | "ExpiredTokenException" | "RequestExpired" => {
                    "the credentials have expired: run `aws sso login` (or renew the credentials in your environment or profile)"
                }
                "AccessDenied" | "AccessDeniedException" => {
                    "access denied: the local identity needs permission for this call (for a role, its trust policy must allow you sts:AssumeRole, sts:TagSession and sts:SetSourceIdentity)"
                }
                "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "UnrecognizedClientException"
                | "InvalidAccessKeyId"
                | "IncompleteSignature" => {
                    "AWS does not accept the local credentials: run `aws configure` or `aws sso login`, or set AWS_PROFILE"
                }
                "RegionDisabledException" => {
                    "STS is not enabled in this region: set AWS_REGION to an enabled one"
                }
                "MalformedPolicyDocument" | "PackedPolicyTooLarge" => {
                    "the session policy was rejected: fix the --aws-session-policy file"
                }
                _ => "",
            };
            let message = if fix.is_empty() {
                format!("{operation}: {code}: {message}")
            } else {
                format!("{operation}: {fix} ({code}: {message})")
            };
            MintError::Refused {
                kind: KIND,
                message,
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => MintError::Failed {
            kind: KIND,
            message: format!(
                "{operation}: could not reach AWS STS ({}); check the network, a proxy, or AWS_ENDPOINT_URL_STS",
                DisplayErrorContext(&err)
            ),
        },
        _ => MintError::Failed {
            kind: KIND,
            message: format!("{operation}: {}", DisplayErrorContext(&err)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use credstream_proto::convert::system_time as system_time_of;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const CALLER_IDENTITY: &str = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:sts::210987654321:assumed-role/Dev/alice</Arn>
    <UserId>AROAEXAMPLE:alice</UserId>
    <Account>210987654321</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#;

    /// A one-trick STS: answers `GetCallerIdentity`, and records every
    /// `Action` it was asked for (anything else gets a 400).
    async fn fake_sts() -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let actions = Arc::new(Mutex::new(Vec::new()));
        let seen = actions.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let body = loop {
                        let n = stream.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text[..end]
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + length {
                                break text[end + 4..end + 4 + length].to_owned();
                            }
                        }
                    };
                    let action = body
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("Action="))
                        .unwrap_or("")
                        .to_owned();
                    seen.lock().unwrap().push(action.clone());
                    let (status, reply) = if action == "GetCallerIdentity" {
                        ("200 OK", CALLER_IDENTITY.to_owned())
                    } else {
                        (
                            "400 Bad Request",
                            "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>Cannot call GetSessionToken with session credentials</Message></Error><RequestId>1</RequestId></ErrorResponse>".to_owned(),
                        )
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                        reply.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        (url, actions)
    }

    #[tokio::test]
    async fn temporary_credentials_are_forwarded_as_they_are() {
        let (url, actions) = fake_sts().await;
        let expiry = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    + 1800,
            );
        let local = Credentials::new(
            "ASIATEMPORARYEXAMPLE",
            "temporary-secret",
            Some("temporary-session-token".into()),
            Some(expiry),
            "test",
        );
        let minter = AwsMinter::builder()
            .credentials_provider(local)
            .endpoint_url(url)
            .region("eu-west-1")
            .build()
            .await
            .unwrap();
        for _ in 0..2 {
            let update = minter.mint().await.unwrap();
            assert_eq!(update.expiry(), Some(expiry));
            let Some(credential_update::Credential::Aws(aws)) = &update.credential else {
                panic!("not an AWS credential: {update:?}");
            };
            assert_eq!(aws.access_key_id, "ASIATEMPORARYEXAMPLE");
            assert_eq!(aws.secret_access_key, "temporary-secret");
            assert_eq!(aws.session_token, "temporary-session-token");
            assert_eq!(
                aws.principal_arn,
                "arn:aws:sts::210987654321:assumed-role/Dev/alice"
            );
            assert_eq!(aws.account_id, "210987654321");
            assert_eq!(aws.region, "eu-west-1");
            // Nothing renews them: minting ends when they expire.
            let end = update.access_end.as_ref().expect("an access end");
            assert_eq!(end.at.as_ref().and_then(system_time_of), Some(expiry));
            assert_eq!(end.reason, "your temporary AWS credentials expire then");
        }
        // GetSessionToken would have been refused; it was never asked.
        assert_eq!(
            *actions.lock().unwrap(),
            ["GetCallerIdentity", "GetCallerIdentity"]
        );
    }

    #[tokio::test]
    async fn expired_temporary_credentials_are_refused_before_any_call() {
        let (url, actions) = fake_sts().await;
        let local = Credentials::new(
            "ASIATEMPORARYEXAMPLE",
            "temporary-secret",
            Some("temporary-session-token".into()),
            Some(SystemTime::now() - Duration::from_secs(60)),
            "test",
        );
        let minter = AwsMinter::builder()
            .credentials_provider(local)
            .endpoint_url(url)
            .build()
            .await
            .unwrap();
        let err = minter.mint().await.unwrap_err().to_string();
        assert!(
            err.contains("expired") && err.contains("aws sso login"),
            "{err}"
        );
        assert!(!err.contains("temporary-secret"), "{err}");
        assert!(actions.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn settings_are_checked_when_building() {
        let cases: Vec<(AwsMinterBuilder, &str)> = vec![
            (
                AwsMinter::builder().duration(Duration::from_secs(60)),
                "out of range",
            ),
            (
                AwsMinter::builder()
                    .role_arn("arn:aws:iam::123456789012:role/r")
                    .duration(Duration::from_secs(13 * 3600)),
                "out of range",
            ),
            (AwsMinter::builder().role_arn("my-role"), "not a role ARN"),
            (
                AwsMinter::builder().session_policy("{}"),
                "needs a role ARN",
            ),
            (
                AwsMinter::builder()
                    .role_arn("arn:aws:iam::123456789012:role/r")
                    .session_policy("{not json"),
                "not valid JSON (line 1",
            ),
            (
                AwsMinter::builder()
                    .role_arn("arn:aws:iam::123456789012:role/r")
                    .session_policy("[]"),
                "must be a JSON object",
            ),
            (
                AwsMinter::builder()
                    .role_arn("arn:aws:iam::123456789012:role/r")
                    .session_policy_file("/nonexistent/policy.json"),
                "cannot read the session policy /nonexistent/policy.json",
            ),
            (
                AwsMinter::builder()
                    .role_arn("arn:aws:iam::123456789012:role/r")
                    .role_session_name("x"),
                "role session name",
            ),
        ];
        for (builder, expected) in cases {
            let err = builder.region("us-east-1").build().await.unwrap_err();
            assert!(matches!(err, MintError::InvalidConfig { .. }), "{err}");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn policies_are_minified_and_bounded() {
        let packed = load_policy(PolicySource::Inline(
            "{\n  \"Version\": \"2012-10-17\",\n  \"Statement\": []\n}".into(),
        ))
        .unwrap();
        assert_eq!(packed, r#"{"Statement":[],"Version":"2012-10-17"}"#);
        let big = format!("{{\"Sid\": \"{}\"}}", "x".repeat(3000));
        assert!(load_policy(PolicySource::Inline(big)).is_err());
    }

    #[test]
    fn account_is_read_from_arns() {
        assert_eq!(
            account_of("arn:aws:sts::123456789012:assumed-role/r/s"),
            Some("123456789012")
        );
        assert_eq!(account_of("arn:aws:iam::aws:policy/x"), None);
        assert_eq!(account_of("nonsense"), None);
    }

    #[test]
    fn default_session_name_is_valid() {
        let name = default_session_name();
        assert!(name.starts_with("credstream-"));
        assert!(name.len() <= 64 && name.chars().all(cloudtrail::identity_char));
    }
}
