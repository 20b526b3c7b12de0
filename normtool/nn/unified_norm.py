"""Unified Normalization (Yang et al., ACM MM 2022): a foldable stand-in for LayerNorm.

Why here: UN was designed so that its inference map is a per-channel affine that disappears into
the neighbouring linear layers (``normtool fold``). This layer lets people train with it, and its
checkpoint looks like the reference implementation's (``UN1d``, hikvision-research/
Unified-Normalization) so that both fold the same way — which is why training follows that
implementation step for step (tested against it written out in ``tests/test_nn_training.py``).
At step ``n`` (``iters``, counted from 1), with ``slot = n mod window``:

* statistics are per-channel quadratic means ``x² = mean over tokens`` (no mean subtraction);
* fluctuation smoothing: the last ``window`` batch statistics are kept in ``buffer_x2`` and,
  once ``n > window`` and ``n ≥ warmup_iters``, the forward divides by their *geometric* mean;
  the backward likewise averages the gradient statistic ``mean(g·z)`` over ``buffer_gz`` and
  keeps an EMA of it (``ema_gz``) that corrects the gradient (approximate backpropagation
  through the statistics);
* gradient compensation: from step ``max(1000, warmup_iters) + 1`` on, the output gradient and
  the weight's gradient are scaled by the ratio of the current to the running scale, clipped to
  [1/5, 5];
* optional outlier filtration, from step ``warmup_iters`` on: when the window's arithmetic mean
  exceeds its geometric mean by more than ``window`` × the variance of the window's square roots
  as it was before this batch, the batch is an outlier: its statistic is replaced in the window
  by the running one, it is normalised by its own statistic, and ``skip_counter`` counts it.
  Like ``UN1d``, the filter does not wait for the window to fill: with ``warmup_iters`` below
  ``window`` the window's initial zeros make its geometric mean 0, so early batches tend to
  count as outliers (and put ``running_var`` into the window) — set ``warmup_iters ≥ window``
  to avoid that;
* ``running_var`` (a running mean of x², despite its name) follows an EMA with ``momentum``.

One ``window`` serves forward and backward (``UN1d``'s default; it also accepts two sizes).

Eval: ``weight * x / sqrt(running_var + eps) + bias`` (the ``unorm`` op of the graph).

State dict (reference keys and shapes): ``weight [C]``, ``bias [C]``, ``running_var [C]``,
``ema_gz [C]``, ``iters [1]``, ``buffer_x2 [window, C]``, ``buffer_gz [window, C]``,
``skip_counter [1]`` (counters int64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: Gradient compensation stays off for at least this many steps (as the paper's code does).
_COMPENSATION_START = 1000


@dataclass
class _Step:
    """What one training step decided in the forward, needed again by its backward."""

    slot: int
    windowed: bool  # the window of statistics is full and warm-up is over
    skipped: bool  # outlier batch (or no window): use this batch's own statistics


def _geometric_mean(rows: torch.Tensor) -> torch.Tensor:
    return rows.log().mean(0).exp()


class _UNFunction(torch.autograd.Function):
    """``y = weight * x / sqrt(var + eps) + bias`` with UN's smoothed approximate backward."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, var, ratio, norm: UnifiedNorm, step: _Step):  # noqa: ANN001
        inv = torch.rsqrt(var + norm.eps)
        ctx.save_for_backward(x * inv, inv, weight, ratio)
        ctx.norm, ctx.step = norm, step
        return x * inv * weight + bias

    @staticmethod
    def backward(ctx: Any, grad):  # noqa: ANN001
        z, inv, weight, ratio = ctx.saved_tensors
        norm, step = ctx.norm, ctx.step
        m = norm.momentum
        g = grad * weight * ratio
        with torch.no_grad():
            gz = (g * z).mean(0)
            norm.buffer_gz[step.slot].copy_(norm.ema_gz if step.skipped else gz)
            mean_gz = norm.buffer_gz.mean(0) if step.windowed else gz
            norm.ema_gz.copy_(m * norm.ema_gz + (1 - m) * mean_gz)
            correction = mean_gz if step.skipped else norm.ema_gz.clone()
        grad_x = (g - correction * z) * inv
        return grad_x, (grad * ratio * z).sum(0), grad.sum(0), None, None, None, None


class UnifiedNorm(nn.Module):
    """Drop-in for ``nn.LayerNorm(d)`` on ``[..., d]`` inputs; statistics over all tokens."""

    def __init__(
        self,
        d: int,
        window: int = 4,
        warmup_iters: int = 4000,
        outlier_filtration: bool = False,
        eps: float = 1e-5,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.num_features, self.window = d, window
        self.warmup_iters, self.outlier_filtration = warmup_iters, outlier_filtration
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))
        self.register_buffer("ema_gz", torch.zeros(d))
        self.register_buffer("iters", torch.zeros(1, dtype=torch.long))
        self.register_buffer("buffer_x2", torch.zeros(window, d))
        self.register_buffer("buffer_gz", torch.zeros(window, d))
        self.register_buffer("skip_counter", torch.zeros(1, dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, window={self.window}, warmup={self.warmup_iters}, "
            f"outlier_filtration={self.outlier_filtration}, eps={self.eps}"
        )

    def _statistics(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, _Step]:
        """Record this batch's x², decide outlier/windowed, update ``running_var``.

        Returns the statistic the forward divides by, the gradient compensation ratio, and the
        step's decisions.
        """
        self.iters += 1
        n = int(self.iters.item())
        slot = n % self.window
        full = n > self.window
        spread = self.buffer_x2.sqrt().var() if self.outlier_filtration else None
        self.buffer_x2[slot].copy_(x2)
        skipped = self.window <= 1  # no window to smooth over
        if spread is not None and n >= self.warmup_iters:
            excess = self.buffer_x2.mean(0) - _geometric_mean(self.buffer_x2)
            if bool((excess > spread * self.window).any()):
                self.buffer_x2[slot].copy_(self.running_var)
                self.skip_counter += 1
                skipped = True
        windowed = full and n >= self.warmup_iters and not skipped
        var = _geometric_mean(self.buffer_x2) if windowed else x2
        ratio = torch.ones_like(var)
        if not skipped and n > max(_COMPENSATION_START, self.warmup_iters):
            scale = torch.sqrt((var + self.eps) / (self.running_var + self.eps))
            ratio = scale.clamp(1 / 5, 5)
        self.running_var.copy_(self.momentum * self.running_var + (1 - self.momentum) * var)
        return var, ratio, _Step(slot, windowed, skipped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.num_features)
        if not self.training:
            y = flat * torch.rsqrt(self.running_var + self.eps) * self.weight + self.bias
            return y.reshape(shape)
        with torch.no_grad():
            var, ratio, step = self._statistics(flat.pow(2).mean(0))
        y = _UNFunction.apply(flat, self.weight, self.bias, var, ratio, self, step)
        return y.reshape(shape)
