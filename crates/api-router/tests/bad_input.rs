//! Bad input, one test each: the status, the JSON error, and that no state
//! changed (no backend was called, no decision recorded, no policy changed).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use hyper::Method;
use serde_json::{Value, json};
use test_support::*;

struct Fixture {
    m1: Mock,
    router: Router,
}

async fn fixture() -> Fixture {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    let r = router.admin_post("/v1/admin/routing/policies", policy("org-a", "gpt-4o", &[("backend-1", 1)], 3)).await;
    assert_eq!(r.status, 200);
    Fixture { m1, router }
}

impl Fixture {
    /// Nothing reached a backend and no routing decision was made.
    async fn assert_untouched(&self) {
        assert_eq!(self.m1.requests().await, 0, "a backend was called");
        assert!(self.router.decisions("").await.is_empty(), "a decision was recorded");
    }

    async fn post_inference(&self, headers: &[(&str, &str)], body: impl Into<bytes::Bytes>) -> Resp {
        send(Method::POST, &self.router.url("/v1/inference"), headers, body).await
    }

    async fn assert_policy_unchanged(&self) {
        let p = self.router.admin_get("/v1/admin/routing/policies/org-a/gpt-4o").await.json();
        assert_eq!(p, policy("org-a", "gpt-4o", &[("backend-1", 1)], 3));
    }
}

const BODY: &str = r#"{"request_id":"r-1","model":"gpt-4o","payload":"hi"}"#;

#[tokio::test]
async fn inference_without_api_key_is_401() {
    let f = fixture().await;
    f.post_inference(&[], BODY).await.assert_error(401, "unauthorized");
    f.assert_untouched().await;
}

#[tokio::test]
async fn inference_with_wrong_api_key_is_401() {
    let f = fixture().await;
    f.post_inference(&[("x-api-key", "not-a-key")], BODY).await.assert_error(401, "unauthorized");
    f.assert_untouched().await;
}

#[tokio::test]
async fn malformed_json_is_400() {
    let f = fixture().await;
    f.post_inference(&[("x-api-key", KEY_A)], r#"{"model": "gpt-4o", "#).await.assert_error(400, "invalid_json");
    f.assert_untouched().await;
}

#[tokio::test]
async fn missing_model_is_400() {
    let f = fixture().await;
    let r = f.post_inference(&[("x-api-key", KEY_A)], r#"{"request_id":"r-2","payload":"hi"}"#).await;
    r.assert_error(400, "invalid_request");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("model"));
    f.assert_untouched().await;
}

#[tokio::test]
async fn oversized_body_is_413() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).env("MAX_BODY_BYTES", "1024").start();
    let big = json!({"model": "gpt-4o", "payload": "x".repeat(2000)}).to_string();
    let r = send(Method::POST, &router.url("/v1/inference"), &[("x-api-key", KEY_A)], big).await;
    r.assert_error(413, "payload_too_large");
    assert_eq!(m1.requests().await, 0);
    assert!(router.decisions("").await.is_empty());
}

#[tokio::test]
async fn bad_request_id_is_400() {
    let f = fixture().await;
    for id in ["has spaces", "slash/es", &"x".repeat(129)] {
        let body = json!({"request_id": id, "model": "gpt-4o"}).to_string();
        let r = f.post_inference(&[("x-api-key", KEY_A)], body).await;
        r.assert_error(400, "invalid_request");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("request_id"));
    }
    f.assert_untouched().await;
}

#[tokio::test]
async fn unknown_model_without_default_route_is_404() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).env("DEFAULT_ROUTE", "false").start();
    router.infer(KEY_A, json!({"model": "nope"})).await.assert_error(404, "model_not_found");
    assert_eq!(m1.requests().await, 0);
}

