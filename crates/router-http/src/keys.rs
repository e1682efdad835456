//! The key API (`/v1/admin/keys`, behind the admin token): create, list,
//! show, rotate and revoke managed API keys, and a key's spend. A key is in
//! an answer only when it is made (create, rotate); listings show its
//! non-secret prefix, never the key or its hash, and no log line has either.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use router_core::config_service::Snapshot;
use router_core::keys::{KeyRecord, NewKey, SHOWN_PREFIX_LEN};
use router_core::util::now_ms;
use serde_json::{Value, json};

use crate::SharedState;
use crate::admin::small_body;
use crate::error::ApiError;

/// A key's metadata, with its last use as this replica knows it.
fn view(snapshot: &Snapshot, record: &KeyRecord) -> Value {
    let last_used = snapshot.key(&record.key_id).and_then(|k| k.runtime.last_used_ms());
    record.view(last_used, now_ms())
}

fn unknown_key(id: &str) -> ApiError {
    ApiError::NotFound(format!("unknown key {id:?}"))
}

fn json_body(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidJson(e.to_string()))
}

/// `POST /v1/admin/keys` → 201 with the metadata and the `key`, shown only here.
pub async fn create(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let value = json_body(&small_body(&state, &headers, body).await?)?;
    let new = NewKey::from_json(value, now_ms()).map_err(|e| ApiError::InvalidRequest(format!("invalid key: {e}")))?;
    let budgets = state.core.limits.service().is_none();
    let (key, record) = state.core.writer.create_key(new, budgets).await?;
    tracing::info!(key_id = %record.key_id, organization_id = %record.organization_id, prefix = %record.prefix, "API key created");
    let mut body = view(&state.core.config.load(), &record);
    body["key"] = json!(key);
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// `GET /v1/admin/keys[?organization_id=...][&prefix=...]`: metadata only,
/// oldest first. `prefix` (a key's first characters) matches a key's current
/// prefix, or its previous one while it rotates, so a leaked key is found
/// without sending it.
pub async fn list(
    State(state): State<SharedState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (mut org, mut prefix) = (None, None);
    for (name, value) in &query {
        match name.as_str() {
            "organization_id" => org = Some(value.as_str()),
            "prefix" => prefix = Some(value.as_str()),
            other => return Err(ApiError::InvalidRequest(format!("unknown query parameter {other:?}"))),
        }
    }
    if prefix.is_some_and(|p| p.len() > SHOWN_PREFIX_LEN) {
        // A whole key in a URL would end up in shell histories and proxy logs.
        return Err(ApiError::InvalidRequest(format!(
            "`prefix`: give at most the key's first {SHOWN_PREFIX_LEN} characters, never the whole key"
        )));
    }
    let snapshot = state.core.config.load_full();
    if let Some(org) = org.filter(|o| !snapshot.knows_organization(o)) {
        return Err(ApiError::NotFound(format!("unknown organization {org:?}")));
    }
    let mut records: Vec<&KeyRecord> = snapshot
        .state
        .keys
        .values()
        .filter(|r| org.is_none_or(|o| r.organization_id == o))
        .filter(|r| {
            prefix.is_none_or(|p| {
                r.prefix.starts_with(p)
                    || r.previous.as_ref().is_some_and(|x| !x.prefix.is_empty() && x.prefix.starts_with(p))
            })
        })
        .collect();
    records.sort_by(|a, b| (a.created_at_ms, &a.key_id).cmp(&(b.created_at_ms, &b.key_id)));
    let keys: Vec<Value> = records.into_iter().map(|r| view(&snapshot, r)).collect();
    Ok(axum::Json(json!({ "keys": keys })).into_response())
}

/// `GET /v1/admin/keys/{key_id}`
pub async fn show(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let snapshot = state.core.config.load_full();
    let record = snapshot.state.keys.get(&id).ok_or_else(|| unknown_key(&id))?;
    Ok(axum::Json(view(&snapshot, record)).into_response())
}

/// `POST /v1/admin/keys/{key_id}/rotate` `{"grace_period_secs"}` → a new key
/// under the same id; the old one works until the grace period ends.
pub async fn rotate(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let value = json_body(&small_body(&state, &headers, body).await?)?;
    let Value::Object(obj) = value else {
        return Err(ApiError::InvalidRequest("the body must be a JSON object".into()));
    };
    if let Some(unknown) = obj.keys().find(|k| *k != "grace_period_secs") {
        return Err(ApiError::InvalidRequest(format!("unknown field `{unknown}`; expected grace_period_secs")));
    }
    let grace = match obj.get("grace_period_secs") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| {
            ApiError::InvalidRequest("`grace_period_secs` must be a whole number of seconds, 0 or more".into())
        })?,
    };
    let (key, record) = state.core.writer.rotate_key(&id, grace).await?;
    tracing::info!(key_id = %id, organization_id = %record.organization_id, prefix = %record.prefix, grace_period_secs = grace, "API key rotated");
    let mut body = view(&state.core.config.load(), &record);
    body["key"] = json!(key);
    Ok(axum::Json(body).into_response())
}

/// `DELETE /v1/admin/keys/{key_id}`: revoked at once, on every replica as
/// soon as its watch sees it.
pub async fn revoke(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let record = state.core.writer.revoke_key(&id).await?;
    tracing::warn!(key_id = %id, organization_id = %record.organization_id, prefix = %record.prefix, "API key revoked");
    Ok(axum::Json(view(&state.core.config.load(), &record)).into_response())
}

/// `GET /v1/admin/keys/{key_id}/usage`: spend and tokens in the current
/// period, as the organization usage endpoint gives them.
pub async fn usage(State(state): State<SharedState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let entry = state.core.config.load().key(&id).cloned().ok_or_else(|| unknown_key(&id))?;
    Ok(axum::Json(state.core.limits.key_usage(&entry).await?).into_response())
}
