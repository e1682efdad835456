//! Every fenced `bash` block of `docs/runbook.md` runs verbatim against a
//! router set up as `make run` sets it up (two mock backends, a dev key, an
//! admin token): each command exits 0, and the output contains every
//! `# Expected:` line of its block.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]

use std::process::Command;

use test_support::*;

/// The fenced bash blocks of a Markdown text, in order.
fn bash_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```bash") => current = Some(String::new()),
            (Some(_), "```") => blocks.push(current.take().unwrap()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_commands_work_verbatim() {
    let md = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/runbook.md")).unwrap();
    let (m1, m2) = (Mock::start("backend-1", &[]), Mock::start("backend-2", &[]));
    let router = RouterBuilder::new(&[&m1, &m2]).env("API_KEYS", "dev-key-runbook=dev-org").start();
    let blocks = bash_blocks(&md);
    assert!(blocks.len() >= 8, "found only {} bash blocks", blocks.len());
    let mut ran = 0;
    for block in blocks {
        if block.contains("export ROUTER=") {
            // The set-up block: the test provides these variables itself.
            continue;
        }
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!("set -eo pipefail\n{block}"))
            .env("ROUTER", format!("http://{}", router.addr))
            .env("ADMIN", ADMIN_TOKEN)
            .env("KEY", "dev-key-runbook")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "block failed:\n{block}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for expected in block.lines().filter_map(|l| l.trim().strip_prefix("# Expected: ")) {
            assert!(stdout.contains(expected), "block:\n{block}\ndid not print {expected:?}; it printed:\n{stdout}");
        }
        ran += 1;
    }
    assert!(ran >= 8);
}
