//! When an AWS SSO (IAM Identity Center) login ends, read from the SSO
//! token cache the AWS CLI writes at `aws sso login`.
//!
//! The profile (`AWS_PROFILE`, `--aws-profile`, or `default`, followed
//! through `source_profile` for a role assumed from an SSO profile) names
//! either an `sso_session` (the current form) or an `sso_start_url` (the
//! legacy form). The cache file is `~/.aws/sso/cache/<hex SHA-1 of the
//! session name, or of the start URL>.json` — the same name aws-config
//! reads — and holds the access token's `expiresAt` (RFC 3339). After that
//! time aws-config cannot fetch role credentials until the user runs
//! `aws sso login` again, so it is when minting from the profile ends.
//!
//! A cache entry with a `refreshToken` (an `sso_session` registered for
//! refresh) is renewed by aws-config while the Identity Center session
//! lasts, and that session's end is not written anywhere on the client:
//! such a login reports no end.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aws_runtime::env_config::file::EnvConfigFiles;
use aws_sdk_sts::primitives::{DateTime, DateTimeFormat};
use aws_types::os_shim_internal::{Env, Fs};
use sha1::{Digest, Sha1};
use tracing::debug;

/// How many `source_profile` links are followed at most.
const MAX_PROFILE_HOPS: usize = 8;

/// The end of the SSO login behind `profile` (or the selected one), if the
/// profile uses SSO, its cache entry can be read and it cannot be renewed
/// without the user. `None` otherwise; every failure is logged at debug
/// level only, since the credential itself was minted fine.
pub async fn session_end(profile: Option<&str>) -> Option<SystemTime> {
    let identifier = cache_identifier(profile).await?;
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let path = cache_path(&home, &identifier);
    let text = match std::fs::read(&path) {
        Ok(text) => zeroize::Zeroizing::new(text),
        Err(error) => {
            debug!(path = %path.display(), %error, "no readable SSO token cache entry");
            return None;
        }
    };
    entry_end(&text, &path)
}

/// True if `profile` (or the selected one), or a `source_profile` it is
/// assumed from, signs in through SSO: then `aws sso login` is what renews
/// its credentials.
pub async fn uses_sso(profile: Option<&str>) -> bool {
    cache_identifier(profile).await.is_some()
}

/// The session name or start URL the profile's SSO token is cached under.
async fn cache_identifier(profile: Option<&str>) -> Option<String> {
    let set = aws_config::profile::load(
        &Fs::real(),
        &Env::real(),
        &EnvConfigFiles::default(),
        profile.map(|p| Cow::Owned(p.to_owned())),
    )
    .await
    .map_err(|error| debug!(%error, "cannot read the AWS profile files"))
    .ok()?;
    let mut name = set.selected_profile().to_owned();
    for _ in 0..MAX_PROFILE_HOPS {
        let profile = set.get_profile(&name)?;
        if let Some(session) = profile.get("sso_session") {
            return Some(session.to_owned());
        }
        if let Some(url) = profile.get("sso_start_url") {
            return Some(url.to_owned());
        }
        name = profile.get("source_profile")?.to_owned();
    }
    None
}

/// `<home>/.aws/sso/cache/<hex sha1(identifier)>.json`.
pub fn cache_path(home: &Path, identifier: &str) -> PathBuf {
    let digest = Sha1::digest(identifier.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    home.join(".aws/sso/cache").join(format!("{hex}.json"))
}

/// The `expiresAt` of a cache entry that has no refresh token.
fn entry_end(text: &[u8], path: &Path) -> Option<SystemTime> {
    let json: serde_json::Value = serde_json::from_slice(text)
        .map_err(
            |error| debug!(path = %path.display(), %error, "the SSO token cache entry is not JSON"),
        )
        .ok()?;
    let field = |name: &str| {
        json.as_object()?
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| value.as_str())
            .filter(|value| !value.is_empty())
    };
    if field("refreshToken").is_some() {
        debug!(path = %path.display(), "the SSO token is refreshed by aws-config; its session end is not known here");
        return None;
    }
    let expires = field("expiresAt")?;
    let parsed = DateTime::from_str(expires, DateTimeFormat::DateTime)
        .map_err(
            |error| debug!(path = %path.display(), %error, "expiresAt is not an RFC 3339 time"),
        )
        .ok()?;
    SystemTime::try_from(parsed).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_file_names_are_the_sha1_of_the_identifier() {
        // The example in aws-config's own tests (sso/cache.rs).
        assert_eq!(
            cache_path(
                Path::new("/home/me"),
                "https://d-92671207e4.awsapps.com/start"
            ),
            Path::new("/home/me/.aws/sso/cache/13f9d35043871d073ab260e020f0ffde092cb14b.json")
        );
        assert_eq!(
            cache_path(Path::new("/home/someuser"), "admin"),
            Path::new(
                "/home/someuser/.aws/sso/cache/d033e22ae348aeb5660fc2140aec35850c4da997.json"
            )
        );
    }

    #[test]
    fn entries_without_a_refresh_token_end_at_expires_at() {
        let path = Path::new("x.json");
        let end = entry_end(
            br#"{"startUrl":"u","region":"us-east-1","accessToken":"t","expiresAt":"2026-12-01T17:42:00Z"}"#,
            path,
        );
        assert_eq!(
            end,
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_146_920))
        );
        let refreshable = entry_end(
            br#"{"accessToken":"t","expiresAt":"2026-12-01T17:42:00Z","refreshToken":"r"}"#,
            path,
        );
        assert_eq!(refreshable, None);
        assert_eq!(entry_end(b"not json", path), None);
        assert_eq!(entry_end(br#"{"expiresAt":"soon"}"#, path), None);
    }
}
