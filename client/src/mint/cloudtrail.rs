//! What an `AssumeRole` call carries so that CloudTrail names the person and
//! the cluster behind every call made with the credential it returns.
//!
//! - `SourceIdentity`: the user's own identity name — the last part of the
//!   ARN `GetCallerIdentity` gives for the local credentials (`alice` for
//!   `…:user/alice`, the session name for `…:assumed-role/Role/alice@corp`),
//!   or `--aws-source-identity`. AWS records it on every event of the
//!   session and of every role chained from it, and it cannot be changed
//!   afterwards.
//! - Session tags: `credstream-cluster=<cluster id>` and every
//!   `--aws-tag KEY=VALUE`, all transitive (`TransitiveTagKeys`), so they
//!   follow chained roles too and IAM conditions (`aws:PrincipalTag/…`) can
//!   use them.
//! - `RoleSessionName`: `credstream-<cluster id>` (it shows in the
//!   assumed-role ARN, `…:assumed-role/Role/credstream-analysis`).
//!
//! The role's trust policy must allow `sts:TagSession` and
//! `sts:SetSourceIdentity` besides `sts:AssumeRole`; an `AccessDenied` says
//! so.

use super::MintError;

/// The session tag naming the cluster.
pub const CLUSTER_TAG: &str = "credstream-cluster";
/// Most session tags AWS accepts on one call.
const MAX_TAGS: usize = 50;

/// What STS allows in a `SourceIdentity` and a `RoleSessionName`:
/// letters, digits and `+=,.@_-`.
pub(crate) fn identity_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "+=,.@_-".contains(c)
}

/// Checks a `SourceIdentity` or `RoleSessionName` given by the user: 2 to 64
/// characters of [`identity_char`].
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), MintError> {
    if (2..=64).contains(&name.len()) && name.chars().all(identity_char) {
        if what == "source identity" && name.to_ascii_lowercase().starts_with("aws:") {
            return Err(config(format!(
                "{what} {name:?} must not start with \"aws:\""
            )));
        }
        Ok(())
    } else {
        Err(config(format!(
            "{what} {name:?} must be 2 to 64 characters of letters, digits and +=,.@_-"
        )))
    }
}

/// The identity name in a principal ARN, reduced to what `SourceIdentity`
/// allows: the part after the last `/` (`alice` for
/// `arn:aws:iam::123456789012:user/team/alice`, `alice@corp.com` for
/// `…:assumed-role/Admin/alice@corp.com`), or after the last `:` when there
/// is no `/` (`root`). `None` if fewer than 2 characters remain.
pub fn identity_name(arn: &str) -> Option<String> {
    let tail = match arn.rsplit_once('/') {
        Some((_, name)) => name,
        None => arn.rsplit_once(':').map_or(arn, |(_, name)| name),
    };
    let mut name: String = tail.chars().filter(|c| identity_char(*c)).collect();
    name.truncate(64);
    (name.len() >= 2).then_some(name)
}

/// `credstream-<cluster>`, cut to the 64 characters STS allows (cluster ids
/// use only characters a session name may hold).
pub fn session_name_for_cluster(cluster: &str) -> String {
    let mut name: String = format!("credstream-{cluster}")
        .chars()
        .filter(|c| identity_char(*c))
        .collect();
    name.truncate(64);
    name
}

/// A session tag's key and value as STS allows them: a key of 1 to 128
/// characters, a value of at most 256, both of letters, digits, spaces and
/// `_.:/=+-@`, and the key not starting with `aws:`.
pub(crate) fn check_tag(key: &str, value: &str) -> Result<(), MintError> {
    let allowed = |c: char| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c);
    if key.is_empty() || key.chars().count() > 128 || !key.chars().all(allowed) {
        return Err(config(format!(
            "session tag key {key:?} must be 1 to 128 characters of letters, digits, spaces and _.:/=+-@"
        )));
    }
    if key.to_ascii_lowercase().starts_with("aws:") {
        return Err(config(format!(
            "session tag key {key:?} must not start with \"aws:\""
        )));
    }
    if value.chars().count() > 256 || !value.chars().all(allowed) {
        return Err(config(format!(
            "the value of session tag {key:?} must be at most 256 characters of letters, digits, spaces and _.:/=+-@"
        )));
    }
    Ok(())
}

/// The tags to send: the cluster tag first (when the cluster is known),
/// then the user's, checked, without duplicate keys (tag keys are
/// case-insensitive to STS).
pub(crate) fn session_tags(
    cluster: Option<&str>,
    extra: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, MintError> {
    let mut tags: Vec<(String, String)> = Vec::new();
    if let Some(cluster) = cluster {
        tags.push((CLUSTER_TAG.to_owned(), cluster.to_owned()));
    }
    for (key, value) in extra {
        check_tag(&key, &value)?;
        if tags.iter().any(|(k, _)| k.eq_ignore_ascii_case(&key)) {
            return Err(config(format!(
                "session tag {key:?} is given twice{}",
                if key.eq_ignore_ascii_case(CLUSTER_TAG) {
                    " (credstream sets it to the cluster id)"
                } else {
                    ""
                }
            )));
        }
        tags.push((key, value));
    }
    if tags.len() > MAX_TAGS {
        return Err(config(format!(
            "{} session tags: AWS accepts at most {MAX_TAGS}",
            tags.len()
        )));
    }
    Ok(tags)
}

fn config(message: String) -> MintError {
    MintError::InvalidConfig {
        kind: "AWS",
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_names_come_from_the_arn_tail() {
        assert_eq!(
            identity_name("arn:aws:iam::123456789012:user/team/alice").as_deref(),
            Some("alice")
        );
        assert_eq!(
            identity_name("arn:aws:sts::123456789012:assumed-role/Admin/alice@corp.com").as_deref(),
            Some("alice@corp.com")
        );
        assert_eq!(
            identity_name("arn:aws:iam::123456789012:root").as_deref(),
            Some("root")
        );
        assert_eq!(
            identity_name("arn:aws:sts::1:federated-user/b o!b").as_deref(),
            Some("bob")
        );
        assert_eq!(identity_name("arn:aws:iam::1:user/x"), None);
        let long = format!("arn:aws:iam::1:user/{}", "a".repeat(100));
        assert_eq!(identity_name(&long).unwrap().len(), 64);
    }

    #[test]
    fn names_and_tags_are_checked() {
        assert!(check_name("source identity", "alice@corp.com").is_ok());
        for bad in ["a", "has space", "aws:me", &"x".repeat(65)] {
            let err = check_name("source identity", bad).unwrap_err().to_string();
            assert!(err.contains("source identity"), "{err}");
        }
        assert_eq!(session_name_for_cluster("analysis"), "credstream-analysis");
        assert_eq!(session_name_for_cluster(&"c".repeat(100)).len(), 64);

        let tags = session_tags(
            Some("dev"),
            vec![
                ("team".into(), "data eng".into()),
                ("cost".into(), "".into()),
            ],
        )
        .unwrap();
        assert_eq!(tags[0], (CLUSTER_TAG.to_owned(), "dev".to_owned()));
        assert_eq!(tags.len(), 3);
        for (key, value, expected) in [
            ("", "v", "tag key"),
            ("aws:x", "v", "must not start"),
            ("k", "semi;colon", "the value of session tag"),
            ("Credstream-Cluster", "other", "given twice"),
        ] {
            let err = session_tags(Some("dev"), vec![(key.into(), value.into())])
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{key}={value}: {err}");
        }
        let many = (0..50).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert!(
            session_tags(Some("dev"), many)
                .unwrap_err()
                .to_string()
                .contains("at most 50")
        );
    }
}
