#!/usr/bin/env bash
# `make test`: installs what the suite needs (reusing what is installed),
# checks formatting and lints, then runs every test with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
command -v curl >/dev/null 2>&1 || { echo "==> installing curl"; apt-get update -q && apt-get install -y -q curl; }

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "==> cargo nextest run"
cargo nextest run --workspace --no-fail-fast "$@"
