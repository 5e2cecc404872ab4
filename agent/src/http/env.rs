//! `GET /env`: the private environment as a JSON object of name → value,
//! for processes the agent did not start (`requests.get(...).json()` and
//! `os.environ.update`). Token-protected like the AWS endpoint.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header::CACHE_CONTROL};
use axum::response::{IntoResponse, Response};

use super::{AppState, HttpError};
use crate::served::Served;
use crate::store::NotReady;

/// 200 with the variables (an empty object when the publisher declared no
/// private env); 503 while a declared env has not arrived or before the
/// agent knows what was declared.
pub(super) async fn private_env(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    app.token.check(&headers)?;
    let state = app.store.current();
    if state.env.is_none() {
        match &state.info {
            Some(info) if !info.private_env => {}
            Some(_) => return Err(HttpError::PrivateEnvUnavailable),
            None => {
                let reason = app
                    .store
                    .readiness(&state, SystemTime::now())
                    .err()
                    .unwrap_or(NotReady::NoPublisher);
                return Err(HttpError::NotReady(reason));
            }
        }
    }
    let vars: BTreeMap<&str, &str> = state.env_vars().collect();
    if let Some(env) = &state.env {
        app.store.served().record(Served::Env, env.version);
    }
    let mut response = Json(vars).into_response();
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
