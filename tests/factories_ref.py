"""Tiny seeded reference checkpoints for tests: normtool's transformer and CNN, and HF ResNets.

Why a module and not fixtures: other test files build variants (placement, norm, parallel…)
with different configs; each call writes a fresh file into the given folder. Running statistics
of PowerNorm, UN and BatchNorm are set to random positive values (as after training) so that
tests exercise them instead of their identity initial values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from normtool.nn.cnn import SmallCNN, cnn_config
from normtool.nn.save import save_reference
from normtool.nn.transformer import ReferenceTransformer, transformer_config

TINY_TRANSFORMER: dict[str, Any] = {
    "vocab_size": 48,
    "max_len": 16,
    "d_model": 16,
    "heads": 4,
    "layers": 2,
    "d_ff": 32,
}


def randomize_norm_state(model: nn.Module, seed: int) -> None:
    """Give every norm random affine parameters and trained-looking running statistics.

    Random affine: γ around 1 (some negative would break nothing here, but keep them natural),
    β small; running statistics positive, spread over an order of magnitude.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_var", "running_phi"):
                buf = getattr(m, name, None)
                if isinstance(buf, torch.Tensor):
                    buf.copy_(torch.rand(buf.shape, generator=g) * 2.0 + 0.2)
            mean = getattr(m, "running_mean", None)
            if isinstance(mean, torch.Tensor):
                mean.copy_(torch.randn(mean.shape, generator=g) * 0.3)
            if m is model or not hasattr(m, "weight") or isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(m, nn.Embedding) or m.weight is None:
                continue
            m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=g))


def make_reference_transformer(
    dir: Path, name: str | None = None, seed: int = 0, **config: Any
) -> Path:
    """Write a tiny seeded ReferenceTransformer (``TINY_TRANSFORMER`` + ``config``) to ``dir``.

    Returns the ``.safetensors`` path (config in its metadata). The file name defaults to one
    derived from the norm and placement, so several variants can share a folder.
    """
    cfg = transformer_config(**{**TINY_TRANSFORMER, **config})
    torch.manual_seed(seed)
    model = ReferenceTransformer(cfg)
    randomize_norm_state(model, seed + 1)
    stem = name or f"ref_{cfg['norm']}_{cfg['placement']}{'_par' if cfg['parallel'] else ''}"
    return save_reference(model.eval(), Path(dir) / f"{stem}.safetensors", force=True)


def make_cnn(dir: Path, name: str = "cnn", seed: int = 0, **config: Any) -> Path:
    """Write a tiny seeded SmallCNN (random BN statistics) to ``dir``; returns the path."""
    torch.manual_seed(seed)
    model = SmallCNN(cnn_config(**config))
    randomize_norm_state(model, seed + 1)
    return save_reference(model.eval(), Path(dir) / f"{name}.safetensors", force=True)


def make_resnet(dir: Path, layer_type: str = "basic", seed: int = 0, **config: Any) -> Path:
    """Save a tiny random ``ResNetForImageClassification`` folder (``save_pretrained``).

    BatchNorm statistics and affines are randomised so eval-mode BN is not the identity.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "num_channels": 3,
        "embedding_size": 8,
        "hidden_sizes": [8, 16] if layer_type == "basic" else [16, 32],
        "depths": [1, 2],
        "layer_type": layer_type,
        "num_labels": 5,
        **config,
    }
    model = ResNetForImageClassification(ResNetConfig(**kwargs)).eval()
    randomize_norm_state(model, seed + 1)
    out = Path(dir) / f"resnet_{layer_type}"
    model.save_pretrained(out)
    return out
