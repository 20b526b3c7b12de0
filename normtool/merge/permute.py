"""Permutations as index vectors, applied to tensors along the axes labelled with their space.

Convention (used everywhere, and in ``--save-perms`` files): ``perm[space]`` is a LongTensor ``p``
such that the permuted tensor is ``t.index_select(axis, p)`` on every axis labelled ``space`` —
new unit ``i`` is old unit ``p[i]``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from normtool.graph import Graph
from normtool.merge.groups import Group

Perms = dict[str, torch.Tensor]


def permute_tensor(
    t: torch.Tensor,
    axes: tuple[str | None, ...],
    perms: Mapping[str, torch.Tensor],
    skip_axis: int | None = None,
) -> torch.Tensor:
    """``t`` with every axis whose space has a permutation permuted (``skip_axis`` left alone)."""
    for ax, space in enumerate(axes):
        if ax != skip_axis and space is not None and space in perms:
            t = t.index_select(ax, perms[space])
    return t


def permute_weights(
    graph: Graph, weights: Mapping[str, torch.Tensor], perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every graph tensor permuted; the network computes the same function (DESIGN §3.3)."""
    return {
        name: permute_tensor(weights[name], spec.axes, perms)
        for name, spec in graph.tensors.items()
    }


def identity_perms(graph: Graph, groups: list[Group]) -> Perms:
    return {
        s: torch.arange(graph.spaces[s].size, dtype=torch.int64) for g in groups for s in g.spaces
    }


def head_structured(
    head_order: torch.Tensor, within: list[torch.Tensor], head_dim: int
) -> torch.Tensor:
    """The full index vector of a head space from whole-head and within-head permutations.

    New head ``a`` is old head ``head_order[a]``, its dims reordered by ``within[a]``.
    """
    return torch.cat([int(h) * head_dim + w for h, w in zip(head_order, within, strict=True)])


def grouped_heads(
    order: torch.Tensor,
    sub: dict[int, torch.Tensor],
    qk_within: dict[int, torch.Tensor],
    vo_within: dict[int, torch.Tensor],
    dims: tuple[int, int],
) -> list[torch.Tensor]:
    """The (q, k, v, out) index vectors of a grouped-query attention (``normtool.merge.groups``).

    New kv group ``a`` is old group ``g = order[a]``; its query heads, in new order, are old
    query heads ``g·r + sub[g][j]``; every head of group ``g`` has its q/k dims reordered by
    ``qk_within[g]`` and its v/out dims by ``vo_within[g]`` (``dims``: their head widths).
    """
    r = len(next(iter(sub.values())))
    q_heads = torch.tensor([int(g) * r + int(j) for g in order for j in sub[int(g)]])
    groups_of_q = [int(h) // r for h in q_heads]
    dqk, dvo = dims
    return [
        head_structured(q_heads, [qk_within[g] for g in groups_of_q], dqk),
        head_structured(order, [qk_within[int(g)] for g in order], dqk),
        head_structured(order, [vo_within[int(g)] for g in order], dvo),
        head_structured(q_heads, [vo_within[g] for g in groups_of_q], dvo),
    ]


def random_perms(graph: Graph, groups: list[Group], gen: torch.Generator) -> Perms:
    """Uniformly random permutations respecting every group's structure (tests, benchmarks)."""

    def within(dim: int, fixed: bool = False) -> torch.Tensor:
        return torch.arange(dim) if fixed else torch.randperm(dim, generator=gen)

    perms: Perms = {}
    for g in groups:
        if not g.heads:
            perms[g.spaces[0]] = torch.randperm(graph.spaces[g.spaces[0]].size, generator=gen)
            continue
        units = g.kv_heads or g.heads
        order = torch.randperm(units, generator=gen)
        dqk, dvo = (graph.spaces[s].size // g.heads for s in (g.spaces[0], g.spaces[-1]))
        if g.kv_heads:
            r = g.heads // g.kv_heads
            sub = {u: within(r) for u in range(units)}
            qk = {u: within(dqk, g.rotary) for u in range(units)}
            vo = {u: within(dvo) for u in range(units)}
            ps = grouped_heads(order, sub, qk, vo, (dqk, dvo))
        else:
            ps = [
                head_structured(order, [within(d, fixed) for _ in range(units)], d)
                for d, fixed in ((dqk, g.rotary), (dvo, False))
            ]
        perms.update(zip(g.spaces, ps, strict=True))
    return perms


def invert(perms: Mapping[str, torch.Tensor]) -> Perms:
    """The permutations that undo ``perms``."""
    return {s: torch.argsort(p) for s, p in perms.items()}
