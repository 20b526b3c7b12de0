"""Weighted averages of models that share one graph (after they were brought into one basis)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.io.safetensors_format import DTYPES


def parse_weights(text: str | None, n: int) -> list[float]:
    """``"0.25,0.75"`` → ``[0.25, 0.75]``; equal weights when ``text`` is None.

    Must give one finite weight per model, summing to 1 (within float rounding of the text).
    """
    if text is None:
        return [1.0 / n] * n
    try:
        ws = [float(x) for x in text.split(",")]
    except ValueError as e:
        raise NormtoolError(f"--weights {text!r}: not a comma-separated list of numbers") from e
    if len(ws) != n:
        raise NormtoolError(f"--weights gives {len(ws)} weights for {n} models")
    if not all(torch.isfinite(torch.tensor(w)) for w in ws):
        raise NormtoolError(f"--weights {text!r}: weights must be finite")
    if abs(sum(ws) - 1.0) > 1e-6:
        raise NormtoolError(f"--weights must sum to 1 (they sum to {sum(ws):g})")
    return ws


def interpolate(
    graph: Graph, models: Sequence[Mapping[str, torch.Tensor]], coeffs: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``Σ_i c_i · W_i`` for every graph tensor (see :func:`interpolate_tensor`)."""
    return {name: interpolate_tensor(graph, name, models, coeffs) for name in graph.tensors}


#: Elements per step when accumulating: the fp32 copy of a whole term is never held.
_CHUNK = 1 << 22


def interpolate_tensor(
    graph: Graph, name: str, models: Sequence[Mapping[str, torch.Tensor]], coeffs: Sequence[float]
) -> torch.Tensor:
    """``Σ_i c_i · W_i`` for one graph tensor, computed in fp32 (fp64 for fp64 tensors).

    Terms with a zero coefficient are skipped, so ``coeffs = (0, 1)`` returns B's tensors bit for
    bit. Integer tensors are taken from the model with the largest coefficient. Each term is
    read once (``models`` may be lazy mappings that read on lookup) and added in chunks.
    """
    terms = [(c, m) for c, m in zip(coeffs, models, strict=True) if c != 0.0]
    dtype = DTYPES[graph.tensors[name].dtype]
    if not dtype.is_floating_point:
        return max(zip(coeffs, models, strict=True), key=lambda cm: cm[0])[1][name]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1][name]
    acc = torch.zeros(
        graph.tensors[name].shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    flat = acc.view(-1)
    for c, m in terms:
        t = m[name].reshape(-1)
        for i in range(0, flat.numel(), _CHUNK):
            flat[i : i + _CHUNK] += c * t[i : i + _CHUNK].to(acc.dtype)
    return acc
