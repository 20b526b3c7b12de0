"""Which permutations a graph allows: one group per permutable space, head-structured for attention.

Why derive them from the graph: every (tensor, axis) labelled with a space must move together,
and the graph already says which those are (``Graph.tensor_axes``), so no architecture needs its
own permutation table. Two things the labels alone cannot say are read from the ops:

* attention: a head's q/k dims and its v/o dims belong to the same head, so the q/k space and
  the v/o space of one attention op form *one* group whose units are whole heads, with a
  permutation of the q/k dims and one of the v/o dims inside each head (never across heads);
* a space a graph output lives in (a base model's ``last_hidden_state``) keeps its order;
* ops that are not permutation-equivariant over channels (group-wise RMS, grouped convolution
  between two different spaces, rotary embeddings: ``OpSpec.pins``) pin their spaces, which
  are then skipped with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from normtool.graph import Graph
from normtool.opspec import SPECS

#: Space kinds whose units are interchangeable; input/output/fixed spaces are never permuted.
PERMUTABLE_KINDS = frozenset({"resid", "hidden", "channels", "heads_qk", "heads_vo"})


@dataclass(frozen=True)
class Group:
    """One permutation to find.

    Plain: ``spaces == (space,)``, ``heads == 0``. Head-structured: ``spaces == (qk, vo)`` of one
    attention op with ``heads`` heads; its units are heads.
    """

    name: str
    spaces: tuple[str, ...]
    heads: int = 0


def _pinned_spaces(graph: Graph) -> dict[str, str]:
    """Spaces that some op forbids permuting freely (``OpSpec.pins``), and those a graph output
    lives in (a base model's hidden states: their channel order is what the user reads), with
    the reason."""
    pinned = {
        graph.value_spaces[out]: f"graph output {out!r} lives in it (its channel order is kept)"
        for out in reversed(graph.outputs)
    }
    for op in graph.ops:
        pins, grouped = SPECS[op.kind].pins, op.attrs.get("groups", 1) > 1
        if not pins or (pins != "input" and not grouped):
            continue
        s_in = graph.value_spaces[op.inputs[0]]
        if pins == "groups":
            pinned[s_in] = (
                f"{op.name} normalises {op.attrs['groups']} channel groups separately; "
                "a permutation would mix them"
            )
        elif pins == "grouped_map":
            s_out = graph.value_spaces[op.output]
            if s_in != s_out:
                reason = f"{op.name} is a grouped convolution from {s_in} to {s_out}"
                pinned[s_in] = pinned[s_out] = reason
        else:
            pinned[s_in] = f"{op.name} ({op.kind}) gives each channel of {s_in} a fixed role"
    return pinned


def permutation_groups(graph: Graph) -> tuple[list[Group], dict[str, str]]:
    """The permutation groups of ``graph`` and the spaces skipped, ``{space: reason}``.

    Only spaces that label at least one tensor axis are groups (others have nothing to move).
    """
    pinned = _pinned_spaces(graph)
    skipped: dict[str, str] = {}
    groups: list[Group] = []
    in_heads: set[str] = set()
    for op in graph.ops_of("attention"):
        q, k, v = (graph.value_spaces[x] for x in op.inputs)
        heads = int(op.attrs["heads"])
        if q != k:
            reason = f"{op.name}: q and k in different spaces ({q}, {k})"
            skipped.update({q: reason, k: reason, v: reason})
            in_heads.update((q, k, v))
            continue
        bad = [s for s in (q, v) if s in pinned]
        if bad:
            skipped.update({s: pinned[bad[0]] for s in (q, v)})
        elif graph.spaces[q].size % heads or graph.spaces[v].size % heads:
            reason = f"{op.name}: width not divisible by {heads} heads"
            skipped.update({q: reason, v: reason})
        else:
            groups.append(Group(op.name, (q, v), heads))
        in_heads.update((q, v))
    used = {s for spec in graph.tensors.values() for s in spec.axes if s is not None}
    for name, space in graph.spaces.items():
        if name in in_heads or name not in used or space.kind not in PERMUTABLE_KINDS:
            continue
        if name in pinned:
            skipped[name] = pinned[name]
        elif space.kind in ("heads_qk", "heads_vo"):
            skipped[name] = "head space that no attention op reads"
        else:
            groups.append(Group(name, (name,)))
    return groups, skipped
