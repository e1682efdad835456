#!/usr/bin/env bash
# `make test`: installs what the suite needs (reusing what is installed),
# checks formatting and lints, runs every test with nextest, then fuzzes
# each parser briefly.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests need, installed once and reused.
source scripts/test-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "==> cargo nextest run"
cargo nextest run --workspace --no-fail-fast "$@"
echo "==> a short fuzzing pass per target (make fuzz runs longer)"
scripts/fuzz.sh "${FUZZ_SECONDS:-5}"
