#!/usr/bin/env bash
# Instructions per request of the router (callgrind, 2,000 requests over 4
# connections, less an idle run of equal length; MODE=minimal, the default,
# or MODE=all with Redis, Kafka, etcd and audit), for this tree's
# release build or for other builds given as directories holding api-router
# and mock-backend: an A/B of two commits on the one stable figure.
#
# Usage: scripts/bench-instructions.sh [RELEASE_DIR ...]
#   e.g. scripts/bench-instructions.sh /tmp/old-target/release target/release
source "$(dirname "$0")/bench-lib.sh"
MODE=${MODE:-minimal}
[ "$MODE" = minimal ] || start_services
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=("$BIN")
for dir in "${dirs[@]}"; do
  BIN=$dir
  start_mock
  echo "$dir: $(instructions "$MODE") instructions per request (router $MODE)"
  # The next build's mock takes the same port: wait until this one is gone
  # (otherwise the new one cannot bind, and the run stopped silently).
  kill "${pids[-1]}" 2>/dev/null || true
  wait "${pids[-1]}" 2>/dev/null || true
done
