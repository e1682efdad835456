//! Backends that misbehave at the byte level, behind the real router: the
//! client gets a failover to a good backend (or a clear 502/504 when there is
//! none), the router's memory stays bounded, and the broken backend's
//! failures are counted against it. (Streams that break or report an error
//! inside their 200 are in `openai.rs` and `providers.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use serde_json::json;
use test_support::*;

/// A router over the raw backend (primary) and a good mock (standby).
async fn router_over(raw: &RawBackend, good: &Mock) -> Router {
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &format!("{},{}", raw.endpoint(), good.endpoint()))
        .env("BACKEND_TIMEOUT_MS", "1000")
        .env("BACKEND_MAX_RESPONSE_BYTES", &(1 << 20).to_string())
        .env("HEALTH_CHECK_INTERVAL_MS", "60000")
        .start();
    let p = policy("org-a", "gpt-4o", &[(&raw.id, 1), (&good.id, 0)], 100);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", p).await.status, 200);
    router
}

/// The request fails over to the good backend, and the failure is counted
/// against the broken one with `error_type`.
async fn assert_fails_over(how: Misbehaviour, error_type: &str) -> Router {
    let raw = RawBackend::start("broken", how).await;
    let good = Mock::start("good", &[]);
    let router = router_over(&raw, &good).await;
    let r = router.infer(KEY_A, json!({"model": "gpt-4o", "request_id": "broken-1"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend-id").as_deref(), Some("good"));
    let text = router.metrics().await;
    let errors =
        metric(&text, "api_router_backend_errors_total", &[("backend_id", "broken"), ("error_type", error_type)]);
    assert_eq!(errors, 1.0, "api_router_backend_errors_total{{broken, {error_type}}}");
    let health = router.admin_get("/v1/admin/routing/backends/broken/health").await.json();
    assert_eq!(health["consecutive_failures"], 1, "{health}");
    let decisions = router.decisions("decision_type=FAILOVER").await;
    assert_eq!(decisions[0]["backend_id"], "good");
    router
}

/// With only the broken backend: a clear error in the native shape.
async fn assert_only_backend_gives(how: Misbehaviour, status: u16, code: &str) {
    let raw = RawBackend::start("broken", how).await;
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &raw.endpoint())
        .env("BACKEND_TIMEOUT_MS", "1000")
        .env("BACKEND_MAX_RESPONSE_BYTES", &(1 << 20).to_string())
        .env("HEALTH_CHECK_INTERVAL_MS", "60000")
        .start();
    router.infer(KEY_A, json!({"model": "gpt-4o"})).await.assert_error(status, code);
}

/// The router's resident memory, in MiB.
fn rss_mib(router: &Router) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", router.proc.pid())).unwrap();
    let kb: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    kb / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn headers_that_never_come_time_out_and_fail_over() {
    assert_fails_over(Misbehaviour::NoHeaders, "timeout").await;
    assert_only_backend_gives(Misbehaviour::NoHeaders, 504, "backend_timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_stalls_half_way_times_out_and_fails_over() {
    assert_fails_over(Misbehaviour::StallMidBody, "timeout").await;
    assert_only_backend_gives(Misbehaviour::StallMidBody, 504, "backend_timeout").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_400_mib_answer_is_refused_past_the_limit_with_memory_bounded() {
    let router = assert_fails_over(Misbehaviour::Huge { bytes: 400 << 20 }, "too_large").await;
    assert!(rss_mib(&router) < 150, "the router holds {} MiB", rss_mib(&router));
    assert_only_backend_gives(Misbehaviour::Huge { bytes: 400 << 20 }, 502, "backend_unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_endless_chunked_answer_to_a_plain_request_is_cut_at_the_limit() {
    let router = assert_fails_over(Misbehaviour::EndlessChunks, "too_large").await;
    assert!(rss_mib(&router) < 150, "the router holds {} MiB", rss_mib(&router));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_malformed_status_line_fails_over() {
    assert_fails_over(Misbehaviour::Raw(b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\n{}"), "io").await;
    assert_only_backend_gives(Misbehaviour::Raw(b"\x00\x01garbage\r\n\r\n"), 502, "backend_unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_headers_fail_over() {
    assert_fails_over(Misbehaviour::Raw(b"HTTP/1.1 200 OK\r\nbad header line\r\ncontent-length: 2\r\n\r\n{}"), "io")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_mid_body_fails_over() {
    assert_fails_over(Misbehaviour::ResetMidBody, "io").await;
    assert_only_backend_gives(Misbehaviour::ResetMidBody, 502, "backend_unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_is_a_failed_attempt_and_never_followed() {
    assert_fails_over(Misbehaviour::Redirect, "redirect").await;
    assert_only_backend_gives(Misbehaviour::Redirect, 502, "backend_unavailable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_informational_answer_before_the_real_one_is_skipped() {
    let raw = RawBackend::start("broken", Misbehaviour::InformationalFirst).await;
    let good = Mock::start("good", &[]);
    let router = router_over(&raw, &good).await;
    let r = router.infer(KEY_A, json!({"model": "gpt-4o"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-backend-id").as_deref(), Some("broken"));
    assert_eq!(r.text(), raw::OK_BODY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gzip_answer_is_passed_through_intact() {
    const GZ: &[u8] =
        b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03not really deflate, but bytes to carry as they are\x00\xff";
    let raw = RawBackend::start("broken", Misbehaviour::Gzip(GZ)).await;
    let good = Mock::start("good", &[]);
    let router = router_over(&raw, &good).await;
    let r = router.infer(KEY_A, json!({"model": "gpt-4o"})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding").as_deref(), Some("gzip"));
    assert_eq!(&r.body[..], GZ, "the body is the backend's, byte for byte");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_backend_is_ejected_after_its_threshold() {
    let raw = RawBackend::start("broken", Misbehaviour::ResetMidBody).await;
    let good = Mock::start("good", &[]);
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &format!("{},{}", raw.endpoint(), good.endpoint()))
        .env("HEALTH_CHECK_INTERVAL_MS", "60000")
        .start();
    let p = policy("org-a", "gpt-4o", &[("broken", 1), ("good", 0)], 3);
    assert_eq!(router.admin_post("/v1/admin/routing/policies", p).await.status, 200);
    for i in 0..10 {
        let r = router.infer(KEY_A, json!({"model": "gpt-4o", "request_id": format!("eject-{i}")})).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(router.backend_status("broken").await, "unhealthy");
    let text = router.metrics().await;
    assert_eq!(metric(&text, "api_router_backend_errors_total", &[("backend_id", "broken")]), 3.0, "ejected after 3");
    assert_eq!(good.requests().await, 10);
}
