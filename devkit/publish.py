"""BENCHMARKS.md sections: each benchmark script owns one section between its own markers.

Why one helper: every script rewrites only its own section (so scripts run at different times
never clobber each other's tables) and writes atomically (an interrupted run leaves the file
as it was).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_section(path: Path, start: str, end: str, section: str) -> None:
    """Replace the text from ``start`` to ``end`` (``section`` includes both markers), or append."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = section.strip("\n")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def publish(json_path: Path, payload: dict, section: str, md_path: Path | None) -> None:
    """Write a benchmark's JSON, print its section, and put it in ``md_path`` (None: don't).

    ``section`` starts with its start marker line and ends with its end marker line."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    print(section)
    if md_path is not None:
        lines = section.strip("\n").splitlines()
        write_section(md_path, lines[0], lines[-1], section)
