"""``normtool demo``: every command end to end on small built-in models, one summary table."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from normtool.commands.common import JsonOpt, emit, progress
from normtool.commands.table import WORK_COMMANDS
from normtool.demo import StepResult, run_demo
from normtool.errors import CheckFailed, NormtoolError


def _table(results: list[StepResult]) -> list[str]:
    rows = [("step", "model", "result", "key number", "time")]
    for r in results:
        shown = r.key if r.ok else (r.error or "failed")
        rows.append((r.command, r.model, "ok" if r.ok else "FAIL", shown, f"{r.seconds:.2f}s"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def demo(
    dir: Annotated[
        Path | None,
        typer.Option("--dir", help="Keep the models and outputs here (default: a temp folder)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build small models (no download) and run every command on them; exit 1 if any step fails."""
    if dir is not None and dir.exists() and not dir.is_dir():
        raise NormtoolError("--dir exists and is not a folder", dir)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="normtool-demo-") as tmp:
        root = Path(tmp) if dir is None else dir
        root.mkdir(parents=True, exist_ok=True)
        results = run_demo(
            root,
            dict(WORK_COMMANDS),
            each=lambda steps: progress(steps, "demo", total=len(steps)),
        )
    failed = [r for r in results if not r.ok]
    total = time.perf_counter() - t0
    payload = {
        "dir": str(dir) if dir else None,
        "ok": not failed,
        "seconds": total,
        "steps": [asdict(r) for r in results],
    }
    where = f"outputs in {dir}" if dir else "outputs removed (use --dir to keep them)"
    lines = [
        *_table(results),
        f"{len(results) - len(failed)}/{len(results)} steps ok in {total:.1f}s; {where}",
    ]
    emit(as_json, payload, lines)
    if failed:
        raise CheckFailed(
            f"{len(failed)} demo step(s) failed: "
            + "; ".join(f"{r.command} {r.model}" for r in failed)
        )
