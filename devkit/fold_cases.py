"""The fold error measure and inputs, shared by ``test_fold`` (which asserts the issue's bars)
and ``scripts/fold_errors.py`` (which reports the figures per family and placement).

The reference is always the ORIGINAL network run by code independent of the pass: a
normtool.nn module (plain torch), transformers' own forward, or the plain-torch timm-style ViT.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from devkit.factories import TINY_TRANSFORMER, randomize_norm_state
from normtool.model import Model
from normtool.nn.save import save_reference
from normtool.nn.transformer import ReferenceTransformer, transformer_config
from normtool.runtime.torch_exec import run_graph

FP64_REL, FP32_ABS = 1e-9, 1e-4
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
Reference = Callable[[torch.dtype, torch.Tensor], torch.Tensor]


def ids(seed: int, vocab: int = 48, shape=(3, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def pixels(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def module_ref(module: torch.nn.Module) -> Reference:
    def run(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module.to(dtype)(x)

    return run


def errors(folded: Model, exact: Model, reference: Reference, x: torch.Tensor, name: str) -> dict:
    """The folded model against ``reference`` (the original): float64 max error relative to the
    logit scale (the unrounded fold), float32 max-abs (the tensors as stored, run in fp32)."""
    xf = x if not x.is_floating_point() else x.double()
    want64 = reference(torch.float64, xf).double()
    got64 = run_graph(exact.graph, exact.weights(), {name: xf}, dtype=torch.float64)["logits"]
    xs = x if not x.is_floating_point() else x.float()
    want32 = reference(torch.float32, xs).float()
    got32 = run_graph(folded.graph, folded.weights(), {name: xs}, dtype=torch.float32)["logits"]
    return {
        "fp64_rel": ((got64 - want64).abs().max() / want64.abs().max()).item(),
        "fp32_abs": (got32 - want32).abs().max().item(),
        "logit_scale": want64.abs().max().item(),
    }


def deep_post(tmp_path: Path, norm: str, seed: int, gamma_std: float = 1.0):
    """Depth-12 Post-Norm transformer whose norms have γ ~ N(0, gamma_std²): negatives included."""
    torch.manual_seed(seed)
    cfg = {**TINY_TRANSFORMER, "layers": 12, "placement": "post", "norm": norm}
    model = ReferenceTransformer(transformer_config(**cfg))
    randomize_norm_state(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for blk in model.blocks:
            for n in (blk.norm1, blk.norm2):
                n.weight.copy_(gamma_std * torch.randn(n.weight.shape, generator=g))
    return save_reference(model.eval(), tmp_path / f"deep_{norm}.safetensors", force=True), model
