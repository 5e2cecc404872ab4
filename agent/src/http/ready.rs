//! `GET /readyz`: 200 only while the agent holds an unexpired credential of
//! every kind the publisher declared and the declared private env — the
//! same condition `exec` waits for — else 503 with the reason, which names
//! the updates the agent refused and why, if it refused any (the usual
//! cause: sealed updates and no `--seal-key-file`). Once the subscription
//! ended for good, the answer says so and until when.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{AppState, HttpError};

pub(super) async fn readyz(State(app): State<AppState>) -> Result<Json<Value>, HttpError> {
    let state = app.store.current();
    let now = SystemTime::now();
    app.store.readiness(&state, now)?;
    Ok(Json(
        match (&state.subscription_ended, state.last_expiry(now)) {
            (Some(reason), Some(until)) => json!({
                "status": "ready",
                "warning": format!(
                    "the subscription to the broker ended for good ({reason}): serving what is held until it expires at {}",
                    humantime::format_rfc3339_seconds(until)
                ),
            }),
            _ => json!({ "status": "ready" }),
        },
    ))
}

#[cfg(test)]
mod tests {
    use credstream_proto::v1::credential_update::Credential;
    use credstream_proto::v1::{
        AwsCredential, ClusterInfo, ClusterSnapshot, CredentialKind, CredentialUpdate,
        SealedPayload, subscribe_response::Message,
    };

    use super::*;
    use crate::http::token::AuthToken;
    use crate::store::CredentialStore;

    /// Issue 32: `/readyz` names the sealed updates an agent without a key
    /// refused, and the flag that fixes it.
    #[tokio::test]
    async fn readyz_names_the_refused_updates_and_the_fix() {
        let store = CredentialStore::new();
        store.apply(Message::Snapshot(ClusterSnapshot {
            info: Some(ClusterInfo {
                kinds: vec![CredentialKind::Aws as i32],
                private_env: false,
                publisher_connected: true,
                version: 1,
            }),
            ..Default::default()
        }));
        for version in 2..=4 {
            store.apply(Message::Credential(CredentialUpdate {
                credential: Some(Credential::Aws(AwsCredential::default())),
                sealed: Some(SealedPayload::default()),
                version,
                ..Default::default()
            }));
        }
        let app = AppState {
            store,
            token: AuthToken::generate(),
        };
        let error = readyz(State(app)).await.unwrap_err();
        assert_eq!(error.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        let message = error.to_string();
        assert!(
            message.starts_with(
                "not ready: no aws credential received yet: refused 3 updates from the broker (last: aws version 4: it is sealed and this agent has no seal key: start it with --seal-key-file F"
            ),
            "{message}"
        );
    }
}