#[tokio::test]
async fn admin_without_token_is_401() {
    let f = fixture().await;
    let r = send(Method::POST, &f.router.url("/v1/admin/routing/backends/backend-1/degrade"), &[], r#"{"reason":"x"}"#)
        .await;
    r.assert_error(401, "unauthorized");
    let r = send(Method::GET, &f.router.url("/v1/admin/routing/backends"), &[], "").await;
    r.assert_error(401, "unauthorized");
    assert_eq!(f.router.backend_status("backend-1").await, "healthy");
}

#[tokio::test]
async fn admin_with_wrong_token_is_401() {
    let f = fixture().await;
    let r = send(
        Method::POST,
        &f.router.url("/v1/admin/routing/policies"),
        &[("authorization", "Bearer wrong-token-wrong-token-wrong")],
        policy("org-a", "gpt-4o", &[("backend-1", 5)], 1).to_string(),
    )
    .await;
    r.assert_error(401, "unauthorized");
    f.assert_policy_unchanged().await;
}

#[tokio::test]
async fn admin_api_is_403_when_no_token_is_configured() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).without("ADMIN_TOKEN").start();
    let r =
        send(Method::GET, &router.url("/v1/admin/routing/backends"), &[("authorization", "Bearer anything")], "").await;
    r.assert_error(403, "admin_disabled");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("disabled"));
    assert!(router.proc.lines().iter().any(|l| log_message(l).is_some_and(|m| m.contains("admin API disabled"))));
}

async fn assert_policy_rejected(body: Value, needle: &str) {
    let f = fixture().await;
    let r = f.router.admin_post("/v1/admin/routing/policies", body).await;
    r.assert_error(400, "invalid_request");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains(needle), "{msg}");
    f.assert_policy_unchanged().await;
}

fn base_policy() -> Value {
    policy("org-a", "gpt-4o", &[("backend-1", 7)], 2)
}

#[tokio::test]
async fn policy_with_unknown_backend_is_400() {
    assert_policy_rejected(policy("org-a", "gpt-4o", &[("backend-1", 1), ("ghost", 1)], 3), "unknown backend").await;
}

#[tokio::test]
async fn policy_with_negative_weight_is_400() {
    let mut p = base_policy();
    p["backends"][0]["weight"] = json!(-5);
    assert_policy_rejected(p, "negative").await;
}

#[tokio::test]
async fn policy_with_all_weights_zero_is_400() {
    assert_policy_rejected(policy("org-a", "gpt-4o", &[("backend-1", 0)], 3), "weight above 0").await;
}

#[tokio::test]
async fn policy_with_missing_field_is_400() {
    for field in ["policy_id", "organization_id", "model", "backends", "failover_threshold"] {
        let mut p = base_policy();
        p.as_object_mut().unwrap().remove(field);
        let f = fixture().await;
        let r = f.router.admin_post("/v1/admin/routing/policies", p).await;
        r.assert_error(400, "invalid_request");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains(field));
        f.assert_policy_unchanged().await;
    }
}

#[tokio::test]
async fn policy_with_threshold_below_one_is_400() {
    let mut p = base_policy();
    p["failover_threshold"] = json!(0);
    assert_policy_rejected(p, "failover_threshold").await;
}

#[tokio::test]
async fn policy_that_is_not_json_is_400() {
    let f = fixture().await;
    let r = send(
        Method::POST,
        &f.router.url("/v1/admin/routing/policies"),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        "{nope",
    )
    .await;
    r.assert_error(400, "invalid_json");
    f.assert_policy_unchanged().await;
}

#[tokio::test]
async fn degrade_unknown_backend_is_404() {
    let f = fixture().await;
    let r = f.router.admin_post("/v1/admin/routing/backends/ghost/degrade", json!({"reason": "x"})).await;
    r.assert_error(404, "not_found");
    let r = f.router.admin_post("/v1/admin/routing/backends/ghost/healthy", json!({})).await;
    r.assert_error(404, "not_found");
    f.router.admin_get("/v1/admin/routing/backends/ghost/health").await.assert_error(404, "not_found");
    let listed = f.router.admin_get("/v1/admin/routing/backends").await.json();
    assert_eq!(listed["backends"].as_array().unwrap().len(), 1);
    assert_eq!(listed["backends"][0]["status"], "healthy");
}

