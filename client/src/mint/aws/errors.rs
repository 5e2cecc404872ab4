//! What the user can do about a failure, decided from the SDK's error
//! types: the [`CredentialsError`] variant and the typed errors in its
//! source chain for the local credential chain, the [`SdkError`] variant
//! and the service's error code ([`ProvideErrorMetadata::code`]) for STS.
//! The provider's text is only quoted, never searched.

use std::error::Error;

use aws_config::imds::client::error::ImdsError;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_sts::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sts::operation::assume_role::AssumeRoleError;
use aws_sdk_sts::operation::assume_role_with_web_identity::AssumeRoleWithWebIdentityError;

use super::KIND;
use crate::mint::MintError;

const NO_CREDENTIALS_HINT: &str = "run `aws configure` or `aws sso login`, or set AWS_PROFILE";
const SSO_LOGIN_HINT: &str = "run `aws sso login` (with --profile if you use one)";
const EXPIRED_FIX: &str = "the credentials have expired: run `aws sso login` (or renew the credentials in your environment or profile)";

/// The codes STS answers expired credentials with.
const EXPIRED_CODES: [&str; 3] = ["ExpiredToken", "ExpiredTokenException", "RequestExpired"];

pub(super) fn config_error(message: impl Into<String>) -> MintError {
    MintError::InvalidConfig {
        kind: KIND,
        message: message.into(),
    }
}

pub(super) fn no_credentials() -> MintError {
    MintError::NoCredentials {
        kind: KIND,
        hint: NO_CREDENTIALS_HINT.to_owned(),
    }
}

pub(super) fn empty_answer(operation: &str) -> MintError {
    MintError::Failed {
        kind: KIND,
        message: format!("{operation} answered without credentials"),
    }
}

pub(super) fn invalid_expiry(operation: &str) -> MintError {
    MintError::Failed {
        kind: KIND,
        message: format!("{operation} returned an expiry that is not a valid time"),
    }
}

/// Temporary credentials that expired before the mint.
pub(super) fn expired_locally() -> MintError {
    MintError::Refused {
        kind: KIND,
        message: "the local temporary credentials have expired: run `aws sso login` (or renew the credentials in your environment or profile)".into(),
    }
}

/// Maps a credential-chain failure to what the user can do. `sso_login`
/// says the profile in use signs in through SSO (so logging in again is
/// the fix for whatever its provider failed at).
pub(super) fn credentials_error(err: CredentialsError, sso_login: bool) -> MintError {
    let detail = DisplayErrorContext(&err).to_string();
    match &err {
        CredentialsError::CredentialsNotLoaded(_) => no_credentials(),
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
        CredentialsError::ProviderError(_) if cause::<ImdsError>(&err).is_some() => {
            no_credentials()
        }
        CredentialsError::ProviderError(_) => {
            let hint = if sso_login || expired_in_sts(&err) {
                SSO_LOGIN_HINT
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

/// The first error of type `T` in `err`'s source chain.
fn cause<'a, T: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a T> {
    std::iter::successors(Some(err), |e| (*e).source()).find_map(|e| e.downcast_ref::<T>())
}

/// True if an STS call the chain made (a profile's role, web identity) was
/// refused because the credentials it signed with have expired.
fn expired_in_sts(err: &CredentialsError) -> bool {
    let code = cause::<SdkError<AssumeRoleError>>(err)
        .and_then(|e| e.code())
        .or_else(|| cause::<SdkError<AssumeRoleWithWebIdentityError>>(err).and_then(|e| e.code()));
    code.is_some_and(|code| EXPIRED_CODES.contains(&code))
}

/// The error code and message of an STS service error, as the SDK parsed
/// them.
fn code_and_message<E: ProvideErrorMetadata>(err: &E) -> (&str, &str) {
    (
        err.code().unwrap_or("Unknown"),
        err.message().unwrap_or("no message"),
    )
}

/// Maps an STS failure to what the user can do. STS error messages carry
/// no secrets (they name principals and actions).
pub(super) fn sts_error<E>(operation: &str, err: SdkError<E>) -> MintError
where
    E: ProvideErrorMetadata + Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(_) => {
            let (code, message) = code_and_message(&err);
            let fix = match code {
                code if EXPIRED_CODES.contains(&code) => EXPIRED_FIX,
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

/// A minted credential that failed its check (`GetCallerIdentity` signed
/// with it): not published, so agents keep the last good one, and retried.
pub(super) fn failed_check<E>(operation: &str, err: SdkError<E>) -> MintError
where
    E: ProvideErrorMetadata + Error + Send + Sync + 'static,
{
    let what = match &err {
        SdkError::ServiceError(_) => {
            let (code, message) = code_and_message(&err);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    use aws_sdk_sts::config::http::HttpResponse;
    use aws_sdk_sts::error::ErrorMetadata;

    fn refused_by_sts(code: &str, message: &str) -> SdkError<AssumeRoleError> {
        let meta = ErrorMetadata::builder().code(code).message(message).build();
        SdkError::service_error(
            AssumeRoleError::generic(meta),
            HttpResponse::new(400.try_into().unwrap(), "".into()),
        )
    }

    #[test]
    fn chain_failures_are_told_apart_by_type() {
        let err = credentials_error(CredentialsError::not_loaded("nothing here"), false);
        assert!(matches!(err, MintError::NoCredentials { .. }), "{err:?}");

        let failed = || CredentialsError::provider_error("the provider failed");
        let err = credentials_error(failed(), false).to_string();
        assert!(err.ends_with(NO_CREDENTIALS_HINT), "{err}");
        // The same failure from an SSO profile: log in again.
        let err = credentials_error(failed(), true).to_string();
        assert!(err.ends_with(SSO_LOGIN_HINT), "{err}");

        // A profile's role refused because its source credentials expired.
        let expired = refused_by_sts(
            "ExpiredToken",
            "The security token included in the request is expired",
        );
        let err = credentials_error(CredentialsError::provider_error(expired), false);
        assert!(matches!(err, MintError::Refused { .. }), "{err:?}");
        assert!(err.to_string().ends_with(SSO_LOGIN_HINT), "{err}");
        let denied = refused_by_sts("AccessDenied", "not authorized to perform sts:AssumeRole");
        let err = credentials_error(CredentialsError::provider_error(denied), false);
        assert!(err.to_string().ends_with(NO_CREDENTIALS_HINT), "{err}");
    }

    #[test]
    fn sts_refusals_name_the_fix_by_code() {
        let err = sts_error("AssumeRole", refused_by_sts("AccessDenied", "no"));
        assert!(matches!(err, MintError::Refused { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("AWS refused to mint: AssumeRole: access denied: ")
                && err.to_string().ends_with(" (AccessDenied: no)"),
            "{err}"
        );
        let err = sts_error(
            "AssumeRole",
            refused_by_sts("ValidationError", "bad duration"),
        );
        assert_eq!(
            err.to_string(),
            "AWS refused to mint: AssumeRole: ValidationError: bad duration"
        );
    }
}
