//! Start-up, shutdown and restart of the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::process::Command;
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::json;
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_logs_status_endpoints_and_metrics() {
    let m1 = Mock::start("backend-1", &[]);
    let router = RouterBuilder::new(&[&m1]).start();
    for msg in ["starting API router service", "backend registry initialized", "HTTP server starting"] {
        assert!(router.proc.lines().iter().any(|l| log_message(l).as_deref() == Some(msg)), "missing log line {msg:?}");
    }
    let h = send(Method::GET, &router.url("/v1/status/healthz"), &[], "").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "healthy");
    assert!(h.json()["timestamp"].as_str().unwrap().ends_with('Z'));

    let r = send(Method::GET, &router.url("/v1/status/readyz"), &[], "").await;
    assert_eq!(r.status, 200);
    let j = r.json();
    assert_eq!(j["status"], "ready");
    assert_eq!(
        j["components"],
        json!({"redis": "not_configured", "kafka": "not_configured", "config_service": "not_configured", "backend_registry": "healthy", "audit_store": "healthy"})
    );
    assert_eq!(j["build"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(j["build"]["commit"].is_string() && j["build"]["build_time"].is_string());

    // The runbook's own smoke request.
    let r = router.infer(KEY_A, json!({"request_id": "test-123", "model": "gpt-4o", "payload": "test"})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id").as_deref(), Some("test-123"));
    assert_eq!(r.header("x-backend-id").as_deref(), Some("backend-1"));
    assert_eq!(r.json()["request_id"], "test-123");
    // A missing request_id is generated.
    let r = router.infer(KEY_A, json!({"model": "gpt-4o"})).await;
    assert_eq!(r.header("x-request-id").unwrap().len(), 36);

    let text = router.metrics().await;
    for name in [
        "api_router_backend_requests_total",
        "api_router_backend_errors_total",
        "api_router_backend_request_duration_seconds_bucket",
        "router_failover_total",
        "router_backend_health_status",
        "api_router_http_requests_total",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(name), "metric {name} missing");
    }
    assert_eq!(
        metric(&text, "api_router_backend_requests_total", &[("backend_id", "backend-1"), ("status_class", "2xx")]),
        2.0
    );
    assert_eq!(metric(&text, "api_router_http_requests_total", &[("route", "/v1/inference"), ("status", "200")]), 2.0);
    // A door's path with another method is the router's 405, and a path
    // near a door's is not the door: both counted like any other answer.
    let get = send(Method::GET, &router.url("/v1/inference"), &[("x-api-key", KEY_A)], "").await;
    assert_eq!(get.status, 405);
    let near = send(Method::POST, &router.url("/v1/inference/"), &[("x-api-key", KEY_A)], "{}").await;
    assert_eq!(near.status, 404);
    assert_eq!(near.json()["error"]["code"], "not_found", "{:?}", near.body);
    // The door's own refusal: counted under its route with its status.
    let denied = router.infer("not-a-key", json!({"model": "gpt-4o"})).await;
    assert_eq!(denied.status, 401);
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_http_requests_total", &[("route", "/v1/inference"), ("status", "401")]), 1.0);
    assert_eq!(
        metric(&text, "api_router_http_request_duration_seconds_count", &[("route", "/v1/inference")]),
        4.0,
        "two answered, one refused by the door, one 405"
    );
    assert_eq!(metric(&text, "api_router_http_requests_total", &[("route", "/v1/inference"), ("status", "405")]), 1.0);
    assert_eq!(metric(&text, "api_router_http_requests_total", &[("route", "unmatched"), ("status", "404")]), 1.0);
    assert_eq!(metric(&text, "api_router_http_requests_total", &[("route", "/v1/inference"), ("status", "200")]), 2.0);
    // No secrets in logs.
    let logs = router.proc.lines().join("\n");
    assert!(!logs.contains(KEY_A) && !logs.contains(ADMIN_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_without_backends() {
    let router = RouterBuilder::new(&[]).start();
    let r = send(Method::GET, &router.url("/v1/status/readyz"), &[], "").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "degraded");
    assert_eq!(r.json()["components"]["backend_registry"], "unhealthy");
    // The probe form: only the named components decide the code.
    let only = send(Method::GET, &router.url("/v1/status/readyz?only=redis,kafka"), &[], "").await;
    assert_eq!(only.status, 200);
    assert_eq!(only.json()["components"]["backend_registry"], "unhealthy", "the body still shows every component");
    let only = send(Method::GET, &router.url("/v1/status/readyz?only=backend_registry"), &[], "").await;
    assert_eq!(only.status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_50_requests_in_flight_finishes_them_all() {
    let m1 = Mock::start("backend-1", &["--latency-ms", "2000"]);
    let mut router = RouterBuilder::new(&[&m1]).start();
    let url = router.url("/v1/inference");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"request_id": format!("inflight-{i}"), "model": "m"}).to_string();
            send(Method::POST, &url, &[("x-api-key", KEY_A)], body).await.status
        }));
    }
    // All 50 are at the backend before the signal.
    assert!(eventually(Duration::from_secs(10), || async { m1.requests().await == 50 }).await);
    let signalled = Instant::now();
    router.proc.signal("TERM");
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let status = router.proc.wait_exit(Duration::from_secs(10)).expect("did not exit within 10 s");
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
    let lines = router.proc.lines();
    let msgs: Vec<String> = lines.iter().filter_map(|l| log_message(l)).collect();
    let down = msgs.iter().position(|m| m == "shutting down gracefully").expect("no shutdown line");
    let stopped = msgs.iter().position(|m| m == "API router service stopped").expect("no stopped line");
    assert!(down < stopped);
    assert!(!lines.iter().any(|l| l.contains("\"level\":\"ERROR\"")), "errors during shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_record_is_readable_after_a_restart() {
    let m1 = Mock::start("backend-1", &[]);
    let mut router = RouterBuilder::new(&[&m1]).start();
    let r = router.infer(KEY_A, json!({"request_id": "kept-1", "model": "gpt-4o"})).await;
    assert_eq!(r.status, 200);
    router.restart();
    let (status, record) = get_json(&router.url("/v1/audit/requests/kept-1"), &[("x-api-key", KEY_A)]).await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["request_id"], "kept-1");
    assert_eq!(record["organization_id"], "org-a");
    assert_eq!(record["model"], "gpt-4o");
    assert_eq!(record["status"], 200);
    assert_eq!(record["backend_id"], "backend-1");
    assert!(record["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(record["started_at"].is_string() && record["finished_at"].is_string());
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["decision_type"], "PRIMARY");
    assert_eq!(attempts[0]["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_record_lists_every_attempt_of_a_failover() {
    let mut m1 = Mock::start("backend-1", &[]);
    let m2 = Mock::start("backend-2", &[]);
    let router = RouterBuilder::new(&[&m1, &m2]).env("HEALTH_CHECK_INTERVAL_MS", "60000").start();
    router
        .admin_post("/v1/admin/routing/policies", policy("org-a", "m", &[("backend-1", 1), ("backend-2", 0)], 10))
        .await;
    // The start-up health round must have seen it up before it dies.
    router.wait_health_round().await;
    m1.kill();
    let r = router.infer(KEY_A, json!({"request_id": "fo-1", "model": "m"})).await;
    assert_eq!(r.status, 200);
    let record = wait_audit(&router, "fo-1", &[("x-api-key", KEY_A)]).await;
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["backend_id"], "backend-1");
    assert_eq!(attempts[0]["decision_type"], "PRIMARY");
    assert!(attempts[0]["error"].as_str().unwrap().contains("connect"));
    assert_eq!(attempts[1]["backend_id"], "backend-2");
    assert_eq!(attempts[1]["decision_type"], "FAILOVER");
    assert_eq!(record["backend_id"], "backend-2");
}

fn run_router_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_api-router")).env_clear().envs(env.iter().copied()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_bad_setting_exits_non_zero_with_one_line() {
    let (code, stderr) = run_router_with(&[("HEALTH_CHECK_INTERVAL_MS", "often")]);
    assert_eq!(code, Some(2));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("HEALTH_CHECK_INTERVAL_MS") && stderr.contains("often") && stderr.contains("expected"));

    // A distinctive short token: in no form (whole, a part, escaped) may it
    // be echoed.
    let token = "Zq7-wEAk-tOk3n";
    let (code, stderr) = run_router_with(&[("ADMIN_TOKEN", token)]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("ADMIN_TOKEN") && stderr.contains("ALLOW_WEAK_ADMIN_TOKEN"));
    for form in [token, "Zq7", "wEAk", "tOk3n", &token.to_lowercase(), &token.to_uppercase()] {
        assert!(!stderr.contains(form), "the token ({form}) is echoed: {stderr}");
    }
}

