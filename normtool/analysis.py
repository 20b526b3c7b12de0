"""Structural facts about a graph that several commands need (inspect, passes)."""

from __future__ import annotations

import math
from typing import Any

from normtool.graph import Graph, InputSpec, Op
from normtool.opspec import SPECS


def norm_placement(graph: Graph, op: Op) -> str:
    """Where a norm sits: ``post`` (its output feeds a residual add: the skip path), ``final``
    (no residual add after it), ``after-conv``/``after-linear`` (normalises a layer's output,
    e.g. Conv-BN), or ``pre`` (normalises the stream for a branch)."""
    prod = graph.producer(op.inputs[0])
    if prod is not None and prod.kind in ("conv2d", "ws_conv2d", "linear"):
        return "after-linear" if prod.kind == "linear" else "after-conv"
    if any(c.kind == "add" for c in graph.consumers(op.output)):
        return "post"
    idx = graph.ops.index(op)
    if not any(o.kind == "add" for o in graph.ops[idx + 1 :]):
        return "final"
    return "pre"


def norms(graph: Graph) -> list[tuple[Op, str]]:
    """Every norm op with its placement, in graph order."""
    return [(o, norm_placement(graph, o)) for o in graph.ops if SPECS[o.kind].norm]


#: Param roles that hold running statistics or a derived constant (Loki's squared distances),
#: not trained weights: buffers, as torch's ``parameters()`` and Hugging Face count them.
BUFFER_ROLES = frozenset({"running_mean", "running_var", "running_phi", "d2"})


def parameter_count(graph: Graph) -> int:
    """Trained parameter elements as stored, each once.

    Graph tensors are views of stored tensors: a tied LM head and its embedding are one stored
    matrix (counted once), GPT-2's fused ``c_attn`` is three slices of one (each counted).
    Buffers (``BUFFER_ROLES``) are left out, and stored tensors no op reads (position ids,
    attention masks, ``num_batches_tracked``) never enter the graph.
    """
    buffers = {t for o in graph.ops for role, t in o.params.items() if role in BUFFER_ROLES}
    stored = {
        (spec.source.key, spec.source.slice): math.prod(spec.shape)
        for name, spec in graph.tensors.items()
        if name not in buffers
    }
    return sum(stored.values())


def tied_head(graph: Graph) -> bool:
    """Whether a linear reads the very stored matrix an embedding does (a tied LM head)."""
    tables = {graph.tensors[o.params["weight"]].source for o in graph.ops_of("embed")}
    return any(graph.tensors[o.params["weight"]].source in tables for o in graph.ops_of("linear"))


def current_info(graph: Graph) -> dict[str, Any]:
    """``graph.info`` with the facts a transform changes read from the graph itself: which norms
    it has and whether its head is tied. An adapter records them at load time, and a converted
    model's stored info would otherwise still describe the model it came from."""
    info = dict(graph.info)
    if "norm" in info:
        kinds = graph.norm_kinds()
        info["norm"] = ",".join(kinds) or "none"
    if "tied_head" in info:
        info["tied_head"] = tied_head(graph)
    return info


def size_free(graph: Graph, spec: InputSpec) -> bool:
    """Whether image input ``spec`` can take any height and width: everything reading its
    feature maps is a size-free op (``OpSpec.size_free``) or the global pooling that ends them."""
    if spec.kind != "pixels" or len(spec.shape) != 4:
        return False
    maps = {spec.name}
    for op in graph.ops:
        if not maps.intersection(op.inputs) or op.kind == "global_avgpool":
            continue
        if not SPECS[op.kind].size_free:
            return False
        maps.add(op.output)
    return not maps.intersection(graph.outputs)
