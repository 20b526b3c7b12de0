"""Interleaved timing: the only way normtool compares speeds.

Why interleave: on a shared machine, clock boosts, thermal state and neighbours drift over
seconds; timing model A for a minute and then model B attributes that drift to the models.
Running one call of each model per round, rotating which goes first, exposes every model to
the same conditions, so the ratio of medians measured in the same run is trustworthy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def interleaved(
    runners: Sequence[Callable[[], object]], warmup: int, iters: int
) -> list[list[float]]:
    """Run each callable ``warmup`` times, then ``iters`` rounds of one call each (rotating the
    starting runner per round). Returns seconds per call, one list per runner."""
    for _ in range(warmup):
        for r in runners:
            r()
    times: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    for i in range(iters):
        for j in range(n):
            k = (i + j) % n
            t0 = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) — exact sample values, no interpolation."""
    s = sorted(xs)
    rank = max(1, min(len(s), round(q / 100 * len(s) + 0.5)))
    return s[rank - 1]


def summarize(times: Sequence[float], items_per_call: int) -> dict[str, float]:
    """Median/p90/p99 in milliseconds and throughput (items per second at the median)."""
    med = statistics.median(times)
    return {
        "median_ms": med * 1e3,
        "p90_ms": percentile(times, 90) * 1e3,
        "p99_ms": percentile(times, 99) * 1e3,
        "throughput": items_per_call / med if med > 0 else float("inf"),
        "runs": len(times),
    }
