"""RMSNorm and CRMSNorm as training layers, so reference models can use them like ``nn.LayerNorm``.

Why our own: ``torch.nn.RMSNorm`` has no compressed variant, and the reference models must have
exactly the op table's semantics (``rmsnorm``, ``crmsnorm`` in ``normtool.graph``) so that the
executor can be tested against them.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) * weight`` over the last axis (Zhang & Sennrich 2019)."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class CRMSNorm(nn.Module):
    """Compressed RMSNorm (Jiang et al. 2023) on a ``d``-wide input that stands for a zero-mean
    ``d+1`` vector whose dropped coordinate is ``-sum(x)``:
    ``x / sqrt((sum x² + (sum x)²) / (d+1) + eps) * weight``."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ms = (x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)) / (x.shape[-1] + 1)
        return x * torch.rsqrt(ms + self.eps) * self.weight
