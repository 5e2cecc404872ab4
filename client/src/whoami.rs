//! `credstream whoami`: which identities would be forwarded, and from where.
//!
//! It asks the same minters `publish` uses, so what it prints is what a
//! publish would forward: for AWS the caller identity STS reports for the
//! local credentials (`GetCallerIdentity`, which needs no permission) and
//! how a mint would turn them into forwarded credentials; for GCP the
//! principal and project of a freshly fetched token. Nothing secret is
//! printed, and nothing is minted on the AWS side.

use std::time::SystemTime;

use crate::mint::MintError;
use crate::mint::aws::{AwsMintPlan, AwsMinter};
use crate::mint::gcp::GcpMinter;

/// The local AWS identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AwsIdentity {
    /// The caller's ARN (`arn:aws:iam::123456789012:user/alice`).
    pub arn: String,
    /// The 12-digit account id.
    pub account: String,
    /// STS's unique id of the caller.
    pub user_id: String,
    /// Where the local credentials came from (environment variables, a
    /// profile, SSO, …).
    pub source: String,
    /// The region credentials would be forwarded with.
    pub region: Option<String>,
    /// What a mint would do with them.
    pub plan: AwsMintPlan,
}

/// The local GCP identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GcpIdentity {
    /// The principal's email, when the source says (service account keys,
    /// the gcloud CLI); authorized-user ADC files do not record it.
    pub principal: Option<String>,
    /// The project that would be forwarded.
    pub project_id: Option<String>,
    /// Where the credentials came from.
    pub source: String,
    /// When the token fetched to check them expires.
    pub expires_at: SystemTime,
}

/// The answer of `whoami`: each kind's identity, or why there is none.
/// `None` for a kind that was not asked about (`--no-aws`, `--no-gcp`).
#[derive(Debug)]
pub struct Whoami {
    /// The AWS side.
    pub aws: Option<Result<AwsIdentity, MintError>>,
    /// The GCP side.
    pub gcp: Option<Result<GcpIdentity, MintError>>,
}

/// Looks up both identities concurrently; pass `None` to skip a kind.
pub async fn whoami(aws: Option<&AwsMinter>, gcp: Option<&GcpMinter>) -> Whoami {
    let aws_lookup = async {
        match aws {
            Some(minter) => Some(minter.local_identity().await),
            None => None,
        }
    };
    let gcp_lookup = async {
        match gcp {
            Some(minter) => Some(minter.local_identity().await),
            None => None,
        }
    };
    let (aws, gcp) = tokio::join!(aws_lookup, gcp_lookup);
    Whoami { aws, gcp }
}

impl Whoami {
    /// True if every kind asked about has an identity (the CLI's exit code).
    pub fn all_found(&self) -> bool {
        !matches!(self.aws, Some(Err(_))) && !matches!(self.gcp, Some(Err(_)))
    }

    /// The answer as lines for the terminal, each starting with `aws:` or
    /// `gcp:`.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        match &self.aws {
            None => {}
            Some(Err(err)) => lines.push(format!("aws: none: {err}")),
            Some(Ok(id)) => {
                lines.push(format!("aws: {} (account {})", id.arn, id.account));
                lines.push(format!("aws: source: {}", id.source));
                lines.push(format!(
                    "aws: region: {}",
                    id.region
                        .as_deref()
                        .unwrap_or("none (set AWS_REGION to forward one)")
                ));
                lines.push(format!("aws: forwards: {}", describe_plan(&id.plan)));
            }
        }
        match &self.gcp {
            None => {}
            Some(Err(err)) => lines.push(format!("gcp: none: {err}")),
            Some(Ok(id)) => {
                lines.push(format!(
                    "gcp: {}",
                    id.principal
                        .as_deref()
                        .unwrap_or("principal not recorded by this source")
                ));
                lines.push(format!("gcp: source: {}", id.source));
                lines.push(format!(
                    "gcp: project: {}",
                    id.project_id
                        .as_deref()
                        .unwrap_or("none (set GOOGLE_CLOUD_PROJECT to forward one)")
                ));
                let left = id
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                lines.push(format!(
                    "gcp: forwards: a new access token on every refresh (this one for {})",
                    humantime::format_duration(std::time::Duration::from_secs(left.as_secs()))
                ));
            }
        }
        lines
    }
}

fn describe_plan(plan: &AwsMintPlan) -> String {
    let human = |d: &std::time::Duration| humantime::format_duration(*d).to_string();
    match plan {
        AwsMintPlan::AssumeRole {
            role_arn,
            session_policy,
            duration,
        } => format!(
            "AssumeRole {role_arn} for {}{}",
            human(duration),
            if *session_policy {
                ", down-scoped by the session policy"
            } else {
                ""
            }
        ),
        AwsMintPlan::SessionToken { duration } => format!(
            "GetSessionToken credentials for {} (the long-term keys stay here)",
            human(duration)
        ),
        AwsMintPlan::Forward { expires_at } => match expires_at {
            Some(at) => format!(
                "these temporary credentials as they are (they expire in {})",
                human(&std::time::Duration::from_secs(
                    at.duration_since(SystemTime::now())
                        .unwrap_or_default()
                        .as_secs()
                ))
            ),
            None => "these temporary credentials as they are (expiry unknown)".to_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lines_name_identity_source_and_plan() {
        let answer = Whoami {
            aws: Some(Ok(AwsIdentity {
                arn: "arn:aws:iam::123456789012:user/alice".into(),
                account: "123456789012".into(),
                user_id: "AIDAEXAMPLE".into(),
                source: "keys in profile default (~/.aws)".into(),
                region: Some("eu-west-1".into()),
                plan: AwsMintPlan::SessionToken {
                    duration: Duration::from_secs(12 * 3600),
                },
            })),
            gcp: Some(Err(MintError::NoCredentials {
                kind: "GCP",
                hint: "run `gcloud auth application-default login`".into(),
            })),
        };
        let lines = answer.lines();
        assert_eq!(
            lines[0],
            "aws: arn:aws:iam::123456789012:user/alice (account 123456789012)"
        );
        assert_eq!(lines[1], "aws: source: keys in profile default (~/.aws)");
        assert_eq!(lines[2], "aws: region: eu-west-1");
        assert_eq!(
            lines[3],
            "aws: forwards: GetSessionToken credentials for 12h (the long-term keys stay here)"
        );
        assert_eq!(
            lines[4],
            "gcp: none: no local GCP credentials: run `gcloud auth application-default login`"
        );
        assert!(!answer.all_found());
    }
}
