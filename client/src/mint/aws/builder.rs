//! [`AwsMinterBuilder`]: every setting checked once, when the minter is
//! built, so that a mint can only fail on what it asks AWS.

use std::path::PathBuf;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use tracing::debug;

use super::errors::config_error;
use super::{
    AwsMinter, DEFAULT_DURATION, MAX_ASSUME_ROLE_DURATION, MAX_SESSION_TOKEN_DURATION, MIN_DURATION,
};
use crate::mint::MintError;
use crate::mint::cloudtrail::{self, check_name, session_name_for_cluster};

/// Longest session policy AWS accepts, in characters of plain text.
const MAX_SESSION_POLICY_CHARS: usize = 2048;

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

/// What `AssumeRole` is asked with, checked by [`AwsMinterBuilder::build`].
pub(super) struct RoleSettings {
    pub(super) arn: String,
    pub(super) session_name: String,
    pub(super) policy: Option<String>,
    /// Given by the user; else derived from the local identity per mint.
    pub(super) source_identity: Option<String>,
    /// Transitive session tags, `credstream-cluster` first.
    pub(super) tags: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn default_session_name_is_valid() {
        let name = default_session_name();
        assert!(name.starts_with("credstream-"));
        assert!(name.len() <= 64 && name.chars().all(cloudtrail::identity_char));
    }
}
