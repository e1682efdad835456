//! Every fenced `bash` block of `docs/runbook.md` runs verbatim against a
//! router set up as `make run` sets it up (two mock backends, a dev key, an
//! admin token): each command exits 0 (curl with `--fail-with-body`, so an
//! HTTP error fails it), and each command's own output contains the
//! `# Expected:` lines that follow it.

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

/// A block cut after each run of `# Expected:` lines: the commands of each
/// piece, and what their output must contain.
fn segments(block: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = vec![(String::new(), Vec::new())];
    for line in block.lines() {
        match line.trim().strip_prefix("# Expected: ") {
            Some(expected) => out.last_mut().unwrap().1.push(expected.to_string()),
            None => {
                if !out.last().unwrap().1.is_empty() {
                    out.push((String::new(), Vec::new()));
                }
                let commands = &mut out.last_mut().unwrap().0;
                commands.push_str(line);
                commands.push('\n');
            }
        }
    }
    out
}

/// Run before each block: curl fails on an HTTP error and prints its body,
/// unless the command prints the status itself (`-w`).
const PRELUDE: &str = r#"set -eo pipefail
curl() {
  case " $* " in
    *" -w "*) command curl "$@" ;;
    *) command curl --fail-with-body "$@" ;;
  esac
}
"#;

#[test]
fn a_block_is_cut_after_each_run_of_expected_lines() {
    let cut = segments("a\n# Expected: 1\n# Expected: 2\nb \\\n  c\n# Expected: 3\nd\n");
    assert_eq!(cut.len(), 3);
    assert_eq!(cut[0], ("a\n".into(), vec!["1".into(), "2".into()]));
    assert_eq!(cut[1], ("b \\\n  c\n".into(), vec!["3".into()]));
    assert_eq!(cut[2], ("d\n".into(), vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runbook_commands_work_verbatim() {
    let md = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/runbook.md")).unwrap();
    let (m1, m2) = (Mock::start("backend-1", &[]), Mock::start("backend-2", &[]));
    let router = RouterBuilder::new(&[&m1, &m2]).env("API_KEYS", "dev-key-runbook=dev-org").start();
    let blocks = bash_blocks(&md);
    assert!(blocks.len() >= 8, "found only {} bash blocks", blocks.len());
    let (mut ran, mut checked) = (0, 0);
    for block in blocks {
        if block.contains("export ROUTER=") {
            // The set-up block: the test provides these variables itself.
            continue;
        }
        let pieces = segments(&block);
        let mut script = PRELUDE.to_string();
        for (i, (commands, _)) in pieces.iter().enumerate() {
            script.push_str(&format!("echo '@@piece {i}@@'\n{commands}"));
        }
        let out = Command::new("bash")
            .arg("-c")
            .arg(script)
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
        for (i, (commands, expected)) in pieces.iter().enumerate() {
            let own = stdout.split(&format!("@@piece {i}@@\n")).nth(1).unwrap_or_default();
            let own = own.split("@@piece ").next().unwrap_or_default();
            for e in expected {
                assert!(own.contains(e.as_str()), "command:\n{commands}did not print {e:?}; it printed:\n{own}");
                checked += 1;
            }
        }
        ran += 1;
    }
    assert!(ran >= 8);
    assert!(checked >= 25, "only {checked} expected lines checked");
}
