"""A key/value cache for causal token models' ONNX exports (``normtool export --kv-cache``).

Why: decoding one token at a time without a cache recomputes every earlier token's keys and
values at each step (quadratic work); with it each step reads them back. The names and layouts
are Optimum's, so its generation loops and ORT's tooling take the files as they are:

* inputs ``input_ids`` ``[batch, seq]``, ``attention_mask`` ``[batch, past + seq]`` (the past
  tokens' mask too), ``position_ids`` ``[batch, seq]`` (every family with positions: a learned
  table or rotary), ``past_key_values.N.key/value`` ``[batch, kv_heads, past, head_dim]``;
* outputs the model's own (``logits``) and ``present.N.key/value`` ``[batch, kv_heads,
  past + seq, head_dim]``: the past with this call's keys (after the rotary embedding, as
  ``transformers`` caches them) and values appended. A past of length 0 is the prefill.

Layer ``N`` numbers the attention ops in graph order. The causal (and sliding-window) mask is
offset by the past length: query ``i`` is token ``past + i``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import onnx
from onnx import TensorProto, helper

from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec, Op


class _Emitter(Protocol):
    """What the cache needs of ``onnx_emit``'s emitter (named here: that module imports this)."""

    graph: Graph
    act: int

    def node(self, op_type: str, inputs: list[str], hint: str = "", **attrs: Any) -> str: ...

    def i64(self, values: Any) -> str: ...


#: Ops that read whole sequences in a way a cache of past keys/values does not carry over
#: (positions counted over the mask or the ids, a pooled or picked token).
_UNCACHEABLE = frozenset({"mask_positions", "id_positions", "pick_token", "masked_mean", "select"})
PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"


def check_cacheable(graph: Graph) -> None:
    """Refuse graphs a key/value cache does not apply to, naming why."""
    if not any(s.kind == "tokens" for s in graph.inputs):
        raise NormtoolError("--kv-cache needs a token model (input_ids)")
    attention = graph.ops_of("attention")
    if not attention or not all(op.attrs.get("causal") for op in attention):
        raise NormtoolError("--kv-cache needs a causal decoder (every attention causal)")
    odd = sorted({op.kind for op in graph.ops if op.kind in _UNCACHEABLE})
    if odd:
        raise NormtoolError(f"--kv-cache: {', '.join(odd)} cannot read a cache")


@dataclass
class KvCache:
    """What the cache adds to one export: its graph inputs and outputs, made as the attention
    ops are emitted."""

    position_ids: str
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[tuple[str, str, onnx.ValueInfoProto]] = field(default_factory=list)
    layers: int = 0
    _past: str | None = None

    @classmethod
    def start(cls, em: _Emitter, graph: Graph) -> KvCache:
        """The cache of ``graph``; adds ``position_ids`` where rotary positions need it."""
        check_cacheable(graph)
        given = next((s.name for s in graph.inputs if s.kind == "positions"), None)
        cache = cls(given or "position_ids")
        if given is None and graph.ops_of("rope"):
            cache.inputs.append(
                helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])
            )
        return cache

    def past_length(self, em: _Emitter) -> str:
        """The past's length as a 0-D int64 (from layer 0's past keys; made once)."""
        if self._past is None:
            n = em.node("Shape", [PAST.format(0, "key")], "past", start=2, end=3)
            self._past = em.node("Squeeze", [n, em.i64([0])], "past")
        return self._past

    def append(self, em: _Emitter, op: Op, k: str, v: str, kv_heads: int) -> tuple[str, str]:
        """Layer ``N``'s keys and values ``[B, kv_heads, past + T, D]``: its past inputs with
        ``k``/``v`` (``[B, T, kv_heads·D]``) appended; both are also the layer's outputs."""
        n, self.layers = self.layers, self.layers + 1
        width = em.graph.spaces[em.graph.value_spaces[op.inputs[1]]].size
        dims = ["batch", kv_heads, "past_sequence_length", width // kv_heads]
        total = [*dims[:2], "total_sequence_length", dims[3]]
        out = []
        for part, x in (("key", k), ("value", v)):
            past = PAST.format(n, part)
            self.inputs.append(helper.make_tensor_value_info(past, em.act, dims))
            heads = em.node("Reshape", [x, em.i64([0, 0, kv_heads, -1])], "kv_heads")
            new = em.node("Transpose", [heads], part, perm=[0, 2, 1, 3])
            cat = em.node("Concat", [past, new], "present", axis=2)
            name = PRESENT.format(n, part)
            self.outputs.append((cat, name, helper.make_tensor_value_info(name, em.act, total)))
            out.append(cat)
        return out[0], out[1]


def mask_input(spec: InputSpec) -> list[int | str] | None:
    """The cached export's dims for ``spec`` where they differ: the mask covers past + seq."""
    return ["batch", "total_sequence_length"] if spec.kind == "mask" else None
