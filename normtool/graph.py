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

Op kinds (inputs → output; params; attrs)
-----------------------------------------
=================  ===========================  =====================================================
kind               params                       semantics
=================  ===========================  =====================================================
embed              weight[V, C]                 ids[B,T] → weight[ids]
positions          weight[P, C]                 x[B,T,·] → weight[offset : offset+T] (broadcast [1,T,C])
row                weight[R, C]                 x → weight[index] as [1,1,C] (BERT token type 0)
patch_embed        weight[C,Cin,p,p], bias[C]   pixels[B,Cin,H,W] → conv stride p, flatten → [B,N,C]
cls_concat         token[C]                     x[B,N,C] → [token; x] → [B,N+1,C]
add                —                            a + b (broadcasting)
linear             weight[O,I], bias?[O]        x @ Wᵀ + b
layernorm          weight?[C], bias?[C]         (x−μ)/√(σ²+eps)·γ+β over the channel axis
rmsnorm            weight?[C]                   x/√(mean(x²)+eps)·γ
crmsnorm           weight?[C]                   x/√((Σx²+(Σx)²)/(C+1)+eps)·γ  (Jiang et al. 2023)
group_rmsnorm      —                            x split in ``groups`` channel groups, each / its RMS (eps)
unorm              weight, bias, running_var    γ·x/√(running_var+eps)+β  (UN inference)
powernorm          weight, bias, running_phi    γ·GS(x)/√(running_phi+eps)+β, GS = group_rmsnorm
batchnorm          weight, bias, running_mean,  (x−m)/√(v+eps)·γ+β on the channel axis
                   running_var
affine             scale[C], shift?[C]          x·s + t on the channel axis
act                —                            fn ∈ relu|gelu|gelu_tanh|tanh|silu|quick_gelu
attention          —                            (q,k,v)[B,T,H·D] → softmax(q kᵀ·scale [+causal]) v
select             —                            x[B,T,C] → x[:, index]  ([B,C])
conv2d             weight, bias?                stride, padding, groups, dilation
ws_conv2d          weight, bias?                conv2d with the standardised weight Ŵ (per output
                                                row; attrs eps, variant var|std: normtool.nn.ws_conv)
maxpool2d          —                            kernel, stride, padding
global_avgpool     —                            [B,C,H,W] → [B,C]
loki               d2[K,N]                      logits[B,K] → argmin_y Σ p_i d²(y,i)  (int64 [B])
=================  ===========================  =====================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass
from typing import Any

from normtool.errors import NormtoolError

#: Space kinds. ``input``/``output``/``fixed`` spaces are never permuted by merge.
SPACE_KINDS = frozenset(
    {"resid", "hidden", "heads_qk", "heads_vo", "channels", "input", "output", "fixed"}
)

#: kind -> (required param roles, optional param roles, number of inputs)
OP_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "embed": (("weight",), (), 1),
    "positions": (("weight",), (), 1),
    "row": (("weight",), (), 1),
    "patch_embed": (("weight", "bias"), (), 1),
    "cls_concat": (("token",), (), 1),
    "add": ((), (), 2),
    "linear": (("weight",), ("bias",), 1),
    "layernorm": ((), ("weight", "bias"), 1),
    "rmsnorm": ((), ("weight",), 1),
    "crmsnorm": ((), ("weight",), 1),
    "group_rmsnorm": ((), (), 1),
    "unorm": (("weight", "bias", "running_var"), (), 1),
    "powernorm": (("weight", "bias", "running_phi"), (), 1),
    "batchnorm": (("weight", "bias", "running_mean", "running_var"), (), 1),
    "affine": (("scale",), ("shift",), 1),
    "act": ((), (), 1),
    "attention": ((), (), 3),
    "select": ((), (), 1),
    "conv2d": (("weight",), ("bias",), 1),
    "ws_conv2d": (("weight",), ("bias",), 1),
    "maxpool2d": ((), (), 1),
    "global_avgpool": ((), (), 1),
    "loki": (("d2",), (), 1),
}

#: Op kinds that normalise (the ones inspect/fold/ln→rms look for).
NORM_KINDS = frozenset(
    {"layernorm", "rmsnorm", "crmsnorm", "group_rmsnorm", "unorm", "powernorm", "batchnorm"}
)

ACTIVATIONS = frozenset({"relu", "gelu", "gelu_tanh", "tanh", "silu", "quick_gelu"})

#: Outputs of base models (no head), named as transformers names them.
BASE_OUTPUTS = frozenset({"last_hidden_state", "pooler_output"})


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
    ``(axis, start, stop)`` of the stored tensor, then optionally transposed (2-D), then
    optionally reshaped (same element count: e.g. ViT's stored ``[1, P, d]`` position table read
    as the canonical ``[P, d]``)."""

    key: str
    slice: tuple[int, int, int] | None = None
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

    # ---- queries -------------------------------------------------------------------------
    def op(self, name: str) -> Op:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def producer(self, value: str) -> Op | None:
        """The op that writes ``value`` (``None`` for graph inputs)."""
        for o in self.ops:
            if o.output == value:
                return o
        return None

    def consumers(self, value: str) -> list[Op]:
        return [o for o in self.ops if value in o.inputs]

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
        return sorted({o.kind for o in self.ops if o.kind in NORM_KINDS})

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
        order, known kinds and params, tensor shapes agreeing with the sizes of their spaces.
        """
        defined = {i.name for i in self.inputs}
        for o in self.ops:
            if o.kind not in OP_KINDS:
                raise NormtoolError(f"graph op {o.name!r} has unknown kind {o.kind!r}")
            required, optional, n_in = OP_KINDS[o.kind]
            if len(o.inputs) != n_in:
                raise NormtoolError(f"graph op {o.name!r} ({o.kind}) needs {n_in} inputs")
            for v in o.inputs:
                if v not in defined:
                    raise NormtoolError(f"graph op {o.name!r} reads undefined value {v!r}")
            missing = [r for r in required if r not in o.params]
            extra = [r for r in o.params if r not in required + optional]
            if missing or extra:
                raise NormtoolError(
                    f"graph op {o.name!r} ({o.kind}) params wrong: missing {missing}, extra {extra}"
                )
            for t in o.params.values():
                if t not in self.tensors:
                    raise NormtoolError(f"graph op {o.name!r} uses unknown tensor {t!r}")
            defined.add(o.output)
        for out in self.outputs:
            if out not in defined:
                raise NormtoolError(f"graph output {out!r} is never computed")
        for name, spec in self.tensors.items():
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
        """A deep copy (via JSON) that passes can edit without touching the original."""
        return Graph.from_json(self.to_json())


def _fields(obj: object) -> dict[str, Any]:
    """A dataclass instance's fields, for ``json.dumps``; TypeError for anything else (a tensor
    or array in an op's attributes is a bug to report, not a value to write as ``{}``)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return vars(obj)
    raise TypeError(f"{type(obj).__name__} in a graph is not JSON serialisable")
