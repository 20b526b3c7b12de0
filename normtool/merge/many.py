"""Three or more models: MergeMany (Ainsworth et al. 2022, Algorithm 3) or match-to-reference.

MergeMany: every model is matched to the mean of all the others (in their current bases), in a
seeded random order, until a round changes no permutation (or ``max_iter`` rounds); the models
then share a basis that favours none of them. ``reference``: every model is matched to the first,
whose basis is kept — simpler, and the output stays in a known model's basis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from normtool.graph import Graph
from normtool.merge.groups import Group
from normtool.merge.matching import SweepWrapper, weight_matching
from normtool.merge.permute import Perms, identity_perms, permute_weights

Weights = Mapping[str, torch.Tensor]


@dataclass
class ManyResult:
    perms: list[Perms]  # one per model; applying perms[i] to model i puts it in the shared basis
    sweeps: int  # weight-matching sweeps, all matchings together
    rounds: int  # MergeMany rounds (1 for reference matching)


def match_to_reference(
    graph: Graph,
    groups: list[Group],
    models: Sequence[Weights],
    max_iter: int,
    seed: int,
    wrap: SweepWrapper | None = None,
) -> ManyResult:
    """Permute every model after the first into the first one's basis."""
    perms = [identity_perms(graph, groups)]
    sweeps = 0
    for i, m in enumerate(models[1:], start=1):
        r = weight_matching(graph, groups, models[0], m, max_iter, seed + i, wrap=wrap)
        perms.append(r.perms)
        sweeps += r.sweeps
    return ManyResult(perms, sweeps, 1)


def _mean(graph: Graph, models: Sequence[Weights]) -> dict[str, torch.Tensor]:
    """Elementwise mean of the float tensors (others taken from the first model)."""
    first = models[0]
    return {
        name: torch.stack([m[name] for m in models]).mean(0)
        if first[name].is_floating_point()
        else first[name]
        for name in graph.tensors
    }


def merge_many(
    graph: Graph,
    groups: list[Group],
    models: Sequence[Weights],
    max_iter: int,
    seed: int,
    wrap: SweepWrapper | None = None,
) -> ManyResult:
    """Bring all ``models`` into one basis by matching each to the mean of the others."""
    perms = [identity_perms(graph, groups) for _ in models]
    current = [dict(m) for m in models]
    rng = np.random.default_rng(seed)
    sweeps = rounds = 0
    while rounds < max_iter:
        rounds += 1
        changed = False
        for i in rng.permutation(len(models)):
            target = _mean(graph, [current[j] for j in range(len(models)) if j != i])
            r = weight_matching(
                graph, groups, target, models[i], max_iter, seed + rounds, perms[i], wrap
            )
            sweeps += r.sweeps
            if any(not torch.equal(r.perms[s], perms[i][s]) for s in r.perms):
                changed = True
                perms[i] = r.perms
                current[i] = permute_weights(graph, models[i], r.perms)
        if not changed:
            break
    return ManyResult(perms, sweeps, rounds)
