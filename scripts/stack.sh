#!/usr/bin/env bash
# `make stack`: the full local stack, to try every runbook procedure locally.
# Redis, etcd, a Kafka-protocol broker (tansu), PostgreSQL (the shared audit
# store) and Prometheus (with the alert rules, scraping the routers), plus two
# router replicas behind one port (a round-robin balancer, as a Kubernetes
# Service spreads connections) and two mock backends, wired to all of them. Everything runs in the background under .stack/; `make
# stack-down` stops it. Ports are fixed so that the runbook's commands work.
set -euo pipefail
cd "$(dirname "$0")/.."
S=.stack
mkdir -p "$S"
[ -f "$S/pids" ] && { echo "a stack is already running (make stack-down first)"; exit 1; }

scripts/deps.sh protoc:protobuf-compiler curl:curl redis-server:redis-server etcd:etcd-server \
  etcdctl:etcd-client prometheus:prometheus
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  cargo install tansu --version 0.6.0 --features dynostore,libsql --locked
fi
TANSU=$(command -v tansu || echo "$HOME/.cargo/bin/tansu")
cargo build --bins
BIN=${CARGO_TARGET_DIR:-target}/debug

REDIS_PORT=16379 ETCD_PORT=12379 KAFKA_PORT=19092 PROM_PORT=19090 PG_PORT=15432 ROUTER_PORT=8080
REPLICA_PORTS=(18081 18082)
start() { # name, command...
  local name=$1; shift
  "$@" >"$S/$name.log" 2>&1 &
  echo $! >>"$S/pids"
}
wait_port() {
  for _ in $(seq 1 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on $1; see $S/*.log" >&2; return 1
}

start redis redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no
start etcd etcd --name stack --data-dir "$S/etcd" --listen-client-urls http://127.0.0.1:$ETCD_PORT \
  --advertise-client-urls http://127.0.0.1:$ETCD_PORT --listen-peer-urls http://127.0.0.1:12380 \
  --initial-advertise-peer-urls http://127.0.0.1:12380 --initial-cluster stack=http://127.0.0.1:12380
(cd "$S" && exec "$TANSU" broker --listener-url tcp://127.0.0.1:$KAFKA_PORT --advertised-listener-url tcp://127.0.0.1:$KAFKA_PORT \
  --storage-engine sqlite://tansu.db) >"$S/tansu.log" 2>&1 &
echo $! >>"$S/pids"
# PostgreSQL: a private server under $S/pg (as the postgres user when root:
# PostgreSQL refuses to run as root).
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$PG_BIN" ] || { scripts/deps.sh __postgresql__:postgresql; PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1); }
as_pg() { if [ "$(id -u)" = 0 ]; then exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; else exec "$@"; fi; }
if [ ! -s "$S/pg/PG_VERSION" ]; then
  mkdir -p "$S/pg"
  if [ "$(id -u)" = 0 ]; then chmod 755 "$S"; chown postgres:postgres "$S/pg"; fi
  (as_pg "$PG_BIN/initdb" -D "$S/pg" -A trust -U postgres --no-sync -E UTF8 --locale=C) >"$S/initdb.log" 2>&1
fi
start postgres as_pg "$PG_BIN/postgres" -D "$S/pg" -p $PG_PORT -k "$PWD/$S/pg" -c listen_addresses=127.0.0.1
start backend-1 "$BIN/mock-backend" --listen 127.0.0.1:8001 --id backend-1
start backend-2 "$BIN/mock-backend" --listen 127.0.0.1:8002 --id backend-2
wait_port $REDIS_PORT; wait_port $ETCD_PORT; wait_port $KAFKA_PORT; wait_port $PG_PORT
"$PG_BIN/psql" -X -q -h 127.0.0.1 -p $PG_PORT -U postgres -c "CREATE DATABASE api_router" >/dev/null 2>&1 || true
(cd "$S" && "$TANSU" topic create api-router.usage --partitions 1 --broker tcp://127.0.0.1:$KAFKA_PORT >/dev/null 2>&1 || true)

random() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
[[ -s "$S/admin-token" ]] || random >"$S/admin-token"
[[ -s "$S/api-key" ]] || echo "dev-$(random)" >"$S/api-key"
ADMIN=$(cat "$S/admin-token") KEY=$(cat "$S/api-key")

cat >"$S/prometheus.yml" <<YAML
global: {scrape_interval: 5s, evaluation_interval: 5s}
rule_files: [$PWD/deployments/prometheus/alerts.yml]
scrape_configs:
  - job_name: api-router
    static_configs: [{targets: ['127.0.0.1:${REPLICA_PORTS[0]}', '127.0.0.1:${REPLICA_PORTS[1]}']}]
YAML
start prometheus prometheus --config.file="$S/prometheus.yml" --storage.tsdb.path="$S/prometheus" \
  --web.listen-address=127.0.0.1:$PROM_PORT

for i in 0 1; do
  start "router-$((i + 1))" env HTTP_ADDR=127.0.0.1:${REPLICA_PORTS[$i]} DATA_DIR="$S/data-$((i + 1))" \
    INSTANCE_ID="router-$((i + 1))" ADMIN_TOKEN="$ADMIN" API_KEYS="$KEY=dev-org" \
    BACKEND_ENDPOINTS=backend-1=http://127.0.0.1:8001,backend-2=http://127.0.0.1:8002 \
    REDIS_URL=redis://127.0.0.1:$REDIS_PORT KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT \
    AUDIT_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/api_router \
    CONFIG_SERVICE_ENDPOINTS=http://127.0.0.1:$ETCD_PORT HEALTH_CHECK_INTERVAL_MS=2000 "$BIN/api-router"
done
wait_port "${REPLICA_PORTS[0]}"; wait_port "${REPLICA_PORTS[1]}"
start balancer python3 scripts/round-robin.py $ROUTER_PORT "${REPLICA_PORTS[@]}"
wait_port $ROUTER_PORT; wait_port $PROM_PORT

cat <<BANNER
Stack running (logs in $S/, stop with: make stack-down)
  router      http://127.0.0.1:$ROUTER_PORT      admin token: $ADMIN   API key: $KEY
              (round robin over two replicas: http://127.0.0.1:${REPLICA_PORTS[0]}, http://127.0.0.1:${REPLICA_PORTS[1]})
  postgres    postgres://postgres@127.0.0.1:$PG_PORT/api_router (the shared audit store)
  backends    http://127.0.0.1:8001, http://127.0.0.1:8002
  redis       redis://127.0.0.1:$REDIS_PORT
  etcd        http://127.0.0.1:$ETCD_PORT        (etcdctl --endpoints http://127.0.0.1:$ETCD_PORT ...)
  kafka       127.0.0.1:$KAFKA_PORT (tansu), topic api-router.usage
  prometheus  http://127.0.0.1:$PROM_PORT         (alert rules loaded)
For the runbook:
  export ROUTER=http://127.0.0.1:$ROUTER_PORT ADMIN=\$(cat $S/admin-token) KEY=\$(cat $S/api-key)
BANNER
