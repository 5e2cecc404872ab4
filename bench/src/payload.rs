//! The payload every peer fans out: one AWS `CredentialUpdate` of about
//! 1.5 KB once encoded, with the publish round in its access key id so that
//! every receiver — whatever carried the bytes — finds the round the same
//! way, by decoding the protobuf.

use std::time::{Duration, SystemTime};

use credstream_proto::convert::timestamp;
use credstream_proto::v1::{AwsCredential, CredentialUpdate, credential_update::Credential};
use prost::Message;

const KEY_PREFIX: &str = "ASIABENCH";

/// The credential of publish round `round` (round 0 is the one published
/// before agents connect; measured rounds start at 1).
pub fn credential(round: u64) -> CredentialUpdate {
    let mut aws = AwsCredential::default();
    aws.access_key_id = format!("{KEY_PREFIX}{round:011}");
    aws.secret_access_key = "x".repeat(40);
    // Real STS session tokens are 800 to 1,400 characters.
    aws.session_token = "IQoJb3JpZ2luX2VjE".repeat(76);
    aws.principal_arn = "arn:aws:sts::123456789012:assumed-role/bench-role/bench-session".into();
    aws.account_id = "123456789012".into();
    aws.region = "eu-west-1".into();
    let now = SystemTime::now();
    CredentialUpdate {
        credential: Some(Credential::Aws(aws)),
        issued_at: Some(timestamp(now)),
        expires_at: Some(timestamp(now + Duration::from_secs(3600))),
        version: round,
        ..Default::default()
    }
}

/// The encoded credential of `round`, as the non-gRPC peers carry it.
pub fn encoded(round: u64) -> Vec<u8> {
    credential(round).encode_to_vec()
}

/// The round a received credential belongs to; `None` if it is not one of
/// ours.
pub fn round_of(update: &CredentialUpdate) -> Option<u64> {
    match &update.credential {
        Some(Credential::Aws(aws)) => aws.access_key_id.strip_prefix(KEY_PREFIX)?.parse().ok(),
        _ => None,
    }
}

/// Decodes bytes carried by a non-gRPC peer and returns their round.
pub fn round_of_bytes(bytes: &[u8]) -> Option<u64> {
    CredentialUpdate::decode(bytes)
        .ok()
        .and_then(|u| round_of(&u))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_about_one_and_a_half_kilobytes_and_carries_its_round() {
        let bytes = encoded(42);
        assert!((1300..1700).contains(&bytes.len()), "{} bytes", bytes.len());
        assert_eq!(round_of_bytes(&bytes), Some(42));
    }
}
