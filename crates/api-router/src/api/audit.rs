//! `GET /v1/audit/requests/{requestId}`: the request's audit record, for the
//! admin token or the API key of the request's own organization. Any other
//! organization gets the same 404 as an unknown id, so ids cannot be probed.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};

use crate::api::SharedState;
use crate::api::auth;
use crate::api::error::ApiError;

pub async fn lookup(
    State(state): State<SharedState>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let is_admin =
        auth::bearer(&headers).is_some() && auth::check_admin(state.settings.admin_token.as_deref(), &headers).is_ok();
    let org = if is_admin {
        None
    } else if headers.contains_key("x-api-key") {
        Some(auth::organization(&state.config.load(), &headers)?)
    } else if auth::bearer(&headers).is_some() {
        return Err(ApiError::AdminUnauthorized);
    } else {
        return Err(ApiError::MissingApiKey);
    };
    let not_found = || ApiError::NotFound(format!("no audit record for request {request_id:?}"));
    if !crate::pipeline::valid_request_id(&request_id) {
        return Err(not_found());
    }
    let record = state
        .audit
        .get(&request_id, org.as_deref())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(not_found)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], record).into_response())
}
