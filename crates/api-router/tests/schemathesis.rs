//! Schemathesis against `docs/openapi.yaml` on a running router (both doors,
//! the admin API with and without the token, no credential at all): no
//! server error, and every answer's status, content type and body as the
//! document says.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::process::Command;

use test_support::*;

/// `schemathesis`, next to the test venv's interpreter.
fn schemathesis() -> std::path::PathBuf {
    python::python().with_file_name("schemathesis")
}

/// One schemathesis run over the operations `filter` selects, with `headers`
/// on every request.
fn run(router: &Router, label: &str, filter: &[&str], headers: &[String]) {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let examples = std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "30".into());
    let mut cmd = Command::new(schemathesis());
    cmd.args(["run", spec, "--url", &format!("http://{}", router.addr)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--phases", "coverage,fuzzing", "--max-examples", &examples, "--workers", "2"])
        .args(filter)
        .args(["--suppress-health-check", "all", "--request-timeout", "10", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its reports and cassettes stay out of the source tree.
        .current_dir(std::env::temp_dir())
        .env_remove("HYPOTHESIS_STORAGE_DIRECTORY");
    for h in headers {
        cmd.args(["-H", h]);
    }
    // A failed check is the router's; a "Runtime Error" inside schemathesis
    // or Hypothesis themselves (seen once: a recursion-depth mismatch while
    // Hypothesis described a lambda) is the tool's, and is run again once.
    for attempt in 1..=2 {
        let t0 = std::time::Instant::now();
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("schemathesis ({label}): {:.1} s", t0.elapsed().as_secs_f64());
        if out.status.success() {
            return;
        }
        let tool_error = !stdout.contains("FAILURES") && stdout.contains("Runtime Error");
        assert!(
            tool_error && attempt == 1,
            "schemathesis ({label}) found problems:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("schemathesis ({label}): an error inside the tool, not a failed check; running it again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let native = Mock::start("backend-1", &[]);
    let oa = Mock::start("openai-1", &[]);
    let claude = Mock::start("anthropic-1", &[]);
    let router = RouterBuilder::new(&[])
        .env("BACKEND_ENDPOINTS", &endpoints_of_every_kind(&native, &oa, &claude))
        // Schemathesis presents made-up admin tokens by the hundred; slowing
        // them down (tests/hostile.rs checks that) would only slow the run.
        .env("ADMIN_AUTH_FREE_FAILURES", "1000000")
        .start();
    let key = format!("X-API-Key: {KEY_A}");
    let admin = ["--include-path-regex", "^/v1/admin"];
    let doors = ["--exclude-path-regex", "^/v1/admin"];
    // The admin run last: it degrades backends (readiness then answers a
    // documented 503, which the server-error check cannot tell apart).
    run(&router, "no credential", &[], &[]);
    run(&router, "organization key", &doors, &[key, format!("Authorization: Bearer {KEY_A}")]);
    run(&router, "admin token", &admin, &[format!("Authorization: Bearer {ADMIN_TOKEN}")]);
    // The router is still whole: the admin run degraded backends and
    // rewrote policies and limits, so bring a backend back and ask it.
    assert_eq!(router.admin_get("/v1/admin/routing/backends").await.status, 200);
    let back =
        router.admin_post(&format!("/v1/admin/routing/backends/{}/healthy", native.id), serde_json::json!({})).await;
    assert_eq!(back.status, 200);
    assert!(router.metrics().await.contains("api_router_http_requests_total"));
}
