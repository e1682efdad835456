//! Credentials: organization API keys and the admin token.
//!
//! API keys are kept only as SHA-256 hashes. A presented key is hashed and
//! looked up by hash, and the stored hash is compared in constant time; since
//! the lookup is on a hash, its timing says nothing about the key. The admin
//! token is compared in constant time too. Neither is ever logged. Where the
//! credential comes from (which header) is the door's business.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config_service::Snapshot;
use crate::keys::KeyEntry;
use crate::util::now_ms;

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No API key on the request.
    MissingKey,
    /// An API key that matches no organization (or was revoked, or was
    /// rotated out at the end of its grace period).
    InvalidKey,
    /// A managed key past its expiry.
    KeyExpired,
}

/// Who a request is from: the organization, and the managed key when it
/// came with one (static keys from `API_KEYS` and the file have none).
#[derive(Debug, Clone)]
pub struct Principal {
    pub organization_id: Arc<str>,
    pub key: Option<Arc<KeyEntry>>,
}

impl Principal {
    /// An organization's static key (no managed key).
    pub fn organization(organization_id: impl Into<Arc<str>>) -> Principal {
        Principal { organization_id: organization_id.into(), key: None }
    }
}

/// Why an admin call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAuthError {
    /// The admin API is off because no admin token is configured.
    Disabled,
    /// Missing or wrong admin token.
    Unauthorized,
}

pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Who is behind a presented key: a static key, or a managed key that is
/// neither revoked, nor expired, nor a rotated-out key past its grace. A
/// managed key's use is noted (one atomic store).
pub fn authenticate(snapshot: &Snapshot, key: Option<&str>) -> Result<Principal, AuthError> {
    let key = key.filter(|k| !k.is_empty()).ok_or(AuthError::MissingKey)?;
    let hash = hash_key(key);
    if let Some((stored, org)) = snapshot.organization_for_key_hash(&hash)
        && bool::from(stored.ct_eq(&hash))
    {
        return Ok(Principal { organization_id: org.clone(), key: None });
    }
    let Some((stored, managed)) = snapshot.managed_key(&hash) else { return Err(AuthError::InvalidKey) };
    let entry = &managed.entry;
    if !bool::from(stored.ct_eq(&hash)) || entry.revoked {
        return Err(AuthError::InvalidKey);
    }
    let now = now_ms();
    if managed.until_ms.is_some_and(|u| u <= now) {
        return Err(AuthError::InvalidKey);
    }
    if entry.expires_at_ms.is_some_and(|e| e <= now) {
        return Err(AuthError::KeyExpired);
    }
    entry.runtime.touch();
    Ok(Principal { organization_id: entry.organization_id.clone(), key: Some(entry.clone()) })
}

/// The organization behind a presented key.
pub fn organization(snapshot: &Snapshot, key: Option<&str>) -> Result<Arc<str>, AuthError> {
    authenticate(snapshot, key).map(|p| p.organization_id)
}

/// Checks a presented admin token. `configured` is `None` when the admin
/// API is off.
pub fn check_admin(configured: Option<&str>, presented: Option<&str>) -> Result<(), AdminAuthError> {
    let expected = configured.ok_or(AdminAuthError::Disabled)?;
    match presented {
        Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
        _ => Err(AdminAuthError::Unauthorized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_checks() {
        let token = "0123456789abcdef0123456789";
        assert!(check_admin(Some(token), Some(token)).is_ok());
        assert_eq!(check_admin(Some(token), None), Err(AdminAuthError::Unauthorized));
        assert_eq!(check_admin(Some(token), Some("wrong")), Err(AdminAuthError::Unauthorized));
        assert_eq!(check_admin(None, None), Err(AdminAuthError::Disabled));
    }

    #[test]
    fn keys_resolve_to_their_organization_by_hash() {
        let mut state = crate::config_service::ConfigState::default();
        state.api_keys.insert(hash_key("k1"), "org-a".into());
        let store = crate::config_service::test_store(state);
        let snap = store.load();
        assert_eq!(&*organization(&snap, Some("k1")).unwrap(), "org-a");
        assert_eq!(organization(&snap, Some("k2")), Err(AuthError::InvalidKey));
        assert_eq!(organization(&snap, Some("")), Err(AuthError::MissingKey));
        assert_eq!(organization(&snap, None), Err(AuthError::MissingKey));
    }
}
