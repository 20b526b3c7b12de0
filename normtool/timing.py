"""Interleaved timing: the only way normtool compares speeds.

Why interleave: on a shared machine, clock boosts, thermal state and neighbours drift over
seconds; timing model A for a minute and then model B attributes that drift to the models.
Running one call of each model per round, rotating which goes first, exposes every model to
the same conditions. The calls of one round are paired: ``paired_ratio`` turns the paired
rounds into a ratio with a confidence interval, so a small difference is reported only when
the rounds support it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


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


#: contiguous blocks of paired cycles the rounds of a single set of sessions are cut into
BLOCKS_IN_ONE_SET = 10


@dataclass(frozen=True)
class Ratio:
    """A model's time relative to the baseline's: estimate, confidence interval, verdict.

    ``ci`` is ``None`` when there are fewer than two blocks to estimate a spread from; such a
    ratio is never called distinguishable.
    """

    ratio: float
    ci: tuple[float, float] | None

    @property
    def verdict(self) -> str:
        if self.ci is None or self.ci[0] <= 1.0 <= self.ci[1]:
            return "not distinguishable"
        return "faster" if self.ci[1] < 1.0 else "slower"

    @property
    def distinguishable(self) -> bool:
        return self.verdict != "not distinguishable"


def _block_bounds(rounds: int, models: int, count: int) -> list[tuple[int, int]]:
    """Round ranges of at most ``count`` contiguous blocks made of whole rotation cycles.

    A cycle is ``models`` consecutive rounds: ``interleaved`` rotates the call order, so within
    a cycle every model has held every position in its round once (the position matters: the
    second call of a round ran 2-3 % slower here). Rounds after the last whole cycle are left
    out, unless there is no whole cycle at all.
    """
    cycles = max(1, rounds // models)
    k = min(count, cycles)
    size, extra = divmod(cycles, k)
    edges = [min(rounds, (j * size + min(j, extra)) * models) for j in range(k + 1)]
    return list(zip(edges, edges[1:], strict=False))


def _log_ratio(base: Sequence[float], other: Sequence[float], span: tuple[int, int]) -> float:
    a, b = span
    return math.log(statistics.median(other[a:b]) / statistics.median(base[a:b]))


def paired_ratio(
    base: Sequence[Sequence[float]],
    other: Sequence[Sequence[float]],
    models: int,
    level: float = 0.95,
) -> Ratio:
    """``other``'s time relative to ``base``'s, with a ``level`` confidence interval.

    ``base`` and ``other`` hold one list of per-round times per set of sessions, both timed in
    the same interleaved rounds (``models`` models in all). The unit of the interval is a
    block of paired rounds: each set of sessions when there are several, else
    ``BLOCKS_IN_ONE_SET`` contiguous blocks of the single set. A block's statistic is the log
    of the ratio of the two models' medians over the block's rounds; the estimate is the
    exponentiated mean of the block statistics, the interval Student's t over them with
    blocks - 1 degrees of freedom, exponentiated.

    Why blocks: rounds are neither independent nor drawn from one distribution. Neighbouring
    rounds' ratios are correlated (lag-1 typically +0.2 to +0.5 measured here), and two ORT
    sessions of one file differ by a fixed 0.2-3 % for as long as they live (where their
    buffers landed, which was created first). A bootstrap or order-statistics interval over
    the rounds of one run called identical models different in 21-27 of 30 A/A runs. Blocks far
    apart in time are nearly independent; only fresh sessions per block (several sets) also
    cover session placement, so that is what ``normtool bench`` does by default.

    Why a ratio of medians per block, not the median of per-round ratios: the rounds of a block
    are the same for both models, so drift between blocks cancels either way, but a call
    preempted by a neighbour spoils its round's ratio while a median over the block drops it.
    With the 2 cores at load 14, A/A intervals were 6.5 % wide this way, 479 % from per-round
    ratios.
    """
    if len(base) == 1:
        spans = [(0, s) for s in _block_bounds(len(base[0]), models, BLOCKS_IN_ONE_SET)]
    else:
        spans = [(i, _block_bounds(len(b), models, 1)[0]) for i, b in enumerate(base)]
    stats = [_log_ratio(base[i], other[i], span) for i, span in spans]
    centre = statistics.fmean(stats)
    if len(stats) < 2:
        return Ratio(math.exp(centre), None)
    from scipy.stats import t  # noqa: PLC0415 - scipy is slow to import; only bench needs it

    half = t.ppf((1 + level) / 2, len(stats) - 1) * statistics.stdev(stats) / math.sqrt(len(stats))
    return Ratio(math.exp(centre), (math.exp(centre - half), math.exp(centre + half)))
