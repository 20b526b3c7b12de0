"""The ONNX emitter: Graph + weights → ``onnx.ModelProto``, written node by node with onnx.helper.

Why not ``torch.onnx.export``: it chooses op forms and may silently lower the opset; here every op
kind has one small emitter (``_<kind>``, bound to ``normtool.opspec.SPECS`` on import), so the
forms ONNX Runtime runs fastest are chosen on purpose and nothing falls back silently.

Forms (all exact rewrites of the op table's semantics):
* layernorm → ``LayerNormalization`` (stash_type 1: statistics in fp32 even for fp16 activations);
  layernorm2d → the same between two ``Transpose`` (channels last, then back).
* rmsnorm → ``RMSNormalization`` at opset ≥ 23; below, ``Pow → ReduceMean → Add → Sqrt → Div →
  Mul(scale)``, the pattern ORT fuses into ``SimplifiedLayerNormalization`` (a weightless norm gets
  a ones scale so the pattern, and the fusion, stay complete).
* crmsnorm → ``x / sqrt((ReduceSumSquare(x) + ReduceSum(x)²) / (C+1) + eps) · γ``.
* group_rmsnorm / powernorm → Reshape to ``[..., G, C/G]``, RMS normalisation, per-channel affine
  in the grouped shape, Reshape back.
* unorm / batchnorm / affine → one ``Mul`` and one ``Add`` with the scale and shift precomputed in
  fp64 at export time (what remains of a per-channel affine at inference).
* ws_conv2d → ``Conv`` with the standardised weight precomputed in fp64 at export time (a constant
  at inference: a ReduceMean/Sub/Div subgraph on the initializer would only be constant-folded
  by ORT, in the export dtype rather than fp64).
* attention → ``MatMul → Mul(scale) → [Add causal mask] → Softmax → MatMul`` with Reshape/Transpose
  over heads (``attention="op"``: the opset-23 ``Attention`` node instead).
* target ``ort`` (the default): groups of ops ONNX Runtime has one kernel for are written as that
  contrib kernel (``com.microsoft`` Attention with packed q/k/v weights, SkipLayerNormalization /
  SkipSimplifiedLayerNormalization taking the residual add and a linear's bias, BiasGelu /
  FastGelu taking a linear's bias); ``normtool.runtime.onnx_fuse`` plans them. Target
  ``portable`` writes standard ONNX ops only, for any runtime.
* dynamic axes: Reshape uses 0-copy dims; positions and the causal mask are sliced / built from
  ``Shape`` of the running activation, so batch and sequence length stay free. An image input
  gets free ``height``/``width`` axes when every op reading its feature maps works at any size
  up to a global pooling (CNNs, ResNets); a patch embedding keeps them fixed (ViT: the position
  table holds one row per patch of the trained size). The stored signature keeps the concrete
  size, which verify and bench use.

fp16: weights and activations are fp16; norm statistics and softmax run in fp32 (``Cast`` around
them, or the op's own fp32 stash/precision), matching the torch executor's precision policy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from normtool import __version__
from normtool.analysis import size_free
from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec, Op, rotary_dims
from normtool.nn.ws_conv import standardize_weight
from normtool.opspec import SPECS, implementations
from normtool.rotary import inv_frequencies
from normtool.runtime.onnx_fuse import FusionPlan, plan_fusions
from normtool.runtime.onnx_kv import KvCache, mask_input

INPUTS_KEY = "normtool.inputs"
MS_DOMAIN = "com.microsoft"
TARGETS = ("ort", "portable")
MIN_OPSET, MAX_OPSET = 17, 23
DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
_NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_TORCH = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16}


@dataclass(frozen=True)
class EmitOptions:
    """How to emit. ``target``: ``ort`` (ONNX Runtime's fused contrib kernels where the graph
    allows; fastest there) or ``portable`` (standard ONNX ops only). ``attention`` (used where
    attention is not fused): ``decomposed`` (every provider runs it) or ``op`` (the opset-23
    ``Attention`` node; ORT's CUDA kernel rejects its fp32-softmax precision, so not the default;
    asking for it also keeps the ``ort`` target from fusing attention). ``kv_cache``: past
    keys/values in, present ones out (``normtool.runtime.onnx_kv``; decomposed attention)."""

    opset: int = MAX_OPSET
    dtype: str = "fp32"
    attention: str = "decomposed"
    target: str = "ort"
    kv_cache: bool = False

    def check(self) -> None:
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise NormtoolError(f"--opset {self.opset}: supported are {MIN_OPSET}..{MAX_OPSET}")
        if self.dtype not in DTYPES:
            raise NormtoolError(f"--dtype {self.dtype!r}: supported are {', '.join(DTYPES)}")
        if self.attention not in ("decomposed", "op"):
            raise NormtoolError(f"attention form {self.attention!r}: use decomposed or op")
        if self.attention == "op" and self.opset < 23:
            raise NormtoolError("the Attention op needs opset 23")
        if self.attention == "op" and self.kv_cache:
            raise NormtoolError("--kv-cache writes decomposed attention, not the Attention op")
        if self.target not in TARGETS:
            raise NormtoolError(f"export target {self.target!r}: use {' or '.join(TARGETS)}")


class _Emitter:
    """Accumulates nodes and initializers; helpers keep the per-kind emitters short."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor], opts: EmitOptions):
        self.graph = graph
        self.weights = weights
        self.opset = opts.opset
        self.opts = opts
        self.act = DTYPES[opts.dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.rank: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.derived: dict[tuple[str, str], str] = {}  # (what, input) → value made once from it
        self._used: set[str] = set()
        self._scope = "graph"
        self.tied = _tied_heads(graph, weights)
        ort = opts.target == "ort"
        fuse_attention = opts.attention == "decomposed" and not opts.kv_cache
        self.plan = plan_fusions(graph, fuse_attention) if ort else FusionPlan()
        self.kv: KvCache | None = None
        self.env: dict[str, str] = {}
        self.pending_bias: dict[str, str] = {}  # value → bias initializer a consumer absorbs
        self.used_ms = False

    def emit(self, op: Op) -> None:
        """Write ``op`` (at its own position, or on behalf of the op that fuses it)."""
        scope, self._scope = self._scope, op.name
        # a value not written yet is one a fused kernel computes inside (packed q/k/v)
        xs = [self.env.get(v, "") for v in op.inputs]
        out = EMITTERS[op.kind](self, op, xs, dict(op.params))
        if out not in self.rank:
            ranks = [self.rank[self.env[v]] for v in op.inputs]
            self.rank[out] = SPECS[op.kind].rank(ranks)
        self.env[op.output] = out
        self._scope = scope

    # ---- naming and nodes -------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        base = f"{self._scope}/{hint}"
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        out = self.fresh(hint or op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def contrib(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> list[str]:
        """A ``com.microsoft`` node; ``outputs``: a count, or which of the outputs to name."""
        want = [True] * outputs if isinstance(outputs, int) else outputs
        outs = [self.fresh(f"{op_type}_{i}") if w else "" for i, w in enumerate(want)]
        while outs and not outs[-1]:
            outs.pop()
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=outs[0], domain=MS_DOMAIN, **attrs)
        )
        self.used_ms = True
        return [o for o in outs if o]

    def take_bias(self, x: str) -> str | None:
        """The bias a producer left for this consumer to absorb (``None`` if there is none)."""
        return self.pending_bias.pop(x, None)

    def settle(self, x: str) -> str:
        """``x`` with any pending bias added (for a consumer that does not absorb it)."""
        bias = self.take_bias(x)
        return self.node("Add", [x, bias]) if bias else x

    # ---- constants and weights --------------------------------------------------------------
    def _init(self, name: str, array: np.ndarray) -> str:
        self.inits[name] = numpy_helper.from_array(np.array(array, order="C"), name)
        self._used.add(name)
        return name

    def const(self, values: Any, dtype: Any) -> str:
        """A small constant (shapes, axes, eps, …), shared between all its uses."""
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self._init(f"const/{len(self._consts)}", arr)
        return self._consts[key]

    def i64(self, values: Any) -> str:
        return self.const(values, np.int64)

    def scalar(self, value: float, stat: bool = False) -> str:
        """A float scalar in the activation dtype (or fp32 for the statistics chain)."""
        return self.const(value, np.float32 if stat else _NP[self.act])

    def weight(
        self,
        tensor: str,
        form: str = "",
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dtype: int | None = None,
    ) -> str:
        """Initializer for a graph tensor, optionally transformed by ``fn`` (applied in fp64).

        ``form`` names the transformed variant so each form is stored once, however many ops use
        it. Values that do not fit fp16 are refused instead of exported as inf.
        """
        name = f"{tensor}{'/' + form if form else ''}"
        if name in self.inits:
            return name
        w = self.weights[tensor].detach()
        if fn is not None:
            w = fn(w.double())
        return self._store(name, w, tensor, dtype)

    def packed(self, name: str, tensors: list[str], transpose: bool = False) -> str:
        """One initializer: graph tensors concatenated on axis 0, then optionally transposed
        (packed q/k/v weights ``[C, dq + dk + dv]`` and biases)."""
        if name in self.inits:
            return name
        w = torch.cat([self.weights[t].detach().double() for t in tensors], 0)
        return self._store(name, w.t() if transpose else w, name)

    def _store(self, name: str, w: torch.Tensor, what: str, dtype: int | None = None) -> str:
        target = dtype if dtype is not None else self.act
        if w.is_floating_point():
            cast = w.to(_TORCH[target])
            if target == TensorProto.FLOAT16 and bool((cast.isinf() & w.isfinite()).any()):
                raise NormtoolError(f"tensor {what!r} has values beyond the fp16 range")
            w = cast
        return self._init(name, w.cpu().numpy())

    def channel(
        self, tensor: str, form: str, fn: Callable[[torch.Tensor], torch.Tensor], rank: int
    ):
        """A per-channel vector shaped to broadcast on the channel axis (axis 1 of 4-D images)."""
        if rank == 4:
            return self.weight(tensor, f"{form}_chw", lambda w: fn(w).reshape(-1, 1, 1))
        return self.weight(tensor, form, fn)

    # ---- precision -----------------------------------------------------------------------
    @property
    def low(self) -> bool:
        return self.act == TensorProto.FLOAT16

    def to_stat(self, x: str) -> str:
        return self.node("Cast", [x], "to_fp32", to=TensorProto.FLOAT) if self.low else x

    def from_stat(self, x: str) -> str:
        return self.node("Cast", [x], "to_fp16", to=self.act) if self.low else x

    # ---- shared building blocks -------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int = 1) -> str:
        """Reduce* with axes as an input (opset ≥ 18, and ReduceSum from 13) or an attribute."""
        if self.opset >= 18 or op_type == "ReduceSum":
            return self.node(op_type, [x, self.i64(axes)], keepdims=keepdims)
        return self.node(op_type, [x], axes=axes, keepdims=keepdims)

    def rms(self, x: str, eps: float, scale: str) -> str:
        """``x / sqrt(mean(x², last axis) + eps) · scale`` in its fastest exact form."""
        if self.opset >= 23:
            return self.node("RMSNormalization", [x, scale], axis=-1, epsilon=eps, stash_type=1)
        xs = self.to_stat(x)
        ms = self.reduce("ReduceMean", self.node("Pow", [xs, self.scalar(2.0, stat=True)]), [-1])
        den = self.node("Sqrt", [self.node("Add", [ms, self.scalar(eps, stat=True)])])
        return self.node("Mul", [self.from_stat(self.node("Div", [xs, den])), scale])

    def ones(self, n: int) -> str:
        return self.const(np.ones(n), _NP[self.act])

    def grouped(self, x: str, groups: int, body: Callable[[str], str]) -> str:
        """Run ``body`` on ``x`` reshaped to ``[..., groups, C/groups]``, then reshape back."""
        if groups == 1:
            return body(x)
        lead = [0] * (self.rank[x] - 1)
        g = self.node("Reshape", [x, self.i64([*lead, groups, -1])], "group")
        return self.node("Reshape", [body(g), self.i64([*lead, -1])], "ungroup")


def _tied_heads(graph: Graph, weights: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Linear weights equal to an embedding table (a tied LM head) → that table's name.

    Such a head then reads the embedding's initializer through a Transpose (constant-folded by
    ORT) instead of storing the matrix twice; equality is checked, so sharing is always exact.
    """
    tables = [op.params["weight"] for op in graph.ops_of("embed")]
    tied = {}
    for op in graph.ops_of("linear"):
        w = op.params["weight"]
        for t in tables:
            same_shape = w != t and graph.tensors[w].shape == graph.tensors[t].shape
            if same_shape and torch.equal(weights[w], weights[t]):
                tied[w] = t
    return tied


# ---- emitters: one per op kind ------------------------------------------------------------
Emit = Callable[[_Emitter, Op, list[str], dict[str, str]], str]


def _embed(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    y = em.node("Gather", [em.weight(p["weight"]), xs[0]], axis=0)
    scale = op.attrs.get("scale")
    return em.node("Mul", [y, em.scalar(scale)], "scaled") if scale else y


def _softcap(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    return _capped(em, em.settle(xs[0]), float(op.attrs["cap"]))


def _capped(em: _Emitter, x: str, cap: float, stat: bool = False) -> str:
    """``cap · tanh(x / cap)`` (``stat``: on the fp32 statistics chain)."""
    t = em.node("Tanh", [em.node("Div", [x, em.scalar(cap, stat)])])
    return em.node("Mul", [t, em.scalar(cap, stat)], "softcap")


def _positions(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    table = em.weight(p["weight"], "1PC", lambda w: w.reshape(1, -1, w.shape[-1]))
    seq = em.node("Shape", [xs[0]], "seq", start=1, end=2)
    offset = int(op.attrs.get("offset", 0))
    start = em.i64([offset])
    if em.kv is not None:  # the tokens after the cached ones
        past = em.node("Unsqueeze", [em.kv.past_length(em), em.i64([0])])
        start = em.node("Add", [start, past])
    end = em.node("Add", [seq, start])
    return em.node("Slice", [table, start, end, em.i64([1])])


def _id_positions(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    pad = em.i64(int(op.attrs["pad"]))
    real = em.node("Cast", [em.node("Not", [em.node("Equal", [xs[0], pad])])], to=TensorProto.INT64)
    count = em.node("CumSum", [real, em.i64(1)])
    rows = em.node("Add", [em.node("Mul", [count, real]), pad])
    return em.node("Gather", [em.weight(p["weight"]), rows], axis=0)


def _pick_token(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    x, ids = xs
    eos = int(op.attrs["eos"])
    key = ids if eos < 0 else em.node("Equal", [ids, em.i64(eos)])
    # ArgMax on int32 (ORT has no int64 kernel); it returns the first maximum, as torch does
    at = em.node("ArgMax", [em.node("Cast", [key], to=TensorProto.INT32)], axis=1, keepdims=1)
    return em.node("GatherND", [x, at], batch_dims=1)


def _row(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    index = int(op.attrs.get("index", 0))
    return em.weight(p["weight"], f"row{index}", lambda w: w[index].reshape(1, 1, -1))


def _patch_embed(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    k = int(op.attrs["patch"])
    bias = [em.weight(p["bias"])] if "bias" in p else []
    conv = em.node(
        "Conv",
        [xs[0], em.weight(p["weight"]), *bias],
        kernel_shape=[k, k],
        strides=[k, k],
    )
    flat = em.node("Reshape", [conv, em.i64([0, 0, -1])])
    return em.node("Transpose", [flat], perm=[0, 2, 1])


def _cls_concat(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    token = em.weight(p["token"], "11C", lambda w: w.reshape(1, 1, -1))
    batch = em.node("Shape", [xs[0]], "batch", start=0, end=1)
    shape = em.node("Concat", [batch, em.i64([1, 1])], axis=0)
    return em.node("Concat", [em.node("Expand", [token, shape]), xs[0]], axis=1)


def _mean(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    return em.node("Div", [em.node("Add", xs), em.scalar(2.0)])


def _linear(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    w = p["weight"]
    bias = [em.weight(p["bias"])] if "bias" in p else []
    if em.rank[xs[0]] == 2:
        return em.node("Gemm", [xs[0], em.weight(w), *bias], transB=1)
    if w in em.tied:
        wt = em.node("Transpose", [em.weight(em.tied[w])], "head_T", perm=[1, 0])
    else:
        wt = em.weight(w, "T", lambda t: t.t())
    y = em.node("MatMul", [xs[0], wt])
    if bias and op.name in em.plan.bias_to and em.rank[xs[0]] == 3:
        em.pending_bias[y] = bias[0]  # absorbed by the skip norm / GELU kernel reading y
        return y
    return em.node("Add", [y, *bias]) if bias else y


def _mul(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    return em.node("Mul", [em.settle(xs[0]), em.settle(xs[1])])


def _add(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """A residual add; with the norm reading it (``ort`` target) one Skip*Normalization node."""
    norm = em.plan.skip_norm.get(op.name)
    if norm is not None and all(em.rank[x] == 3 for x in xs):
        return _skip_norm(em, op, norm, xs)
    y = em.node("Add", [em.settle(x) for x in xs])
    if norm is not None:  # ranks other than 3: the planned norm follows as its own node
        em.env[op.output], em.rank[y] = y, max(em.rank[x] for x in xs)
        em.emit(norm)
    return y


def _skip_norm(em: _Emitter, add: Op, norm: Op, xs: list[str]) -> str:
    """``norm(a + b [+ linear bias])`` and the sum itself (output 3) where anything reads it."""
    biased = [x for x in xs if x in em.pending_bias]
    x = biased[0] if biased else xs[0]
    skip = xs[1] if x == xs[0] else xs[0]
    bias = em.take_bias(x) or ""
    p = dict(norm.params)
    gamma = _norm_scale(em, norm)
    readers = [o for o in em.graph.consumers(add.output) if o.name != norm.name]
    need_sum = bool(readers) or add.output in em.graph.outputs
    eps = norm.attrs["eps"]
    if norm.kind == "layernorm":
        beta = em.weight(p["bias"]) if "bias" in p else ""
        ins = [x, skip, gamma, beta, bias]
        kernel = "SkipLayerNormalization"
    else:
        ins = [x, skip, gamma, bias]
        kernel = "SkipSimplifiedLayerNormalization"
    while not ins[-1]:
        ins.pop()
    outs = em.contrib(kernel, ins, [True, False, False, need_sum], epsilon=eps)
    em.env[norm.output], em.rank[outs[0]] = outs[0], 3
    # without readers the sum is not materialised; the add's value then names the norm output,
    # which nothing reads under the add's name
    return outs[-1]


def _width(em: _Emitter, op: Op) -> int:
    return em.graph.spaces[em.graph.value_spaces[op.inputs[0]]].size


def _layernorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    scale = _norm_scale(em, op)
    bias = [em.weight(p["bias"])] if "bias" in p else []
    return em.node(
        "LayerNormalization", [xs[0], scale, *bias], axis=-1, epsilon=op.attrs["eps"], stash_type=1
    )


def _layernorm2d(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """NCHW → NHWC, ``LayerNormalization`` over the last axis, back to NCHW (ONNX normalises
    over all axes from ``axis`` on, so the channels must come last)."""
    nhwc = em.node("Transpose", xs, perm=[0, 2, 3, 1])
    return em.node("Transpose", [_layernorm(em, op, [nhwc], p)], perm=[0, 3, 1, 2])


def _norm_scale(em: _Emitter, op: Op) -> str:
    """A norm's scale initializer: ``γ``, ``offset + γ`` (Gemma's RMSNorm), or ones."""
    p, offset = op.params, float(op.attrs.get("offset", 0.0))
    if "weight" not in p:
        return em.ones(_width(em, op))
    if offset:
        return em.weight(p["weight"], f"plus{offset:g}", lambda w: w + offset)
    return em.weight(p["weight"])


def _rmsnorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    return em.rms(xs[0], op.attrs["eps"], _norm_scale(em, op))


def _head_rmsnorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """Reshape to ``[B, T, H, D]``, the RMS form over the last axis, reshape back."""
    heads = int(op.attrs["heads"])
    scale = _norm_scale(em, op) if "weight" in p else em.ones(_width(em, op) // heads)
    return em.grouped(xs[0], heads, lambda g: em.rms(g, op.attrs["eps"], scale))


def _crmsnorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    xs32 = em.to_stat(xs[0])
    sq = em.reduce("ReduceSumSquare", xs32, [-1])
    s = em.reduce("ReduceSum", xs32, [-1])
    total = em.node("Add", [sq, em.node("Mul", [s, s])])
    ms = em.node("Div", [total, em.scalar(_width(em, op) + 1, stat=True)])
    den = em.node("Sqrt", [em.node("Add", [ms, em.scalar(op.attrs["eps"], stat=True)])])
    y = em.from_stat(em.node("Div", [xs32, den]))
    return em.node("Mul", [y, em.weight(p["weight"])]) if "weight" in p else y


def _group_rmsnorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    groups = int(op.attrs["groups"])
    ones = em.ones(_width(em, op) // groups)
    return em.grouped(xs[0], groups, lambda g: em.rms(g, op.attrs["eps"], ones))


def _affine_nodes(em: _Emitter, x: str, scale: str, shift: str | None) -> str:
    y = em.node("Mul", [x, scale])
    return em.node("Add", [y, shift]) if shift is not None else y


def _unorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    var = em.weights[p["running_var"]].double().reshape(-1)
    r = em.rank[xs[0]]
    s = em.channel(p["weight"], "unorm_s", lambda g: g / torch.sqrt(var + op.attrs["eps"]), r)
    return _affine_nodes(em, xs[0], s, em.channel(p["bias"], "", lambda b: b, r))


def _powernorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """Group-RMS then the per-channel affine, applied in the grouped shape (one Mul, one Add)."""
    groups = int(op.attrs["groups"])
    width = _width(em, op)
    phi = em.weights[p["running_phi"]].double().reshape(-1)

    def grouped(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(groups, width // groups) if groups > 1 else v

    s = em.weight(p["weight"], "pn_s", lambda g: grouped(g / torch.sqrt(phi + op.attrs["eps"])))
    t = em.weight(p["bias"], "pn_t", grouped)
    ones = em.ones(width // groups)
    return em.grouped(
        xs[0],
        groups,
        lambda g: _affine_nodes(em, em.rms(g, op.attrs["gs_eps"], ones), s, t),
    )


def _batchnorm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    inv_std = 1.0 / torch.sqrt(em.weights[p["running_var"]].double() + op.attrs["eps"])
    scale = em.weights[p["weight"]].double() * inv_std
    mean = em.weights[p["running_mean"]].double()
    r = em.rank[xs[0]]
    s = em.channel(p["weight"], "bn_s", lambda g: g * inv_std, r)
    t = em.channel(p["bias"], "bn_t", lambda b: b - mean * scale, r)
    return _affine_nodes(em, xs[0], s, t)


def _affine(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    r = em.rank[xs[0]]
    s = em.channel(p["scale"], "", lambda v: v, r)
    t = em.channel(p["shift"], "", lambda v: v, r) if "shift" in p else None
    return _affine_nodes(em, xs[0], s, t)


def _gelu_erf(em: _Emitter, x: str) -> str:
    """0.5·x·(1 + erf(x/√2)): the decomposition ORT fuses into its Gelu kernel below opset 20."""
    e = em.node("Erf", [em.node("Div", [x, em.scalar(math.sqrt(2.0))])])
    return em.node(
        "Mul", [em.node("Mul", [x, em.node("Add", [e, em.scalar(1.0)])]), em.scalar(0.5)]
    )


def _gelu_tanh(em: _Emitter, x: str) -> str:
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))): ORT's FastGelu pattern below opset 20."""
    cube = em.node("Mul", [em.node("Pow", [x, em.scalar(3.0)]), em.scalar(0.044715)])
    inner = em.node("Mul", [em.node("Add", [x, cube]), em.scalar(math.sqrt(2.0 / math.pi))])
    t = em.node("Add", [em.node("Tanh", [inner]), em.scalar(1.0)])
    return em.node("Mul", [em.node("Mul", [x, em.scalar(0.5)]), t])


