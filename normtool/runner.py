"""The one runner of every writing transform: plan → self-check → history → streaming write.

Why one: each command used to repeat that sequence with small differences (where the history
entry was made, what a failed check scanned, how many threads the writer left), and passes
could not be chained. Here a list of passes runs on one model: each plans on the previous
one's result, the chain is checked ONCE against the original (fp64 and fp32/half, see
``normtool.selfcheck``), every pass gets its history entry, and the output is written once,
streamed tensor by tensor.

Chains and exactness: the stored result of pass k is what pass k+1 plans on, exactly as if the
intermediate file had been written and read back; for the fp64 check, pass k+1 is also planned
on pass k's *exact* result, so the float64 chain composes the maths unrounded and the 1e-9 bar
holds for the whole chain, not per step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from normtool import history
from normtool.errors import CheckFailed, NormtoolError
from normtool.finite import require_finite
from normtool.io.writer import DEFAULT_MAX_SHARD
from normtool.model import Model
from normtool.passes.recipes import NonFinite
from normtool.passes.rewrite import Pass, Rewrite
from normtool.save import save_model
from normtool.selfcheck import self_check


@dataclass
class Planned:
    """A chain planned on one model: every pass's Rewrite, the result as it will be written
    (``stored``) and in float64 (``exact``)."""

    source: Model
    rewrites: list[Rewrite]
    stored: Model
    exact: Model
    where: Path | None  # the file errors name

    @property
    def equivalent(self) -> bool:
        return any(r.equivalent for r in self.rewrites)


def plan(model: Model, passes: Sequence[Pass], where: Path | None = None) -> Planned:
    """Plan ``passes`` in order on ``model`` (NormtoolError naming the file — ``where``, the path
    the user gave, else the checkpoint's — and the pass that cannot run, with its reasons)."""
    where = where or (model.checkpoint.path if model.checkpoint else None)
    stored = exact = model
    rewrites: list[Rewrite] = []
    for i, p in enumerate(passes):
        try:
            rw = p.plan(stored)
            rw_exact = rw if exact is stored else p.plan(exact)
        except NormtoolError as e:
            message = e.message if i == 0 else f"after {passes[i - 1].name}: {e.message}"
            raise type(e)(message, e.path or where) from e
        rewrites.append(rw)
        stored, exact = rw.stored(), rw_exact.exact()
    return Planned(model, rewrites, stored, exact, where)


def check(planned: Planned) -> dict[str, float] | None:
    """The chain's equivalence self-check (None when no pass claims equivalence); CheckFailed
    with every failed bar, after naming a non-finite rewritten tensor when one explains it."""
    if not planned.equivalent:
        return None
    errors, bad = self_check(planned.source, planned.exact, planned.stored)
    if bad:
        _scan(planned)  # NaN/Inf weights (in the source, or by overflow) explain it: name them
        for rw in planned.rewrites:
            bad += rw.explain(bad) if rw.explain else []
        message = "self-verification failed, nothing written: " + "; ".join(bad)
        raise CheckFailed(message, planned.where)
    return errors


@contextmanager
def _explaining(planned: Planned) -> Iterator[None]:
    """A NonFinite raised within becomes the refusal naming the source's first tensor with
    NaN/Inf when there is one (else it stands: an overflow of the rewrite). Why here, not in the
    per-tensor check: that runs in the writer's thread, beside the main thread's reading of the
    same model; the source is scanned in the caller's thread, after the writer stopped."""
    try:
        yield
    except NonFinite:
        require_finite(planned.source)
        raise


def _scan(planned: Planned) -> None:
    """NormtoolError when a rewritten tensor of the result holds NaN/Inf, one at a time."""
    last = planned.rewrites[-1].engine
    with _explaining(planned):
        for name in planned.stored.graph.tensors:
            if name in planned.stored.overrides:
                last.finite(name, planned.stored.tensor(name))


def _entries(
    planned: Planned, errors: dict[str, float] | None, verify: bool, extra: dict[str, Any]
) -> list[dict[str, Any]]:
    """One history entry per pass. In a chain every entry names the chain, and the errors are
    the chain's (measured once, against the original); a pass with its own check (a Loki head)
    records what that measured."""
    chain = [r.transform for r in planned.rewrites]
    entries = []
    for rw in planned.rewrites:
        own = rw.verify(planned.stored) if rw.verify and verify else errors
        e = history.entry(rw.transform, planned.source, {**rw.params, **extra}, own, rw.summary)
        if len(chain) > 1:
            e["chain"] = chain
        entries.append(e)
    return entries


@dataclass
class Result:
    """What a run did: the rewrites (their reports), the equivalence check's errors (None: not
    checked, or no pass claims equivalence), the result with its history entries, and the path
    it was written to (None: not written)."""

    planned: Planned
    errors: dict[str, float] | None
    model: Model
    output: Path | None = None

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.model.history[len(self.planned.source.history) :]


def apply(
    model: Model,
    passes: Sequence[Pass],
    verify: bool = True,
    history_params: dict[str, Any] | None = None,
    where: Path | None = None,
) -> Result:
    """Plan ``passes`` on ``model``, check the result (unless ``verify`` is false) and record
    one history entry per pass; nothing is written. ``where``: the path errors name."""
    planned = plan(model, passes, where)
    errors = check(planned) if verify else None
    result = planned.stored
    result.history.extend(_entries(planned, errors, verify, history_params or {}))
    return Result(planned, errors, result)


def run(
    model: Model,
    passes: Sequence[Pass],
    out: Path,
    inputs: Sequence[Path],
    force: bool = False,
    verify: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    history_params: dict[str, Any] | None = None,
    before_write: Callable[[Model], None] | None = None,
) -> Result:
    """``apply``, then write the result to ``out`` (streamed; atomically, never over an input).
    ``before_write(result)``: a last step that may refuse (loki's ``--eval``), so that a bad
    input of its own leaves nothing behind."""
    res = apply(model, passes, verify, history_params, inputs[0] if inputs else None)
    if before_write is not None:
        before_write(res.model)
    # The writer thread writes one tensor while the next is computed: give that computation one
    # torch thread, since two more threads on a 2-core machine oversubscribe it (measured: the
    # rewrite took 2-3x longer with torch's default two threads beside the writer).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    last = res.planned.rewrites[-1].engine
    try:
        with _explaining(res.planned):
            res.output = save_model(
                res.model, out, inputs, force, max_shard_size=max_shard_size, check=last.finite
            )
    finally:
        torch.set_num_threads(threads)
    return res
