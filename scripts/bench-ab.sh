#!/usr/bin/env bash
# A/B of router settings: the minimal router (pinned as in bench-http.sh) with
# each given environment, one 8 s oha open-loop run at RATE per setting and
# round, two rounds; prints "p50 p99 p99.9 rps non-2xx" (ms) per run.
#
# Usage: scripts/bench-ab.sh RATE "NAME=VALUE ..." ["NAME=VALUE ..." ...]
# e.g.   scripts/bench-ab.sh 2000 AUDIT_COMMIT_INTERVAL_MS=10 AUDIT_COMMIT_INTERVAL_MS=100
source "$(dirname "$0")/bench-lib.sh"
RATE=$1; shift
start_mock
for round in 1 2; do
  for setting in "$@"; do
    read -r -a extra <<<"$setting"
    start_router minimal env "${extra[@]}"
    echo "round $round, $setting @ $RATE/s: $(oha_run "$ROUTER_URL" -z 8s -q "$RATE" --latency-correction)"
    stop_router
  done
done
