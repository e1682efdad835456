//! The external budget service contract (docs/budget-service.md), against a
//! stub server implementing it: allowed, denied, and unreachable under both
//! failure modes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::{get, post};
use serde_json::{Value, json};
use test_support::*;

#[derive(Default)]
struct Stub {
    reserves: Mutex<Vec<Value>>,
    settles: Mutex<Vec<Value>>,
}

/// Starts the stub; org-b is always over budget.
async fn stub() -> (String, Arc<Stub>) {
    let state = Arc::new(Stub::default());
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/v1/budget/reserve",
            post(|State(s): State<Arc<Stub>>, Json(body): Json<Value>| async move {
                let denied = body["organization_id"] == "org-b";
                s.reserves.lock().unwrap().push(body);
                if denied {
                    Json(json!({"allowed": false, "code": "budget_exceeded", "limit": 5.0, "remaining": 0.0,
                                "reset_at": "2030-01-01T00:00:00Z"}))
                } else {
                    Json(json!({"allowed": true}))
                }
            }),
        )
        .route(
            "/v1/budget/settle",
            post(|State(s): State<Arc<Stub>>, Json(body): Json<Value>| async move {
                s.settles.lock().unwrap().push(body);
                Json(json!({"ok": true}))
            }),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state)
}

async fn router_with(url: &str, mode: &str, m1: &Mock) -> Router {
    let router = RouterBuilder::new(&[m1])
        .env("BUDGET_SERVICE_URL", url)
        .env("BUDGET_SERVICE_FAILURE_MODE", mode)
        .env("BUDGET_SERVICE_TIMEOUT_MS", "200")
        .start();
    for org in ["org-a", "org-b"] {
        let r = router
            .admin_put(
                &format!("/v1/admin/organizations/{org}/limits"),
                json!({"budget": {"amount": 5, "period": "daily"}}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    router
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_requests_reserve_then_settle() {
    let (url, stub) = stub().await;
    let m1 = Mock::start("backend-1", &[]);
    let router = router_with(&url, "closed", &m1).await;
    let r = router.infer(KEY_A, json!({"model": "m", "request_id": "svc-ok-1"})).await;
    assert_eq!(r.status, 200);
    let reserve = stub.reserves.lock().unwrap()[0].clone();
    assert_eq!(reserve["organization_id"], "org-a");
    assert_eq!(reserve["request_id"], "svc-ok-1");
    assert_eq!(reserve["model"], "m");
    assert!(eventually(Duration::from_secs(5), || async { !stub.settles.lock().unwrap().is_empty() }).await);
    let settle = stub.settles.lock().unwrap()[0].clone();
    assert_eq!(settle["request_id"], "svc-ok-1");
    assert_eq!(settle["released"], false);
    assert_eq!(settle["actual_tokens"], 21);
    assert_eq!(router.readiness().await["components"]["budget_service"], "healthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_requests_get_402_and_the_denial_is_cached() {
    let (url, stub) = stub().await;
    let m1 = Mock::start("backend-1", &[]);
    let router = router_with(&url, "closed", &m1).await;
    for _ in 0..3 {
        let r = router.infer(KEY_B, json!({"model": "m"})).await;
        r.assert_error(402, "budget_exceeded");
        assert_eq!(r.json()["error"]["remaining"], 0.0);
        assert_eq!(r.json()["error"]["reset_at"], "2030-01-01T00:00:00.000Z");
    }
    assert_eq!(stub.reserves.lock().unwrap().len(), 1, "denials are cached");
    assert_eq!(m1.requests().await, 0);
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_budget_denials_total", &[("organization_id", "org-b")]), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_service_with_open_mode_admits_and_counts() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let m1 = Mock::start("backend-1", &[]);
    let router = router_with(&url, "open", &m1).await;
    assert_eq!(router.infer(KEY_A, json!({"model": "m"})).await.status, 200);
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_budget_service_failures_total", &[("mode", "open")]), 1.0);
    assert!(router.proc.lines().iter().any(|l| l.contains("budget service unreachable")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_service_with_closed_mode_refuses() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let m1 = Mock::start("backend-1", &[]);
    let router = router_with(&url, "closed", &m1).await;
    router.infer(KEY_A, json!({"model": "m"})).await.assert_error(503, "budget_service_unavailable");
    assert_eq!(m1.requests().await, 0);
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_budget_service_failures_total", &[("mode", "closed")]), 1.0);
}
