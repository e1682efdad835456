#!/usr/bin/env python3
"""The mutation table of docs/testing.md from cargo-mutants' outcomes.json.

Usage: mutants-table.py OUTCOMES[,OUTCOMES...] SECONDS COMMAND [CURRENT]
Per file: mutants generated, caught, missed, unviable, timed out; then every
missed mutant (each needs a test, or a reason it is equivalent, in
docs/testing.md's text). With several outcome files (a full run, then runs
of some mutants again), a later file's outcome for a mutant replaces the
earlier one. CURRENT (`cargo mutants --list --json` of the same files)
makes the table one of the code as it is now: a mutant is known by its
function, its place within that function and its replacement, so an
outcome still counts after an edit elsewhere moved its lines; a mutant of
the current code that no run has tested is counted as untested.
"""
import collections, json, sys

path, seconds, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
current = json.load(open(sys.argv[4])) if len(sys.argv) > 4 else None


def where(m):
    start, end = m.get("span", {}).get("start", {}), m.get("span", {}).get("end", {})
    fn = m.get("function") or {}
    fn_start = fn.get("span", {}).get("start", {}).get("line", 0)
    return (m.get("file"), fn.get("function_name"), m.get("genre"), m.get("replacement"),
            start.get("line", 0) - fn_start, start.get("column"), end.get("line", 0) - fn_start, end.get("column"))


latest = collections.OrderedDict()
for one in path.split(","):
    for o in json.load(open(one))["outcomes"]:
        scenario = o["scenario"]
        if not isinstance(scenario, dict) or "Mutant" not in scenario:
            continue  # the baseline
        m = scenario["Mutant"]
        latest[where(m)] = (m, o["summary"])
if current is not None:
    latest = collections.OrderedDict(
        (where(m), (m, latest.get(where(m), (m, "Untested"))[1])) for m in current)
rows = collections.OrderedDict()
missed = []
for m, summary in latest.values():
    file = m.get("file") or m.get("source_file", {}).get("path", "?")
    row = rows.setdefault(file, collections.Counter())
    row["generated"] += 1
    key = {"CaughtMutant": "caught", "MissedMutant": "missed", "Unviable": "unviable", "Timeout": "timeout",
           "Untested": "untested"}.get(summary, summary)
    row[key] += 1
    if summary in ("MissedMutant", "Untested"):
        start = m.get("span", {}).get("start", {})
        function = (m.get("function") or {}).get("function_name", "?")
        replacement = m.get("replacement", "")
        what = f"replaced by `{replacement}`" if replacement else "deleted"
        tag = "" if summary == "MissedMutant" else " (untested)"
        missed.append(f"`{file}:{start.get('line', '?')}:{start.get('column', '?')}` in `{function}`: {m.get('genre', '')} {what}{tag}")
print(f"Measured with `{command}`, in {seconds // 60} min {seconds % 60} s.\n")
print("| file | generated | caught | missed | unviable | timed out |")
print("|---|---|---|---|---|---|")
total = collections.Counter()
for file, c in rows.items():
    total.update(c)
    print(f"| `{file}` | {c['generated']} | {c['caught']} | {c['missed']} | {c['unviable']} | {c['timeout']} |")
print(f"| all | {total['generated']} | {total['caught']} | {total['missed']} | {total['unviable']} | {total['timeout']} |")
if total["untested"]:
    print(f"\nUntested since the code changed: {total['untested']}.")
if missed:
    print("\nMissed:\n")
    for m in missed:
        print(f"- {m}")
