"""Structural facts about a graph that several commands need (inspect, passes)."""

from __future__ import annotations

from normtool.graph import NORM_KINDS, Graph, Op


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
    return [(o, norm_placement(graph, o)) for o in graph.ops if o.kind in NORM_KINDS]
