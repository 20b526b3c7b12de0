"""normtool's small CNN: Conv-BN-ReLU blocks, global average pooling, a linear head.

Why: the simplest network whose BatchNorms fold backward into convolutions; small enough to train
in seconds for fixtures, and plain torch so it is an independent reference for the executor.

Config::

    {"model_type": "normtool_cnn", "in_channels": 3, "image_size": 16, "channels": [8, 16],
     "strides": [1, 2], "kernel": 3, "conv_bias": false, "bn_eps": 1e-5, "num_classes": 10}

Block ``i``: ``blocks.{i}.conv`` (``Conv2d(kernel, stride=strides[i], padding=kernel // 2)``,
bias when ``conv_bias``), ``blocks.{i}.bn`` (``BatchNorm2d``), ReLU. Then the mean over H, W
and ``head`` (``Linear(channels[-1], num_classes)``). Input ``[B, in_channels, H, W]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODEL_TYPE = "normtool_cnn"

DEFAULTS: dict[str, Any] = {
    "model_type": MODEL_TYPE,
    "in_channels": 3,
    "image_size": 16,
    "channels": [8, 16],
    "strides": [1, 2],
    "kernel": 3,
    "conv_bias": False,
    "bn_eps": 1e-5,
    "num_classes": 10,
}


def cnn_config(**overrides: Any) -> dict[str, Any]:
    """A complete, checked config: the defaults above with ``overrides`` applied."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown cnn config keys: {sorted(unknown)}")
    cfg = {**DEFAULTS, **overrides}
    if len(cfg["channels"]) != len(cfg["strides"]) or not cfg["channels"]:
        raise ValueError("channels and strides must be non-empty lists of the same length")
    if cfg["kernel"] % 2 == 0:
        raise ValueError("kernel must be odd (same padding)")
    return cfg


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=bias)
        self.bn = nn.BatchNorm2d(c_out, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class SmallCNN(nn.Module):
    """Images ``[B, C, H, W]`` → logits ``[B, num_classes]``."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = cnn_config(**{k: v for k, v in config.items() if k != "model_type"})
        self.config = cfg
        widths = [cfg["in_channels"], *cfg["channels"]]
        self.blocks = nn.ModuleList(
            ConvBlock(a, b, cfg["kernel"], s, cfg["conv_bias"], cfg["bn_eps"])
            for a, b, s in zip(widths, widths[1:], cfg["strides"], strict=False)
        )
        self.head = nn.Linear(widths[-1], cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))
