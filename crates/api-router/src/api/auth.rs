//! Credentials: organization API keys and the admin token.
//!
//! API keys are kept only as SHA-256 hashes. A presented key is hashed and
//! looked up by hash, and the stored hash is compared in constant time; since
//! the lookup is on a hash, its timing says nothing about the key. The admin
//! token is compared in constant time too. Neither is ever logged.

use std::sync::Arc;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::error::ApiError;
use crate::config_service::Snapshot;

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The organization behind the request's `X-API-Key`.
pub fn organization(snapshot: &Snapshot, headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).filter(|k| !k.is_empty());
    organization_for_key(snapshot, key)
}

/// The OpenAI door also takes the key as `Authorization: Bearer <key>`, as
/// OpenAI clients send it.
pub fn organization_bearer_or_header(snapshot: &Snapshot, headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
    let key =
        bearer(headers).or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok())).filter(|k| !k.is_empty());
    organization_for_key(snapshot, key)
}

fn organization_for_key(snapshot: &Snapshot, key: Option<&str>) -> Result<Arc<str>, ApiError> {
    let key = key.ok_or(ApiError::MissingApiKey)?;
    let hash = hash_key(key);
    match snapshot.organization_for_key_hash(&hash) {
        Some((stored, org)) if bool::from(stored.ct_eq(&hash)) => Ok(org.clone()),
        _ => Err(ApiError::InvalidApiKey),
    }
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Checks the admin token. `configured` is `None` when the admin API is off.
pub fn check_admin(configured: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = configured.ok_or(ApiError::AdminDisabled)?;
    match bearer(headers) {
        Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        _ => Err(ApiError::AdminUnauthorized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn admin_token_checks() {
        let token = "0123456789abcdef0123456789";
        assert!(check_admin(Some(token), &headers(&[("authorization", &format!("Bearer {token}"))])).is_ok());
        assert!(matches!(check_admin(Some(token), &headers(&[])), Err(ApiError::AdminUnauthorized)));
        assert!(matches!(
            check_admin(Some(token), &headers(&[("authorization", "Bearer wrong")])),
            Err(ApiError::AdminUnauthorized)
        ));
        assert!(matches!(check_admin(None, &headers(&[])), Err(ApiError::AdminDisabled)));
    }
}
