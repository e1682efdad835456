# Shared by the HTTP benchmarks (bench-http.sh, bench-soak.sh); sourced, not run.
# Installs oha, nginx and the services if absent, builds the release binaries
# (unless BENCH_BIN names a build),
# and starts what a run needs on free ports under a temp dir, stopped on exit.
#
# Pinning: the server under test (the router or nginx) on core 0; oha, the
# mock backend and the real services (Redis, etcd, tansu) on core 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v oha >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/oha" ] || cargo install oha --locked
OHA=$(command -v oha || echo "$HOME/.cargo/bin/oha")
scripts/deps.sh nginx:nginx-light taskset:util-linux python3:python3 protoc:protobuf-compiler \
  redis-server:redis-server etcd:etcd-server etcdctl:etcd-client gnuplot:gnuplot-nox
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  cargo install tansu --version 0.6.0 --features dynostore,libsql --locked
fi
TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
# BENCH_BIN: a directory holding another build's api-router and mock-backend
# (e.g. the profile-guided one, `make build-pgo`), measured instead of this
# tree's release build.
if [ -n "${BENCH_BIN:-}" ]; then
  BIN=$BENCH_BIN
else
  cargo build --release --bins
  BIN=${CARGO_TARGET_DIR:-target}/release
fi

TMP=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 300); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
# The core the load generator, the mock and the services share.
LOAD_CORE=1 SERVER_CORE=0
PINNING="the server under test (nginx or the router) on core $SERVER_CORE (\`taskset -c $SERVER_CORE\`); oha, mock-backend, Redis, etcd and tansu on core $LOAD_CORE"

BODY='{"model":"gpt-4o","payload":"hello"}'
MOCK_PORT=$(free_port)
start_mock() {
  taskset -c $LOAD_CORE "$BIN/mock-backend" --listen 127.0.0.1:$MOCK_PORT --id backend-1 >"$TMP/mock.log" 2>&1 &
  pids+=($!)
  wait_port $MOCK_PORT
}

# One oha run against URL with extra arguments; prints "p50 p99 p999 rps non2xx"
# (milliseconds). Any non-2xx answer is counted, and marks the run failed.
oha_run() {
  local url=$1; shift
  taskset -c $LOAD_CORE "$OHA" --no-tui --output-format json -m POST -H "X-API-Key: bench-key" \
    -H "Content-Type: application/json" -d "$BODY" "$@" "$url" >"$TMP/out.json"
  python3 - "$TMP/out.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
p = d.get("latencyPercentiles", {})
codes = d.get("statusCodeDistribution", {})
# Requests still in flight when a -z run ends are aborted by oha itself.
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
bad = sum(v for k, v in codes.items() if not k.startswith("2")) + sum(errors.values())
if bad:
    print(f"non-2xx answers or errors: {codes} {errors}", file=sys.stderr)
ms = lambda k: (p.get(k) or 0) * 1000
print(f'{ms("p50"):.3f} {ms("p99"):.3f} {ms("p99.9"):.3f} {d["summary"]["requestsPerSec"]:.0f} {bad}')
PY
}

