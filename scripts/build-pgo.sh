#!/usr/bin/env bash
# A profile-guided (PGO) release build of the router, for production and for
# the benchmarks: an instrumented build serves a training load, and the
# profile it writes guides the final build (which functions are hot, which
# branches are taken, what to inline). The load: the benchmark's (the native
# door, router minimal, then with every feature: Redis limits and budget,
# Kafka usage, audit, etcd), and the OpenAI door, answered whole and streamed.
# Paths it does not run (other doors, TLS, failover) are built as cold code;
# a deployment with a different mix can train on its own.
#
# Output: target/pgo/<host triple>/release/{api-router,mock-backend}.
# The profile (target/pgo/merged.profdata) is a build output, never committed.
# The builds are for the target triple, so the flags reach the project and its
# crates but not build scripts or proc macros. Needs llvm-profdata of rustc's
# LLVM major version (installed from Debian's llvm-NN if missing).
#
# Usage: scripts/build-pgo.sh   (about 20 minutes on two cores: two full release builds)
set -euo pipefail
cd "$(dirname "$0")/.."
TRIPLE=$(rustc -vV | awk '/^host:/ {print $2}')
PGO=$PWD/${CARGO_TARGET_DIR:-target}/pgo
# The load runs the instrumented build (bench-lib then builds nothing).
BENCH_BIN=$PGO/gen/$TRIPLE/release
source scripts/bench-lib.sh
LLVM_MAJOR=$(rustc -vV | awk '/^LLVM version/ {split($3, v, "."); print v[1]}')
PROFDATA=llvm-profdata-$LLVM_MAJOR
scripts/deps.sh "$PROFDATA:llvm-$LLVM_MAJOR"
rm -rf "$PGO/raw" "$PGO/merged.profdata"

echo "==> instrumented build"
RUSTFLAGS="-Cprofile-generate=$PGO/raw" CARGO_TARGET_DIR=$PGO/gen \
  cargo build --release --bins --target "$TRIPLE"

train() { # name url seconds
  read -r _ _ _ rps bad <<<"$(oha_run "$2" -z "$3" -c 32)"
  [ "$bad" = 0 ] || { echo "training run ($1) had $bad non-2xx answers" >&2; exit 1; }
  echo "    $1: $rps requests/s (instrumented)"
}
echo "==> training load"
start_services
start_mock
for mode in minimal all; do
  start_router "$mode"
  train "native door, $mode" "$ROUTER_URL" 10s
  # A clean exit writes the profile.
  stop_router
done
start_router minimal env BACKEND_ENDPOINTS=backend-1=openai+http://127.0.0.1:$MOCK_PORT
for stream in false true; do
  BODY='{"model":"gpt-4o","stream":'$stream',"messages":[{"role":"user","content":"hello"}]}' \
    train "OpenAI door, stream $stream" "${ROUTER_URL%/v1/inference}/v1/chat/completions" 5s
done
stop_router
"$PROFDATA" merge -o "$PGO/merged.profdata" "$PGO/raw"

echo "==> optimized build"
# Cargo does not see the profile change: build everything again with it.
rm -rf "${PGO:?}/$TRIPLE"
RUSTFLAGS="-Cprofile-use=$PGO/merged.profdata" CARGO_TARGET_DIR=$PGO \
  cargo build --release --bins --target "$TRIPLE"
echo "==> $PGO/$TRIPLE/release/api-router"
