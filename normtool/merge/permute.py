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


def random_perms(graph: Graph, groups: list[Group], gen: torch.Generator) -> Perms:
    """Uniformly random permutations respecting every group's structure (tests, benchmarks)."""
    perms: Perms = {}
    for g in groups:
        if not g.heads:
            perms[g.spaces[0]] = torch.randperm(graph.spaces[g.spaces[0]].size, generator=gen)
            continue
        order = torch.randperm(g.heads, generator=gen)
        for s in g.spaces:
            dim = graph.spaces[s].size // g.heads
            within = [torch.randperm(dim, generator=gen) for _ in range(g.heads)]
            perms[s] = head_structured(order, within, dim)
    return perms


def invert(perms: Mapping[str, torch.Tensor]) -> Perms:
    """The permutations that undo ``perms``."""
    return {s: torch.argsort(p) for s, p in perms.items()}