# Redis, etcd and tansu on free ports, with the benchmark organization's
# policy and limits in etcd (a rate limit and a budget it never reaches, so
# every request runs the whole admission check and is admitted).
start_services() {
  REDIS_PORT=$(free_port) ETCD_PORT=$(free_port) ETCD_PEER=$(free_port) KAFKA_PORT=$(free_port)
  taskset -c $LOAD_CORE redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    >"$TMP/redis.log" 2>&1 & pids+=($!)
  REDIS_PID=$!
  taskset -c $LOAD_CORE etcd --name bench --data-dir "$TMP/etcd" --listen-client-urls http://127.0.0.1:$ETCD_PORT \
    --advertise-client-urls http://127.0.0.1:$ETCD_PORT --listen-peer-urls http://127.0.0.1:$ETCD_PEER \
    --initial-advertise-peer-urls http://127.0.0.1:$ETCD_PEER --initial-cluster bench=http://127.0.0.1:$ETCD_PEER \
    >"$TMP/etcd.log" 2>&1 & pids+=($!)
  mkdir -p "$TMP/tansu"
  (cd "$TMP/tansu" && exec taskset -c $LOAD_CORE "$TANSU" broker --listener-url tcp://127.0.0.1:$KAFKA_PORT \
    --advertised-listener-url tcp://127.0.0.1:$KAFKA_PORT --storage-engine sqlite://tansu.db) >"$TMP/tansu.log" 2>&1 &
  pids+=($!)
  TANSU_PID=$!
  wait_port "$REDIS_PORT"; wait_port "$ETCD_PORT"; wait_port "$KAFKA_PORT"
  (cd "$TMP/tansu" && "$TANSU" topic create api-router.usage --partitions 1 --broker tcp://127.0.0.1:$KAFKA_PORT) \
    >/dev/null
  local etcdctl=(etcdctl --endpoints "http://127.0.0.1:$ETCD_PORT")
  "${etcdctl[@]}" put /api-router/policies/org-bench/gpt-4o \
    '{"policy_id":"bench","organization_id":"org-bench","model":"gpt-4o","backends":[{"backend_id":"backend-1","weight":100}],"failover_threshold":3}' >/dev/null
  "${etcdctl[@]}" put /api-router/organizations/org-bench \
    '{"rate_limit":{"requests_per_second":1000000,"burst":1000000},"budget":{"amount":1000000000,"period":"monthly"},"quota":{"requests":1000000000,"period":"daily"}}' >/dev/null
}

# The router, pinned to the server core: `minimal` (API key auth and routing)
# or `all` (Redis limits and budget, Kafka usage with the write-ahead buffer,
# audit, etcd policies). Sets ROUTER_PID and ROUTER_URL. Extra arguments are
# put before the binary (e.g. valgrind).
start_router() {
  local mode=$1; shift
  local port; port=$(free_port)
  local features=(DEFAULT_ROUTE=true)
  if [ "$mode" = all ]; then
    features=(DEFAULT_ROUTE=false REDIS_URL=redis://127.0.0.1:$REDIS_PORT KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
      CONFIG_SERVICE_ENDPOINTS=http://127.0.0.1:$ETCD_PORT BUDGET_DEFAULT_REQUEST_COST=0.001
      # With the default 20 ms, a saturated router (closed loop) reads some
      # Redis answers late and admits those requests locally instead; 250 ms
      # keeps every admission on Redis, which is what this configuration measures.
      REDIS_TIMEOUT_MS=250)
  fi
  rm -rf "$TMP/router-$mode"
  env -i PATH="$PATH" HTTP_ADDR=127.0.0.1:$port BACKEND_ENDPOINTS=backend-1=http://127.0.0.1:$MOCK_PORT \
    API_KEYS=bench-key=org-bench RATE_LIMIT_DEFAULT_RPS=0 RUST_LOG=warn DATA_DIR="$TMP/router-$mode" \
    HEALTH_CHECK_INTERVAL_MS=60000 "${features[@]}" taskset -c $SERVER_CORE "$@" "$BIN/api-router" \
    >"$TMP/router-$mode.log" 2>&1 &
  ROUTER_PID=$!; pids+=($ROUTER_PID)
  ROUTER_URL=http://127.0.0.1:$port/v1/inference
  wait_port "$port"
  # Ready: every configured dependency answered (readyz is 200 only then).
  for _ in $(seq 1 300); do
    curl -fs -o /dev/null "http://127.0.0.1:$port/v1/status/readyz" && return 0
    sleep 0.1
  done
  echo "router ($mode) never became ready; see $TMP/router-$mode.log" >&2
  cat "$TMP/router-$mode.log" >&2
  return 1
}

# Requests admitted without Redis (its answer came too late): 0 means every
# admission in the run went through Redis.
redis_fallbacks() {
  curl -fsS "${ROUTER_URL%/v1/inference}/metrics" | awk '/^api_router_limits_degraded_total/ {n += $2} END {print n + 0}'
}

stop_router() { kill -TERM "$ROUTER_PID"; wait "$ROUTER_PID" 2>/dev/null || true; }

# Instructions per request under callgrind: the router's total with N requests
# minus its total idling for as long, divided by N. Only an all-2xx run counts.
instructions() { # mode
  local mode=$1 n=2000 totals=() CG_SECONDS=0
  for requests in $n 0; do
    start_router "$mode" valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$mode.$requests"
    if [ "$requests" = 0 ]; then
      sleep "$CG_SECONDS"
    else
      local t0=$SECONDS
      read -r _ _ _ _ bad <<<"$(oha_run "$ROUTER_URL" -n $n -c 4)"
      [ "$bad" = 0 ] || { echo "callgrind run ($mode) had $bad non-2xx answers" >&2; exit 1; }
      CG_SECONDS=$((SECONDS - t0 + 1))
    fi
    stop_router
    totals+=("$(callgrind_annotate "$TMP/cg.$mode.$requests" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')")
  done
  echo $(((totals[0] - totals[1]) / n))
}
# Core N's busy and total ticks so far ("busy total", from /proc/stat; idle
# and iowait are not busy), and the percent busy between two readings.
core_ticks() { awk -v c="cpu$1" '$1 == c {t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t}' /proc/stat; }
busy_pct() { python3 -c "print(f'{100 * ($3 - $1) / max($4 - $2, 1):.0f}')"; }
rss_mb() { awk -v k="$2" '$1 == k":" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
