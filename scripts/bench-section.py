#!/usr/bin/env python3
"""Replaces one generated section of a markdown file with stdin.

Usage: bench-section.py FILE NAME < content
The section lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; the
text around it (the hand-written analysis) is kept. A missing section is
appended at the end.
"""
import sys

path, name = sys.argv[1], sys.argv[2]
begin, end = f"<!-- {name}:begin (generated; do not edit) -->", f"<!-- {name}:end -->"
text = open(path).read()
block = f"{begin}\n{sys.stdin.read().strip()}\n{end}"
if begin in text and end in text:
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    text = head + block + tail
else:
    text = text.rstrip() + "\n\n" + block + "\n"
open(path, "w").write(text)
