//! The minters a publisher uses, from what the user asked for (the
//! identity flags of `credstream publish` and `credstream whoami`, the
//! Python `Publisher`'s arguments), and which of them have local
//! credentials to mint from.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::mint::aws::AwsMinter;
use crate::mint::gcp::GcpMinter;
use crate::mint::{MintError, Minter};
use crate::whoami::{Whoami, whoami as look_up};

/// What to mint from: the identity flags shared by `publish` and `whoami`.
#[derive(Clone, Debug, Default)]
pub struct IdentityOptions {
    /// Mint AWS (not `--no-aws`).
    pub aws: bool,
    /// Mint GCP (not `--no-gcp`).
    pub gcp: bool,
    /// `--aws-profile`.
    pub aws_profile: Option<String>,
    /// `--aws-role-arn`.
    pub aws_role_arn: Option<String>,
    /// `--aws-session-policy`.
    pub aws_session_policy: Option<PathBuf>,
    /// `--aws-duration`.
    pub aws_duration: Option<Duration>,
    /// `--gcp-scopes`.
    pub gcp_scopes: Vec<String>,
}

/// What `publish` adds to an `AssumeRole` so that CloudTrail names the
/// person and the cluster ([`crate::mint::cloudtrail`]).
#[derive(Clone, Debug, Default)]
pub struct AwsAudit {
    /// The cluster: the `credstream-cluster` session tag and the session
    /// name.
    pub cluster: Option<String>,
    /// `--aws-source-identity` (default: the name in the local ARN).
    pub source_identity: Option<String>,
    /// `--aws-tag KEY=VALUE`.
    pub tags: Vec<(String, String)>,
}

/// The configured minters; `None` for a kind turned off.
pub struct Minters {
    /// AWS, unless `--no-aws`.
    pub aws: Option<AwsMinter>,
    /// GCP, unless `--no-gcp`.
    pub gcp: Option<GcpMinter>,
}

impl IdentityOptions {
    /// Builds the minters. A wrong setting (a duration out of range, an
    /// unreadable session policy) is an error: the user asked for it.
    pub async fn minters(&self) -> Result<Minters, MintError> {
        self.minters_for(&AwsAudit::default()).await
    }

    /// [`IdentityOptions::minters`], with what `AssumeRole` carries for
    /// CloudTrail.
    pub async fn minters_for(&self, audit: &AwsAudit) -> Result<Minters, MintError> {
        let aws = if self.aws {
            let mut builder = AwsMinter::builder();
            if let Some(cluster) = &audit.cluster {
                builder = builder.cluster(cluster);
            }
            if let Some(name) = &audit.source_identity {
                builder = builder.source_identity(name);
            }
            for (key, value) in &audit.tags {
                builder = builder.session_tag(key, value);
            }
            if let Some(profile) = &self.aws_profile {
                builder = builder.profile(profile);
            }
            if let Some(arn) = &self.aws_role_arn {
                builder = builder.role_arn(arn);
            }
            if let Some(policy) = &self.aws_session_policy {
                builder = builder.session_policy_file(policy);
            }
            if let Some(duration) = self.aws_duration {
                builder = builder.duration(duration);
            }
            Some(builder.build().await?)
        } else {
            None
        };
        let gcp = if self.gcp {
            let mut builder = GcpMinter::builder();
            if !self.gcp_scopes.is_empty() {
                builder = builder.scopes(self.gcp_scopes.iter().map(|s| s.trim().to_owned()));
            }
            Some(builder.build()?)
        } else {
            None
        };
        Ok(Minters { aws, gcp })
    }
}

/// What `publish` will mint: the minters whose local identity resolved, and
/// one line per kind saying who it publishes as, or why it does not.
pub struct Usable {
    /// The minters to publish with.
    pub minters: Vec<Arc<dyn Minter>>,
    /// Lines for the user (no secrets).
    pub lines: Vec<String>,
}

/// Looks up each configured kind's local identity (concurrently) and keeps
/// the kinds that have one. A kind without one is reported once and left
/// out, so the others are still published.
pub async fn usable(minters: Minters) -> Usable {
    let answer = look_up(minters.aws.as_ref(), minters.gcp.as_ref()).await;
    let mut usable = Usable {
        minters: Vec::new(),
        lines: Vec::new(),
    };
    match (minters.aws, &answer.aws) {
        (Some(minter), Some(Ok(_))) => {
            usable.lines.extend(kind_lines(&answer, "aws:"));
            usable.minters.push(Arc::new(minter));
        }
        (_, Some(Err(error))) => usable
            .lines
            .push(format!("aws: not publishing AWS credentials: {error}")),
        _ => {}
    }
    match (minters.gcp, &answer.gcp) {
        (Some(minter), Some(Ok(_))) => {
            usable.lines.extend(kind_lines(&answer, "gcp:"));
            usable.minters.push(Arc::new(minter));
        }
        (_, Some(Err(error))) => usable.lines.push(format!(
            "gcp: not publishing a Google access token: {error}"
        )),
        _ => {}
    }
    usable
}

fn kind_lines(answer: &Whoami, prefix: &str) -> Vec<String> {
    answer
        .lines()
        .into_iter()
        .filter(|line| line.starts_with(prefix))
        .collect()
}
