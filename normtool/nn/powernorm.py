"""PowerNorm (Shen et al., ICML 2020): batch-statistics normalisation for transformers.

Why here: PowerNorm's inference map is (after a group RMS scaling) a per-channel affine, which
``normtool fold`` removes. People must be able to train with it first, and the checkpoint must
look like the reference implementation's (``MaskPowerNorm``) so that both fold the same way.

Training, as the paper describes:

* every token is first divided by the RMS of each of its ``groups`` channel groups
  (``GroupScaling1D``; groups = attention heads, eps ``gs_eps`` = 1e-5);
* the per-channel quadratic mean ``σ²_B = mean over tokens of x²`` replaces the variance — no mean
  subtraction;
* warm-up: for the first ``warmup_iters`` steps the forward divides by the batch's own ``σ²_B``
  and ``running_phi`` is the running average of those; afterwards the forward divides by the
  running statistic and ``running_phi`` follows an EMA with ``alpha_fwd``;
* backward: approximate backpropagation through the running statistic, correcting the gradient
  with ``ema_gz`` (the paper's ν), updated as ``ν ← ν·(1 − (1−α)Γ) + (1−α)Λ`` with
  ``Γ = mean(ẑ²)``, ``Λ = mean(g·ẑ)`` and ``α = alpha_bkw``.

Eval: ``weight * GS(x) / sqrt(running_phi + eps) + bias`` (the ``powernorm`` op of the graph).

State dict (reference keys and shapes): ``weight [C]``, ``bias [C]``, ``running_phi [1,C,1,1]``,
``ema_gz [1,C,1,1]``, ``iters [1]`` (int64).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def group_scale(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Divide each token's ``groups`` contiguous channel groups by their RMS (last axis)."""
    shape = x.shape
    g = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).reshape(shape)


class _PowerFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(denom + eps) + bias`` with the paper's approximate backward."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, denom, ema_gz, eps: float, alpha_bkw: float):  # noqa: ANN001
        inv = torch.rsqrt(denom + eps)
        ctx.save_for_backward(x * inv, inv, weight)
        ctx.ema_gz, ctx.alpha = ema_gz, alpha_bkw
        return x * inv * weight + bias

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: ANN001
        z, inv, weight = ctx.saved_tensors
        nu = ctx.ema_gz
        g = grad * weight
        grad_x = (g - nu * z) * inv
        with torch.no_grad():
            gamma_b = z.pow(2).mean(0)
            lambda_b = (g * z).mean(0)
            nu.copy_(nu * (1 - (1 - ctx.alpha) * gamma_b) + (1 - ctx.alpha) * lambda_b)
        return grad_x, (grad * z).sum(0), grad.sum(0), None, None, None, None


class PowerNorm(nn.Module):
    """Drop-in for ``nn.LayerNorm(d)`` on ``[..., d]`` inputs; statistics over all tokens."""

    def __init__(
        self,
        d: int,
        groups: int = 1,
        eps: float = 1e-5,
        gs_eps: float = 1e-5,
        alpha_fwd: float = 0.9,
        alpha_bkw: float = 0.9,
        warmup_iters: int = 10000,
    ) -> None:
        super().__init__()
        if d % groups:
            raise ValueError(f"PowerNorm: {d} channels do not split into {groups} groups")
        self.num_features, self.groups = d, groups
        self.eps, self.gs_eps = eps, gs_eps
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.warmup_iters = warmup_iters
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_phi", torch.ones(1, d, 1, 1))
        self.register_buffer("ema_gz", torch.zeros(1, d, 1, 1))
        self.register_buffer("iters", torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, groups={self.groups}, eps={self.eps}, warmup={self.warmup_iters}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xs = group_scale(x, self.groups, self.gs_eps).reshape(-1, self.num_features)
        phi = self.running_phi.view(-1)
        if not self.training:
            y = xs * torch.rsqrt(phi + self.eps) * self.weight + self.bias
            return y.reshape(shape)
        with torch.no_grad():
            self.iters += 1
            step = int(self.iters.item())
            batch_sq = xs.pow(2).mean(0)
            warm = step <= self.warmup_iters
            denom = batch_sq.clone() if warm else phi.clone()
            if warm:  # running average of the warm-up batches
                phi.copy_(phi * (step - 1) / step + batch_sq / step)
            else:
                phi.copy_(self.alpha_fwd * phi + (1 - self.alpha_fwd) * batch_sq)
        y = _PowerFunction.apply(
            xs, self.weight, self.bias, denom, self.ema_gz.view(-1), self.eps, self.alpha_bkw
        )
        return y.reshape(shape)
