#!/usr/bin/env bash
# `make reliability`: every failure scenario of crates/api-router/tests/
# reliability.rs, one at a time, with longer faults (RELIABILITY_FAULT_SECS,
# default 12) and more traffic (RELIABILITY_RPS, default 100) than the short
# versions in `make test`, in a release build; then writes the table of
# docs/reliability.md. About 12 minutes here.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/test-deps.sh
export RELIABILITY_FAULT_SECS="${RELIABILITY_FAULT_SECS:-12}"
export RELIABILITY_RPS="${RELIABILITY_RPS:-100}"
export RELIABILITY_REPORT
RELIABILITY_REPORT=$(mktemp)
trap 'rm -f "$RELIABILITY_REPORT"' EXIT
COMMAND="RELIABILITY_FAULT_SECS=$RELIABILITY_FAULT_SECS RELIABILITY_RPS=$RELIABILITY_RPS cargo nextest run --profile reliability --release -p api-router --test reliability --test-threads 1"
echo "==> $COMMAND"
cargo nextest run --profile reliability --release -p api-router --test reliability --test-threads 1
python3 scripts/reliability-table.py "$RELIABILITY_REPORT" "$COMMAND" "$(nproc) cores, $(date -u +%Y-%m-%d)" \
  | python3 scripts/bench-section.py docs/reliability.md scenarios
echo "==> docs/reliability.md written"
