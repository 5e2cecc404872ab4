//! Conversions between generated types and the standard library.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

use crate::v1::{CredentialKind, CredentialUpdate, credential_update::Credential};

/// Converts a `SystemTime` to a protobuf `Timestamp` (whole nanoseconds).
pub fn timestamp(time: SystemTime) -> Timestamp {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

/// Converts a protobuf `Timestamp` to a `SystemTime`; `None` when it is
/// before 1970 or its nanos are out of range.
pub fn system_time(ts: &Timestamp) -> Option<SystemTime> {
    if ts.seconds < 0 || !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    UNIX_EPOCH.checked_add(Duration::new(ts.seconds as u64, ts.nanos as u32))
}

impl CredentialUpdate {
    /// The kind of credential this update carries, `Unspecified` when none.
    pub fn kind(&self) -> CredentialKind {
        match &self.credential {
            Some(Credential::Aws(_)) => CredentialKind::Aws,
            Some(Credential::Gcp(_)) => CredentialKind::Gcp,
            None => CredentialKind::Unspecified,
        }
    }

    /// When the credential expires; `None` if unset or invalid.
    pub fn expiry(&self) -> Option<SystemTime> {
        self.expires_at.as_ref().and_then(system_time)
    }
}

impl CredentialKind {
    /// A short lower-case name for logs and CLI output (`aws`, `gcp`).
    pub fn label(self) -> &'static str {
        match self {
            CredentialKind::Aws => "aws",
            CredentialKind::Gcp => "gcp",
            CredentialKind::Unspecified => "unspecified",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let now = SystemTime::now();
        assert_eq!(system_time(&timestamp(now)), Some(now));
        assert_eq!(
            system_time(&Timestamp {
                seconds: -1,
                nanos: 0
            }),
            None
        );
    }
}
