//! The official Python SDKs (`openai`, `anthropic`) driving a router: a
//! scenario script in `crates/api-router/tests/python`, run with the test
//! venv's interpreter (`make test` creates `.venv-test`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::router::Router;

/// The interpreter: `OPENAI_TEST_PYTHON`, else the workspace's `.venv-test`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("OPENAI_TEST_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv-test/bin/python");
    assert!(venv.exists(), "the SDKs' Python venv is missing: run `make test` (it creates .venv-test)");
    venv
}

/// Runs `script SCENARIO` against `router` with the organization key
/// `api_key` and `env`; asserts it printed `ok SCENARIO`.
pub fn sdk(script: &str, router: &Router, api_key: &str, scenario: &str, env: &[(&str, &str)]) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../api-router/tests/python").join(script);
    let out = Command::new(python())
        .arg(path)
        .arg(scenario)
        .env("ROUTER_URL", format!("http://{}", router.addr))
        .env("API_KEY", api_key)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{script} {scenario}: {stdout}\n{stderr}");
    assert_eq!(stdout.trim(), format!("ok {scenario}"), "{stderr}");
}
