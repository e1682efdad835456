#!/usr/bin/env python3
"""The mutation table of docs/testing.md from cargo-mutants' outcomes.json.

Usage: mutants-table.py OUTCOMES[,OUTCOMES...] SECONDS COMMAND
Per file: mutants generated, caught, missed, unviable, timed out; then every
missed mutant (each needs a test, or a reason it is equivalent, in
docs/testing.md's text). With several outcome files (a full run, then a
run of some mutants again), a later file's outcome for a mutant replaces
the earlier one.
"""
import collections, json, sys

path, seconds, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
latest = collections.OrderedDict()
for one in path.split(","):
    for o in json.load(open(one))["outcomes"]:
        scenario = o["scenario"]
        if not isinstance(scenario, dict) or "Mutant" not in scenario:
            continue  # the baseline
        m = scenario["Mutant"]
        latest[json.dumps(m, sort_keys=True)] = (m, o["summary"])
rows = collections.OrderedDict()
missed = []
for m, summary in latest.values():
    file = m.get("file") or m.get("source_file", {}).get("path", "?")
    row = rows.setdefault(file, collections.Counter())
    row["generated"] += 1
    key = {"CaughtMutant": "caught", "MissedMutant": "missed", "Unviable": "unviable", "Timeout": "timeout"}.get(summary, summary)
    row[key] += 1
    if summary == "MissedMutant":
        start = m.get("span", {}).get("start", {})
        function = (m.get("function") or {}).get("function_name", "?")
        replacement = m.get("replacement", "")
        what = f"replaced by `{replacement}`" if replacement else "deleted"
        missed.append(f"`{file}:{start.get('line', '?')}:{start.get('column', '?')}` in `{function}`: {m.get('genre', '')} {what}")
print(f"Measured with `{command}`, in {seconds // 60} min {seconds % 60} s.\n")
print("| file | generated | caught | missed | unviable | timed out |")
print("|---|---|---|---|---|---|")
total = collections.Counter()
for file, c in rows.items():
    total.update(c)
    print(f"| `{file}` | {c['generated']} | {c['caught']} | {c['missed']} | {c['unviable']} | {c['timeout']} |")
print(f"| all | {total['generated']} | {total['caught']} | {total['missed']} | {total['unviable']} | {total['timeout']} |")
if missed:
    print("\nMissed:\n")
    for m in missed:
        print(f"- {m}")
