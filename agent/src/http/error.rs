//! The one mapping from the agent's HTTP failures to responses.
//!
//! Every error body is JSON `{"code": "...", "message": "..."}` with
//! `Content-Type: application/json` (google-auth raises on a response
//! without a content type, docs/facts.md, fact 7). Messages are built from fixed text,
//! credential kinds and expiry times only: never from a header, a path or a
//! credential's secret fields, so no error can echo a secret.

use std::time::SystemTime;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use credstream_proto::v1::CredentialKind;
use serde::Serialize;

use crate::store::{AgentState, NotReady};

/// Why a local request failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No `Authorization` header on a token-protected endpoint (401): the
    /// caller was not started with the agent's variables.
    #[error(
        "missing Authorization header: send the token from AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
    )]
    MissingToken,
    /// An `Authorization` header that is not the agent's token (403), for
    /// example one from an earlier run of the agent.
    #[error("the Authorization header is not this agent's token")]
    WrongToken,
    /// A metadata request without `Metadata-Flavor: Google` (403), as the
    /// real metadata server answers: it keeps plain browsers and naive
    /// request-forgery out.
    #[error("missing Metadata-Flavor:Google header")]
    MissingMetadataFlavor,
    /// A metadata request carrying `X-Forwarded-For` (403): it came through
    /// a proxy, which the real metadata server refuses too.
    #[error("requests with X-Forwarded-For are not accepted")]
    Forwarded,
    /// A request whose `Host` is not this machine's loopback (or, on the
    /// metadata paths, a metadata server name), or has no or several `Host`
    /// headers (403): it may come from a web page through DNS rebinding.
    /// SDKs send the host of the URL the agent handed out, `127.0.0.1:PORT`.
    #[error(
        "the Host header must name this machine's loopback (127.0.0.1, [::1] or localhost, with any port)"
    )]
    HostNotAllowed,
    /// A request carrying `Origin` (403): browsers add it to cross-origin
    /// requests, SDKs never send it, and web pages are not served.
    #[error("requests from web pages (with an Origin header) are not served")]
    CrossOrigin,
    /// No unexpired credential of this kind to serve (503). The message says
    /// whether none arrived yet, it expired, or the cluster does not publish
    /// the kind.
    #[error("{message}")]
    CredentialUnavailable {
        /// The kind asked for.
        kind: CredentialKind,
        /// What the agent holds instead.
        message: String,
    },
    /// The publisher declared a private environment that has not arrived
    /// (503).
    #[error("the private environment has not arrived yet")]
    PrivateEnvUnavailable,
    /// `/readyz` while the agent is not ready (503).
    #[error("not ready: {0}")]
    NotReady(#[from] NotReady),
    /// A metadata value this agent does not have (404), such as a project id
    /// the publisher did not send.
    #[error("{0}")]
    MetadataNotFound(&'static str),
    /// No such endpoint (404).
    #[error("no such endpoint")]
    NotFound,
    /// A method other than GET or HEAD (405).
    #[error("method not allowed: only GET is served")]
    MethodNotAllowed,
}

impl HttpError {
    /// The 503 for a kind with no live credential, explaining what is held.
    pub fn unavailable(state: &AgentState, kind: CredentialKind, now: SystemTime) -> Self {
        let name = kind.provider();
        let held = state.held(kind);
        let declared = state
            .info
            .as_ref()
            .map(|info| info.kinds().any(|k| k == kind));
        let message = match (held.and_then(|c| c.expiry()), declared) {
            (Some(expiry), _) if expiry <= now => format!(
                "the {name} credential expired at {}; waiting for the publisher to refresh it",
                humantime::format_rfc3339_seconds(expiry)
            ),
            (_, Some(false)) => {
                format!("this cluster's publisher does not publish {name} credentials")
            }
            (_, None) => format!(
                "no {name} credential yet: {}",
                state.readiness(now).err().unwrap_or(NotReady::NoPublisher)
            ),
            _ => format!("no {name} credential received yet; waiting for the publisher"),
        };
        Self::CredentialUnavailable { kind, message }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken => StatusCode::UNAUTHORIZED,
            Self::WrongToken
            | Self::MissingMetadataFlavor
            | Self::Forwarded
            | Self::HostNotAllowed
            | Self::CrossOrigin => StatusCode::FORBIDDEN,
            Self::CredentialUnavailable { .. }
            | Self::PrivateEnvUnavailable
            | Self::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MetadataNotFound(_) | Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    /// A stable machine-readable code for the JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing_token",
            Self::WrongToken => "wrong_token",
            Self::MissingMetadataFlavor => "missing_metadata_flavor",
            Self::Forwarded => "forwarded_request",
            Self::HostNotAllowed => "host_not_allowed",
            Self::CrossOrigin => "cross_origin_request",
            Self::CredentialUnavailable {
                kind: CredentialKind::Aws,
                ..
            } => "aws_credential_unavailable",
            Self::CredentialUnavailable {
                kind: CredentialKind::Gcp,
                ..
            } => "gcp_credential_unavailable",
            Self::CredentialUnavailable { .. } => "credential_unavailable",
            Self::PrivateEnvUnavailable => "private_env_unavailable",
            Self::NotReady(_) => "not_ready",
            Self::MetadataNotFound(_) => "metadata_not_found",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code();
        tracing::debug!(status = status.as_u16(), code, "local request refused");
        (
            status,
            Json(ErrorBody {
                code,
                message: self.to_string(),
            }),
        )
            .into_response()
    }
}
