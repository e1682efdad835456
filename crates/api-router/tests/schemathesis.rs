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

fn run(router: &Router, label: &str, headers: &[String]) {
    let spec = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml");
    let examples = std::env::var("SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "15".into());
    let mut cmd = Command::new(schemathesis());
    cmd.args(["run", spec, "--url", &format!("http://{}", router.addr)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing", "--max-examples", &examples, "--workers", "1"])
        .args(["--suppress-health-check", "all", "--request-timeout", "10", "--no-color"])
        .env("SCHEMATHESIS_HOOKS", "")
        .env_remove("HYPOTHESIS_STORAGE_DIRECTORY");
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis ({label}) found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_off_the_document() {
    let native = Mock::start("backend-1", &[]);
    let oa = Mock::start("openai-1", &[]);
    let claude = Mock::start("anthropic-1", &[]);
    let router = RouterBuilder::new(&[])
        .env(
            "BACKEND_ENDPOINTS",
            &format!("{},{},{}=anthropic+{}", native.endpoint(), oa.openai_endpoint(), claude.id, claude.url()),
        )
        .start();
    let key = format!("X-API-Key: {KEY_A}");
    run(&router, "organization key", &[key.clone(), format!("Authorization: Bearer {KEY_A}")]);
    run(&router, "admin token", &[key, format!("Authorization: Bearer {ADMIN_TOKEN}")]);
    run(&router, "no credential", &[]);
    // The router is still whole.
    assert_eq!(router.infer(KEY_A, serde_json::json!({"model": "gpt-4o"})).await.status, 200);
}
