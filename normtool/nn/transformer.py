"""normtool's reference transformer, written in plain torch.

Why plain torch and not the graph executor: this module is the *independent* reference that the
adapter, the executor and every transform are tested against, so it shares no code with them.

Config (a JSON-able dict, stored in the checkpoint's metadata by ``normtool.nn.save``)::

    {"model_type": "normtool_transformer", "vocab_size": V, "max_len": P, "d_model": d,
     "heads": h, "layers": L, "d_ff": f, "placement": "pre" | "post", "parallel": bool,
     "norm": "layernorm" | "rmsnorm" | "crmsnorm" | "powernorm" | "un" | "batchnorm",
     "norm_eps": 1e-5, "act": "gelu", "causal": bool, "num_classes": 0, "bias": bool,
     "tie_embeddings": bool}

State-dict keys: ``tok_emb.weight [V,d]``, ``pos_emb.weight [P,d]``, per block ``blocks.{i}.norm1.*``,
``blocks.{i}.attn.{q,k,v,o}.weight`` (``+bias`` when ``bias``), ``blocks.{i}.norm2.*`` (absent when
``parallel``), ``blocks.{i}.mlp.{fc1,fc2}.weight`` (``+bias``), ``norm_f.*`` (pre placement only),
``head.weight`` (``+bias``). With ``tie_embeddings`` (LM head only) there are no ``head.*`` tensors
at all: the head is ``tok_emb.weight`` without bias.

Forward: ``x = tok_emb[ids] + pos_emb[:T]``; pre serial ``x += attn(norm1(x)); x += mlp(norm2(x))``;
pre parallel ``h = norm1(x); x += attn(h) + mlp(h)``; then ``norm_f``. Post serial
``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``; post parallel ``x = norm1(x + attn(x) + mlp(x))``.
Head: ``num_classes == 0`` → logits over the vocabulary at every token ``[B,T,V]``; otherwise a
classifier on token 0 ``[B,num_classes]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normtool.nn.powernorm import PowerNorm
from normtool.nn.rmsnorm import CRMSNorm, RMSNorm
from normtool.nn.unified_norm import UnifiedNorm

MODEL_TYPE = "normtool_transformer"
NORMS = ("layernorm", "rmsnorm", "crmsnorm", "powernorm", "un", "batchnorm")
ACTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

DEFAULTS: dict[str, Any] = {
    "model_type": MODEL_TYPE,
    "vocab_size": 64,
    "max_len": 32,
    "d_model": 32,
    "heads": 4,
    "layers": 2,
    "d_ff": 64,
    "placement": "pre",
    "parallel": False,
    "norm": "layernorm",
    "norm_eps": 1e-5,
    "act": "gelu",
    "causal": True,
    "num_classes": 0,
    "bias": True,
    "tie_embeddings": False,
}


def transformer_config(**overrides: Any) -> dict[str, Any]:
    """A complete, checked config: the defaults above with ``overrides`` applied."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown transformer config keys: {sorted(unknown)}")
    cfg = {**DEFAULTS, **overrides}
    if cfg["norm"] not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, not {cfg['norm']!r}")
    if cfg["placement"] not in ("pre", "post"):
        raise ValueError("placement must be 'pre' or 'post'")
    if cfg["act"] not in ACTS:
        raise ValueError(f"act must be one of {sorted(ACTS)}")
    if cfg["d_model"] % cfg["heads"]:
        raise ValueError("d_model must be a multiple of heads")
    if cfg["tie_embeddings"] and cfg["num_classes"]:
        raise ValueError("tie_embeddings needs the LM head (num_classes = 0)")
    return cfg


class TokenBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` over the channel axis of ``[B, T, d]`` token activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def make_norm(kind: str, d: int, eps: float, heads: int) -> nn.Module:
    """One norm layer of the chosen kind, width ``d`` (PowerNorm groups = attention heads)."""
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(d, eps)
    if kind == "crmsnorm":
        return CRMSNorm(d, eps)
    if kind == "powernorm":
        return PowerNorm(d, groups=heads, eps=eps)
    if kind == "un":
        return UnifiedNorm(d, eps=eps)
    if kind == "batchnorm":
        return TokenBatchNorm(d, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, causal: bool, bias: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=bias) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        hd = d // self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if self.causal:
            future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, act: str, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d, bias=bias)
        self.act = ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d, h = cfg["d_model"], cfg["heads"]
        self.pre, self.parallel = cfg["placement"] == "pre", cfg["parallel"]
        self.norm1 = make_norm(cfg["norm"], d, cfg["norm_eps"], h)
        self.attn = Attention(d, h, cfg["causal"], cfg["bias"])
        if not self.parallel:
            self.norm2 = make_norm(cfg["norm"], d, cfg["norm_eps"], h)
        self.mlp = MLP(d, cfg["d_ff"], cfg["act"], cfg["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre and self.parallel:
            h = self.norm1(x)
            return x + self.attn(h) + self.mlp(h)
        if self.pre:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if self.parallel:
            return self.norm1(x + self.attn(x) + self.mlp(x))
        x = self.norm1(x + self.attn(x))
        return self.norm2(x + self.mlp(x))


class ReferenceTransformer(nn.Module):
    """Token ids ``[B, T]`` → logits (``[B, T, V]`` LM, or ``[B, num_classes]`` classifier)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = transformer_config(**{k: v for k, v in config.items() if k != "model_type"})
        self.config = cfg
        d = cfg["d_model"]
        self.tok_emb = nn.Embedding(cfg["vocab_size"], d)
        self.pos_emb = nn.Embedding(cfg["max_len"], d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["layers"]))
        if cfg["placement"] == "pre":
            self.norm_f = make_norm(cfg["norm"], d, cfg["norm_eps"], cfg["heads"])
        if not cfg["tie_embeddings"]:
            n_out = cfg["num_classes"] or cfg["vocab_size"]
            self.head = nn.Linear(d, n_out, bias=cfg["bias"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.tok_emb(input_ids) + self.pos_emb.weight[:t]
        for block in self.blocks:
            x = block(x)
        if self.config["placement"] == "pre":
            x = self.norm_f(x)
        if self.config["num_classes"]:
            x = x[:, 0]
        if self.config["tie_embeddings"]:
            return F.linear(x, self.tok_emb.weight)
        return self.head(x)
