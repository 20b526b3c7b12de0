"""The torch executor: runs any Graph directly from its op table, in any float dtype.

Why an interpreter rather than generated modules: one small function per op kind (``_<kind>``,
bound to the kinds of ``normtool.opspec.SPECS`` on import) is the executable form of the op
table, so the semantics live in one place that verify, the transforms' self-checks and the tests
all share. Precision policy: every op computes
in the run dtype, except softmax and norm statistics in fp16/bf16, which are computed in fp32
(the numerically safe choice the reference implementations make too). A weight-standardised
conv's ``Ŵ`` depends on the weight alone, so it is computed in float64 (cheap) and cast to the
run dtype: the value the ONNX export stores and ``fold`` bakes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from normtool.graph import Graph, Op, rotary_dims
from normtool.inputs import complete_inputs
from normtool.nn.ws_conv import standardize_weight
from normtool.opspec import implementations
from normtool.rotary import inv_frequencies

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


def _layernorm2d(op: Op, xs, p):
    """``layernorm`` over the channel axis of a ``[B, C, H, W]`` map, each pixel on its own."""
    return _per_channel(lambda z: _layernorm(op, [z], p))(xs[0])


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _stat_dtype(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rmsnorm(op: Op, xs, p):
    """``offset``: Gemma stores γ − 1 and scales by ``1 + γ`` (the sum taken in the weight's
    dtype, as its reference does in fp32)."""
    y = _rms(xs[0], op.attrs["eps"])
    if "weight" not in p:
        return y
    offset = op.attrs.get("offset", 0.0)
    return y * (p["weight"] + offset) if offset else y * p["weight"]


def _head_rmsnorm(op: Op, xs, p):
    """Each head normalised by its own RMS, then scaled by one ``offset + γ`` shared by all."""
    x = xs[0]
    y = _rms(x.reshape(*x.shape[:-1], op.attrs["heads"], -1), op.attrs["eps"])
    if "weight" in p:
        y = y * (p["weight"] + op.attrs.get("offset", 0.0))
    return y.reshape(x.shape)


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


def _conv(op: Op, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
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
    return _conv(op, xs[0], ws, p.get("bias"))


ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "silu": F.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def attention_mask(t: int, causal: bool, window: int, device: torch.device) -> torch.Tensor | None:
    """``[t, t]`` True where query ``i`` may not see key ``j``: later keys when causal, and with
    a sliding ``window`` keys ``window`` or more positions back (Mistral's ``i − j < window``)."""
    i = torch.arange(t, device=device)
    gap = i[:, None] - i[None, :]
    hidden = gap < 0 if causal else torch.zeros(t, t, dtype=torch.bool, device=device)
    return hidden | (gap >= window) if window else (hidden if causal else None)


def hide_padding(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` ``[B, …, Tq, Tk]`` with the keys a padding ``mask`` ``[B, Tk]`` zeroes set to
    the dtype's lowest finite value: finite, so a query whose every key is hidden (a padded row
    under left padding and a causal mask) gets a uniform softmax instead of NaN, as in
    ``transformers``; any real score beats it by far, so visible keys get all the weight."""
    b, t = mask.shape
    hidden = (mask == 0).reshape(b, *[1] * (scores.dim() - 2), t)
    return scores.masked_fill(hidden, torch.finfo(scores.dtype).min)


def _attention(op: Op, xs, p):
    """Softmax attention over ``heads`` query heads; with ``kv_heads`` < ``heads`` (grouped-query
    attention) query head ``h`` reads key/value head ``h // (heads / kv_heads)``; a fourth
    input is the padding mask (``hide_padding``)."""
    q, k, v = xs[:3]
    h = op.attrs["heads"]
    g = op.attrs.get("kv_heads") or h
    b, t, _ = q.shape
    dq, dv = q.shape[-1] // h, v.shape[-1] // g
    # [B, G, H/G, T, D] queries against [B, G, 1, T, D] keys/values: broadcast, no copies
    q = q.reshape(b, t, g, h // g, dq).permute(0, 2, 3, 1, 4)
    k = k.reshape(b, t, g, 1, dq).permute(0, 2, 3, 1, 4)
    v = v.reshape(b, t, g, 1, dv).permute(0, 2, 3, 1, 4)
    scale = op.attrs.get("scale") or 1.0 / math.sqrt(dq)
    scores = (q @ k.transpose(-1, -2)) * scale
    if op.attrs.get("softcap"):
        scores = softcap(scores, op.attrs["softcap"])
    scores = _stat_dtype(scores)
    if len(xs) > 3:
        scores = hide_padding(scores, xs[3])
    mask = attention_mask(t, bool(op.attrs.get("causal")), op.attrs.get("window", 0), q.device)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    w = torch.softmax(scores, dim=-1).to(v.dtype)
    return (w @ v).permute(0, 3, 1, 2, 4).reshape(b, t, h * dv)


def _loki(op: Op, xs, p):
    probs = torch.softmax(_stat_dtype(xs[0]), dim=-1)
    risk = probs @ p["d2"].to(probs.dtype)
    # argmin of the risk; torch and ONNX ArgMax both return the first index on ties
    return torch.argmax(-risk, dim=-1)


def _embed(op: Op, xs, p):
    y = F.embedding(xs[0], p["weight"])
    return y * op.attrs["scale"] if op.attrs.get("scale") else y


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap · tanh(x / cap)``: smooth clipping to (−cap, cap) (Gemma 2's logits and scores)."""
    return torch.tanh(x / cap) * cap


def _softcap(op: Op, xs, p):
    return softcap(xs[0], op.attrs["cap"])


def _positions(op: Op, xs, p):
    offset = op.attrs.get("offset", 0)
    return p["weight"][offset : offset + xs[0].shape[1]].unsqueeze(0)


def _id_positions(op: Op, xs, p):
    """RoBERTa's positions: non-padding tokens count from ``pad + 1``, padding ones read row
    ``pad`` (``cumsum(ids ≠ pad) · (ids ≠ pad) + pad``)."""
    real = (xs[0] != op.attrs["pad"]).long()
    return F.embedding(torch.cumsum(real, dim=1) * real + op.attrs["pad"], p["weight"])


def _pick_token(op: Op, xs, p):
    """Each row's token at the first position of ``ids == eos`` (CLIP's EOS pooling); with
    ``eos`` < 0 the first position of the largest id (CLIP's configs with eos 2 do that)."""
    x, ids = xs
    key = ids if op.attrs["eos"] < 0 else (ids == op.attrs["eos"]).long()
    return x[torch.arange(x.shape[0], device=x.device), torch.argmax(key, dim=1)]


def _mask_positions(op: Op, xs, p):
    mask = xs[0]
    ids = (mask.cumsum(-1) * mask - 1) + op.attrs["offset"]
    return F.embedding(ids, p["weight"])


def _masked_mean(op: Op, xs, p):
    """In fp32 for half-precision activations: the 1e-9 floor is 0 in fp16."""
    x = _stat_dtype(xs[0])
    m = xs[1].to(x.dtype).unsqueeze(-1)
    return ((x * m).sum(1) / m.sum(1).clamp(min=1e-9)).to(xs[0].dtype)


def _l2norm(op: Op, xs, p):
    return F.normalize(_stat_dtype(xs[0]), p=2.0, dim=-1, eps=1e-12).to(xs[0].dtype)


def _row(op: Op, xs, p):
    return p["weight"][op.attrs.get("index", 0)].reshape(1, 1, -1)


def _patch_embed(op: Op, xs, p):
    y = F.conv2d(xs[0], p["weight"], p.get("bias"), stride=op.attrs["patch"])
    return y.flatten(2).transpose(1, 2)


def _cls_concat(op: Op, xs, p):
    return torch.cat([p["token"].reshape(1, 1, -1).expand(xs[0].shape[0], 1, -1), xs[0]], dim=1)


def _add(op: Op, xs, p):
    return xs[0] + xs[1]


def _mul(op: Op, xs, p):
    return xs[0] * xs[1]


def _mean(op: Op, xs, p):
    return (xs[0] + xs[1]) / 2


def _linear(op: Op, xs, p):
    return F.linear(xs[0], p["weight"], p.get("bias"))


def _act(op: Op, xs, p):
    return ACT_FNS[op.attrs["fn"]](xs[0])


def _select(op: Op, xs, p):
    return xs[0][:, op.attrs.get("index", 0)]


def _conv2d(op: Op, xs, p):
    return _conv(op, xs[0], p["weight"], p.get("bias"))


def _maxpool2d(op: Op, xs, p):
    a = op.attrs
    return F.max_pool2d(xs[0], a["kernel"], a.get("stride"), a.get("padding", 0))


def _global_avgpool(op: Op, xs, p):
    return xs[0].mean(dim=(2, 3))


def rotary_tables(
    seq: int,
    dims: int,
    base: float,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    scaling: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[seq, dims/2]`` of the angles ``t · θ_i`` (``normtool.rotary``).

    Why this precision: the frequencies are computed in float64 and rounded once, the angles in
    float32 (float64 for a float64 run) — the arithmetic the ONNX export repeats node by node,
    so both compute the same angles.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv = torch.tensor(inv_frequencies(dims, base, scaling), dtype=torch.float64)
    angles = torch.arange(seq, dtype=work, device=device)[:, None] * inv.to(work).to(device)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rope(op: Op, xs, p):
    """Each head's first ``dims`` channels as pairs (i, i + dims/2) rotated by position."""
    x = xs[0]
    b, t, c = x.shape
    heads = op.attrs["heads"]
    dims = rotary_dims(c // heads, op.attrs.get("fraction", 1.0))
    base = op.attrs.get("base", 10000.0)
    cos, sin = rotary_tables(t, dims, base, x.dtype, x.device, op.attrs.get("scaling"))
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    xh = x.reshape(b, t, heads, -1)
    x1, x2, rest = xh[..., : dims // 2], xh[..., dims // 2 : dims], xh[..., dims:]
    y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return y.reshape(b, t, c)


#: The torch function of every op kind (``normtool.opspec``: ``_<kind>`` above).
OPS: dict[str, Fn] = implementations(globals(), "torch function")


def run_graph(
    graph: Graph,
    weights: Mapping[str, torch.Tensor],
    inputs: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Run ``graph`` on ``inputs``; returns ``{output name: tensor}``.

    ``weights`` maps graph tensor names to tensors (any dtype; cast to ``dtype`` here). Float
    inputs are cast to ``dtype``; integer inputs (token ids) are kept. Optional inputs left
    out (a padding mask, position ids, token types) take ``normtool.inputs.DEFAULTS``.
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
    for env, given in zip(envs, batches, strict=True):
        inputs = complete_inputs(graph, given)
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
