"""Which groups of graph ops the ONNX emitter writes as one ONNX Runtime contrib kernel.

Why: ONNX Runtime's own graph optimiser does not recognise every standard-op pattern (at opset 23
it fuses neither attention nor Add + LayerNormalization), and its transformer optimiser is a
separate offline step that breaks on new exporters. normtool knows the structure already — the
graph says which linears feed an attention and which residual add feeds a norm — so with the
``ort`` target it writes the fused kernels ONNX Runtime runs fastest directly:

* q/k/v linears on one input + attention → ``com.microsoft.Attention`` (one packed [d, 3d] GEMM;
  ``unidirectional`` for causal attention);
* residual ``add`` → layernorm / rmsnorm → ``SkipLayerNormalization`` /
  ``SkipSimplifiedLayerNormalization``, whose fourth output is the residual sum itself; the bias
  of a linear feeding that add moves into the kernel's ``bias`` input;
* linear → GELU (erf / tanh) → ``BiasGelu`` / ``FastGelu`` with the linear's bias.

A group is fused only when every intermediate value has no other reader and is no graph output,
so each rewrite is exact (same maths, one kernel). The plan is pure graph analysis; the emitter
still checks tensor ranks when it writes the nodes and falls back to the standard forms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from normtool.graph import Graph, Op
from normtool.opspec import SPECS

_BIAS_ACTS = ("gelu", "gelu_tanh")


@dataclass
class FusionPlan:
    """``qkv``: attention op → its (q, k, v) linear ops (emitted by the attention, not before).
    ``skip_norm``: residual add op → the norm op it feeds (emitted together at the add).
    ``bias_to``: linear op → the op that absorbs its bias (a skip add, or a GELU)."""

    qkv: dict[str, tuple[Op, Op, Op]] = field(default_factory=dict)
    skip_norm: dict[str, Op] = field(default_factory=dict)
    bias_to: dict[str, str] = field(default_factory=dict)

    @property
    def deferred(self) -> set[str]:
        """Ops written by another op's emitter (never on their own)."""
        linears = {o.name for ops in self.qkv.values() for o in ops}
        return linears | {n.name for n in self.skip_norm.values()}


def _sole_reader(graph: Graph, value: str, reader: Op) -> bool:
    return value not in graph.outputs and [o.name for o in graph.consumers(value)] == [reader.name]


def _qkv(graph: Graph, op: Op):
    if any(op.attrs.get(a) for a in ("kv_heads", "window", "softcap")):
        return None  # the contrib kernel has no grouped heads, sliding window or soft-capping
    qkv = op.inputs[:3]  # a fourth input is the padding mask, which the kernel takes too
    lin = [graph.producer(v) for v in qkv]
    if any(p is None or p.kind != "linear" for p in lin):
        return None
    if len({p.inputs[0] for p in lin}) != 1 or len({"bias" in p.params for p in lin}) != 1:
        return None
    if not all(_sole_reader(graph, v, op) for v in qkv):
        return None
    heads = int(op.attrs["heads"])
    widths = [graph.tensors[p.params["weight"]].shape[0] for p in lin]
    if widths[0] != widths[1] or any(w % heads for w in widths):
        return None
    return tuple(lin)


def _norm_after(graph: Graph, add: Op) -> Op | None:
    # an add of a batch-broadcast [1, S, C] value (a position table) is not a skip add
    if len(set(add.inputs)) != 2 or any(
        (p := graph.producer(v)) is not None and SPECS[p.kind].shape_only for v in add.inputs
    ):
        return None
    norms = [o for o in graph.consumers(add.output) if SPECS[o.kind].skip_fusable]
    return norms[0] if len(norms) == 1 and norms[0].inputs == (add.output,) else None


def plan_fusions(graph: Graph, attention: bool = True) -> FusionPlan:
    """The fusions for ``graph`` (``attention=False`` keeps attention unfused)."""
    plan = FusionPlan()

    def biased_linear(value: str, reader: Op) -> Op | None:
        p = graph.producer(value)
        ok = p is not None and p.kind == "linear" and "bias" in p.params
        return p if ok and _sole_reader(graph, value, reader) else None

    for op in graph.ops:
        if op.kind == "attention" and attention:
            lin = _qkv(graph, op)
            if lin is not None:
                plan.qkv[op.name] = lin
        elif op.kind == "add":
            norm = _norm_after(graph, op)
            if norm is None:
                continue
            plan.skip_norm[op.name] = norm
            for v in op.inputs:
                lin = biased_linear(v, op)
                if lin is not None:
                    plan.bias_to[lin.name] = op.name
                    break
        elif op.kind == "act" and op.attrs.get("fn") in _BIAS_ACTS:
            lin = biased_linear(op.inputs[0], op)
            if lin is not None:
                plan.bias_to[lin.name] = op.name
    qkv_linears = {o.name for ops in plan.qkv.values() for o in ops}
    plan.bias_to = {k: v for k, v in plan.bias_to.items() if k not in qkv_linears}
    return plan
