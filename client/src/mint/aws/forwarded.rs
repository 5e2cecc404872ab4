//! The credential a mint forwards ([`Forwarded`]), built in one place
//! whatever STS call (or none) it came from, and turned into the update.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sdk_sts::operation::get_caller_identity::GetCallerIdentityOutput;
use credstream_proto::convert::timestamp;
use credstream_proto::v1::{AccessEnd, AwsCredential, CredentialUpdate, credential_update};

use super::KIND;
use super::errors::{empty_answer, invalid_expiry};
use crate::mint::MintError;

/// Who a credential acts as: the principal's ARN and its account, either
/// empty when STS did not say.
#[derive(Default)]
pub(super) struct Principal {
    pub(super) arn: String,
    pub(super) account: String,
}

impl Principal {
    /// What `GetCallerIdentity` answered.
    pub(super) fn of(identity: &GetCallerIdentityOutput) -> Principal {
        Principal {
            arn: identity.arn().unwrap_or_default().to_owned(),
            account: identity.account().unwrap_or_default().to_owned(),
        }
    }

    /// An assumed-role user's ARN, with the account read from it.
    pub(super) fn from_arn(arn: String) -> Principal {
        let account = account_of(&arn).unwrap_or_default().to_owned();
        Principal { arn, account }
    }
}

/// A credential on its way to the agents and when it expires. The region
/// is added by [`Forwarded::into_update`].
pub(super) struct Forwarded {
    credential: AwsCredential,
    expires_at: SystemTime,
}

impl Forwarded {
    /// The one constructor: keys, session token, principal and expiry.
    fn new(
        access_key_id: &str,
        secret_access_key: &str,
        session_token: &str,
        principal: Principal,
        expires_at: SystemTime,
    ) -> Forwarded {
        Forwarded {
            credential: AwsCredential {
                access_key_id: access_key_id.to_owned(),
                secret_access_key: secret_access_key.to_owned(),
                session_token: session_token.to_owned(),
                principal_arn: principal.arn,
                account_id: principal.account,
                region: String::new(),
            },
            expires_at,
        }
    }

    /// What `operation` (`GetSessionToken`, `AssumeRole`) issued.
    pub(super) fn issued(
        credentials: Option<&aws_sdk_sts::types::Credentials>,
        principal: Principal,
        operation: &str,
    ) -> Result<Forwarded, MintError> {
        let c = credentials.ok_or_else(|| empty_answer(operation))?;
        let expires_at =
            SystemTime::try_from(*c.expiration()).map_err(|_| invalid_expiry(operation))?;
        Ok(Forwarded::new(
            c.access_key_id(),
            c.secret_access_key(),
            c.session_token(),
            principal,
            expires_at,
        ))
    }

    /// The local temporary credentials, as they are.
    pub(super) fn local(
        local: &Credentials,
        principal: Principal,
        expires_at: SystemTime,
    ) -> Forwarded {
        Forwarded::new(
            local.access_key_id(),
            local.secret_access_key(),
            local.session_token().unwrap_or_default(),
            principal,
            expires_at,
        )
    }

    /// The credential as the SDK signs with it (to check it works).
    pub(super) fn signing_credentials(&self) -> Credentials {
        Credentials::new(
            self.credential.access_key_id.clone(),
            self.credential.secret_access_key.clone(),
            Some(self.credential.session_token.clone()),
            None,
            "credstream-minted",
        )
    }

    /// Records what `GetCallerIdentity` signed with this credential said:
    /// its account, and its principal if it had none.
    pub(super) fn confirmed(mut self, identity: Principal) -> Forwarded {
        if self.credential.principal_arn.is_empty() && !identity.arn.is_empty() {
            self.credential.principal_arn = identity.arn;
        }
        if !identity.account.is_empty() {
            self.credential.account_id = identity.account;
        }
        self
    }

    /// Fills in the account from `fallback` if STS did not name one.
    pub(super) fn or_account(mut self, fallback: Option<&str>) -> Forwarded {
        if self.credential.account_id.is_empty() {
            self.credential.account_id = fallback.unwrap_or_default().to_owned();
        }
        self
    }

    pub(super) fn access_key_id(&self) -> &str {
        &self.credential.access_key_id
    }

    pub(super) fn principal_arn(&self) -> &str {
        &self.credential.principal_arn
    }

    pub(super) fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// The update that carries it, forwarded with `region`. A credential
    /// without a session token is refused: long-term keys are never
    /// shipped, whatever a provider returned.
    pub(super) fn into_update(
        self,
        region: Option<&str>,
        access_end: Option<AccessEnd>,
    ) -> Result<CredentialUpdate, MintError> {
        if self.credential.session_token.is_empty() {
            return Err(MintError::Failed {
                kind: KIND,
                message:
                    "STS returned credentials without a session token; refusing to forward them"
                        .into(),
            });
        }
        let mut credential = self.credential;
        credential.region = region.unwrap_or_default().to_owned();
        Ok(CredentialUpdate {
            credential: Some(credential_update::Credential::Aws(credential)),
            issued_at: Some(timestamp(SystemTime::now())),
            expires_at: Some(timestamp(self.expires_at)),
            access_end,
            ..Default::default()
        })
    }
}

/// The account field of an ARN (`arn:aws:sts::123456789012:assumed-role/…`).
fn account_of(arn: &str) -> Option<&str> {
    arn.split(':')
        .nth(4)
        .filter(|a| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn keys_without_a_session_token_are_never_forwarded() {
        let keys = Credentials::new("AKIAEXAMPLE", "long-term-secret", None, None, "test");
        let forwarded = Forwarded::local(&keys, Principal::default(), SystemTime::now());
        let err = forwarded.into_update(Some("eu-west-1"), None).unwrap_err();
        assert!(matches!(err, MintError::Failed { .. }), "{err:?}");
        assert!(err.to_string().contains("without a session token"), "{err}");
        assert!(!err.to_string().contains("long-term-secret"), "{err}");
    }
}
