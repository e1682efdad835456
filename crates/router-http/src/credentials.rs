//! Where each door finds a credential in the request: `X-API-Key`, or (the
//! OpenAI door, and the admin token) `Authorization: Bearer`. Checking it is
//! the core's (`router_core::auth`).

use axum::http::HeaderMap;

/// The `X-API-Key` header, if any.
pub fn api_key(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-api-key").and_then(|v| v.to_str().ok())
}

/// The bearer token of an `Authorization` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The key as OpenAI clients send it (`Authorization: Bearer`), or `X-API-Key`.
pub fn bearer_or_api_key(headers: &HeaderMap) -> Option<&str> {
    bearer(headers).or_else(|| api_key(headers)).filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_found_where_each_door_looks() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_or_api_key(&h), None);
        h.insert("x-api-key", "k1".parse().unwrap());
        assert_eq!((api_key(&h), bearer_or_api_key(&h)), (Some("k1"), Some("k1")));
        h.insert("authorization", "bearer  k2 ".parse().unwrap());
        assert_eq!(bearer_or_api_key(&h), Some("k2"), "bearer first, trimmed, any case");
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
