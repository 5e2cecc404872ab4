//! The one decision of what a mint does with the local credentials
//! ([`Plan::decide`]): the mint follows it, and `whoami` shows it as
//! [`AwsMintPlan`].

use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;

use super::builder::RoleSettings;
use super::local::expiry_from_env;

/// AWS limits a role assumed with temporary credentials (role chaining) to
/// one hour.
const ROLE_CHAINING_MAX_DURATION: Duration = Duration::from_secs(3600);

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

/// What one mint does, with the settings it needs.
pub(super) enum Plan<'a> {
    /// `AssumeRole` on `role`, asking for `duration`.
    AssumeRole {
        role: &'a RoleSettings,
        duration: Duration,
    },
    /// `GetSessionToken` from long-term keys, asking for `duration`.
    SessionToken { duration: Duration },
    /// The local temporary credentials as they are; `None` if nothing says
    /// when they expire.
    Forward { expires_at: Option<SystemTime> },
}

impl<'a> Plan<'a> {
    /// A role if one is set; else temporary credentials are forwarded (STS
    /// refuses `GetSessionToken` with them) and long-term keys exchanged.
    /// A role assumed from temporary credentials is asked for at most one
    /// hour (role chaining).
    pub(super) fn decide(
        role: Option<&'a RoleSettings>,
        duration: Duration,
        local: &Credentials,
    ) -> Plan<'a> {
        let temporary = local.session_token().is_some();
        match role {
            Some(role) => Plan::AssumeRole {
                role,
                duration: if temporary {
                    duration.min(ROLE_CHAINING_MAX_DURATION)
                } else {
                    duration
                },
            },
            None if temporary => Plan::Forward {
                expires_at: local.expiry().or_else(expiry_from_env),
            },
            None => Plan::SessionToken { duration },
        }
    }
}

impl From<&Plan<'_>> for AwsMintPlan {
    fn from(plan: &Plan<'_>) -> AwsMintPlan {
        match plan {
            Plan::AssumeRole { role, duration } => AwsMintPlan::AssumeRole {
                role_arn: role.arn.clone(),
                session_policy: role.policy.is_some(),
                duration: *duration,
            },
            Plan::SessionToken { duration } => AwsMintPlan::SessionToken {
                duration: *duration,
            },
            Plan::Forward { expires_at } => AwsMintPlan::Forward {
                expires_at: *expires_at,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn role() -> RoleSettings {
        RoleSettings {
            arn: "arn:aws:iam::123456789012:role/r".into(),
            session_name: "credstream-test".into(),
            policy: Some("{}".into()),
            source_identity: None,
            tags: Vec::new(),
        }
    }

    #[test]
    fn the_plan_follows_the_role_and_the_kind_of_local_credentials() {
        let long_term = Credentials::new("AKIAEXAMPLE", "secret", None, None, "test");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let temporary = Credentials::new(
            "ASIAEXAMPLE",
            "secret",
            Some("token".into()),
            Some(at),
            "test",
        );
        let role = role();
        let plan = |role, local| AwsMintPlan::from(&Plan::decide(role, 8 * HOUR, local));

        assert_eq!(
            plan(None, &long_term),
            AwsMintPlan::SessionToken { duration: 8 * HOUR }
        );
        assert_eq!(
            plan(None, &temporary),
            AwsMintPlan::Forward {
                expires_at: Some(at)
            }
        );
        assert_eq!(
            plan(Some(&role), &long_term),
            AwsMintPlan::AssumeRole {
                role_arn: role.arn.clone(),
                session_policy: true,
                duration: 8 * HOUR,
            }
        );
        // Role chaining: at most one hour.
        assert_eq!(
            plan(Some(&role), &temporary),
            AwsMintPlan::AssumeRole {
                role_arn: role.arn.clone(),
                session_policy: true,
                duration: HOUR,
            }
        );
    }
}
