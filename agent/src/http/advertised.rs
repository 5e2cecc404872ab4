//! The expiry the agent tells SDKs, which is what bounds how long a process
//! keeps using a credential after the publisher revoked it.
//!
//! SDKs cache what an endpoint served until shortly before the expiry it
//! named: boto3's default session, fsspec's cached `S3FileSystem`, a
//! google-auth `Credentials` object. Revocation removes the credential from
//! the agent at once, but a process that fetched it a minute earlier would
//! go on signing with it until the real expiry (12 hours for a role session
//! at most, an hour for a Google token). So the agent names an expiry no
//! later than a fixed lifetime ahead of the request ([`AWS_LIFETIME`],
//! [`GCP_LIFETIME`]), or the real one when that comes first: SDKs come back
//! often, and once the credential is revoked, the next fetch fails with the
//! agent's reason. The real expiry is unchanged everywhere else (the
//! agent's status, refresh hints, the broker).
//!
//! The bounds this gives, from the SDKs' refresh margins
//! (docs/facts.md, facts 4 and 9):
//! - boto3 and aiobotocore (s3fs) fetch again when under 15 minutes remain
//!   and raise when under 10 remain if that fetch fails. With 16 minutes
//!   advertised they fetch a minute after each fetch, and a revoked
//!   credential is used for at most 6 minutes after the last fetch.
//!   Anything under 15 minutes would make every boto3 call fetch.
//! - google-auth fetches again under 3 minutes 45 seconds and raises if that
//!   fails; with 6 minutes advertised, a revoked token is used for at most
//!   2 minutes 15 seconds (gcsfs, which fetches under 5 minutes: 1 minute).
//! - Any SDK that honours the expiry it was given: at most the advertised
//!   lifetime, 16 minutes for AWS and 6 for Google.

use std::time::{Duration, SystemTime};

/// The longest lifetime the AWS endpoint advertises: just over botocore's
/// 15-minute advisory refresh window.
pub const AWS_LIFETIME: Duration = Duration::from_secs(16 * 60);

/// The longest lifetime the GCE token endpoint advertises.
pub const GCP_LIFETIME: Duration = Duration::from_secs(6 * 60);

/// The expiry to advertise at `now` for a credential that really expires
/// at `expiry`: the earlier of the two.
pub fn expiry(expiry: SystemTime, now: SystemTime, lifetime: Duration) -> SystemTime {
    expiry.min(now + lifetime)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_long_lived_credential_is_advertised_for_the_lifetime_only() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(
            expiry(now + 12 * HOUR, now, AWS_LIFETIME),
            now + AWS_LIFETIME
        );
        assert_eq!(expiry(now + HOUR, now, GCP_LIFETIME), now + GCP_LIFETIME);
    }

    #[test]
    fn a_credential_that_expires_sooner_is_advertised_as_it_is() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let soon = now + Duration::from_secs(14 * 60);
        assert_eq!(expiry(soon, now, AWS_LIFETIME), soon);
        assert_eq!(expiry(now, now, GCP_LIFETIME), now);
    }

    #[test]
    fn the_aws_lifetime_leaves_boto3_outside_its_refresh_window_after_a_fetch() {
        // Fact 4: boto3 fetches on every call while under 15 minutes remain.
        assert!(AWS_LIFETIME > Duration::from_secs(15 * 60));
        // Fact 9: google-auth fetches on every call under 3 min 45 s.
        assert!(GCP_LIFETIME > Duration::from_secs(3 * 60 + 45));
    }
}
