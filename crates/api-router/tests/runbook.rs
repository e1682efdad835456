//! The runbook's procedures, walked against real processes: "Backend
//! Degradation", "Routing Policy Update" and "Failover Recovery".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::time::Duration;

use serde_json::{Value, json};
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_degradation_excludes_and_restores_a_backend() {
    let m1 = Mock::start("backend-1", &[]);
    let m2 = Mock::start("backend-2", &[]);
    let router = RouterBuilder::new(&[&m1, &m2]).start();

    // Mark degraded: excluded immediately.
    let r = router
        .admin_post("/v1/admin/routing/backends/backend-1/degrade", json!({"reason": "High error rate detected"}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "degraded");
    let h = router.admin_get("/v1/admin/routing/backends/backend-1/health").await.json();
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["degraded_reason"], "High error rate detected");
    let listed = router.admin_get("/v1/admin/routing/backends").await.json();
    let b1 = listed["backends"].as_array().unwrap().iter().find(|b| b["backend_id"] == "backend-1").unwrap().clone();
    assert_eq!(b1["status"], "degraded");
    assert_eq!(b1["degraded_reason"], "High error rate detected");
    assert!(metric(&router.metrics().await, "router_backend_health_status", &[("backend_id", "backend-1")]) == 2.0);

    // Traffic routes to the healthy backend: 0 of the next 200 reach backend-1.
    let before = m1.requests().await;
    let (split, failures) = load(&router, KEY_A, "gpt-4o", 200, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(split.get("backend-2"), Some(&200));
    assert_eq!(m1.requests().await, before, "degraded backend received traffic");

    // Degraded stays excluded whatever the health checks say.
    assert!(
        eventually(Duration::from_secs(3), || async { m1.stats().await["health_checks"].as_u64().unwrap() >= 2 }).await
    );
    assert_eq!(router.backend_status("backend-1").await, "degraded");

    // Mark healthy: traffic restored.
    let r = router.admin_post("/v1/admin/routing/backends/backend-1/healthy", json!({})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "healthy");
    let (split, failures) = load(&router, KEY_A, "gpt-4o", 200, 4).await;
    assert!(failures.is_empty());
    assert!(split.get("backend-1").copied().unwrap_or(0) > 50, "{split:?}");
    assert!(m1.requests().await > before);
    assert!(metric(&router.metrics().await, "router_backend_health_status", &[("backend_id", "backend-1")]) == 1.0);
}

fn share(split: &std::collections::HashMap<String, usize>, id: &str, n: usize) -> f64 {
    split.get(id).copied().unwrap_or(0) as f64 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_update_changes_the_split_without_restart_and_rolls_back() {
    let m1 = Mock::start("backend-1", &[]);
    let m2 = Mock::start("backend-2", &[]);
    let router = RouterBuilder::new(&[&m1, &m2]).start();
    let pid = router.proc.pid();

    // 80/20 over 2,000 requests: within ±3 percentage points.
    let v1 = policy("org-a", "gpt-4o", &[("backend-1", 80), ("backend-2", 20)], 3);
    let r = router.admin_post("/v1/admin/routing/policies", v1.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = router.admin_get("/v1/admin/routing/policies/org-a/gpt-4o").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), v1);
    let (split, failures) = load(&router, KEY_A, "gpt-4o", 2000, 8).await;
    assert!(failures.is_empty());
    let s1 = share(&split, "backend-1", 2000);
    assert!((s1 - 0.80).abs() <= 0.03, "backend-1 got {s1}");

    // Routing decisions reflect the policy.
    let d = router.decisions("backend_id=backend-1&limit=50").await;
    assert_eq!(d.len(), 50);
    assert!(d.iter().all(|x| x["backend_id"] == "backend-1" && x["organization_id"] == "org-a"));

    // Update to 20/80: the split follows, same process.
    let v2 = policy("org-a", "gpt-4o", &[("backend-1", 20), ("backend-2", 80)], 3);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", v2.clone()).await.status, 200);
    assert_eq!(router.admin_get("/v1/admin/routing/policies/org-a/gpt-4o").await.json(), v2);
    let (split, failures) = load(&router, KEY_A, "gpt-4o", 1000, 8).await;
    assert!(failures.is_empty());
    let s1 = share(&split, "backend-1", 1000);
    assert!((s1 - 0.20).abs() <= 0.04, "backend-1 got {s1}");

    // Rollback: re-post the previous policy.
    assert_eq!(router.admin_post("/v1/admin/routing/policies", v1.clone()).await.status, 200);
    let (split, _) = load(&router, KEY_A, "gpt-4o", 1000, 8).await;
    let s1 = share(&split, "backend-1", 1000);
    assert!((s1 - 0.80).abs() <= 0.04, "backend-1 got {s1}");

    // Another organization's traffic is not governed by org-a's policy.
    let (split, _) = load(&router, KEY_B, "gpt-4o", 400, 4).await;
    let s1 = share(&split, "backend-1", 400);
    assert!((s1 - 0.5).abs() <= 0.1, "default route is equal weight, got {s1}");
    assert_eq!(router.proc.pid(), pid, "no restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_recovery_with_a_killed_backend() {
    let mut m1 = Mock::start("backend-1", &[]);
    let m2 = Mock::start("backend-2", &[]);
    // A long health interval, so that only the failover threshold ejects the
    // dead backend during the run; the recovery check then waits two intervals.
    let interval_ms = 2000;
    let router = RouterBuilder::new(&[&m1, &m2]).env("HEALTH_CHECK_INTERVAL_MS", &interval_ms.to_string()).start();
    let r = router
        .admin_post("/v1/admin/routing/policies", policy("org-a", "gpt-4o", &[("backend-1", 50), ("backend-2", 50)], 3))
        .await;
    assert_eq!(r.status, 200);
    // Kill backend-1 just after a health round, so that the failover
    // threshold (not the next probe, 2 s away) is what ejects it.
    let checks = m1.stats().await["health_checks"].as_u64().unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { m1.stats().await["health_checks"].as_u64().unwrap() > checks })
            .await
    );
    m1.kill();
    // One at a time, so the threshold is exact: 500 requests all succeed.
    let (split, failures) = load(&router, KEY_A, "gpt-4o", 500, 1).await;
    assert!(failures.is_empty(), "{:?}", failures.iter().map(|f| f.text()).collect::<Vec<_>>());
    assert_eq!(split.get("backend-2"), Some(&500));

    // Failovers are visible in decisions and metrics.
    let failovers = router.decisions("decision_type=FAILOVER&limit=1000").await;
    assert!(!failovers.is_empty());
    assert!(failovers.iter().all(|d| d["backend_id"] == "backend-2"));
    assert!(failovers[0]["reason"].as_str().unwrap().contains("backend-1"));
    let text = router.metrics().await;
    assert!(metric(&text, "router_failover_total", &[("backend_id", "backend-1")]) >= 1.0);
    // The runbook's review command, as written, still shows them after ~500
    // routine decisions.
    let runbook = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/runbook.md")).unwrap();
    let command = runbook.lines().find(|l| l.contains(r#"select(.decision_type == "FAILOVER")"#)).unwrap();
    let out = std::process::Command::new("bash")
        .args(["-c", &format!("set -eo pipefail; {command}")])
        .env("ROUTER", format!("http://{}", router.addr))
        .env("ADMIN", ADMIN_TOKEN)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(shown.matches(r#""decision_type": "FAILOVER""#).count(), failovers.len(), "{shown}");

    // After failover_threshold consecutive failures the dead backend gets no
    // more attempts.
    let attempts_b1 = router.decisions("backend_id=backend-1&limit=10000").await;
    let failed: Vec<_> = attempts_b1.iter().filter(|d| d["error"].is_string()).collect();
    assert_eq!(failed.len(), 3, "exactly failover_threshold attempts at the dead backend");
    assert_eq!(
        metric(&text, "api_router_backend_errors_total", &[("backend_id", "backend-1"), ("error_type", "connect")]),
        3.0
    );
    assert_eq!(router.backend_status("backend-1").await, "unhealthy");
    assert_eq!(metric(&text, "router_backend_health_status", &[("backend_id", "backend-1")]), 0.0);

    // Restarted, it is readmitted within two health intervals.
    m1.restart();
    assert!(
        eventually(Duration::from_millis(2 * interval_ms + 500), || async {
            router.backend_status("backend-1").await == "healthy"
        })
        .await,
        "not readmitted within two health intervals"
    );
    let (split, failures) = load(&router, KEY_A, "gpt-4o", 200, 2).await;
    assert!(failures.is_empty());
    assert!(split.get("backend-1").copied().unwrap_or(0) > 40, "{split:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_down_gives_a_json_502_or_503() {
    let mut m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).env("HEALTH_CHECK_INTERVAL_MS", "60000").start();
    // The start-up health round must have seen it up before it dies.
    router.wait_health_round().await;
    m1.kill();
    let r = router.infer(KEY_A, json!({"model": "m", "request_id": "all-down-1"})).await;
    r.assert_error(502, "backend_unavailable");
    assert_eq!(r.header("x-request-id").as_deref(), Some("all-down-1"));
    // Threshold 3 on the default route: after 3 failures, no backend is routable.
    for _ in 0..2 {
        router.infer(KEY_A, json!({"model": "m"})).await.assert_error(502, "backend_unavailable");
    }
    let r = router.infer(KEY_A, json!({"model": "m", "request_id": "all-down-4"})).await;
    r.assert_error(503, "no_healthy_backend");
    // The warning names the request it belongs to (the request span's fields).
    let line = router
        .proc
        .wait_for_line(Duration::from_secs(10), |l| log_message(l).as_deref() == Some("no healthy backend"))
        .expect("a \"no healthy backend\" warning");
    let span = &serde_json::from_str::<Value>(&line).unwrap()["span"];
    assert_eq!((span["request_id"].as_str(), span["organization_id"].as_str()), (Some("all-down-4"), Some("org-a")));
    let d = router.decisions("decision_type=NO_HEALTHY_BACKEND").await;
    assert_eq!(d.len(), 1);
    let ready = send(hyper::Method::GET, &router.url("/v1/status/readyz"), &[], "").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "degraded");
    assert_eq!(ready.json()["components"]["backend_registry"], "unhealthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_statuses_fail_over_and_other_4xx_pass_through() {
    let m1 = Mock::start("backend-1", &["--error-rate", "1", "--error-status", "503"]);
    let m2 = Mock::start("backend-2", &[]);
    let router = RouterBuilder::new(&[&m1, &m2]).env("HEALTH_CHECK_INTERVAL_MS", "60000").start();
    let r = router
        .admin_post("/v1/admin/routing/policies", policy("org-a", "m", &[("backend-1", 1), ("backend-2", 0)], 100))
        .await;
    assert_eq!(r.status, 200);
    // backend-1 answers 503: every request fails over to the standby.
    for status in [503u16, 429, 408] {
        m1.faults(json!({"error_status": status})).await;
        let r = router.infer(KEY_A, json!({"model": "m"})).await;
        assert_eq!(r.status, 200, "{status}: {}", r.text());
        assert_eq!(r.header("x-backend-id").as_deref(), Some("backend-2"));
    }
    // A 400 is the backend's answer: passed back as-is, no failover.
    m1.faults(json!({"error_status": 400})).await;
    let before = m2.requests().await;
    let r = router.infer(KEY_A, json!({"model": "m"})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "injected_fault");
    assert_eq!(r.header("x-backend-id").as_deref(), Some("backend-1"));
    assert_eq!(m2.requests().await, before);
}
