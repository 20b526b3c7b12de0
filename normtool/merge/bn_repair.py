"""BatchNorm statistics after interpolation (the "reset" of Jordan et al., REPAIR, 2022).

Why: the running mean and variance of an interpolated network are not the interpolation of the
endpoints' statistics — averaging shrinks the variance of hidden activations — so the stored
statistics are stale and the merged network normalises with the wrong scale. Recomputing them on
data fixes that. One pass over ``inputs``: ops run in graph order, and each BatchNorm takes the
mean and (unbiased, as torch's running estimate) variance of its actual input, with every earlier
BatchNorm already repaired.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from normtool.graph import Graph
from normtool.runtime.torch_exec import OPS


def has_batchnorm(graph: Graph) -> bool:
    return any(True for _ in graph.ops_of("batchnorm"))


def recompute_batchnorm(
    graph: Graph, weights: Mapping[str, torch.Tensor], inputs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """New ``running_mean``/``running_var`` of every BatchNorm, measured on ``inputs`` (fp32)."""
    env: dict[str, torch.Tensor] = {graph.inputs[0].name: inputs}
    new: dict[str, torch.Tensor] = {}

    def param(name: str) -> torch.Tensor:
        if name in new:
            return new[name]
        w = weights[name]
        return w.float() if w.is_floating_point() else w

    with torch.no_grad():
        for op in graph.ops:
            xs = [env[v] for v in op.inputs]
            if op.kind == "batchnorm":
                x = xs[0].movedim(1, -1) if xs[0].dim() == 4 else xs[0]
                flat = x.reshape(-1, x.shape[-1])
                new[op.params["running_mean"]] = flat.mean(0)
                new[op.params["running_var"]] = flat.var(0, correction=1)
            p = {role: param(t) for role, t in op.params.items()}
            env[op.output] = OPS[op.kind](op, xs, p)
    return new
