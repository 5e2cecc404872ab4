//! The AWS container credential endpoint, the one the AWS SDKs' container
//! provider reads when `AWS_CONTAINER_CREDENTIALS_FULL_URI` is set.
//!
//! The response shape is what botocore parses (docs/facts.md, fact 3): `AccessKeyId`,
//! `SecretAccessKey`, `Token`, `Expiration` as RFC 3339 UTC with a `Z`
//! (a naive or numeric value crashes boto3), and `AccountId` when known.
//! Only an unexpired credential is ever served; otherwise a 503 explains
//! why, and botocore raises after its retries instead of using a dead key.
//! `Expiration` is at most [`advertised::AWS_LIFETIME`] ahead, so that a
//! revoked credential stops being used within a known bound.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header::CACHE_CONTROL};
use axum::response::{IntoResponse, Response};
use credstream_proto::v1::{CredentialKind, credential_update::Credential};
use serde::Serialize;

use super::{AppState, HttpError, advertised};
use crate::served::Served;

/// The JSON body, borrowing from the held credential so no extra copy of
/// the secret is made before serialization.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerCredentials<'a> {
    access_key_id: &'a str,
    secret_access_key: &'a str,
    token: &'a str,
    expiration: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<&'a str>,
}

/// `GET /aws/credentials`.
pub(super) async fn credentials(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    app.token.check(&headers)?;
    let now = SystemTime::now();
    let state = app.store.current();
    let unavailable = || HttpError::unavailable(&state, CredentialKind::Aws, now);
    let update = state
        .live(CredentialKind::Aws, now)
        .ok_or_else(unavailable)?;
    let (Some(Credential::Aws(aws)), Some(expiry)) = (&update.credential, update.expiry()) else {
        return Err(unavailable());
    };
    let body = ContainerCredentials {
        access_key_id: &aws.access_key_id,
        secret_access_key: &aws.secret_access_key,
        token: &aws.session_token,
        // At most `advertised::AWS_LIFETIME` ahead, so that a revocation
        // reaches processes that cached it; whole seconds, rounded down.
        expiration: humantime::format_rfc3339_seconds(advertised::expiry(
            expiry,
            now,
            advertised::AWS_LIFETIME,
        ))
        .to_string(),
        account_id: (!aws.account_id.is_empty()).then_some(aws.account_id.as_str()),
    };
    app.store.served().record(Served::Aws, update.version);
    let mut response = Json(body).into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
