"""Which permutations a graph allows: one group per permutable space, head-structured for attention.

Why derive them from the graph: every (tensor, axis) labelled with a space must move together,
and the graph already says which those are (``Graph.tensor_axes``), so no architecture needs its
own permutation table. Two things the labels alone cannot say are read from the ops:

* attention: a head's q/k dims and its v/o dims belong to the same head, so the q/k space and
  the v/o space of one attention op form *one* group whose units are whole heads, with a
  permutation of the q/k dims and one of the v/o dims inside each head (never across heads);
* grouped-query attention (``kv_heads`` G < ``heads`` H): four spaces move together — queries
  (H heads), keys and values (G heads each) and the output the ``o`` projection reads (H heads).
  The units are kv groups: a key/value head carries its H/G query heads (and their output
  heads) wherever it goes, and those query heads may be reordered among themselves (they read
  the same key and value). Inside a head, the q/k dims of a group are permuted by one shared
  permutation (every query head of the group is dotted with the group's one key head), and the
  v dims of a group by one permutation shared by its value head and each of its output heads;
* rotary embeddings (a ``rope`` op on an attention's queries or keys): whole heads, and whole kv
  groups, still move (the rotation is the same for every head), but the q/k dims *inside* a
  head stay where they are. Dim ``i`` of a head is rotated with dim ``i + D/2`` at frequency
  ``θ_i``: moving it elsewhere changes its frequency, and swapping the two halves of a pair
  reverses its rotation, so neither preserves ``q·k``. The v/o dims stay permutable;
* a space a graph output lives in (a base model's ``last_hidden_state``) keeps its order;
* other ops that are not permutation-equivariant over channels (group-wise RMS, grouped
  convolution between two different spaces, a rotary embedding not read by an attention:
  ``OpSpec.pins``) pin their spaces, which are then skipped with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from normtool.graph import Graph, Op
from normtool.opspec import SPECS

#: Space kinds whose units are interchangeable; input/output/fixed spaces are never permuted.
PERMUTABLE_KINDS = frozenset({"resid", "hidden", "channels", "heads_qk", "heads_vo"})


@dataclass(frozen=True)
class Group:
    """One permutation to find.

    Plain: ``spaces == (space,)``, ``heads == 0``. Head-structured: ``spaces == (qk, vo)`` of one
    attention op with ``heads`` heads; its units are heads. Grouped-query: ``spaces == (q, k, v,
    out)`` with ``kv_heads`` > 0; its units are kv groups. ``rotary``: the q/k dims inside a head
    are fixed (module docstring).
    """

    name: str
    spaces: tuple[str, ...]
    heads: int = 0
    kv_heads: int = 0
    rotary: bool = False


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


def _attention_group(
    graph: Graph, op: Op, rotary: set[str], pinned: dict[str, str]
) -> tuple[Group | None, str]:
    """The group of one attention op's head spaces, or None and why they cannot move."""
    q, k, v = (graph.value_spaces[x] for x in op.inputs[:3])
    out = graph.value_spaces[op.output]
    heads = int(op.attrs["heads"])
    kv = int(op.attrs.get("kv_heads") or heads)
    turned = q in rotary or k in rotary
    # a rotary space may hold q/k heads (their dims stay put), not values, whose dims move
    bad = [s for s in (q, k, v, out) if s in pinned and (s not in rotary or s in (v, out))]
    if bad:
        return None, pinned[bad[0]]
    if kv == heads and (q != k or v != out):
        return None, f"{op.name}: q and k in different spaces ({q}, {k})"
    if kv != heads and len({q, k, v, out}) != 4:
        return None, f"{op.name}: grouped-query attention sharing spaces ({q}, {k}, {v}, {out})"
    sizes = [(graph.spaces[s].size, n) for s, n in ((q, heads), (k, kv), (v, kv), (out, heads))]
    if any(size % n for size, n in sizes):
        return None, f"{op.name}: width not divisible by its heads"
    if kv == heads:
        return Group(op.name, (q, v), heads, rotary=turned), ""
    return Group(op.name, (q, k, v, out), heads, kv, turned), ""


def permutation_groups(graph: Graph) -> tuple[list[Group], dict[str, str]]:
    """The permutation groups of ``graph`` and the spaces skipped, ``{space: reason}``.

    Only spaces that label at least one tensor axis are groups (others have nothing to move).
    """
    pinned = _pinned_spaces(graph)
    skipped: dict[str, str] = {}
    groups: list[Group] = []
    in_heads: set[str] = set()
    rotary = {graph.value_spaces[o.inputs[0]] for o in graph.ops if SPECS[o.kind].pins == "input"}
    for op in graph.ops_of("attention"):
        group, reason = _attention_group(graph, op, rotary, pinned)
        spaces = {graph.value_spaces[x] for x in (*op.inputs[:3], op.output)}
        if group is None:
            skipped.update(dict.fromkeys(spaces, reason))
        else:
            groups.append(group)
        in_heads.update(spaces)
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
