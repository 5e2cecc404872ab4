//! `GET /readyz`: 200 only while the agent holds an unexpired credential of
//! every kind the publisher declared and the declared private env — the
//! same condition `exec` waits for — else 503 with the reason. Once the
//! subscription ended for good, the answer says so and until when.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{AppState, HttpError};

pub(super) async fn readyz(State(app): State<AppState>) -> Result<Json<Value>, HttpError> {
    let state = app.store.current();
    let now = SystemTime::now();
    state.readiness(now)?;
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
