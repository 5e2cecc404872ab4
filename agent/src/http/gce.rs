//! An emulation of the GCE metadata server's credential paths, so that
//! unmodified google-auth, the Go and Java libraries and gcsfs find the
//! published token through `GCE_METADATA_HOST`/`GCE_METADATA_IP` (docs/facts.md, facts 6–9).
//!
//! Served: the ping `GET /`, and under `/computeMetadata/v1/`:
//! `project/project-id`, `universe/universe-domain`,
//! `instance/service-accounts/` and, for `default` or the principal's email,
//! the account directory (`?recursive=true` gives JSON `email`, `scopes`,
//! `aliases`), `email`, `scopes`, `aliases` and `token` (`?scopes=` is
//! accepted and ignored: the token is whatever the publisher minted).
//!
//! Like the real server, every request must carry `Metadata-Flavor: Google`
//! and none may carry `X-Forwarded-For` (403), and every response — errors
//! included — carries `Metadata-Flavor: Google` and a `Content-Type`
//! (google-auth treats a response without one as an uncaught error). Plain
//! values use `application/text`, as the real server does; google-auth
//! parses only `application/json` as JSON.

use std::time::SystemTime;

use axum::Json;
use axum::extract::{RawQuery, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use credstream_proto::v1::{CredentialKind, GcpCredential, credential_update::Credential};
use serde_json::json;

use super::{AppState, HttpError, advertised};
use crate::served::Served;

/// The path prefix of the v1 metadata API.
pub const METADATA_PREFIX: &str = "/computeMetadata/v1/";

const FLAVOR: &str = "metadata-flavor";

/// Checks the request headers and stamps `Metadata-Flavor: Google` on the
/// response, for every route of the emulation.
pub(super) async fn guard(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let refused = if headers.contains_key("x-forwarded-for") {
        Some(HttpError::Forwarded)
    } else if headers.get(FLAVOR).map(HeaderValue::as_bytes) != Some(b"Google") {
        Some(HttpError::MissingMetadataFlavor)
    } else {
        None
    };
    let mut response = match refused {
        Some(error) => error.into_response(),
        None => next.run(request).await,
    };
    response
        .headers_mut()
        .insert(FLAVOR, HeaderValue::from_static("Google"));
    response
}

/// `GET /`: the ping google-auth uses to decide it runs on GCE.
pub(super) async fn ping() -> Response {
    text("computeMetadata/\n".to_owned())
}

/// Everything under `/computeMetadata/`.
pub(super) async fn metadata(
    State(app): State<AppState>,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let Some(path) = uri.path().strip_prefix(METADATA_PREFIX) else {
        return Err(HttpError::MetadataNotFound(
            "only /computeMetadata/v1/ is emulated",
        ));
    };
    let recursive = query_flag(query.as_deref(), "recursive");
    let segments: Vec<&str> = path.split('/').collect();
    match segments.as_slice() {
        [""] => Ok(text("instance/\nproject/\nuniverse/\n".to_owned())),
        ["project", "project-id"] => {
            let gcp = held_gcp(&app)?;
            if gcp.project_id.is_empty() {
                return Err(HttpError::MetadataNotFound(
                    "the publisher did not send a project id",
                ));
            }
            Ok(text(gcp.project_id.clone()))
        }
        ["universe", "universe-domain"] => Ok(text("googleapis.com".to_owned())),
        ["instance", "service-accounts"] | ["instance", "service-accounts", ""] => {
            let gcp = held_gcp(&app)?;
            Ok(text(format!("default/\n{}/\n", email(&gcp))))
        }
        ["instance", "service-accounts", account, rest @ ..] => {
            let gcp = held_gcp(&app)?;
            if *account != "default" && *account != email(&gcp) {
                return Err(HttpError::MetadataNotFound(
                    "no such service account on this agent",
                ));
            }
            match rest {
                [] | [""] if recursive => Ok(Json(json!({
                    "aliases": ["default"],
                    "email": email(&gcp),
                    "scopes": gcp.scopes,
                }))
                .into_response()),
                [] | [""] => Ok(text("aliases\nemail\nscopes\ntoken\n".to_owned())),
                ["aliases"] => Ok(text("default\n".to_owned())),
                ["email"] => Ok(text(email(&gcp))),
                ["scopes"] => Ok(text(gcp.scopes.iter().map(|s| format!("{s}\n")).collect())),
                ["token"] => token(&app),
                _ => Err(HttpError::MetadataNotFound(
                    "this metadata path is not emulated",
                )),
            }
        }
        _ => Err(HttpError::MetadataNotFound(
            "this metadata path is not emulated",
        )),
    }
}

/// The token with its remaining lifetime in whole seconds, at most
/// [`advertised::GCP_LIFETIME`] so that a revoked token stops being used
/// within a known bound. A token with less than a second left is treated as
/// expired: `expires_in: 0` would make the library refresh on every call.
fn token(app: &AppState) -> Result<Response, HttpError> {
    let now = SystemTime::now();
    let state = app.store.current();
    let unavailable = || HttpError::unavailable(&state, CredentialKind::Gcp, now);
    let update = state
        .live(CredentialKind::Gcp, now)
        .ok_or_else(unavailable)?;
    let (Some(Credential::Gcp(gcp)), Some(expiry)) = (&update.credential, update.expiry()) else {
        return Err(unavailable());
    };
    let expires_in = advertised::expiry(expiry, now, advertised::GCP_LIFETIME)
        .duration_since(now)
        .map_or(0, |left| left.as_secs());
    if expires_in == 0 {
        return Err(unavailable());
    }
    let token_type = if gcp.token_type.is_empty() {
        "Bearer"
    } else {
        gcp.token_type.as_str()
    };
    app.store.served().record(Served::Gcp, update.version);
    let mut response = Json(json!({
        "access_token": gcp.access_token.as_str(),
        "expires_in": expires_in,
        "token_type": token_type,
    }))
    .into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The held GCP credential's non-secret metadata (email, scopes, project):
/// served even after the token expired, since none of it expires. 503 when
/// no GCP credential was ever received.
fn held_gcp(app: &AppState) -> Result<Metadata, HttpError> {
    let state = app.store.current();
    match state
        .held(CredentialKind::Gcp)
        .and_then(|c| c.credential.as_ref())
    {
        Some(Credential::Gcp(gcp)) => Ok(Metadata::from(gcp)),
        _ => Err(HttpError::unavailable(
            &state,
            CredentialKind::Gcp,
            SystemTime::now(),
        )),
    }
}

/// The non-secret part of a [`GcpCredential`].
struct Metadata {
    email: String,
    scopes: Vec<String>,
    project_id: String,
}

impl From<&GcpCredential> for Metadata {
    fn from(gcp: &GcpCredential) -> Self {
        Self {
            email: gcp.principal_email.clone(),
            scopes: gcp.scopes.clone(),
            project_id: gcp.project_id.clone(),
        }
    }
}

/// The principal's email, or `default` when the publisher sent none:
/// google-auth requires an `email` and uses it in later paths, which then
/// match the `default` alias.
fn email(gcp: &Metadata) -> String {
    if gcp.email.is_empty() {
        "default".to_owned()
    } else {
        gcp.email.clone()
    }
}

fn text(body: String) -> Response {
    ([(CONTENT_TYPE, "application/text")], body).into_response()
}

fn query_flag(query: Option<&str>, name: &str) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(key, value)| key == name && value.eq_ignore_ascii_case("true"))
}
