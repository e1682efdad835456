#!/usr/bin/env bash
# The HTTP harness (first part): the router's overhead against direct calls and
# nginx, measured side by side in one run with oha in open loop at fixed rates
# (--latency-correction) and closed loop for maximum throughput. Writes
# docs/benchmarks-http.md. Pinning: the server under test (nginx or the router)
# on core 0; oha and mock-backend on core 1.
#
# Usage: scripts/bench-http.sh [SECONDS_PER_RUN]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
RATES=(1000 2000 5000)

command -v oha >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/oha" ] || cargo install oha --locked
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
scripts/deps.sh nginx:nginx-light taskset:util-linux python3:python3
cargo build --release --bins
BIN=${CARGO_TARGET_DIR:-target}/release
TMP=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

MOCK_PORT=$(free_port); NGINX_PORT=$(free_port); ROUTER_PORT=$(free_port)
taskset -c 1 "$BIN/mock-backend" --listen 127.0.0.1:$MOCK_PORT --id backend-1 >"$TMP/mock.log" 2>&1 & pids+=($!)
wait_port $MOCK_PORT

BODY='{"model":"gpt-4o","payload":"hello"}'
# One oha run: prints "p50 p99 p999 rps non2xx" (ms).
run() { # url extra-oha-args...
  local url=$1; shift
  taskset -c 1 "$OHA" -z "${SECS}s" --no-tui --output-format json -m POST \
    -H "X-API-Key: bench-key" -H "Content-Type: application/json" -d "$BODY" "$@" "$url" >"$TMP/out.json"
  python3 - "$TMP/out.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if not k.startswith("2"))
ms = lambda k: (p.get(k) or 0) * 1000
print(f'{ms("p50"):.3f} {ms("p99"):.3f} {ms("p99.9"):.3f} {d["summary"]["requestsPerSec"]:.0f} {bad}')
PY
}

declare -A RESULT
measure() { # name url
  local name=$1 url=$2
  for rate in "${RATES[@]}"; do
    RESULT[$name,$rate]=$(run "$url" -q "$rate" --latency-correction)
    echo "$name @ $rate/s: ${RESULT[$name,$rate]}"
  done
  RESULT[$name,max]=$(run "$url" -c 64)
  echo "$name max: ${RESULT[$name,max]}"
}

measure direct "http://127.0.0.1:$MOCK_PORT/v1/inference"

cat >"$TMP/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
taskset -c 0 nginx -c "$TMP/nginx.conf" -p "$TMP" & NGINX_PID=$!; pids+=($NGINX_PID)
wait_port $NGINX_PORT
measure nginx "http://127.0.0.1:$NGINX_PORT/v1/inference"
kill $NGINX_PID; wait $NGINX_PID 2>/dev/null || true

env -i PATH="$PATH" HTTP_ADDR=127.0.0.1:$ROUTER_PORT BACKEND_ENDPOINTS=backend-1=http://127.0.0.1:$MOCK_PORT \
  API_KEYS=bench-key=org-bench RATE_LIMIT_DEFAULT_RPS=0 RUST_LOG=warn DATA_DIR="$TMP/router" \
  HEALTH_CHECK_INTERVAL_MS=60000 taskset -c 0 "$BIN/api-router" >"$TMP/router.log" 2>&1 & ROUTER_PID=$!; pids+=($ROUTER_PID)
wait_port $ROUTER_PORT
measure router_minimal "http://127.0.0.1:$ROUTER_PORT/v1/inference"
# Peak RSS with 1,000 concurrent connections.
run "http://127.0.0.1:$ROUTER_PORT/v1/inference" -c 1000 >/dev/null
RSS_KB=$(awk '/VmHWM/ {print $2}' /proc/$ROUTER_PID/status)
kill $ROUTER_PID; wait $ROUTER_PID 2>/dev/null || true

# Instructions per request, from callgrind (stable on a noisy machine): the
# router's total with N requests minus its total with none, divided by N.
scripts/deps.sh valgrind:valgrind callgrind_annotate:valgrind
instructions() { # requests
  local port; port=$(free_port)
  rm -rf "$TMP/cg-data"
  env -i PATH="$PATH" HTTP_ADDR=127.0.0.1:$port BACKEND_ENDPOINTS=backend-1=http://127.0.0.1:$MOCK_PORT \
    API_KEYS=bench-key=org-bench RATE_LIMIT_DEFAULT_RPS=0 RUST_LOG=warn DATA_DIR="$TMP/cg-data" \
    HEALTH_CHECK_INTERVAL_MS=600000 taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$1" \
    "$BIN/api-router" >"$TMP/cg.log" 2>&1 & local pid=$!
  for _ in $(seq 1 300); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  if [ "$1" -gt 0 ]; then
    taskset -c 1 "$OHA" -n "$1" -c 4 --no-tui --output-format json -m POST -H "X-API-Key: bench-key" \
      -d "$BODY" "http://127.0.0.1:$port/v1/inference" >"$TMP/cg-oha.json"
    # Only a run where every answer was 2xx counts.
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1]))["statusCodeDistribution"]; sys.exit(any(not k.startswith("2") for k in c))' \
      "$TMP/cg-oha.json" || { echo "callgrind run had non-2xx answers" >&2; kill -9 $pid; exit 1; }
  fi
  kill -TERM $pid; wait $pid 2>/dev/null || true
  callgrind_annotate "$TMP/cg.$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'
}
CG_N=2000
CG_BASE=$(instructions 0)
CG_RUN=$(instructions $CG_N)
IPR=$(( (CG_RUN - CG_BASE) / CG_N ))

OUT=docs/benchmarks-http.md
{
  echo "# HTTP benchmarks: router vs direct vs nginx"
  echo
  echo "Generated by \`scripts/bench-http.sh $SECS\` on $(date -u +%Y-%m-%dT%H:%MZ)."
  echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
  echo "Pinning: nginx or the router on core 0 (\`taskset -c 0\`); oha and mock-backend on core 1."
  echo "Load: \`oha -z ${SECS}s -q RATE --latency-correction\` (open loop) and \`oha -z ${SECS}s -c 64\` (closed loop, max)."
  echo "Every run's status codes are checked: a non-2xx answer marks the run FAILED."
  echo
  echo "| config | rate | p50 ms | p99 ms | p99.9 ms | achieved rps | non-2xx | p99 overhead vs direct ms |"
  echo "|---|---|---|---|---|---|---|---|"
  for name in direct nginx router_minimal; do
    for rate in "${RATES[@]}" max; do
      read -r p50 p99 p999 rps bad <<<"${RESULT[$name,$rate]}"
      read -r _ dp99 _ _ _ <<<"${RESULT[direct,$rate]}"
      over=$(python3 -c "print(f'{$p99 - $dp99:.3f}')")
      status=$([ "$bad" = 0 ] && echo 0 || echo "$bad FAILED")
      echo "| $name | $rate | $p50 | $p99 | $p999 | $rps | $status | $over |"
    done
  done
  echo
  read -r _ _ _ nginx_max _ <<<"${RESULT[nginx,max]}"
  read -r _ _ _ router_max _ <<<"${RESULT[router_minimal,max]}"
  echo "Max throughput on one core: router $router_max rps, nginx $nginx_max rps, ratio $(python3 -c "print(f'{$router_max / $nginx_max:.2f}')")."
  echo "Router peak RSS, after a closed-loop run with 1,000 concurrent connections: $((RSS_KB / 1024)) MB."
  echo "Instructions per request (callgrind, router-minimal, $CG_N requests over 4 connections, minus start-up and shutdown): $IPR."
} >"$OUT"
cat "$OUT"
