#!/usr/bin/env bash
# Builds side by side, alternating, in one run: for each directory holding
# api-router and mock-backend (e.g. a copy of an older target/release), the
# router pinned as in the HTTP harness (MODE=minimal, the default, or
# MODE=all with Redis, Kafka, etcd and audit), then
#   - max throughput: `oha -n 40000 -c 64`, with the router's context
#     switches and CPU time per request over that run (from /proc: every
#     thread's voluntary and involuntary switches, utime + stime), and with
#     MODE=all redis-server's and the Kafka broker's (tansu) CPU time per
#     request too;
#   - c=1: `oha -z 3s -c 1`, p50, p99 and p99.9;
#   - p99 at 2,000 requests/s: `oha -z 4s -q 2000 --latency-correction`;
#   - VmHWM after `oha -z 4s -c 1000`.
# Every answer must be 2xx. Throughput and latency move between runs here;
# compare the builds within one run (rounds alternate the builds' order).
#
# Usage: scripts/bench-builds.sh [ROUNDS] DIR ...
#   e.g. cp target/release/{api-router,mock-backend} /tmp/old/; (change, build)
#        scripts/bench-builds.sh 2 /tmp/old target/release
source "$(dirname "$0")/bench-lib.sh"
rounds=2
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then rounds=$1; shift; fi
[ $# -gt 0 ] || { echo "usage: $0 [ROUNDS] DIR ..." >&2; exit 2; }

switches() { cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}'; }
cpu_ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; }
n=40000
MODE=${MODE:-minimal}
[ "$MODE" = minimal ] || start_services
echo "MODE=$MODE"
echo "| round | build | max rps (c=64) | context switches / request | CPU µs / request | Redis, Kafka broker CPU µs / request | c=1 p50 / p99 / p99.9 ms | p99 at 2,000 rps ms | VmHWM after 1,000 connections MB |"
echo "|---|---|---|---|---|---|---|---|---|"
# A service's CPU ticks so far (0 without services).
ticks_of() { if [ -n "${1:-}" ]; then cpu_ticks "$1"; else echo 0; fi; }
hz=$(getconf CLK_TCK)
# CPU µs per request of the measured run, from two tick readings.
per_request() { python3 -c "print(f'{($2 - $1) * 1e6 / $hz / $n:.0f}')"; }
for round in $(seq 1 "$rounds"); do
  # Every other round runs the builds in reverse order: on this shared
  # machine the build run first in a round tended to be ahead (8 of 9
  # rounds in one order, 3 of 3 in the other, for the same two builds).
  order=("$@")
  if ((round % 2 == 0)); then
    order=()
    for ((i = $#; i >= 1; i--)); do order+=("${!i}"); done
  fi
  for dir in "${order[@]}"; do
    BIN=$dir
    start_mock
    start_router "$MODE"
    oha_run "$ROUTER_URL" -n 2000 -c 64 >/dev/null # warm up
    s0=$(switches "$ROUTER_PID") t0=$(cpu_ticks "$ROUTER_PID") r0=$(ticks_of "${REDIS_PID:-}") k0=$(ticks_of "${TANSU_PID:-}")
    read -r _ _ _ rps bad <<<"$(oha_run "$ROUTER_URL" -n $n -c 64)"
    s1=$(switches "$ROUTER_PID") t1=$(cpu_ticks "$ROUTER_PID") r1=$(ticks_of "${REDIS_PID:-}") k1=$(ticks_of "${TANSU_PID:-}")
    read -r p50 p99 p999 _ bad1 <<<"$(oha_run "$ROUTER_URL" -z 3s -c 1)"
    read -r _ r99 _ _ bad3 <<<"$(oha_run "$ROUTER_URL" -z 4s -q 2000 --latency-correction)"
    read -r _ _ _ _ bad2 <<<"$(oha_run "$ROUTER_URL" -z 4s -c 1000)"
    hwm=$(rss_mb "$ROUTER_PID" VmHWM)
    stop_router
    # The next build's mock takes the same port: wait until this one is gone.
    kill "${pids[-2]}" 2>/dev/null || true
    wait "${pids[-2]}" 2>/dev/null || true
    [ "$bad$bad1$bad2$bad3" = 0000 ] || { echo "$dir: non-2xx answers ($bad, $bad1, $bad2, $bad3)" >&2; exit 1; }
    services=-
    [ "$MODE" = minimal ] || services="$(per_request "$r0" "$r1"), $(per_request "$k0" "$k1")"
    echo "| $round | $dir | $rps | $(python3 -c "print(f'{($s1 - $s0) / $n:.2f}')") | $(per_request "$t0" "$t1") | $services | $p50 / $p99 / $p999 | $r99 | $hwm |"
  done
done
