"""normtool's small CNN: Conv-BN-ReLU blocks, global average pooling, a linear head.

Why: the simplest network whose BatchNorms fold backward into convolutions; small enough to train
in seconds for fixtures, and plain torch so it is an independent reference for the executor.

Config::

    {"model_type": "normtool_cnn", "in_channels": 3, "image_size": 16, "channels": [8, 16],
     "strides": [1, 2], "kernel": 3, "conv_bias": false, "bn_eps": 1e-5, "num_classes": 10,
     "weight_standardization": null}

Block ``i``: ``blocks.{i}.conv`` (``Conv2d(kernel, stride=strides[i], padding=kernel // 2)``,
bias when ``conv_bias``), ``blocks.{i}.bn`` (``BatchNorm2d``), ReLU. Then the mean over H, W
and ``head`` (``Linear(channels[-1], num_classes)``). Input ``[B, in_channels, H, W]``.

``weight_standardization``: ``null`` (plain convs), or ``{"variant": "var"|"std", "eps": e}``
(a variant name alone takes its reference eps): every block's conv is then a ``WSConv2d`` — the
paper's WS+BN combination. Stored in the saved config, so the file alone says which ``Ŵ`` the
network computes; configs saved before the key existed mean ``null``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from normtool.nn.ws_conv import DEFAULT_EPS, WSConv2d, ws_problem

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
    "weight_standardization": None,
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
    ws = cfg["weight_standardization"]
    if isinstance(ws, str):
        ws = {"variant": ws}
    if ws is not None:
        if not isinstance(ws, dict) or set(ws) - {"variant", "eps"}:
            raise ValueError(f"weight_standardization {ws!r}: null, a variant, or variant/eps")
        ws = {
            "variant": ws.get("variant"),
            "eps": ws.get("eps", DEFAULT_EPS.get(ws.get("variant"))),
        }
        fan_in = min([cfg["in_channels"], *cfg["channels"][:-1]]) * cfg["kernel"] ** 2
        problem = ws_problem(ws["variant"], ws["eps"], fan_in)
        if problem:
            raise ValueError(problem)
    cfg["weight_standardization"] = ws
    return cfg


class ConvBlock(nn.Module):
    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int,
        stride: int,
        bias: bool,
        eps: float,
        ws: dict[str, Any] | None = None,
    ):
        super().__init__()
        kw = {"stride": stride, "padding": kernel // 2, "bias": bias}
        conv = nn.Conv2d if ws is None else functools.partial(WSConv2d, **ws)
        self.conv = conv(c_in, c_out, kernel, **kw)
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
            ConvBlock(
                a,
                b,
                cfg["kernel"],
                s,
                cfg["conv_bias"],
                cfg["bn_eps"],
                cfg["weight_standardization"],
            )
            for a, b, s in zip(widths, widths[1:], cfg["strides"], strict=False)
        )
        self.head = nn.Linear(widths[-1], cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))
