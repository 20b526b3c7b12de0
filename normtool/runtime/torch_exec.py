"""The torch executor: runs any Graph directly from its op table, in any float dtype.

Why an interpreter rather than generated modules: one small function per op kind is the
executable form of the op table in ``normtool.graph``, so the semantics live in one place that
verify, the transforms' self-checks and the tests all share. Precision policy: every op computes
in the run dtype, except softmax and norm statistics in fp16/bf16, which are computed in fp32
(the numerically safe choice the reference implementations make too). A weight-standardised
conv's ``Ŵ`` depends on the weight alone, so it is computed in float64 (cheap) and cast to the
run dtype: the value the ONNX export stores and ``fold`` bakes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from normtool.graph import Graph, Op
from normtool.nn.ws_conv import standardize_weight

Fn = Callable[[Op, list[torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


def _low(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision activations for norm statistics."""
    return x.float() if _low(x) else x


def _channel_last(x: torch.Tensor) -> torch.Tensor:
    """Image activations [B,C,H,W] keep channels on axis 1; move them last for per-channel maths."""
    return x.movedim(1, -1) if x.dim() == 4 else x


def _channel_back(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.movedim(-1, 1) if like.dim() == 4 else y


def _per_channel(
    op_fn: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        return _channel_back(op_fn(_channel_last(x)), x)

    return run


def _layernorm(op: Op, xs, p):
    x = xs[0]
    y = F.layer_norm(_stat_dtype(x), (x.shape[-1],), eps=op.attrs["eps"]).to(x.dtype)
    if "weight" in p:
        y = y * p["weight"]
    if "bias" in p:
        y = y + p["bias"]
    return y


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _stat_dtype(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rmsnorm(op: Op, xs, p):
    y = _rms(xs[0], op.attrs["eps"])
    return y * p["weight"] if "weight" in p else y


def _crmsnorm(op: Op, xs, p):
    x = xs[0]
    xf = _stat_dtype(x)
    d = x.shape[-1] + 1
    ms = (xf.pow(2).sum(-1, keepdim=True) + xf.sum(-1, keepdim=True).pow(2)) / d
    y = (xf * torch.rsqrt(ms + op.attrs["eps"])).to(x.dtype)
    return y * p["weight"] if "weight" in p else y


def _group_rms(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    shape = x.shape
    g = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    return _rms(g, eps).reshape(shape)


def _group_rmsnorm(op: Op, xs, p):
    return _group_rms(xs[0], op.attrs["groups"], op.attrs["eps"])


def _scale_shift(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    def f(z: torch.Tensor) -> torch.Tensor:
        return z * s + t if t is not None else z * s

    return _per_channel(f)(x)


def _unorm(op: Op, xs, p):
    s = p["weight"] / torch.sqrt(p["running_var"].reshape(-1) + op.attrs["eps"])
    return _scale_shift(xs[0], s, p["bias"])


def _powernorm(op: Op, xs, p):
    x = _group_rms(xs[0], op.attrs["groups"], op.attrs["gs_eps"])
    s = p["weight"] / torch.sqrt(p["running_phi"].reshape(-1) + op.attrs["eps"])
    return _scale_shift(x, s, p["bias"])


def _batchnorm(op: Op, xs, p):
    s = p["weight"] / torch.sqrt(p["running_var"] + op.attrs["eps"])
    return _scale_shift(xs[0], s, p["bias"] - p["running_mean"] * s)


def _affine(op: Op, xs, p):
    return _scale_shift(xs[0], p["scale"], p.get("shift"))


def _conv2d(op: Op, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(
        x,
        w,
        b,
        stride=op.attrs.get("stride", 1),
        padding=op.attrs.get("padding", 0),
        dilation=op.attrs.get("dilation", 1),
        groups=op.attrs.get("groups", 1),
    )


def _ws_conv2d(op: Op, xs, p):
    w = p["weight"]
    ws = standardize_weight(w.double(), op.attrs["variant"], op.attrs["eps"]).to(w.dtype)
    return _conv2d(op, xs[0], ws, p.get("bias"))


ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def _attention(op: Op, xs, p):
    q, k, v = xs
    h = op.attrs["heads"]
    b, t, _ = q.shape
    dq, dv = q.shape[-1] // h, v.shape[-1] // h
    q = q.reshape(b, t, h, dq).transpose(1, 2)
    k = k.reshape(b, t, h, dq).transpose(1, 2)
    v = v.reshape(b, t, h, dv).transpose(1, 2)
    scale = op.attrs.get("scale") or 1.0 / math.sqrt(dq)
    scores = (q @ k.transpose(-1, -2)) * scale
    if op.attrs.get("causal"):
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    w = torch.softmax(_stat_dtype(scores), dim=-1).to(v.dtype)
    return (w @ v).transpose(1, 2).reshape(b, t, h * dv)


def _loki(op: Op, xs, p):
    probs = torch.softmax(_stat_dtype(xs[0]), dim=-1)
    risk = probs @ p["d2"].to(probs.dtype)
    # argmin of the risk; torch and ONNX ArgMax both return the first index on ties
    return torch.argmax(-risk, dim=-1)


OPS: dict[str, Fn] = {
    "embed": lambda op, xs, p: F.embedding(xs[0], p["weight"]),
    "positions": lambda op, xs, p: p["weight"][
        op.attrs.get("offset", 0) : op.attrs.get("offset", 0) + xs[0].shape[1]
    ].unsqueeze(0),
    "row": lambda op, xs, p: p["weight"][op.attrs.get("index", 0)].reshape(1, 1, -1),
    "patch_embed": lambda op, xs, p: (
        F.conv2d(xs[0], p["weight"], p["bias"], stride=op.attrs["patch"]).flatten(2).transpose(1, 2)
    ),
    "cls_concat": lambda op, xs, p: torch.cat(
        [p["token"].reshape(1, 1, -1).expand(xs[0].shape[0], 1, -1), xs[0]], dim=1
    ),
    "add": lambda op, xs, p: xs[0] + xs[1],
    "linear": lambda op, xs, p: F.linear(xs[0], p["weight"], p.get("bias")),
    "layernorm": _layernorm,
    "rmsnorm": _rmsnorm,
    "crmsnorm": _crmsnorm,
    "group_rmsnorm": _group_rmsnorm,
    "unorm": _unorm,
    "powernorm": _powernorm,
    "batchnorm": _batchnorm,
    "affine": _affine,
    "act": lambda op, xs, p: ACT_FNS[op.attrs["fn"]](xs[0]),
    "attention": _attention,
    "select": lambda op, xs, p: xs[0][:, op.attrs.get("index", 0)],
    "conv2d": lambda op, xs, p: _conv2d(op, xs[0], p["weight"], p.get("bias")),
    "ws_conv2d": _ws_conv2d,
    "maxpool2d": lambda op, xs, p: F.max_pool2d(
        xs[0], op.attrs["kernel"], op.attrs.get("stride"), op.attrs.get("padding", 0)
    ),
    "global_avgpool": lambda op, xs, p: xs[0].mean(dim=(2, 3)),
    "loki": _loki,
}


def run_graph(
    graph: Graph,
    weights: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Run ``graph`` on ``inputs``; returns ``{output name: tensor}``.

    ``weights`` maps graph tensor names to tensors (any dtype; cast to ``dtype`` here). Float
    inputs are cast to ``dtype``; integer inputs (token ids) are kept.
    """
    return run_graph_batches(graph, weights, [inputs], dtype, device)[0]


def run_graph_batches(
    graph: Graph,
    weights: Mapping[str, torch.Tensor],
    batches: Sequence[Mapping[str, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> list[dict[str, torch.Tensor]]:
    """``run_graph`` on several input batches (of any shapes) at once, op by op.

    Why: each op's parameters are fetched once for all batches. A transform's self-check runs
    a model whose rewritten tensors are computed when fetched; batch by batch, the whole
    rewrite would be recomputed for every batch.
    """

    def param(name: str) -> torch.Tensor:
        w = weights[name]
        return w.to(device=device, dtype=dtype) if w.is_floating_point() else w.to(device)

    envs: list[dict[str, torch.Tensor]] = [{} for _ in batches]
    for env, inputs in zip(envs, batches, strict=True):
        for spec in graph.inputs:
            x = inputs[spec.name].to(device)
            env[spec.name] = x.to(dtype) if x.is_floating_point() else x
    # Parameters are fetched per op and dropped after it, so a lazy ``weights`` mapping keeps
    # memory to one op's tensors plus activations; activations are freed after their last use.
    last_use = {v: i for i, op in enumerate(graph.ops) for v in op.inputs}
    keep = set(graph.outputs)
    with torch.no_grad():
        for i, op in enumerate(graph.ops):
            p = {role: param(t) for role, t in op.params.items()}
            for env in envs:
                env[op.output] = OPS[op.kind](op, [env[v] for v in op.inputs], p)
                for v in set(op.inputs):
                    if last_use[v] == i and v not in keep:
                        del env[v]
    return [{o: env[o] for o in graph.outputs} for env in envs]