#[tokio::test]
async fn decisions_with_bad_filter_is_400() {
    let f = fixture().await;
    f.router.admin_get("/v1/admin/routing/decisions?decision_type=SIDEWAYS").await.assert_error(400, "invalid_request");
    f.router.admin_get("/v1/admin/routing/decisions?limit=-1").await.assert_error(400, "invalid_request");
}

#[tokio::test]
async fn audit_lookup_by_another_organization_is_404() {
    let f = fixture().await;
    let r = f.router.infer(KEY_A, json!({"request_id": "org-a-req-1", "model": "gpt-4o"})).await;
    assert_eq!(r.status, 200);
    let url = f.router.url("/v1/audit/requests/org-a-req-1");
    // The owner sees it (once the batched writer has committed it).
    assert_eq!(wait_audit(&f.router, "org-a-req-1", &[("x-api-key", KEY_A)]).await["organization_id"], "org-a");
    // Another organization gets the same answer as for an unknown id.
    let other = send(Method::GET, &url, &[("x-api-key", KEY_B)], "").await;
    other.assert_error(404, "not_found");
    let unknown = send(Method::GET, &f.router.url("/v1/audit/requests/never-seen"), &[("x-api-key", KEY_A)], "").await;
    unknown.assert_error(404, "not_found");
    assert_eq!(other.json()["error"]["code"], unknown.json()["error"]["code"]);
    // No credential, or a bad one: 401.
    send(Method::GET, &url, &[], "").await.assert_error(401, "unauthorized");
    send(Method::GET, &url, &[("x-api-key", "bogus")], "").await.assert_error(401, "unauthorized");
    // The admin token sees any organization's record.
    let admin = send(Method::GET, &url, &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))], "").await;
    assert_eq!(admin.status, 200);
    assert_eq!(admin.json()["organization_id"], "org-a");
}

async fn assert_limits_rejected(body: Value, needle: &str) {
    let f = fixture().await;
    let before = f.router.admin_get("/v1/admin/organizations/org-a/limits").await.json();
    let r = f.router.admin_put("/v1/admin/organizations/org-a/limits", body).await;
    r.assert_error(400, "invalid_request");
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(msg.contains(needle), "{msg}");
    assert_eq!(f.router.admin_get("/v1/admin/organizations/org-a/limits").await.json(), before);
}

#[tokio::test]
async fn limits_with_negative_values_are_400() {
    assert_limits_rejected(json!({"budget": {"amount": -5, "period": "daily"}}), "budget.amount").await;
}

#[tokio::test]
async fn limits_with_zero_values_are_400() {
    assert_limits_rejected(json!({"rate_limit": {"requests_per_second": 0, "burst": 10}}), "greater than 0").await;
    assert_limits_rejected(json!({"quota": {"requests": 0, "period": "daily"}}), "quota.requests").await;
}

#[tokio::test]
async fn limits_with_unknown_period_are_400() {
    assert_limits_rejected(json!({"budget": {"amount": 5, "period": "fortnightly"}}), "fortnightly").await;
}

#[tokio::test]
async fn usage_of_unknown_organization_is_404() {
    let f = fixture().await;
    f.router.admin_get("/v1/admin/organizations/org-nobody/usage").await.assert_error(404, "not_found");
    assert_eq!(f.router.admin_get("/v1/admin/organizations/org-a/usage").await.status, 200);
}

#[tokio::test]
async fn limits_without_admin_token_are_401() {
    let f = fixture().await;
    let url = f.router.url("/v1/admin/organizations/org-a/limits");
    let body = json!({"budget": {"amount": 1, "period": "daily"}}).to_string();
    send(Method::PUT, &url, &[], body).await.assert_error(401, "unauthorized");
    send(Method::GET, &f.router.url("/v1/admin/organizations/org-a/usage"), &[], "")
        .await
        .assert_error(401, "unauthorized");
    assert!(f.router.admin_get("/v1/admin/organizations/org-a/limits").await.json()["budget"].is_null());
}