def _act(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    fn, x = op.attrs["fn"], xs[0]
    bias = em.take_bias(x)
    if bias is not None:  # planned only for the GELUs (ort target)
        return em.contrib("FastGelu" if fn == "gelu_tanh" else "BiasGelu", [x, bias])[0]
    if fn in ("gelu", "gelu_tanh") and em.opset >= 20:
        return em.node("Gelu", [x], approximate="tanh" if fn == "gelu_tanh" else "none")
    if fn == "gelu":
        return _gelu_erf(em, x)
    if fn == "gelu_tanh":
        return _gelu_tanh(em, x)
    if fn == "silu":
        return em.node("Mul", [x, em.node("Sigmoid", [x])])
    if fn == "quick_gelu":
        return em.node("Mul", [x, em.node("Sigmoid", [em.node("Mul", [x, em.scalar(1.702)])])])
    if fn == "relu6":
        return em.node("Clip", [x, em.scalar(0.0), em.scalar(6.0)])
    op_type = {"relu": "Relu", "tanh": "Tanh"}.get(fn)
    if op_type is None:
        raise NormtoolError(f"op {op.name!r}: activation {fn!r} cannot be exported")
    return em.node(op_type, [x])


def _padding_bias(em: _Emitter, mask: str, rank: int, dtype: type = np.float32) -> str:
    """``[B, 1, …, 1, T]`` of ``rank`` dims in ``dtype``: 0 where the padding ``mask`` keeps a
    key, the dtype's lowest finite value where it hides one (the executor's ``hide_padding``);
    made once per mask, rank and dtype."""
    key = (f"padding_bias_{rank}_{np.dtype(dtype).name}", mask)
    if key not in em.derived:
        hidden = em.node("Equal", [mask, em.i64(0)], "padded")
        lowest = em.const(np.finfo(dtype).min, dtype)
        bias = em.node("Where", [hidden, lowest, em.const(0.0, dtype)], "padding_bias")
        axes = em.i64(list(range(1, rank - 1)))
        em.derived[key] = em.node("Unsqueeze", [bias, axes], "padding_bias")
    return em.derived[key]


def _mask_index(em: _Emitter, mask: str) -> str:
    """The padding mask as ``com.microsoft.Attention``'s int32 ``mask_index`` (made once)."""
    key = ("mask_index", mask)
    if key not in em.derived:
        em.derived[key] = em.node("Cast", [mask], "mask_index", to=TensorProto.INT32)
    return em.derived[key]


def _attention(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    heads = int(op.attrs["heads"])
    gs = em.graph.value_spaces
    dq = em.graph.spaces[gs[op.inputs[0]]].size // heads
    scale = float(op.attrs.get("scale") or 1.0 / math.sqrt(dq))
    causal = bool(op.attrs.get("causal"))
    padding = em.env[op.inputs[3]] if len(op.inputs) > 3 else None
    lin = em.plan.qkv.get(op.name)
    if lin is not None:
        src = em.env[lin[0].inputs[0]]
        if em.rank[src] == 3:
            return _packed_attention(em, op, lin, src, heads, scale, causal, padding)
        for linear in lin:  # not a [B, T, C] stream: the planned linears as their own nodes
            em.emit(linear)
        xs = [em.env[v] for v in op.inputs]
    xs = xs[:3]
    kv = int(op.attrs.get("kv_heads") or heads)
    cap = float(op.attrs.get("softcap") or 0.0)
    if em.kv is not None:
        return _cached_attention(em, op, xs, heads, kv, scale, cap, padding)
    mask = _score_mask(em, xs[0], causal, int(op.attrs.get("window", 0)))
    if em.opts.attention == "op":
        extra = {"softmax_precision": TensorProto.FLOAT} if em.low else {}
        extra.update({"softcap": cap} if cap else {})
        window = bool(op.attrs.get("window"))
        bias = [em.from_stat(mask)] if window and mask else []
        if padding:  # the op wants [.., q_seq, kv_seq]: [B, 1, 1, T] → [B, 1, T, T]
            seq = em.node("Shape", [xs[0]], "seq", start=1, end=2)
            rows = em.node("Concat", [em.i64([1, 1]), seq, em.i64([1])], axis=0)
            pad = em.node("Expand", [_padding_bias(em, padding, 4, _NP[em.act]), rows])
            bias = [em.node("Add", [pad, *bias])] if bias else [pad]
        return em.node(
            "Attention",
            [*xs, *bias],
            q_num_heads=heads,
            kv_num_heads=kv,
            is_causal=int(causal and not window),
            scale=scale,
            **extra,
        )
    if kv != heads:
        return _grouped_attention(em, xs, heads, kv, scale, mask, cap, padding)
    q, k, v = (em.node("Reshape", [x, em.i64([0, 0, heads, -1])], "heads") for x in xs)
    q = em.node("Transpose", [q], "q", perm=[0, 2, 1, 3])
    k = em.node("Transpose", [k], "kT", perm=[0, 2, 3, 1])
    v = em.node("Transpose", [v], "v", perm=[0, 2, 1, 3])
    y = _softmax_attention(em, q, k, v, scale, mask, cap, padding, 4)
    y = em.node("Transpose", [y], perm=[0, 2, 1, 3])
    return em.node("Reshape", [y, em.i64([0, 0, -1])])


def _grouped_attention(
    em: _Emitter,
    xs: list[str],
    heads: int,
    kv: int,
    scale: float,
    mask: str | None,
    cap: float,
    padding: str | None,
) -> str:
    """Grouped-query attention as broadcasting MatMuls: queries ``[B, G, H/G, T, D]`` against
    keys and values ``[B, G, 1, T, D]`` (no Expand copying each kv head H/G times)."""
    q = em.node("Reshape", [xs[0], em.i64([0, 0, kv, heads // kv, -1])], "heads")
    k, v = (em.node("Reshape", [x, em.i64([0, 0, kv, 1, -1])], "kv_heads") for x in xs[1:])
    q = em.node("Transpose", [q], "q", perm=[0, 2, 3, 1, 4])
    k = em.node("Transpose", [k], "kT", perm=[0, 2, 3, 4, 1])
    v = em.node("Transpose", [v], "v", perm=[0, 2, 3, 1, 4])
    y = _softmax_attention(em, q, k, v, scale, mask, cap, padding, 5)
    y = em.node("Transpose", [y], perm=[0, 3, 1, 2, 4])
    return em.node("Reshape", [y, em.i64([0, 0, -1])])


def _cached_attention(
    em: _Emitter,
    op: Op,
    xs: list[str],
    heads: int,
    kv: int,
    scale: float,
    cap: float,
    padding: str | None,
) -> str:
    """Attention over the cached keys and values with this call's appended (``onnx_kv``), in
    the grouped form (one group per query head when ``kv == heads``)."""
    assert em.kv is not None
    keys, values = em.kv.append(em, op, xs[1], xs[2], kv)  # [B, G, past + T, D]
    q = em.node("Reshape", [xs[0], em.i64([0, 0, kv, heads // kv, -1])], "heads")
    q = em.node("Transpose", [q], "q", perm=[0, 2, 3, 1, 4])
    k = em.node("Unsqueeze", [em.node("Transpose", [keys], perm=[0, 1, 3, 2]), em.i64([2])], "kT")
    v = em.node("Unsqueeze", [values, em.i64([2])], "v")
    past = em.kv.past_length(em)
    causal = bool(op.attrs.get("causal"))
    mask = _score_mask(em, xs[0], causal, int(op.attrs.get("window", 0)), (past, keys))
    y = _softmax_attention(em, q, k, v, scale, mask, cap, padding, 5)
    y = em.node("Transpose", [y], perm=[0, 3, 1, 2, 4])
    return em.node("Reshape", [y, em.i64([0, 0, -1])])


def _softmax_attention(
    em: _Emitter,
    q: str,
    k_t: str,
    v: str,
    scale: float,
    mask: str | None,
    cap: float,
    padding: str | None,
    rank: int,
) -> str:
    """``softmax(cap(q·kᵀ·scale) + mask + padding bias)·v`` over head-split operands of
    ``rank`` dims (softmax in fp32)."""
    scores = em.to_stat(em.node("Mul", [em.node("MatMul", [q, k_t]), em.scalar(scale)], "scores"))
    if cap:
        scores = _capped(em, scores, cap, stat=True)
    if padding is not None:
        scores = em.node("Add", [scores, _padding_bias(em, padding, rank)])
    if mask is not None:
        scores = em.node("Add", [scores, mask])
    w = em.from_stat(em.node("Softmax", [scores], axis=-1))
    return em.node("MatMul", [w, v])


def _score_mask(
    em: _Emitter, x: str, causal: bool, window: int, cached: tuple[str, str] | None = None
) -> str | None:
    """``[T, T]`` fp32 of 0 and −inf: −inf above the diagonal when ``causal``, and ``window`` or
    more positions below it with a sliding window; None when nothing is masked. ``cached``:
    (past length P as a 0-D int64, keys ``[B, G, P + T, D]``): the mask is ``[T, P + T]`` with
    query ``i`` at position ``P + i``, so its diagonals move right by P."""
    if not causal and not window:
        return None
    seq = em.node("Shape", [x], "seq", start=1, end=2)
    keys = em.node("Shape", [cached[1]], "keys", start=2, end=3) if cached else seq
    square = em.node("Concat", [seq, keys], axis=0)
    neg = helper.make_tensor("neg_inf", TensorProto.FLOAT, [1], [-math.inf])
    full = em.node("ConstantOfShape", [square], value=neg)

    def diagonal(k: int) -> str:
        return em.node("Add", [cached[0], em.i64(k)]) if cached else em.i64(k)

    parts = [em.node("Trilu", [full, diagonal(1)], "causal_mask", upper=1)] if causal else []
    if window:
        parts.append(em.node("Trilu", [full, diagonal(-window)], "window_mask", upper=0))
    return parts[0] if len(parts) == 1 else em.node("Add", parts, "mask")


def _packed_attention(
    em: _Emitter,
    op: Op,
    lin: tuple[Op, ...],
    src: str,
    heads: int,
    scale: float,
    causal: bool,
    mask: str | None,
) -> str:
    """``com.microsoft.Attention``: q/k/v weights packed as ``[C, dq + dk + dv]`` (one GEMM),
    ``unidirectional`` for the causal mask, the padding mask as its 2-D ``mask_index`` (1 keep,
    0 hide). Hidden scores get -10000 before the softmax, whose exp underflows to exactly 0 in
    fp32 and fp16 alike beside any visible score; a padded query with every key hidden gets
    finite values, as in the executor."""
    sizes = [em.graph.tensors[o.params["weight"]].shape[0] for o in lin]
    w = em.packed(f"{op.name}/qkv_weight", [o.params["weight"] for o in lin], transpose=True)
    if "bias" in lin[0].params:
        b = em.packed(f"{op.name}/qkv_bias", [o.params["bias"] for o in lin])
    else:
        b = em.const(np.zeros(sum(sizes)), _NP[em.act])
    extra = {"qkv_hidden_sizes": sizes} if sizes[2] != sizes[0] else {}
    out = em.contrib(
        "Attention",
        [src, w, b, *([_mask_index(em, mask)] if mask else [])],
        num_heads=heads,
        unidirectional=int(causal),
        scale=scale,
        **extra,
    )[0]
    em.rank[out] = 3
    return out


def _select(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    return em.node("Gather", [xs[0], em.i64(int(op.attrs.get("index", 0)))], axis=1)


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int | float) else [int(a) for a in v]


def _pads(padding: Any, kernel: list[int], dilation: list[int]) -> list[int]:
    """ONNX pads ``[top, left, bottom, right]`` for torch's int, pair, 'valid' or 'same'."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    ph, pw = _pair(padding)
    return [ph, pw, ph, pw]


def _conv2d(
    em: _Emitter, op: Op, xs: list[str], p: dict[str, str], weight: str | None = None
) -> str:
    kernel = list(em.graph.tensors[p["weight"]].shape[2:])
    dilation = _pair(op.attrs.get("dilation", 1))
    bias = [em.weight(p["bias"])] if "bias" in p else []
    return em.node(
        "Conv",
        [xs[0], weight or em.weight(p["weight"]), *bias],
        kernel_shape=kernel,
        strides=_pair(op.attrs.get("stride", 1)),
        pads=_pads(op.attrs.get("padding", 0), kernel, dilation),
        dilations=dilation,
        group=int(op.attrs.get("groups", 1)),
    )


def _ws_conv2d(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    variant, eps = op.attrs["variant"], op.attrs["eps"]
    form = f"ws_{variant}_{eps:g}"
    w = em.weight(p["weight"], form, lambda w: standardize_weight(w, variant, eps))
    return _conv2d(em, op, xs, p, w)


def _maxpool2d(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    kernel = _pair(op.attrs["kernel"])
    stride = op.attrs.get("stride")
    return em.node(
        "MaxPool",
        xs,
        kernel_shape=kernel,
        strides=_pair(stride) if stride else kernel,
        pads=_pads(op.attrs.get("padding", 0), kernel, [1, 1]),
    )


def _global_avgpool(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    return em.node("Flatten", [em.node("GlobalAveragePool", xs)], axis=1)


def _masked_mean(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """Σ_t m·x / max(Σ_t m, 1e-9), in fp32 for fp16 activations (1e-9 is 0 in fp16)."""
    m = em.node("Cast", [xs[1]], "mask", to=TensorProto.FLOAT)
    m = em.node("Unsqueeze", [m, em.i64([-1])])
    total = em.reduce("ReduceSum", em.node("Mul", [em.to_stat(xs[0]), m]), [1], keepdims=0)
    count = em.reduce("ReduceSum", m, [1], keepdims=0)
    mean = em.node("Div", [total, em.node("Max", [count, em.scalar(1e-9, stat=True)])])
    return em.from_stat(mean)


def _l2norm(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """x / max(‖x‖₂, 1e-12) over the last axis (``torch.nn.functional.normalize``), in fp32
    for fp16 activations."""
    x = em.to_stat(xs[0])
    norm = em.reduce("ReduceL2", x, [-1])
    return em.from_stat(em.node("Div", [x, em.node("Max", [norm, em.scalar(1e-12, stat=True)])]))


def _mask_positions(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """weight[offset + cumsum(mask)·mask − 1]: positions counted over the unpadded tokens."""
    count = em.node("CumSum", [xs[0], em.i64(1)])
    ids = em.node("Mul", [count, xs[0]])
    ids = em.node("Add", [ids, em.i64(int(op.attrs["offset"]) - 1)])
    return em.node("Gather", [em.weight(p["weight"]), ids], axis=0)


def _loki(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """argmin_y Σ p_i d²(y, i): Softmax → MatMul(D²) → ArgMin, in fp32 (first index on ties,
    as torch's argmax of the negated risk)."""
    probs = em.node("Softmax", [em.to_stat(xs[0])], axis=-1)
    risk = em.node("MatMul", [probs, em.weight(p["d2"], dtype=TensorProto.FLOAT)])
    return em.node("ArgMin", [risk], "prediction", axis=-1, keepdims=0, select_last_index=0)


def _rope(em: _Emitter, op: Op, xs: list[str], p: dict[str, str]) -> str:
    """Rotary embedding: at opset 23 the ``RotaryEmbedding`` node, below it the rotation written
    out (``x1·cos − x2·sin``, ``x2·cos + x1·sin`` on each head's rotary halves). Both read
    cos/sin tables computed from the running sequence length as the executor computes them
    (``torch_exec.rotary_tables``: frequencies of ``normtool.rotary`` rounded once from fp64,
    angles in fp32)."""
    heads = int(op.attrs["heads"])
    dims = rotary_dims(_width(em, op) // heads, op.attrs.get("fraction", 1.0))
    base = float(op.attrs.get("base", 10000.0))
    inv = np.array(inv_frequencies(dims, base, op.attrs.get("scaling")), dtype=np.float64)
    seq = em.node("Squeeze", [em.node("Shape", [xs[0]], "seq", start=1, end=2), em.i64([0])])
    steps = (
        em.kv.position_ids
        if em.kv is not None  # [B, T]: tables per batch row
        else em.node("Range", [em.i64(0), seq, em.i64(1)], "positions")
    )
    pos = em.node("Cast", [steps], to=TensorProto.FLOAT)
    angles = em.node("Mul", [em.node("Unsqueeze", [pos, em.i64([-1])]), em.const(inv, np.float32)])
    cos = em.from_stat(em.node("Cos", [angles]))
    sin = em.from_stat(em.node("Sin", [angles]))
    if em.opset >= 23 and em.kv is not None:  # [B, T, dims/2] tables need no position ids
        return em.node(
            "RotaryEmbedding", [xs[0], cos, sin], num_heads=heads, rotary_embedding_dim=dims
        )
    if em.opset >= 23:
        batch = em.node("Shape", [xs[0]], "batch", start=0, end=1)
        shape = em.node("Concat", [batch, em.node("Unsqueeze", [seq, em.i64([0])])], axis=0)
        ids = em.node("Expand", [em.node("Unsqueeze", [steps, em.i64([0])]), shape])
        return em.node(
            "RotaryEmbedding",
            [xs[0], cos, sin, ids],
            num_heads=heads,
            rotary_embedding_dim=dims,
            interleaved=0,
        )
    cos, sin = (em.node("Unsqueeze", [t, em.i64([-2])]) for t in (cos, sin))  # [.., T, 1, dims/2]
    x = em.node("Reshape", [xs[0], em.i64([0, 0, heads, -1])], "heads")
    half = dims // 2

    def part(start: int, end: int) -> str:
        return em.node("Slice", [x, em.i64([start]), em.i64([end]), em.i64([-1])])

    x1, x2, rest = part(0, half), part(half, dims), part(dims, 2**62)
    y1 = em.node("Sub", [em.node("Mul", [x1, cos]), em.node("Mul", [x2, sin])])
    y2 = em.node("Add", [em.node("Mul", [x2, cos]), em.node("Mul", [x1, sin])])
    y = em.node("Concat", [y1, y2, rest], axis=-1)
    return em.node("Reshape", [y, em.i64([0, 0, -1])])


#: The ONNX emitter of every op kind (``normtool.opspec``: ``_<kind>`` above).
EMITTERS: dict[str, Emit] = implementations(globals(), "ONNX emitter")


# ---- the model ----------------------------------------------------------------------------
#: Input kinds fed as int64 (ids, masks, positions); the others are floats.
INTEGER_INPUTS = frozenset({"tokens", "mask", "positions", "types"})


def _input_type(spec: InputSpec, act: int) -> int:
    return TensorProto.INT64 if spec.kind in INTEGER_INPUTS else act


def _input_dims(graph: Graph, spec: InputSpec) -> list[int | str]:
    """The ONNX input's dims: named axes stay symbolic, H and W too where the model allows."""
    dims: list[int | str] = [d if isinstance(d, str) else int(d) for d in spec.shape]
    if size_free(graph, spec):
        dims[2:] = ["height", "width"]
    return dims


def _output_dims(graph: Graph, value: str, rank: int) -> list[int | str | None]:
    """``[batch, ?, …, channels]``: the batch axis named, the channel width where known."""
    dims: list[int | str | None] = [None] * rank
    dims[0] = "batch"
    space = graph.spaces.get(graph.value_spaces.get(value, ""))
    if rank > 1 and space is not None:
        dims[-1] = space.size
    return dims


def _rename(em: _Emitter, old: str, new: str) -> None:
    """Give value ``old`` the name ``new`` everywhere (moving any other holder of ``new`` aside)."""
    if new in em._used and new != old:
        _rename(em, new, em.fresh(new))
    for n in em.nodes:
        for seq in (n.input, n.output):
            for i, s in enumerate(seq):
                if s == old:
                    seq[i] = new
    em._used.add(new)


def emit_onnx(
    graph: Graph, weights: Mapping[str, torch.Tensor], opts: EmitOptions | None = None
) -> onnx.ModelProto:
    """Emit ``graph`` with ``weights`` as an ONNX model (not yet checked or written)."""
    opts = opts or EmitOptions()
    opts.check()
    em = _Emitter(graph, weights, opts)
    env: dict[str, str] = {}
    inputs = []
    for spec in graph.inputs:
        dims = (opts.kv_cache and mask_input(spec)) or _input_dims(graph, spec)
        inputs.append(helper.make_tensor_value_info(spec.name, _input_type(spec, em.act), dims))
        env[spec.name] = spec.name
        em.rank[spec.name] = len(dims)
        em._used.add(spec.name)
    em.env = env
    if opts.kv_cache:
        em.kv = KvCache.start(em, graph)
    deferred = em.plan.deferred
    for op in graph.ops:
        if op.name not in deferred:
            em.emit(op)
    produced = {o for n in em.nodes for o in n.output}
    outputs = []
    for v, name in graph.output_names().items():
        src = env[v]
        if src in produced:
            _rename(em, src, name)
        else:  # an output that is an initializer or an input needs a node to carry its name
            em.nodes.append(helper.make_node("Identity", [src], [name], name=name))
        kind = next((o.kind for o in graph.ops if o.output == v), None)
        elem = TensorProto.INT64 if kind == "loki" else em.act
        outputs.append(
            helper.make_tensor_value_info(name, elem, _output_dims(graph, v, em.rank[src]))
        )
    if em.kv is not None:
        inputs += em.kv.inputs
        for src, name, info in em.kv.outputs:
            _rename(em, src, name)
            outputs.append(info)
    onnx_graph = helper.make_graph(
        em.nodes, f"normtool_{graph.family}", inputs, outputs, list(em.inits.values())
    )
    opset = [helper.make_opsetid("", opts.opset)]
    ms = [helper.make_opsetid(MS_DOMAIN, 1)] if em.used_ms else []
    model = helper.make_model(onnx_graph, opset_imports=opset + ms, producer_name="normtool")
    model.producer_version = __version__
    model.ir_version = helper.find_min_ir_version_for(opset)
    signature = [{**asdict(s), "shape": list(s.shape)} for s in graph.inputs]
    helper.set_model_props(
        model,
        {
            INPUTS_KEY: json.dumps(signature),
            "normtool.family": graph.family,
            "normtool.dtype": opts.dtype,
        },
    )
    return model


def input_signature(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph input signature stored by ``emit_onnx`` (for valid random inputs)."""
    props = {p.key: p.value for p in model.metadata_props}
    if INPUTS_KEY not in props:
        raise NormtoolError(f"ONNX model has no {INPUTS_KEY} metadata (not a normtool export)")
    return [InputSpec(**{**s, "shape": tuple(s["shape"])}) for s in json.loads(props[INPUTS_KEY])]
