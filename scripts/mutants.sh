#!/usr/bin/env bash
# make mutants: cargo-mutants over the mechanisms where a wrong line loses
# money or records, each file's mutants tested by the tests of its crate;
# writes the table of docs/testing.md. MUTANTS_FILES overrides the file list.
# MUTANTS_ITERATE=1 tests again only what the last run did not catch (after
# new tests were written for it) and merges the outcomes. Takes long (each
# mutant is a build and a test run): its time is recorded with the table.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "==> installing cargo-mutants"
  cargo install cargo-mutants --version 25.3.1 --locked
fi
default_files="crates/router-core/src/limits/gcra.rs crates/router-core/src/limits/local.rs
  crates/router-core/src/routing/selector.rs crates/router-core/src/backends/health.rs
  crates/router-core/src/backends/cooldown.rs crates/router-core/src/wal/mod.rs"
args=()
for f in ${MUTANTS_FILES:-$default_files}; do
  args+=(--file "$f")
done
out=target/mutants
outcomes="$out/mutants.out/outcomes.json"
if [ "${MUTANTS_ITERATE:-0}" = 1 ]; then
  # Keep the full run's outcomes; this run's replace them mutant by mutant.
  [ -f "$out/full-outcomes.json" ] || cp "$outcomes" "$out/full-outcomes.json"
  args+=(--iterate)
  outcomes="$out/full-outcomes.json,$outcomes"
else
  rm -f "$out/full-outcomes.json"
fi
start=$(date +%s)
status=0
cargo mutants "${args[@]}" --test-tool nextest --no-shuffle --jobs 1 --output "$out" || status=$?
seconds=$(( $(date +%s) - start ))
# 0: every mutant caught; 2: some missed; 3: some timed out. Anything else
# (the tests failed without a mutant, a build error) is a failure.
case $status in 0|2|3) ;; *) echo "cargo mutants failed ($status)" >&2; exit "$status" ;; esac
python3 scripts/mutants-table.py "$outcomes" "$seconds" \
  "make mutants$([ "${MUTANTS_ITERATE:-0}" = 1 ] && echo ', then MUTANTS_ITERATE=1 make mutants') ($(nproc) cores, $(date -u +%Y-%m-%d))" \
  | python3 scripts/bench-section.py docs/testing.md mutants
echo "==> docs/testing.md: mutation table written ($seconds s)"
