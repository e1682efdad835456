#!/usr/bin/env bash
# `make bench`: criterion micro-benchmarks of the request path's pure parts.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench routing -- --noplot
cargo bench --bench limits
cargo bench --bench usage
cargo bench --bench config
cargo bench --bench streaming
