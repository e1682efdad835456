#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer, stable with --sanitizer
# none) of every parser that takes outside bytes: scripts/fuzz.sh SECONDS
# runs each target in fuzz/fuzz_targets for SECONDS, starting from its
# committed corpus (fuzz/corpus/<target>, read only). make test runs 5 s a
# target, make fuzz 5 minutes. A crash stops the run with the input saved in
# fuzz/artifacts/<target>/ (replay: cargo fuzz run --sanitizer none <target>
# <file>); make it a regression test. FUZZ_MERGE=1 merges what was found into
# the committed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-5}"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --version 0.13.1 --locked
fi
# The instrumented build goes beside the tools, not into target/: every
# crate is built again with coverage flags, and a fresh checkout (CI) reuses
# it, rebuilding only what changed.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/api-router/fuzz-target}"
# The same dependency versions as the main workspace.
cp Cargo.lock fuzz/Cargo.lock
flags=(--sanitizer none --release --debug-assertions --fuzz-dir fuzz)
echo "==> cargo fuzz build (instrumented; into $CARGO_TARGET_DIR)"
cargo fuzz build "${flags[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for target in $(cargo fuzz list --fuzz-dir fuzz); do
  mkdir -p "$work/$target" "fuzz/artifacts/$target"
  echo "==> fuzzing $target for ${seconds}s"
  log="$work/$target.log"
  if ! cargo fuzz run "${flags[@]}" "$target" "$work/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -artifact_prefix="fuzz/artifacts/$target/" -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|new_units_added)' "$log" | tr '\n' ' '
  echo
  if [ "${FUZZ_MERGE:-0}" = 1 ]; then
    cargo fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" "$work/$target" -- -merge=1 >/dev/null 2>&1
  fi
done
echo "==> fuzzing: every target ran ${seconds}s without a crash"
