#!/usr/bin/env bash
# `make run`: the router on embedded defaults with two mock backends.
# No Redis, Kafka or etcd. Prints the dev API key, the admin token and a curl.
#
# Overrides (all optional): HTTP_PORT (8080), MOCK_PORTS ("8001,8002"),
# DEV_DIR (.dev: data dir and generated credentials), ROUTER_BIN and MOCK_BIN
# (prebuilt binaries; otherwise `cargo build` builds them).
set -euo pipefail
cd "$(dirname "$0")/.."

HTTP_PORT=${HTTP_PORT:-8080}
MOCK_PORTS=${MOCK_PORTS:-8001,8002}
DEV_DIR=${DEV_DIR:-.dev}
IFS=, read -r PORT1 PORT2 <<<"$MOCK_PORTS"

if [[ -z "${ROUTER_BIN:-}" || -z "${MOCK_BIN:-}" ]]; then
  # protoc: the etcd client generates its gRPC code at build time.
  scripts/deps.sh protoc:protobuf-compiler curl:curl
  cargo build --bins
  ROUTER_BIN=${ROUTER_BIN:-${CARGO_TARGET_DIR:-target}/debug/api-router}
  MOCK_BIN=${MOCK_BIN:-${CARGO_TARGET_DIR:-target}/debug/mock-backend}
fi

mkdir -p "$DEV_DIR"
# Credentials are generated once per DEV_DIR and kept there (never committed).
random() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
[[ -s "$DEV_DIR/admin-token" ]] || random > "$DEV_DIR/admin-token"
[[ -s "$DEV_DIR/api-key" ]] || echo "dev-$(random)" > "$DEV_DIR/api-key"
ADMIN_TOKEN=$(cat "$DEV_DIR/admin-token")
API_KEY=$(cat "$DEV_DIR/api-key")

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 0' INT TERM

"$MOCK_BIN" --listen "127.0.0.1:$PORT1" --id backend-1 >"$DEV_DIR/backend-1.log" 2>&1 & pids+=($!)
"$MOCK_BIN" --listen "127.0.0.1:$PORT2" --id backend-2 >"$DEV_DIR/backend-2.log" 2>&1 & pids+=($!)

# The two mocks speak every shape: each is a native backend, and one is also
# an OpenAI-compatible backend, the other an Anthropic one (with an upstream
# key, as a hosted provider wants). With the default route, each door reaches
# the backends that can serve it, translating between shapes where needed.
cat >"$DEV_DIR/router.yaml" <<YAML
backends:
  - {backend_id: backend-1, endpoint: "http://127.0.0.1:$PORT1"}
  - {backend_id: backend-2, endpoint: "http://127.0.0.1:$PORT2"}
  - {backend_id: openai-1, endpoint: "http://127.0.0.1:$PORT1", kind: openai}
  - {backend_id: anthropic-1, endpoint: "http://127.0.0.1:$PORT2", kind: anthropic, api_key_env: DEV_UPSTREAM_KEY}
YAML
export DEV_UPSTREAM_KEY="dev-upstream-$(random)"
export ROUTER_CONFIG="$DEV_DIR/router.yaml"
BACKENDS="backend-1, backend-2 (native), openai-1 (openai), anthropic-1 (anthropic)"
export HTTP_ADDR="127.0.0.1:$HTTP_PORT"
export API_KEYS="$API_KEY=dev-org"
export ADMIN_TOKEN
export DATA_DIR="$DEV_DIR/data"
export HEALTH_CHECK_INTERVAL_MS=${HEALTH_CHECK_INTERVAL_MS:-2000}
"$ROUTER_BIN" & pids+=($!)
router_pid=$!

for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$HTTP_PORT/v1/status/healthz" >/dev/null 2>&1 && break
  kill -0 "$router_pid" 2>/dev/null || { echo "api-router exited; see the log above" >&2; exit 1; }
  sleep 0.1
done

cat <<BANNER

==================== api-router (dev) ====================
Router:      http://127.0.0.1:$HTTP_PORT
Backends:    $BACKENDS
API key:     $API_KEY   (organization dev-org)
Admin token: $ADMIN_TOKEN
Data dir:    $DATA_DIR

Try each door:

# native
curl -X POST http://127.0.0.1:$HTTP_PORT/v1/inference \\
  -H "X-API-Key: $API_KEY" -H "Content-Type: application/json" \\
  -d '{"request_id":"test-123","model":"gpt-4o","payload":"test"}'

# OpenAI chat completions (openai-1, or anthropic-1 through translation)
curl http://127.0.0.1:$HTTP_PORT/v1/chat/completions \\
  -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" \\
  -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello"}]}'

# Anthropic messages (anthropic-1, or openai-1 through translation)
curl http://127.0.0.1:$HTTP_PORT/v1/messages \\
  -H "x-api-key: $API_KEY" -H "anthropic-version: 2023-06-01" -H "Content-Type: application/json" \\
  -d '{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"Hello"}]}'

# OpenAI Responses API (openai-1)
curl http://127.0.0.1:$HTTP_PORT/v1/responses \\
  -H "Authorization: Bearer $API_KEY" -H "Content-Type: application/json" \\
  -d '{"model":"gpt-4o","input":"Hello"}'

Admin, for example:
  curl -H "Authorization: Bearer $ADMIN_TOKEN" http://127.0.0.1:$HTTP_PORT/v1/admin/routing/backends
Press Ctrl-C to stop.
===========================================================

BANNER
wait "$router_pid"
