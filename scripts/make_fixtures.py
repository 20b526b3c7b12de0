"""Train the small models in ``fixtures/`` so their running statistics are realistic.

Why trained and not random: PowerNorm's ``running_phi``, UN's ``running_var`` and BatchNorm's
statistics after real training are uneven across channels and layers, and the residual stream
of a trained Post-Norm network grows; folding tests on such models exercise what random values
would not. Every model is trained a few hundred steps on seeded synthetic data, on one CPU
thread, in well under a minute in total:

* ``ref_{powernorm,un}_{pre,post}.safetensors``: ReferenceTransformer language models on
  sequences ``x[t+1] = (x[t] + k) mod V`` with a per-sequence step ``k`` (found by attention);
* ``cnn_bn.safetensors``: SmallCNN with BatchNorm classifying noisy class templates;
* ``cnn_ws_bn.safetensors``: the same with Weight Standardization (``WSConv2d``, variant
  ``var``) before every BatchNorm (the paper's WS+BN).

Run: ``python scripts/make_fixtures.py [--out fixtures] [--steps 300]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from normtool.nn import PowerNorm, ReferenceTransformer, SmallCNN, UnifiedNorm
from normtool.nn.cnn import cnn_config
from normtool.nn.save import save_reference
from normtool.nn.transformer import transformer_config

LM = {"vocab_size": 64, "max_len": 32, "d_model": 32, "heads": 4, "layers": 2, "d_ff": 64}
#: Short warm-up (papers: thousands of steps) so the post-warm-up statistics paths are trained.
WARMUP = 50


def lm_batch(g: torch.Generator, batch: int, length: int, vocab: int) -> torch.Tensor:
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    step = torch.randint(1, 4, (batch, 1), generator=g)
    return (start + step * torch.arange(length)) % vocab


def train_lm(norm: str, placement: str, steps: int, seed: int) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    cfg = transformer_config(**LM, norm=norm, placement=placement)
    model = ReferenceTransformer(cfg).train()
    for m in model.modules():
        if isinstance(m, (PowerNorm, UnifiedNorm)):
            m.warmup_iters = WARMUP
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        ids = lm_batch(g, 16, 17, cfg["vocab_size"])
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg["vocab_size"]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), loss.item()


def train_cnn(steps: int, seed: int, ws: str | None = None) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    cfg = cnn_config(
        channels=[8, 16, 16], strides=[1, 2, 2], num_classes=6, weight_standardization=ws
    )
    model = SmallCNN(cfg).train()
    g = torch.Generator().manual_seed(seed)
    size, n_cls = cfg["image_size"], cfg["num_classes"]
    templates = torch.randn(n_cls, cfg["in_channels"], size, size, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        y = torch.randint(0, n_cls, (32,), generator=g)
        x = 2.0 * templates[y] + torch.randn(32, 3, size, size, generator=g) + 0.5
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "fixtures")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (f"ref_{norm}_{placement}", lambda n=norm, p=placement, s=i: train_lm(n, p, args.steps, s))
        for i, (norm, placement) in enumerate(
            [("powernorm", "pre"), ("powernorm", "post"), ("un", "pre"), ("un", "post")]
        )
    ]
    jobs.append(("cnn_bn", lambda: train_cnn(args.steps, 10)))
    jobs.append(("cnn_ws_bn", lambda: train_cnn(args.steps, 11, "var")))
    for name, train in jobs:
        t0 = time.perf_counter()
        model, loss = train()
        path = save_reference(model, args.out / f"{name}.safetensors", force=True)
        kb = path.stat().st_size / 1024
        print(f"{name}: final loss {loss:.3f}, {time.perf_counter() - t0:.1f} s, {kb:.0f} KB")


if __name__ == "__main__":
    main()
