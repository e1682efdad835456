#!/usr/bin/env bash
# make mutants: cargo-mutants over the mechanisms where a wrong line loses
# money or records, in sets; each set's mutants are tested by the tests that
# cover them, and each set writes its own table in docs/testing.md.
#   MUTANTS_SET=core|limits|records|audit-log|usage|providers  one set (default: all, in turn)
#   MUTANTS_ITERATE=1  test again only what the set's last run did not catch
#                      (after new tests were written for it), merging outcomes
# Takes long (each mutant is a build and a test run): the time is recorded
# with each table.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo mutants --version >/dev/null 2>&1; then
  echo "==> installing cargo-mutants"
  cargo install cargo-mutants --version 25.3.1 --locked
fi

# set name -> files; and the test targets that run for each mutant (nextest
# arguments: only these are built and run, so a mutant costs seconds).
files_of() {
  case $1 in
    core) echo "crates/router-core/src/limits/gcra.rs crates/router-core/src/limits/local.rs
      crates/router-core/src/routing/selector.rs crates/router-core/src/backends/health.rs
      crates/router-core/src/backends/cooldown.rs crates/router-core/src/wal/mod.rs" ;;
    # The admission check, on both stores (router-core/tests/limits.rs
    # starts a private redis-server), and the periods it counts in.
    limits) echo "crates/router-core/src/limits/period.rs crates/router-core/src/limits/mod.rs
      crates/router-core/src/limits/redis.rs" ;;
    records) echo "crates/router-core/src/keys.rs crates/router-core/src/audit/mod.rs
      crates/router-core/src/audit/embedded.rs" ;;
    # The embedded audit store's files: its unit tests and the store's.
    audit-log) echo "crates/router-core/src/audit/log.rs" ;;
    # The usage buffer's sink and its Kafka publisher (router-core/tests/
    # usage.rs starts a private tansu).
    usage) echo "crates/router-core/src/usage/mod.rs crates/router-core/src/usage/publisher.rs" ;;
    providers) echo "crates/router-providers/src/translate/chat.rs crates/router-providers/src/translate/stream.rs
      crates/router-providers/src/translate/mod.rs crates/router-providers/src/usage.rs
      crates/router-providers/src/sse.rs" ;;
    *) echo "unknown MUTANTS_SET $1" >&2; exit 2 ;;
  esac
}
tests_of() {
  case $1 in
    limits) echo "--lib --test=limits" ;;
    records) echo "--lib --test=pipeline --test=audit_postgres" ;;
    usage) echo "--lib --test=usage" ;;
    *) echo "--lib" ;;
  esac
}
# A nextest filter within those targets, for a set that only some of their
# tests cover.
filter_of() {
  case $1 in
    audit-log) echo "test(/^audit::/)" ;;
    *) echo "" ;;
  esac
}
# The first set's table keeps its historical section name.
section_of() { if [ "$1" = core ]; then echo mutants; else echo "mutants-$1"; fi; }

run_set() {
  local set=$1 args=() out="target/mutants/$1" outcomes status=0 start seconds
  for f in $(files_of "$set"); do args+=(--file "$f"); done
  local files=("${args[@]}")
  outcomes="$out/mutants.out/outcomes.json"
  if [ "${MUTANTS_ITERATE:-0}" = 1 ]; then
    # Keep the full run's outcomes; this run's replace them mutant by mutant.
    [ -f "$out/full-outcomes.json" ] || cp "$outcomes" "$out/full-outcomes.json"
    args+=(--iterate)
    outcomes="$out/full-outcomes.json,$outcomes"
  else
    rm -f "$out/full-outcomes.json" "$out/seconds"
  fi
  mkdir -p "$out"
  echo "==> mutants: set $set"
  start=$(date +%s)
  # The test targets go to every cargo call, the build's too (-C).
  for a in $(tests_of "$set"); do args+=(-C "$a"); done
  local filter; filter=$(filter_of "$set")
  cargo mutants "${args[@]}" --profile mutants --test-tool nextest --no-shuffle --jobs 1 --output "$out" \
    ${filter:+-- -E "$filter"} || status=$?
  seconds=$(( $(date +%s) - start ))
  # 0: every mutant caught; 2: some missed; 3: some timed out. Anything else
  # (the tests failed without a mutant, a build error) is a failure.
  case $status in 0|2|3) ;; *) echo "cargo mutants failed ($status)" >&2; exit "$status" ;; esac
  # Each run's time, and the mutants of the code as it is now (the table
  # counts those: see mutants-table.py).
  echo "$seconds" >> "$out/seconds"
  cargo mutants "${files[@]}" --list --json > "$out/current.json"
  local runs total=0 label
  runs=$(awk '{printf "%s%d min", (NR > 1 ? ", then MUTANTS_ITERATE=1: " : ""), $1 / 60}' "$out/seconds")
  while read -r s; do total=$((total + s)); done < "$out/seconds"
  label="MUTANTS_SET=$set make mutants: $runs; $(nproc) cores, $(date -u +%Y-%m-%d)"
  python3 scripts/mutants-table.py "$outcomes" "$total" "$label" "$out/current.json" \
    | python3 scripts/bench-section.py docs/testing.md "$(section_of "$set")"
  echo "==> docs/testing.md: mutation table of set $set written ($seconds s)"
}

for set in ${MUTANTS_SET:-core limits records audit-log usage providers}; do
  run_set "$set"
done
