#!/usr/bin/env bash
# `make stack-down`: stops what `make stack` started.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .stack/pids ] || { echo "no stack is running"; exit 0; }
while read -r pid; do kill "$pid" 2>/dev/null; done <.stack/pids
sleep 1
while read -r pid; do kill -9 "$pid" 2>/dev/null; done <.stack/pids
rm -f .stack/pids
echo "stack stopped (data kept in .stack/; rm -rf .stack to start fresh)"
