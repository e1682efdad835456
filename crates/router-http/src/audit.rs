//! `GET /v1/audit/requests/{requestId}`: the request's audit record, for the
//! admin token or the API key of the request's own organization. Any other
//! organization gets the same 404 as an unknown id, so ids cannot be probed.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use router_core::audit::AuditError;
use router_core::auth;
use router_core::request::valid_request_id;

use crate::SharedState;
use crate::credentials::{api_key, bearer};
use crate::error::ApiError;

pub async fn lookup(
    State(state): State<SharedState>,
    Path(request_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let admin_token = bearer(&headers);
    let is_admin =
        admin_token.is_some() && auth::check_admin(state.settings.admin_token.as_deref(), admin_token).is_ok();
    let org = if is_admin {
        None
    } else if headers.contains_key("x-api-key") {
        Some(auth::organization(&state.core.config.load(), api_key(&headers))?)
    } else if admin_token.is_some() {
        return Err(ApiError::AdminUnauthorized);
    } else {
        return Err(ApiError::MissingApiKey);
    };
    let not_found = || ApiError::NotFound(format!("no audit record for request {request_id:?}"));
    if !valid_request_id(&request_id) {
        return Err(not_found());
    }
    let record = state
        .core
        .audit
        .get(&request_id, org.as_deref())
        .await
        .map_err(|e| match e {
            AuditError::Unavailable(why) => ApiError::AuditStoreUnavailable(why),
            AuditError::Storage(why) => ApiError::Internal(why),
        })?
        .ok_or_else(not_found)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], record).into_response())
}
