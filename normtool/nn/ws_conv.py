"""Weight Standardization (Qiao et al., 2019): a convolution that uses its standardised weight.

Every output channel's weight row (its ``in/groups × kh × kw`` values) is centred and scaled to
unit spread before the convolution; with BatchNorm after it (the paper's WS+BN) training is
smoother. At inference the standardised weight ``Ŵ`` is a constant, so ``normtool fold`` bakes it
into a plain convolution. Two placements of ``eps`` are in use, and they give different ``Ŵ``:

* ``variant="var"`` — ``Ŵ = (W − μ) / sqrt(Var(W) + eps)``, ``Var`` biased (divide by ``n``);
  timm's ``StdConv2d`` and Hugging Face BiT (they standardise with a batch-norm call over the
  weight), eps ``1e-6`` by default there;
* ``variant="std"`` — ``Ŵ = (W − μ) / (Std(W) + eps)``, ``Std`` unbiased (divide by ``n − 1``);
  the paper's original code, eps ``1e-5``.

Why both, and why the variant is recorded: for a row with spread ``σ`` the two differ by a
relative ``~ eps/σ²`` (var) against ``eps/σ`` (std) and by the ``n/(n−1)`` of the variance
estimate — small, but a bake that picked the wrong one would not compute the trained network.
Both are well defined for a constant row (``Ŵ = 0`` there); the unbiased ``Std`` of a single
value is not (fan-in 1), so that combination is refused.

``WSConv2d`` is a drop-in ``nn.Conv2d``: same constructor (plus ``variant``/``eps``) and the same
state dict keys (``weight``, ``bias``), holding the raw ``W``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: Variant → the eps its reference implementations use by default.
DEFAULT_EPS = {"var": 1e-6, "std": 1e-5}


def ws_problem(variant: Any, eps: Any, fan_in: int) -> str | None:
    """Why ``(variant, eps)`` cannot standardise a weight of ``fan_in`` values per row (None: it can).

    ``eps`` must be positive so a constant row gives ``0/√eps`` or ``0/eps`` = 0, not ``0/0``.
    """
    if variant not in DEFAULT_EPS:
        return f"weight standardization variant {variant!r}: use one of {sorted(DEFAULT_EPS)}"
    if not isinstance(eps, int | float) or isinstance(eps, bool) or not 0 < eps < float("inf"):
        return f"weight standardization eps {eps!r}: must be a positive finite number"
    if variant == "std" and fan_in < 2:
        return "weight standardization variant 'std' needs a fan-in ≥ 2 (unbiased std of 1 value)"
    return None


def standardize_weight(w: torch.Tensor, variant: str, eps: float) -> torch.Tensor:
    """``Ŵ`` of a conv weight ``[out, in/groups, kh, kw]`` (any rank ≥ 2), per output row, in
    ``w``'s dtype. Callers choose the precision: float64 for baking and the executor, at least
    float32 in training."""
    flat = w.reshape(w.shape[0], -1)
    centred = flat - flat.mean(dim=1, keepdim=True)
    if variant == "var":
        den = torch.sqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps)
    elif variant == "std":
        den = torch.sqrt(centred.pow(2).sum(dim=1, keepdim=True) / (flat.shape[1] - 1)) + eps
    else:
        raise ValueError(ws_problem(variant, eps, flat.shape[1]))
    return (centred / den).reshape(w.shape)


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward convolves with the standardised weight (module docstring).

    ``variant``: ``"var"`` (timm/BiT) or ``"std"`` (Qiao et al.); ``eps``: defaults to the
    variant's reference value. Statistics are computed in at least float32, as for norms.
    """

    def __init__(self, *args: Any, variant: str = "var", eps: float | None = None, **kw: Any):
        super().__init__(*args, **kw)
        eps = DEFAULT_EPS.get(variant, 0.0) if eps is None else eps
        problem = ws_problem(variant, eps, self.weight[0].numel())
        if problem:
            raise ValueError(problem)
        self.variant, self.eps = variant, float(eps)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        work = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
        return standardize_weight(work, self.variant, self.eps).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant!r}, eps={self.eps:g}"