#[test]
fn make_run_script_prints_a_curl_for_each_door_that_returns_200() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tmp = tempfile::tempdir().unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (p, m1, m2) = (free(), free(), free());
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/run-dev.sh"))
        .current_dir(&root)
        .env("ROUTER_BIN", env!("CARGO_BIN_EXE_api-router"))
        .env("MOCK_BIN", env!("CARGO_BIN_EXE_mock-backend"))
        .env("HTTP_PORT", p.to_string())
        .env("MOCK_PORTS", format!("{m1},{m2}"))
        .env("DEV_DIR", tmp.path());
    let mut proc = Proc::spawn(cmd);
    proc.wait_for_line(Duration::from_secs(30), |l| l.starts_with("Press Ctrl-C"))
        .unwrap_or_else(|| panic!("no banner printed:\n{}", proc.lines().join("\n")));
    assert!(proc.lines().iter().any(|l| l.contains("API key:")));
    assert!(proc.lines().iter().any(|l| l.contains("Admin token:")));
    // Each printed curl may continue over several lines; take whole commands.
    let lines = proc.lines();
    let mut commands = Vec::new();
    let mut current: Option<String> = None;
    for l in &lines {
        let l = l.trim_end();
        match &mut current {
            None if l.starts_with("curl ") && l.contains("/v1/") && !l.contains("admin") => {
                current = Some(String::new());
            }
            None => continue,
            Some(_) => {}
        }
        let c = current.as_mut().unwrap();
        c.push_str(l.trim_end_matches('\\'));
        c.push(' ');
        if !l.ends_with('\\') {
            commands.push(current.take().unwrap());
        }
    }
    let doors: Vec<&str> = ["/v1/inference", "/v1/chat/completions", "/v1/messages", "/v1/responses"]
        .into_iter()
        .filter(|door| commands.iter().any(|c| c.contains(door)))
        .collect();
    assert_eq!(doors.len(), 4, "a curl for each door: {commands:#?}");
    for command in &commands {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("{command} -s -o /dev/null -w '%{{http_code}}'"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{command}");
    }
    proc.signal("TERM");
    assert!(proc.wait_exit(Duration::from_secs(15)).is_some());
}
