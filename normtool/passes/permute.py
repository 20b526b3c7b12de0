"""The permutation pass of merge: one model moved into another basis (DESIGN §3.3).

Why a pass: permuting is a rewrite like the others — a recipe per tensor that has a permuted
axis, computed lazily on the shared engine, never holding the model — and it is checked before
its result is used. Its check is its own (``verify``): the permuted model must compute the
original function to float64 rounding (relative 1e-9 on seeded random inputs). No float32 bar
applies: permuting moves stored values without arithmetic, so the stored result is exact.

Merge itself is not a pass: it reads N models and writes one; it runs this pass per model and
interpolates the permuted results (``normtool.merge.merge``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import torch

from normtool.errors import CheckFailed
from normtool.graph import Graph
from normtool.inputs import max_seq, random_inputs
from normtool.merge.groups import permutation_groups
from normtool.merge.permute import Perms, permute_tensor
from normtool.model import Model
from normtool.passes.recipes import Ctx, Engine, Recipe
from normtool.passes.rewrite import Rewrite
from normtool.runtime.torch_exec import run_graph


def _permuted(name: str, axes: tuple[str | None, ...], perms: Perms, ctx: Ctx) -> torch.Tensor:
    """Rows ``ctx.rows`` of ``name`` permuted along every axis but the first when the first is
    not permuted (then its rows are the source's own rows), else the whole tensor."""
    return permute_tensor(ctx.get(name), axes, perms)


#: fp64 execution of a permuted model differs from the original only by summation order.
PERMUTATION_RTOL = 1e-9


def check_permutation(
    graph: Graph,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    seed: int,
) -> float:
    """Relative output change of a permuted model (must be float noise); CheckFailed otherwise."""
    x = random_inputs(graph, batch=2, seq=min(8, max_seq(graph)), seed=seed)
    ya = run_graph(graph, before, x, dtype=torch.float64)
    yb = run_graph(graph, after, x, dtype=torch.float64)
    err = 0.0
    for name in graph.outputs:
        scale = float(ya[name].abs().max()) or 1.0
        err = max(err, float((ya[name] - yb[name]).abs().max()) / scale)
    if err > PERMUTATION_RTOL:
        raise CheckFailed(
            f"permuting changed the model's outputs (relative error {err:.3g} > "
            f"{PERMUTATION_RTOL:g}): the permutation groups of {graph.family} are wrong"
        )
    return err


@dataclass(frozen=True)
class Permute:
    """Permute every space in ``perms`` (checked on inputs of seed ``seed``)."""

    perms: Perms = field(hash=False)
    seed: int = 0
    name: str = "permute"

    def applicability(self, graph: Graph) -> list[str]:
        groups, skipped = permutation_groups(graph)
        return [] if groups else [f"no permutable space ({len(skipped)} pinned)"]

    def plan(self, model: Model) -> Rewrite:
        engine = Engine(model)
        g = model.graph
        for name, spec in g.tensors.items():
            if not any(a in self.perms for a in spec.axes if a is not None):
                continue
            rows_from = None if spec.axes and spec.axes[0] in self.perms else name
            fn = partial(_permuted, name, spec.axes, self.perms)
            engine.put(name, Recipe(spec.shape, spec.dtype, fn, rows_from))
        spaces = ", ".join(sorted(self.perms))

        def verify(result: Model) -> dict[str, float]:
            err = check_permutation(g, model.weights(), result.weights(), self.seed)
            return {"permutation_rel_err": err}

        return Rewrite(
            self.name,
            {"spaces": sorted(self.perms)},
            g,
            engine,
            f"permuted {spaces}",
            equivalent=False,
            verify=verify,
        )
