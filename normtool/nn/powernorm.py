"""PowerNorm (Shen et al., ICML 2020): batch-statistics normalisation for transformers.

Why here: PowerNorm's inference map is (after a group RMS scaling) a per-channel affine, which
``normtool fold`` removes. People must be able to train with it first, and the checkpoint must
look like the reference implementation's (``MaskPowerNorm``, sIncerass/powernorm) so that both
fold the same way — which is why training follows that implementation step for step, including
where it is not what the paper's prose suggests (tested against it written out in
``tests/test_nn_training.py``). At step ``n`` (``iters``, counted from 1):

* every token is first divided by the RMS of each of its ``groups`` channel groups
  (``GroupScaling1D``; groups = attention heads, eps ``gs_eps`` = 1e-5);
* the per-channel quadratic mean ``σ²_B = mean over tokens of x²`` replaces the variance — no mean
  subtraction;
* forward: ``ẑ = x / sqrt(σ² + eps)`` with the batch's own ``σ²_B`` while ``n ≤ warmup_iters``,
  afterwards with ``running_phi`` as it was before this step;
* ``running_phi``: while ``n < warmup_iters`` (strictly) it first becomes the running average
  ``φ·(n−1)/n + σ²_B/n``; then, at *every* step, warm-up included, the EMA
  ``φ ← alpha_fwd·φ + (1 − alpha_fwd)·σ²_B`` is applied on top;
* backward (approximate backpropagation): with ``g = ∂L/∂y · weight`` the corrected gradient is
  ``ĝ = g − (1 − alpha_bkw)·ema_gz·ẑ``; ``ema_gz += mean over tokens of ĝ·ẑ``; and
  ``∂L/∂x = ĝ / sqrt(σ²_B + eps)`` — the *batch* statistic, also after warm-up, when the
  forward divided by ``running_phi``. The paper's ν is ``(1 − alpha_bkw)·ema_gz``, and with it
  the update above is the paper's ``ν ← ν·(1 − (1−α)Γ) + (1−α)Λ`` (``Γ = mean(ẑ²)``,
  ``Λ = mean(g·ẑ)``): the checkpoint stores ``ema_gz`` on the reference's scale.

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
    """``y = weight * x / sqrt(stat + eps) + bias``; the backward divides by the batch statistic."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, stat, batch_stat, ema_gz, eps: float, alpha_bkw: float):  # noqa: ANN001
        z = x * torch.rsqrt(stat + eps)
        ctx.save_for_backward(z, torch.rsqrt(batch_stat + eps), weight)
        ctx.ema_gz, ctx.alpha = ema_gz, alpha_bkw
        return z * weight + bias

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: ANN001
        z, inv_batch, weight = ctx.saved_tensors
        ema_gz = ctx.ema_gz
        corrected = grad * weight - (1 - ctx.alpha) * ema_gz * z
        with torch.no_grad():
            ema_gz.add_((corrected * z).mean(0))
        return corrected * inv_batch, (grad * z).sum(0), grad.sum(0), None, None, None, None, None


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
            stat = batch_sq if step <= self.warmup_iters else phi.clone()
            if step < self.warmup_iters:  # running average of the warm-up batches...
                phi.copy_(phi * (step - 1) / step + batch_sq / step)
            phi.copy_(self.alpha_fwd * phi + (1 - self.alpha_fwd) * batch_sq)  # ...then the EMA
        y = _PowerFunction.apply(
            xs,
            self.weight,
            self.bias,
            stat,
            batch_sq,
            self.ema_gz.view(-1),
            self.eps,
            self.alpha_bkw,
        )
        return y.reshape(shape)
