"""The barrier measurement: A → B naively and A → P(B) after weight matching, on labelled data."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from normtool.errors import NormtoolError
from normtool.merge.checks import check_same_architecture
from normtool.merge.data import load_data
from normtool.merge.matching import SweepWrapper
from normtool.merge.merge import MergeOptions, load_weights, match_models
from normtool.merge.path import PathCurve, linear_path
from normtool.merge.permute import permute_weights
from normtool.model import Model
from normtool.passes.permute import check_permutation

METHODS = {"match": ("matched",), "average": ("naive",), "both": ("naive", "matched")}


@dataclass
class BarrierResult:
    curves: dict[str, PathCurve]  # "naive" and/or "matched"
    sweeps: int
    samples: int


def measure_barrier(
    a: Model,
    b: Model,
    data: Path,
    steps: int,
    method: str,
    opts: MergeOptions,
    wrap_sweep: SweepWrapper | None = None,
    wrap_path: Callable[[Iterable[float], str], Iterable[float]] | None = None,
) -> BarrierResult:
    """Loss/accuracy curves along the linear path for ``method`` (match, average or both)."""
    check_same_architecture([a, b])
    graph = a.graph
    outputs = list(graph.output_names().values())
    if "logits" not in outputs:  # a base model's hidden states are not a distribution to score
        raise NormtoolError(
            f"barrier measures a loss on logits; this model outputs {', '.join(outputs)}",
            a.checkpoint.path if a.checkpoint else None,
        )
    x, y = load_data(data, graph, need_labels=True)
    wa, wb = load_weights(a), load_weights(b)
    curves: dict[str, PathCurve] = {}
    sweeps = 0
    for label in METHODS[method]:
        target = wb
        if label == "matched":
            many, _, _ = match_models(graph, [wa, wb], opts, wrap_sweep)
            sweeps = many.sweeps
            target = permute_weights(graph, wb, many.perms[1])
            check_permutation(graph, wb, target, opts.seed)

        def wrap(alphas: Iterable[float], label: str = label) -> Iterable[float]:
            return wrap_path(alphas, label) if wrap_path else alphas

        curves[label] = linear_path(graph, wa, target, x, y, steps, wrap)
    return BarrierResult(curves, sweeps, len(x))
