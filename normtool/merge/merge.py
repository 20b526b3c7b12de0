"""The merge recipe: check, match (or not), verify the permutations, interpolate, repair.

Every permutation is self-verified before anything is written: each permuted model must compute
its original function (fp64 executor on seeded random inputs, relative error ≤ 1e-9) — a wrong
permutation group would otherwise silently produce a broken merge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from normtool.errors import NormtoolError
from normtool.finite import require_finite
from normtool.graph import Graph
from normtool.history import entry
from normtool.io.atomic import atomic_path
from normtool.io.safetensors_format import DTYPES
from normtool.merge.bn_repair import has_batchnorm, recompute_batchnorm
from normtool.merge.checks import check_same_architecture
from normtool.merge.data import load_data
from normtool.merge.groups import permutation_groups
from normtool.merge.interpolate import interpolate_tensor
from normtool.merge.many import ManyResult, match_to_reference, merge_many
from normtool.merge.matching import SweepWrapper, distinct_tensors
from normtool.merge.permute import Perms, identity_perms
from normtool.model import Model
from normtool.passes.permute import Permute

Weights = dict[str, torch.Tensor]


@dataclass
class MergeOptions:
    method: str = "match"  # match | average
    weights: list[float] | None = None  # None: equal
    reference: bool = False
    max_iter: int = 100
    seed: int = 0
    calib: Path | None = None


@dataclass
class MergeResult:
    model: Model
    perms: list[Perms]
    groups: int
    skipped: dict[str, str]
    sweeps: int
    rounds: int
    objective: tuple[float, float]  # mean pairwise Σ⟨W_i, W_j⟩, before / after matching
    l2: tuple[float, float]  # mean pairwise ‖W_i − W_j‖, before / after matching
    permutation_error: float  # worst relative output change of a permuted model
    batchnorm: str  # none | kept | recomputed | stale
    params: dict[str, Any] = field(default_factory=dict)


class Lazy(Mapping[str, torch.Tensor]):
    """Tensors computed when looked up, never held: how merge keeps models larger than memory
    out of it (weight matching, permuting and interpolating read one tensor at a time)."""

    def __init__(self, names: Mapping[str, object], get: Callable[[str], torch.Tensor]) -> None:
        self._names, self._get = names, get

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_weights(model: Model) -> Weights:
    """All graph tensors of ``model`` in memory, refusing NaN/Inf."""
    require_finite(model)
    return {name: model.tensor(name) for name in model.graph.tensors}


def as_float32(w: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return Lazy(w, lambda n: w[n].float() if w[n].is_floating_point() else w[n])


def _pairwise(graph: Graph, models: Sequence[Weights]) -> tuple[float, float]:
    """Mean over model pairs of the inner product and the L2 distance of all distinct tensors."""
    names = [n for n in distinct_tensors(graph) if DTYPES[graph.tensors[n].dtype].is_floating_point]
    dots, dists = [], []
    for a, b in combinations(models, 2):
        dot = sq = 0.0
        for n in names:
            fa, fb, step = a[n].reshape(-1), b[n].reshape(-1), 1 << 22
            for i in range(0, fa.numel(), step):  # float64 chunks, not float64 copies
                ta, tb = fa[i : i + step].double(), fb[i : i + step].double()
                dot += float(ta @ tb)
                sq += float((ta - tb).pow(2).sum())
        dots.append(dot)
        dists.append(sq**0.5)
    return sum(dots) / len(dots), sum(dists) / len(dists)


def match_models(
    graph: Graph,
    models: Sequence[Weights],
    opts: MergeOptions,
    wrap: SweepWrapper | None = None,
) -> tuple[ManyResult, dict[str, str], int]:
    """Permutations bringing every model into one basis; ``(result, skipped spaces, #groups)``."""
    groups, skipped = permutation_groups(graph)
    if opts.method == "average":
        return ManyResult([identity_perms(graph, groups) for _ in models], 0, 0), skipped, 0
    f32 = [as_float32(m) for m in models]
    if len(models) == 2 or opts.reference:
        r = match_to_reference(graph, groups, f32, opts.max_iter, opts.seed, wrap)
    else:
        r = merge_many(graph, groups, f32, opts.max_iter, opts.seed, wrap)
    return r, skipped, len(groups)


def merge_models(
    models: Sequence[Model], opts: MergeOptions, wrap: SweepWrapper | None = None
) -> MergeResult:
    """Merge ``models`` (same architecture) into one Model in the first one's storage layout."""
    if len(models) < 2:
        raise NormtoolError("merge needs at least two models")
    if opts.method not in ("match", "average"):
        raise NormtoolError(f"--method must be match or average, not {opts.method!r}")
    check_same_architecture(models)
    graph = models[0].graph
    coeffs = opts.weights or [1.0 / len(models)] * len(models)
    calib = load_data(opts.calib, graph, need_labels=False)[0] if opts.calib else None
    for m in models:
        require_finite(m)
    weights = [m.weights() for m in models]
    many, skipped, n_groups = match_models(graph, weights, opts, wrap)
    permuted, err = [], 0.0
    for i, (m, w, p) in enumerate(zip(models, weights, many.perms, strict=True)):
        if all(torch.equal(v, torch.arange(len(v))) for v in p.values()):
            permuted.append(w)
            continue
        rw = Permute(p, opts.seed + i).plan(m)
        moved = rw.stored()
        err = max(err, rw.verify(moved)["permutation_rel_err"])
        permuted.append(moved.weights())
    objective = _pairwise(graph, weights), _pairwise(graph, permuted)
    merged: dict[str, Any] = {
        n: (lambda n=n: interpolate_tensor(graph, n, permuted, coeffs)) for n in graph.tensors
    }  # thunks: the writer computes one merged tensor at a time
    bn = "none"
    if has_batchnorm(graph):
        if sum(c != 0 for c in coeffs) == 1:
            bn = "kept"
        elif calib is not None:
            merged.update(
                recompute_batchnorm(graph, Lazy(merged, lambda n: merged[n]()), calib.float())
            )
            bn = "recomputed"
        else:
            bn = "stale"
    params = {
        "inputs": [
            {"path": str(m.checkpoint.path), "sha256": m.checkpoint.sha256()}
            for m in models
            if m.checkpoint is not None
        ],
        "method": opts.method,
        "algorithm": (
            "none"
            if opts.method == "average"
            else "reference"
            if len(models) == 2 or opts.reference
            else "merge_many"
        ),
        "weights": coeffs,
        "seed": opts.seed,
        "max_iter": opts.max_iter,
        "sweeps": many.sweeps,
        "rounds": many.rounds,
        "objective_before": objective[0][0],
        "objective_after": objective[1][0],
        "l2_before": objective[0][1],
        "l2_after": objective[1][1],
        "batchnorm": bn,
        "calib": str(opts.calib) if opts.calib else None,
    }
    summary = (
        f"merged {len(models)} models ({params['algorithm']}, weights "
        f"{','.join(f'{c:g}' for c in coeffs)}), L2 {params['l2_before']:.4g} -> "
        f"{params['l2_after']:.4g}"
    )
    hist = entry("merge", models[0], params, {"permutation_rel_err": err}, summary)
    out = models[0].derive(graph, merged, hist)
    return MergeResult(
        out,
        many.perms,
        n_groups,
        skipped,
        many.sweeps,
        many.rounds,
        (objective[0][0], objective[1][0]),
        (objective[0][1], objective[1][1]),
        err,
        bn,
        params,
    )


def save_perms(perms: Sequence[Perms], out: Path, inputs: Sequence[Path], force: bool) -> Path:
    """Write permutations as int64 index vectors, key ``"<model index>/<space>"``.

    Model ``i`` is brought into the merged basis by ``t.index_select(axis, perm)`` on every axis
    labelled with the space.
    """
    tensors = {
        f"{i}/{space}": p.to(torch.int64).contiguous()
        for i, ps in enumerate(perms)
        for space, p in ps.items()
    }
    meta = {
        "normtool.perms": "model i in the merged basis = t.index_select(axis, tensors['i/space'])",
        "inputs": "\n".join(str(p) for p in inputs),
    }
    with atomic_path(out, inputs, force) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return out
