"""Running processes the way a user or a CI step does, and measuring them.

``run_cli`` runs ``python -m normtool`` in a fresh interpreter; ``time_v`` runs any command
under GNU ``/usr/bin/time -v`` and reads its peak resident memory and CPU times. Why one
module: the tests and the benchmark scripts must run and measure commands the same way, and
the ``time -v`` report was parsed in two scripts, each slightly differently.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TIME = "/usr/bin/time"


def run_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m normtool ARGS`` in a subprocess, as a user or CI step would."""
    return subprocess.run(
        [sys.executable, "-m", "normtool", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"CI": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )


@dataclass(frozen=True)
class Measured:
    """One process run under ``time -v``: its result and what ``time`` reported (None where
    the report lacks a line, e.g. the command could not be started)."""

    returncode: int
    stdout: str
    stderr: str  # the command's stderr followed by time's report
    wall_s: float
    peak_rss_kib: int | None
    user_s: float | None
    sys_s: float | None


def _field(report: str, label: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(label)}: (\S+)\s*$", report, re.MULTILINE)
    return m.group(1) if m else None


def parse_time_v(report: str) -> dict[str, float | int | None]:
    """Peak RSS (KiB), user and system CPU seconds from GNU time's ``-v`` report."""
    rss = _field(report, "Maximum resident set size (kbytes)")
    user, system = (_field(report, f"{k} time (seconds)") for k in ("User", "System"))
    return {
        "peak_rss_kib": int(rss) if rss else None,
        "user_s": float(user) if user else None,
        "sys_s": float(system) if system else None,
    }


def time_v(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Measured:
    """Run ``argv`` under ``/usr/bin/time -v``; output captured, the report parsed.

    Wall time is taken here with ``perf_counter`` (time's own report rounds to 10 ms)."""
    t0 = time.perf_counter()
    r = subprocess.run([TIME, "-v", *argv], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    return Measured(r.returncode, r.stdout, r.stderr, wall_s=wall, **parse_time_v(r.stderr))
