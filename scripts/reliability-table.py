#!/usr/bin/env python3
"""The scenario table of docs/reliability.md from the JSON lines that
crates/api-router/tests/reliability.rs writes to RELIABILITY_REPORT.

Usage: reliability-table.py REPORT COMMAND MACHINE > table.md
"""
import json
import sys

path, command, machine = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(line) for line in open(path) if line.strip()]
order = ["Redis", "Kafka", "etcd", "backend", "replica", "clients"]
rows.sort(key=lambda r: order.index(r["dependency"]) if r["dependency"] in order else len(order))
print(f"Measured with `{command}` ({machine}).\n")
print("| dependency | fault | what was done | what the clients saw | what was lost |")
print("|---|---|---|---|---|")
cell = lambda s: s.replace("|", "\\|")
for r in rows:
    print(f"| {cell(r['dependency'])} | {cell(r['fault'])} | {cell(r['done'])} | {cell(r['seen'])} | {cell(r['lost'])} |")
