"""The model graph: one typed description of a network that every transform, executor and
exporter shares.

Why a graph of our own rather than an ``nn.Module`` or an FX trace: the transforms act on
*spaces* (the residual stream, an MLP hidden layer, a head's q/k dims), not on modules. Every
tensor axis here is labelled with the space it lives in, so "all writers of the residual
stream", "every (tensor, axis) that one permutation moves" or "the consumers of this norm" are
simple queries instead of per-architecture code (DESIGN §2).

Conventions
-----------
* Activations of token models are ``[batch, seq, channels]``; of image models ``[B, C, H, W]``;
  of feature models ``[batch, features]``. ``Graph.value_spaces`` names the space of the
  *channel* axis of every value (last axis, or axis 1 for 4-D image activations).
* ``linear`` weights are ``(out, in)`` like ``nn.Linear``; conv weights are ``(out, in/groups, kh, kw)``.
* Tensors are canonical graph names (``layers.3.q.weight``); ``TensorSpec.source`` says where
  each lives in the checkpoint (key, optional slice, optional transpose), so fused or
  transposed storage such as GPT-2's ``c_attn`` is read as views and can be written back
  re-assembled.

Op kinds (inputs → output; params; attrs) — each one row of ``normtool.opspec.SPECS``
-----------------------------------------------------------------------------------------
=================  ===========================  =====================================================
kind               params                       semantics
=================  ===========================  =====================================================
embed              weight[V, C]                 ids[B,T] → weight[ids]·scale (scale 1; Gemma: √C)
positions          weight[P, C]                 x[B,T,·] → weight[offset : offset+T] (broadcast [1,T,C])
id_positions       weight[P, C]                 ids[B,T] → weight[cumsum(ids≠pad)·(ids≠pad) + pad] (RoBERTa:
                                                non-padding tokens count from pad+1; attr pad)
row                weight[R, C]                 x → weight[index] as [1,1,C] (BERT token type 0)
patch_embed        weight[C,Cin,p,p], bias?[C]   pixels[B,Cin,H,W] → conv stride p, flatten → [B,N,C]
cls_concat         token[C]                     x[B,N,C] → [token; x] → [B,N+1,C]
add                —                            a + b (broadcasting)
mul                —                            a ⊙ b (gated MLPs: act(gate(x)) ⊙ up(x))
mean               —                            (a + b) / 2 (DeiT's class and distillation heads)
linear             weight[O,I], bias?[O]        x @ Wᵀ + b
layernorm          weight?[C], bias?[C]         (x−μ)/√(σ²+eps)·γ+β over the channel axis
layernorm2d        weight?[C], bias?[C]         layernorm over the channels of each pixel of a
                                                [B,C,H,W] map (timm's LayerNorm2d)
rmsnorm            weight?[C]                   x/√(mean(x²)+eps)·(offset+γ)  (offset 0; Gemma
                                                stores γ−1: offset 1)
crmsnorm           weight?[C]                   x/√((Σx²+(Σx)²)/(C+1)+eps)·γ  (Jiang et al. 2023)
group_rmsnorm      —                            x split in ``groups`` channel groups, each / its RMS (eps)
unorm              weight, bias, running_var    γ·x/√(running_var+eps)+β  (UN inference)
powernorm          weight, bias, running_phi    γ·GS(x)/√(running_phi+eps)+β, GS = group_rmsnorm
batchnorm          weight, bias, running_mean,  (x−m)/√(v+eps)·γ+β on the channel axis
                   running_var
affine             scale[C], shift?[C]          x·s + t on the channel axis
act                —                            fn ∈ relu|relu6|gelu|gelu_tanh|tanh|silu|quick_gelu
attention          —                            (q,k,v)[B,T,H·D] → softmax(q kᵀ·scale [+causal]) v;
                                                ``kv_heads`` G < H: k, v are [B,T,G·D] and query
                                                head h reads kv head h // (H/G) (grouped-query);
                                                ``window`` W: a query sees keys < W positions back;
                                                ``softcap`` c: scores → c·tanh(scores/c) first; an
                                                optional 4th input, a padding mask [B,T] (1 keep,
                                                0 pad), hides padded keys (their scores get the
                                                score dtype's lowest finite value, so a row with
                                                every key hidden stays finite, as in transformers)
softcap            —                            x → cap·tanh(x / cap)  (Gemma 2's final logits)
head_rmsnorm       weight?[D]                   x[B,T,H·D]: each of the ``heads`` heads / its RMS
                                                (eps), · (offset+γ) (Gemma 3's q/k norms)
mask_positions     weight[P, C]                 mask[B,T] → weight[offset + cumsum(mask)·mask − 1]
                                                (OPT's positions counted over the unpadded tokens)
masked_mean        —                            (x[B,T,C], mask[B,T]) → Σ_t m·x / max(Σ_t m, 1e-9)
                                                (sentence-transformers' mean pooling)
l2norm             —                            x / max(‖x‖₂, 1e-12) on the channel axis
select             —                            x[B,T,C] → x[:, index]  ([B,C]); index below the
                                                count of tokens ``cls_concat`` ops prepend
pick_token         —                            (x[B,T,C], ids[B,T]) → x at each row's first
                                                ids == eos (eos < 0: first largest id; CLIP)
conv2d             weight, bias?                stride, padding, groups, dilation
ws_conv2d          weight, bias?                conv2d with the standardised weight Ŵ (per output
                                                row; attrs eps, variant var|std: normtool.nn.ws_conv)
maxpool2d          —                            kernel, stride, padding
global_avgpool     —                            [B,C,H,W] → [B,C]
loki               d2[K,N]                      logits[B,K] → argmin_y Σ p_i d²(y,i)  (int64 [B])
rope               —                            x[B,T,H·D] → each head's first ``fraction``·D dims
                                                rotated by position (angles t·base^(−2i/r),
                                                halves paired as in GPT-NeoX/Llama; attrs heads,
                                                fraction 1.0, base 10000, ``scaling``:
                                                ``normtool.rotary``)
=================  ===========================  =====================================================
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass, replace
from typing import Any

from normtool.errors import NormtoolError
from normtool.opspec import SPECS
from normtool.rotary import scaling_problem

#: Space kinds. ``input``/``output``/``fixed`` spaces are never permuted by merge.
SPACE_KINDS = frozenset(
    {"resid", "hidden", "heads_qk", "heads_vo", "channels", "input", "output", "fixed"}
)

ACTIVATIONS = frozenset({"relu", "relu6", "gelu", "gelu_tanh", "tanh", "silu", "quick_gelu"})

#: Outputs of base models (no head), named as transformers names them (CLIP's projected
#: towers: ``image_embeds``, ``text_embeds``), and a pooled sentence embedding
#: (``normtool.outputs``), named as sentence-transformers names it.
BASE_OUTPUTS = frozenset(
    {"last_hidden_state", "pooler_output", "image_embeds", "text_embeds", "sentence_embedding"}
)

#: Tensor dtypes a graph's ops compute with (safetensors names): every op needs float weights.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

#: ``tokens``: int64 ids below ``vocab``; ``pixels``/``features``: floats; the optional token
#: inputs (``normtool.inputs.DEFAULTS`` fills them when not given): ``mask`` (attention_mask, 1
#: keep / 0 padding), ``positions`` (position_ids below ``max_len``), ``types``
#: (token_type_ids below ``vocab``).
INPUT_KINDS = frozenset({"tokens", "pixels", "features", "mask", "positions", "types"})


def sliced_size(size: int, sl: tuple[int, ...]) -> int | None:
    """The length an axis of ``size`` has after a ``Source`` slice ``(axis, start, stop
    [, period])`` (None: the slice does not fit the axis)."""
    _, start, stop, *rest = sl
    period = rest[0] if rest else size
    if len(rest) > 1 or period < 1 or size % period or not 0 <= start <= stop <= period:
        return None
    return size // period * (stop - start)


def rotary_dims(head_dim: int, fraction: float) -> int:
    """Dims of each head a ``rope`` op rotates (GPT-NeoX's ``int(head_size * rotary_pct)``)."""
    return int(head_dim * fraction)


def _is_int(x: object) -> bool:
    return type(x) is int


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _positive_finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class Space:
    """A vector space that activations and tensor axes live in; merge permutes each one."""

    name: str
    size: int
    kind: str
    heads: int = 0  # heads_qk / heads_vo: number of heads; size = heads * head_dim


@dataclass(frozen=True)
class Source:
    """Where a graph tensor is stored: ``key`` in the checkpoint, optionally a slice
    ``(axis, start, stop)`` of the stored tensor — or ``(axis, start, stop, period)``: entries
    ``start:stop`` of every block of ``period`` along the axis (GPT-NeoX stores q, k, v
    interleaved head by head) —, then optionally transposed (2-D), then
    optionally reshaped (same element count: e.g. ViT's stored ``[1, P, d]`` position table read
    as the canonical ``[P, d]``)."""

    key: str
    slice: tuple[int, ...] | None = None
    transpose: bool = False
    reshape: tuple[int, ...] | None = None


@dataclass
class TensorSpec:
    """A parameter tensor of the graph, with the space of each axis (``None``: not permutable)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    source: Source
    dtype: str = "F32"  # safetensors dtype name: F32, F16, BF16, F64


@dataclass
class Op:
    name: str
    kind: str
    inputs: tuple[str, ...]
    output: str
    params: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class InputSpec:
    """A graph input. ``kind``: ``tokens`` (int64 ids), ``pixels`` or ``features`` (float).
    ``shape`` uses ``"batch"`` and ``"seq"`` for dynamic dims."""

    name: str
    kind: str
    shape: tuple[int | str, ...]
    vocab: int = 0
    max_len: int = 0


@dataclass
class Graph:
    family: str
    inputs: list[InputSpec]
    outputs: list[str]
    ops: list[Op]
    spaces: dict[str, Space]
    tensors: dict[str, TensorSpec]
    value_spaces: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    # Index of the ops by name, output and input values: built on first use and rebuilt when
    # ``ops`` is replaced or changes length. Edits through the methods below keep it; an op's
    # ``inputs``/``output`` changed in place by hand need ``reindex()``. Not a dataclass field
    # (no annotation): not serialised, compared or copied.
    _index = None

    # ---- queries -------------------------------------------------------------------------
    def _idx(self) -> _Index:
        if self._index is None or not self._index.fits(self.ops):
            self._index = _Index(self.ops)
        return self._index

    def reindex(self) -> None:
        """Rebuild the producer/consumer index (after editing op inputs or outputs by hand)."""
        self._index = None

    def op(self, name: str) -> Op:
        return self._idx().by_name[name]

    def producer(self, value: str) -> Op | None:
        """The op that writes ``value`` (``None`` for graph inputs)."""
        return self._idx().producer.get(value)

    def consumers(self, value: str) -> list[Op]:
        """The ops reading ``value``, each once, in graph order."""
        return list(self._idx().consumers.get(value, ()))

    # ---- edits ---------------------------------------------------------------------------
    def replace_uses(self, old: str, new: str) -> None:
        """Every op input and graph output that is value ``old`` becomes ``new``."""
        idx = self._idx()
        for o in idx.consumers.pop(old, []):
            o.inputs = tuple(new if v == old else v for v in o.inputs)
            readers = idx.consumers.setdefault(new, [])
            if o not in readers:
                readers.append(o)
                readers.sort(key=idx.position)
        self.outputs = [new if v == old else v for v in self.outputs]

    def remove_op(self, name: str, keep: str = "input") -> None:
        """Remove one-input op ``name``, its value flowing on under one name.

        ``keep="input"``: its readers (and graph outputs) read its input instead.
        ``keep="output"``: the op writing its input, which nothing else reads, now writes its
        output (a layer taking over the value of a norm folded into it; names stay stable).
        """
        idx = self._idx()
        op = idx.by_name[name]
        if len(op.inputs) != 1:
            raise ValueError(f"op {name!r} has {len(op.inputs)} inputs; only one can be bypassed")
        src = op.inputs[0]
        self.ops.remove(op)
        self._index = None
        if keep == "input":
            self.replace_uses(op.output, src)
            self.value_spaces.pop(op.output, None)
            return
        prod = self.producer(src)
        if prod is None or self.consumers(src) or src in self.outputs:
            raise ValueError(f"op {name!r}: its input {src!r} is not written for it alone")
        prod.output = op.output
        self.value_spaces.pop(src, None)
        self._index = None

    def prune(self) -> None:
        """Drop what nothing refers to any more: tensors no op uses, value spaces of values no
        longer computed, spaces that label no tensor axis and no value."""
        used = {t for o in self.ops for t in o.params.values()}
        self.tensors = {k: v for k, v in self.tensors.items() if k in used}
        values = {i.name for i in self.inputs} | {o.output for o in self.ops}
        self.value_spaces = {v: s for v, s in self.value_spaces.items() if v in values}
        spaces = set(self.value_spaces.values())
        spaces.update(a for t in self.tensors.values() for a in t.axes if a is not None)
        self.spaces = {k: v for k, v in self.spaces.items() if k in spaces}

    def forget_hidden(self, why: str) -> None:
        """Record that this graph's values no longer hold the hidden states of the model it was
        built from (``why``: the rewrite that changed them); ``normtool.outputs`` then refuses
        to export them. Hidden states that are graph outputs (a base model's) stay recorded:
        every rewrite keeps the graph's outputs."""
        kept = [self.info.get(k) for k in ("hidden", "pooler") if self.info.get(k)]
        if kept and all(v in self.outputs for v in kept):
            return
        self.info.pop("hidden", None)
        self.info.pop("pooler", None)
        self.info["hidden_lost"] = why

    def ops_of(self, *kinds: str) -> Iterator[Op]:
        return (o for o in self.ops if o.kind in kinds)

    def tensor_axes(self, space: str) -> list[tuple[str, int]]:
        """Every (tensor name, axis) labelled with ``space``: what one permutation moves."""
        return [
            (name, ax)
            for name, spec in self.tensors.items()
            for ax, s in enumerate(spec.axes)
            if s == space
        ]

    def norm_kinds(self) -> list[str]:
        return sorted({o.kind for o in self.ops if SPECS[o.kind].norm})

    def output_names(self) -> dict[str, str]:
        """Output value → public name (what an ONNX export and ``verify`` call it): loki
        predictions are ``prediction``, a base model's ``last_hidden_state`` and
        ``pooler_output`` keep the names transformers gives them, the first other output is
        ``logits``; any further outputs keep their graph names."""
        loki = {op.output for op in self.ops_of("loki")}
        names, first = {}, True
        for v in self.outputs:
            if v in loki:
                names[v] = "prediction"
            elif v in BASE_OUTPUTS:
                names[v] = v
            elif first:
                names[v], first = "logits", False
            else:
                names[v] = v
        return names

    # ---- integrity -------------------------------------------------------------------------
    def validate(self) -> None:
        """Check internal consistency; raise NormtoolError naming the first problem.

        Catches adapter bugs and tampered metadata before anything runs: ops in topological
        order, known kinds and params, tensor shapes agreeing with the sizes of their spaces,
        and every value an op computes with in its domain (eps finite and > 0, head and group
        counts positive integers dividing their width, known activations): a graph that passes
        never makes the executor raise or compute NaN from its metadata.
        """
        self._validate_spaces()
        self._validate_inputs()
        defined = {i.name for i in self.inputs}
        for o in self.ops:
            if o.output in defined:
                raise NormtoolError(f"graph op {o.name!r} writes {o.output!r}, already defined")
            spec = SPECS.get(o.kind)
            if spec is None:
                raise NormtoolError(f"graph op {o.name!r} has unknown kind {o.kind!r}")
            if not spec.inputs <= len(o.inputs) <= spec.inputs + spec.optional_inputs:
                raise NormtoolError(f"graph op {o.name!r} ({o.kind}) needs {spec.inputs} inputs")
            for v in o.inputs:
                if v not in defined:
                    raise NormtoolError(f"graph op {o.name!r} reads undefined value {v!r}")
            missing = [r for r in spec.required if r not in o.params]
            extra = [r for r in o.params if r not in spec.roles]
            if missing or extra:
                raise NormtoolError(
                    f"graph op {o.name!r} ({o.kind}) params wrong: missing {missing}, extra {extra}"
                )
            for t in o.params.values():
                if t not in self.tensors:
                    raise NormtoolError(f"graph op {o.name!r} uses unknown tensor {t!r}")
            problem = self._attr_problem(o)
            if problem:
                raise NormtoolError(f"graph op {o.name!r} ({o.kind}): {problem}")
            defined.add(o.output)
        for out in self.outputs:
            if out not in defined:
                raise NormtoolError(f"graph output {out!r} is never computed")
        for name, spec in self.tensors.items():
            if not all(_is_int(n) and n >= 0 for n in spec.shape):
                raise NormtoolError(f"tensor {name!r} has a bad shape {list(spec.shape)}")
            if len(spec.axes) != len(spec.shape):
                raise NormtoolError(
                    f"tensor {name!r}: {len(spec.axes)} axis labels, shape {spec.shape}"
                )
            for ax, s in enumerate(spec.axes):
                if s is None:
                    continue
                if s not in self.spaces:
                    raise NormtoolError(f"tensor {name!r} axis {ax} in unknown space {s!r}")
                if self.spaces[s].size != spec.shape[ax]:
                    raise NormtoolError(
                        f"tensor {name!r} axis {ax} has size {spec.shape[ax]} "
                        f"but space {s!r} has size {self.spaces[s].size}"
                    )

    def _validate_spaces(self) -> None:
        for key, sp in self.spaces.items():
            if sp.name != key or sp.kind not in SPACE_KINDS:
                raise NormtoolError(f"space {key!r}: name {sp.name!r} or kind {sp.kind!r} wrong")
            if not (_is_int(sp.size) and sp.size >= 0 and _is_int(sp.heads) and sp.heads >= 0):
                raise NormtoolError(
                    f"space {key!r}: size {sp.size!r} and heads {sp.heads!r} must be integers ≥ 0"
                )
            if sp.kind in ("heads_qk", "heads_vo") and not self._divides(sp.heads, sp.size):
                raise NormtoolError(
                    f"space {key!r}: {sp.heads!r} heads do not divide its size {sp.size}"
                )

    def _validate_inputs(self) -> None:
        for i in self.inputs:
            dims_ok = all(d in ("batch", "seq") or (_is_int(d) and d >= 0) for d in i.shape)
            counts_ok = _is_int(i.vocab) and i.vocab >= 0 and _is_int(i.max_len) and i.max_len >= 0
            if i.kind not in INPUT_KINDS or not dims_ok or not counts_ok:
                raise NormtoolError(
                    f"graph input {i.name!r}: kind {i.kind!r}, shape {list(i.shape)}, "
                    f"vocab {i.vocab!r}, max_len {i.max_len!r} not valid"
                )
            if i.kind in ("tokens", "types") and i.vocab < 1:
                raise NormtoolError(f"graph input {i.name!r}: token ids need a vocab ≥ 1")

    @staticmethod
    def _divides(parts: object, width: int) -> bool:
        return _is_int(parts) and parts >= 1 and width % parts == 0

    def _width(self, value: str) -> int | None:
        space = self.spaces.get(self.value_spaces.get(value, ""))
        return None if space is None else space.size

    def _attr_problem(self, o: Op) -> str | None:
        """Why op ``o``'s attributes cannot be run (None: they can)."""
        spec = SPECS[o.kind]
        missing = [a for a in spec.attrs if a not in o.attrs]
        if missing:
            return f"attribute {missing[0]!r} missing"
        for a in spec.eps_attrs:
            if not _positive_finite(o.attrs.get(a)):
                return f"{a} {o.attrs.get(a)!r} is not a finite number > 0"
        for a, least in spec.int_attrs.items():
            v = o.attrs.get(a, least)
            if o.kind == "maxpool2d" and a == "stride" and v is None:
                continue  # None: the kernel size, as in torch
            if not (_is_int(v) and v >= least):
                return f"{a} {v!r} is not an integer ≥ {least}"
        if o.kind == "ws_conv2d":
            from normtool.nn.ws_conv import ws_problem  # noqa: PLC0415 - torch-side module

            w = self.tensors[o.params["weight"]].shape
            return ws_problem(o.attrs["variant"], o.attrs["eps"], math.prod(w[1:]))
        return self._op_specific_problem(o)

    def _op_specific_problem(self, o: Op) -> str | None:
        """Attribute checks that relate an op's attributes to widths and tensor sizes."""
        a = o.attrs
        if o.kind == "act" and a["fn"] not in ACTIVATIONS:
            return f"unknown activation {a['fn']!r}"
        for name in ("offset", "scale", "softcap"):
            v = a.get(name)
            if v is not None and not (_finite(v) and (name == "offset" or v > 0)):
                return f"{name} {v!r} is not a finite number" + ("" if name == "offset" else " > 0")
        if o.kind == "attention":
            width = self._width(o.inputs[0])
            if width is None or not self._divides(a["heads"], width):
                return f"heads {a['heads']!r} is not a positive integer dividing width {width}"
            return self._kv_heads_problem(o)
        if o.kind == "head_rmsnorm":
            width = self._width(o.inputs[0])
            if width is None or not self._divides(a["heads"], width):
                return f"heads {a['heads']!r} is not a positive integer dividing width {width}"
            if "weight" in o.params and self.tensors[o.params["weight"]].shape != (
                width // a["heads"],
            ):
                return f"weight is not one value per dim of a head ({width // a['heads']})"
        if o.kind == "mul" and self._width(o.inputs[0]) != self._width(o.inputs[1]):
            return f"multiplies widths {self._width(o.inputs[0])} and {self._width(o.inputs[1])}"
        if o.kind in ("group_rmsnorm", "powernorm"):
            width = self._width(o.inputs[0])
            if width is None or not self._divides(a["groups"], width):
                return f"groups {a['groups']!r} is not a positive integer dividing width {width}"
        if o.kind == "maxpool2d" and a.get("padding", 0) > a["kernel"] // 2:
            return f"padding {a.get('padding')} exceeds half the kernel {a['kernel']}"
        if o.kind in ("id_positions", "pick_token"):
            problem = self._ids_problem(o)
            if problem:
                return problem
        if o.kind in ("embed", "row", "positions", "id_positions", "mask_positions"):
            return self._table_problem(o)
        if o.kind == "rope":
            return self._rope_problem(o)
        prepended = sum(op.kind == "cls_concat" for op in self.ops)
        if o.kind == "select" and a.get("index", 0) not in range(max(prepended, 1)):
            # sequences may be one token long (verify runs them): only the first is always
            # there, and the class/distillation tokens an image model prepends
            last = max(prepended, 1) - 1
            return (
                f"index {a['index']!r}: only tokens 0..{last} (the first, and those cls_concat "
                "prepends) exist in every input"
            )
        return None

    def _kv_heads_problem(self, o: Op) -> str | None:
        """Grouped-query attention: ``kv_heads`` divides ``heads`` and the k/v widths, and a
        query head is as wide as its key head (their dot product)."""
        heads, kv = o.attrs["heads"], o.attrs.get("kv_heads", o.attrs["heads"])
        widths = [self._width(v) for v in o.inputs[:3]]
        if None in widths or not self._divides(kv, heads):
            return f"kv_heads {kv!r} does not divide heads {heads!r}"
        if not all(self._divides(kv, w) for w in widths[1:]):
            return f"kv_heads {kv!r} does not divide the k/v widths {widths[1:]}"
        if widths[0] // heads != widths[1] // kv:
            return (
                f"query heads ({widths[0] // heads} wide) differ from key heads ({widths[1] // kv})"
            )
        return None

    def _rope_problem(self, o: Op) -> str | None:
        """Rotary dims must be whole (cos, sin) pairs of a head: ``fraction`` of the head width
        rounded down to an even count ≥ 2; ``base`` sets the angles' frequencies."""
        a, width = o.attrs, self._width(o.inputs[0])
        if width is None or not self._divides(a["heads"], width):
            return f"heads {a['heads']!r} is not a positive integer dividing width {width}"
        for name, default in (("fraction", 1.0), ("base", 10000.0)):
            if not _positive_finite(a.get(name, default)):
                return f"{name} {a.get(name)!r} is not a finite number > 0"
        dims = rotary_dims(width // a["heads"], a.get("fraction", 1.0))
        if a.get("fraction", 1.0) > 1 or dims < 2 or dims % 2:
            return f"fraction {a.get('fraction')!r} gives {dims} rotary dims, not an even count ≥ 2"
        return scaling_problem(a.get("scaling"))

    def _ids_problem(self, o: Op) -> str | None:
        """``id_positions`` and ``pick_token`` read token ids: a token graph input (any other
        value would index by floats), and ``pick_token``'s eos an id (−1: the largest id)."""
        ids = o.inputs[0] if o.kind == "id_positions" else o.inputs[1]
        spec = next((i for i in self.inputs if i.name == ids), None)
        if spec is None or spec.kind != "tokens":
            return f"input {ids!r} is not a graph input of token ids"
        eos = o.attrs.get("eos", -1)
        if o.kind == "pick_token" and not (_is_int(eos) and eos >= -1):
            return f"eos {eos!r} is not a token id (or −1)"
        return None

    def _table_problem(self, o: Op) -> str | None:
        """An embedding-like op must only read rows its table has: token ids below the vocab,
        positions ``offset .. offset + max_len − 1`` of token inputs (without ``max_len``
        verify would run sequences longer than the table), the ``row`` index."""
        rows = self.tensors[o.params["weight"]].shape[0]
        spec = next((i for i in self.inputs if i.name == o.inputs[0]), None)
        if o.kind == "embed":
            kind = spec.kind if spec is not None else ""
            need = 0
            if spec is not None and kind in ("tokens", "types", "positions"):
                need = spec.max_len if kind == "positions" else spec.vocab
            first, what = 0, "token ids" if kind == "tokens" else f"{o.inputs[0]} values"
        elif o.kind == "mask_positions":
            if spec is None or spec.kind != "mask" or spec.max_len < 1:
                return "positions counted over a mask need a mask input with max_len ≥ 1"
            # padded tokens read row offset − 1 (count 0, minus 1), the last one offset+max_len−1
            first, need, what = o.attrs["offset"] - 1, spec.max_len + 1, "positions"
        elif o.kind in ("positions", "id_positions"):
            if spec is None:  # an image's patches: as many as its fixed size gives
                return None
            if spec.kind != "tokens" or spec.max_len < 1:
                return "positions of a token input need its max_len ≥ 1"
            first = o.attrs.get("offset", 0) if o.kind == "positions" else o.attrs["pad"] + 1
            need, what = spec.max_len, "positions"
        else:
            first, need, what = o.attrs.get("index", 0), 1, "row"
        if first + need > rows:
            return f"{what} read rows {first}..{first + need - 1} of a {rows}-row table"
        return None

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> str:
        # json meets each dataclass and serialises its fields (in declaration order, as
        # ``asdict`` would) without ``asdict``'s deep copy — ~0.1 s less per command on a
        # 24-layer model, whose graph is serialised several times
        return json.dumps(self, default=_fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Graph:
        d = json.loads(text)
        tensors = {}
        for name, t in d["tensors"].items():
            src = t["source"]
            sl = src.get("slice")
            tensors[name] = TensorSpec(
                shape=tuple(t["shape"]),
                axes=tuple(t["axes"]),
                source=Source(
                    src["key"],
                    tuple(sl) if sl else None,
                    src.get("transpose", False),
                    tuple(src["reshape"]) if src.get("reshape") else None,
                ),
                dtype=t.get("dtype", "F32"),
            )
        g = cls(
            family=d["family"],
            inputs=[InputSpec(**{**i, "shape": tuple(i["shape"])}) for i in d["inputs"]],
            outputs=list(d["outputs"]),
            ops=[Op(**{**o, "inputs": tuple(o["inputs"])}) for o in d["ops"]],
            spaces={k: Space(**v) for k, v in d["spaces"].items()},
            tensors=tensors,
            value_spaces=dict(d["value_spaces"]),
            info=dict(d.get("info", {})),
        )
        g.validate()
        return g

    def copy(self) -> Graph:
        """A copy that passes can edit without touching the original. Cheap: ops, tensor specs
        and inputs are copied one level deep (their fields are replaced, not edited in place),
        spaces and sources are immutable and shared; no JSON round trip, no re-validation."""
        return Graph(
            family=self.family,
            inputs=[copy.copy(i) for i in self.inputs],
            outputs=list(self.outputs),
            ops=[replace(o, params=dict(o.params), attrs=copy.deepcopy(o.attrs)) for o in self.ops],
            spaces=dict(self.spaces),
            tensors={k: copy.copy(v) for k, v in self.tensors.items()},
            value_spaces=dict(self.value_spaces),
            info=copy.deepcopy(self.info),
        )


class _Index:
    """Ops by name, by the value they write and by the values they read (see ``Graph._idx``)."""

    def __init__(self, ops: list[Op]) -> None:
        self.ops, self.size = ops, len(ops)
        self.by_name = {o.name: o for o in ops}
        self.producer = {o.output: o for o in ops}
        self.consumers: dict[str, list[Op]] = {}
        for o in ops:
            for v in dict.fromkeys(o.inputs):
                self.consumers.setdefault(v, []).append(o)
        self._pos = {id(o): i for i, o in enumerate(ops)}

    def fits(self, ops: list[Op]) -> bool:
        return ops is self.ops and len(ops) == self.size

    def position(self, op: Op) -> int:
        return self._pos[id(op)]


def _fields(obj: object) -> dict[str, Any]:
    """A dataclass instance's fields, for ``json.dumps``; TypeError for anything else (a tensor
    or array in an op's attributes is a bug to report, not a value to write as ``{}``)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        fields = vars(obj)
        return {k: v for k, v in fields.items() if k != "_index"} if "_index" in fields else fields
    raise TypeError(f"{type(obj).__name__} in a graph is not JSON serialisable")
