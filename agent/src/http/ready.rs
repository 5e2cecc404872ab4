//! `GET /readyz`: 200 only while the agent holds an unexpired credential of
//! every kind the publisher declared and the declared private env — the
//! same condition `exec` waits for — else 503 with the reason.

use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{AppState, HttpError};

pub(super) async fn readyz(State(app): State<AppState>) -> Result<Json<Value>, HttpError> {
    app.store.current().readiness(SystemTime::now())?;
    Ok(Json(json!({ "status": "ready" })))
}
