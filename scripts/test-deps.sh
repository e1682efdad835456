# Sourced by scripts/test.sh and scripts/reliability.sh: installs what the
# tests need, reusing what is installed, and exports TANSU_BIN and
# OPENAI_TEST_PYTHON.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "==> installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
# Debian packages: protoc (the etcd client's build), curl (the make-run
# test), redis-server, etcd and prometheus (tests start private servers on
# free ports; promtool checks the alert rules), python3 with venv (the SDK tests).
scripts/deps.sh protoc:protobuf-compiler curl:curl redis-server:redis-server etcd:etcd-server etcdctl:etcd-client \
  promtool:prometheus python3:python3 jq:jq

# The Kafka-protocol broker for the usage tests: tansu, built once (about
# 8 minutes) and reused. The default features have no storage engine.
if ! command -v tansu >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/tansu" ]; then
  echo "==> installing tansu 0.6.0 (once; about 8 minutes)"
  cargo install tansu --version 0.6.0 --features dynostore,libsql --locked
fi
export TANSU_BIN="${TANSU_BIN:-$(command -v tansu || echo "$HOME/.cargo/bin/tansu")}"

# The official openai and anthropic Python packages, for the SDK tests of
# the OpenAI and Anthropic doors, and schemathesis for the OpenAPI
# document, in a venv.
VENV=.venv-test
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, anthropic, schemathesis" 2>/dev/null; then
  echo "==> installing the openai, anthropic and schemathesis Python packages into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || { scripts/deps.sh __venv__:python3-venv && python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai>=1.50,<3" "anthropic>=0.40,<1" "schemathesis>=4,<5"
fi
export OPENAI_TEST_PYTHON="$PWD/$VENV/bin/python"

