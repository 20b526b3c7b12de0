"""Weight matching (Ainsworth et al. 2022, Algorithm 1): permute model B towards model A.

Objective: maximise ``Σ_tensors ⟨W_A, P(W_B)⟩`` — equivalently minimise the L2 distance
``‖W_A − P(W_B)‖``. It is solved one group at a time, the others held fixed: for a plain group the
objective restricted to it is ``Σ_i C[i, p(i)]`` with ``C = Σ_(tensor, axis) A_axis · B_axisᵀ``
(each tensor flattened with the group's axis first, B already permuted on its other axes), a
linear assignment problem (``scipy.optimize.linear_sum_assignment``). For a head group the
assignment is two-level: the best within-head assignment for every (head of A, head of B) pair,
q/k and v/o separately, then the assignment of heads by the sum of those scores — the exact
optimum over head-structured permutations.

Schedule: identity start (or ``init``), groups swept in a seeded random order, a group's new
permutation kept only if it raises the objective, stop after a sweep without improvement or at
``max_iter`` sweeps. A group none of whose neighbours changed since it was last solved is not
solved again (its problem, hence its answer, is unchanged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from normtool.graph import Graph
from normtool.merge.groups import Group
from normtool.merge.permute import (
    Perms,
    grouped_heads,
    head_structured,
    identity_perms,
    permute_tensor,
)

#: Wraps the groups of one sweep (the CLI passes a progress bar); identity by default.
SweepWrapper = Callable[[Iterable[Group], int], Iterable[Group]]

#: A new permutation must raise the group's score by more than this fraction of its magnitude;
#: guards against float noise making equal-score assignments look like progress forever.
_REL_TOL = 1e-9


@dataclass
class MatchResult:
    perms: Perms
    sweeps: int
    objective_before: float  # Σ ⟨W_A, W_B⟩ at the start
    objective_after: float  # Σ ⟨W_A, P(W_B)⟩ at the end


def distinct_tensors(graph: Graph) -> list[str]:
    """Graph tensors with tied duplicates (same stored view) dropped: each counted once."""
    seen: set[tuple] = set()
    names = []
    for name, spec in graph.tensors.items():
        src = spec.source
        key = (src.key, src.slice, src.transpose)
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names


def _axes_of(graph: Graph, names: list[str]) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for name in names:
        for ax, s in enumerate(graph.tensors[name].axes):
            if s is not None:
                out.setdefault(s, []).append((name, ax))
    return out


def _others(graph: Graph, name: str, axis: int, perms: Perms) -> set[str]:
    """The permuted spaces of tensor ``name``'s axes other than ``axis``."""
    axes = graph.tensors[name].axes
    return {s for ax, s in enumerate(axes) if ax != axis and s in perms}


def _similarity(
    graph: Graph,
    entries: list[tuple[str, int]],
    wa: Mapping[str, torch.Tensor],
    wb: Mapping[str, torch.Tensor],
    perms: Perms,
    size: int,
) -> np.ndarray:
    """``C[i, j] = Σ ⟨A[unit i], P_other(B)[unit j]⟩`` over every (tensor, axis) of one space."""
    c = torch.zeros(size, size)
    for name, ax in entries:
        b = permute_tensor(wb[name], graph.tensors[name].axes, perms, skip_axis=ax)
        a2 = wa[name].movedim(ax, 0).reshape(size, -1)
        b2 = b.movedim(ax, 0).reshape(size, -1)
        c.addmm_(a2.float(), b2.float().T)
    return c.double().numpy()


def _assign(c: np.ndarray) -> tuple[np.ndarray, float]:
    # imported here: scipy costs every other command ~0.35 s of start-up
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(c, maximize=True)
    return cols[np.argsort(rows)], float(c[rows, cols].sum())


def _score(c: np.ndarray, p: torch.Tensor) -> float:
    return float(c[np.arange(len(p)), p.numpy()].sum())


def _trace(c: np.ndarray, p: np.ndarray) -> float:
    return float(c[np.arange(len(p)), p].sum())


def _within(block: np.ndarray, fixed: bool) -> tuple[np.ndarray, float]:
    """Best within-head permutation for a block of similarities, or the identity if ``fixed``."""
    if fixed:
        keep = np.arange(len(block))
        return keep, _trace(block, keep)
    return _assign(block)


def _solve_heads(
    heads: int, sims: list[np.ndarray], rotary: bool = False
) -> tuple[list[torch.Tensor], float]:
    """Best head-structured permutation of each space in ``sims`` (one head order shared;
    ``rotary``: the first space's dims stay in place inside each head)."""
    dims = [len(c) // heads for c in sims]
    head_score = np.zeros((heads, heads))
    within: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in sims]
    for si, (c, d) in enumerate(zip(sims, dims, strict=True)):
        for a in range(heads):
            for b in range(heads):
                block = c[a * d : (a + 1) * d, b * d : (b + 1) * d]
                p, s = _within(block, rotary and si == 0)
                within[si][a, b] = p
                head_score[a, b] += s
    order, total = _assign(head_score)
    perms = [
        head_structured(
            torch.from_numpy(order),
            [torch.from_numpy(within[si][a, int(order[a])]) for a in range(heads)],
            d,
        )
        for si, d in enumerate(dims)
    ]
    return perms, total


def _solve_kv_groups(g: Group, sims: list[np.ndarray]) -> tuple[list[torch.Tensor], float]:
    """Head-structured permutations of a grouped-query attention's (q, k, v, out) spaces.

    For each (new kv group a, old kv group b): the order of the query heads inside the group
    by an assignment of their pairwise scores, each pair taking its own best dims; given that
    order, the q/k dims by one assignment of the key heads' block plus the matched query
    heads' blocks (identity when rotary), and the v dims likewise with the output heads; then
    the query order again given those dims. Then the kv groups by an assignment of those
    scores. Not the exact optimum over this structure (the inner choices are made one after
    the other, not jointly) — exact for plain attention, where a group is one head — but weight
    matching keeps a new permutation only when it raises the objective.
    """
    cq, ck, cv, co = sims
    kv, r = g.kv_heads, g.heads // g.kv_heads
    dqk, dvo = len(ck) // kv, len(cv) // kv

    def block(c: np.ndarray, d: int, a: int, b: int) -> np.ndarray:
        return c[a * d : (a + 1) * d, b * d : (b + 1) * d]

    score = np.zeros((kv, kv))
    best: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for a in range(kv):
        for b in range(kv):
            qs = [[block(cq, dqk, a * r + j, b * r + i) for i in range(r)] for j in range(r)]
            os_ = [[block(co, dvo, a * r + j, b * r + i) for i in range(r)] for j in range(r)]
            k_blk, v_blk = block(ck, dqk, a, b), block(cv, dvo, a, b)
            own = [
                [_within(qs[j][i], g.rotary)[1] + _assign(os_[j][i])[1] for i in range(r)]
                for j in range(r)
            ]
            sigma, _ = _assign(np.array(own))
            rho, _ = _within(k_blk + sum(qs[j][sigma[j]] for j in range(r)), g.rotary)
            tau, _ = _assign(v_blk + sum(os_[j][sigma[j]] for j in range(r)))
            pair = [
                [_trace(qs[j][i], rho) + _trace(os_[j][i], tau) for i in range(r)] for j in range(r)
            ]
            sigma, s = _assign(np.array(pair))
            score[a, b] = _trace(k_blk, rho) + _trace(v_blk, tau) + s
            best[a, b] = (sigma, rho, tau)
    order, total = _assign(score)
    chosen = {int(order[a]): best[a, int(order[a])] for a in range(kv)}
    parts = [{b: torch.from_numpy(c[i]) for b, c in chosen.items()} for i in range(3)]
    return grouped_heads(torch.from_numpy(order), *parts, (dqk, dvo)), total


def objective(
    graph: Graph,
    wa: Mapping[str, torch.Tensor],
    wb: Mapping[str, torch.Tensor],
    perms: Perms,
) -> float:
    """``Σ ⟨W_A, P(W_B)⟩`` over the distinct floating-point tensors (fp32 dot products, summed
    in fp64: this is reported, not optimised, so BLAS speed wins over the last digits)."""
    total = 0.0
    for name in distinct_tensors(graph):
        a = wa[name]
        if a.is_floating_point():
            b = permute_tensor(wb[name], graph.tensors[name].axes, perms)
            total += float(torch.dot(a.reshape(-1).float(), b.reshape(-1).float()))
    return total


def weight_matching(
    graph: Graph,
    groups: list[Group],
    wa: Mapping[str, torch.Tensor],
    wb: Mapping[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
    init: Perms | None = None,
    wrap: SweepWrapper | None = None,
) -> MatchResult:
    """Permutations of B's groups that make B closest to A (``wa``, ``wb``: float32 tensors)."""
    perms = dict(init) if init is not None else identity_perms(graph, groups)
    entries = _axes_of(graph, [n for n in distinct_tensors(graph) if wa[n].is_floating_point()])
    # A tensor with no other permuted axis (embeddings, norms, biases, a vocabulary head) adds
    # the same term to C in every sweep: compute it once. For GPT-2 this is the [V, d] embedding.
    fixed: dict[str, np.ndarray] = {}
    for space, ents in list(entries.items()):
        if space not in perms:
            continue
        const = [(n, ax) for n, ax in ents if not _others(graph, n, ax, perms)]
        entries[space] = [e for e in ents if e not in const]
        fixed[space] = _similarity(graph, const, wa, wb, perms, graph.spaces[space].size)
    # A group's C depends only on the permutations of its neighbours (the other permuted axes of
    # its tensors). If none changed since it was last solved, solving again returns the same
    # optimum: skip it. Exact, and it spares most of the confirming last sweep.
    neighbours = {
        g.name: sorted(
            {o for s in g.spaces for n, ax in entries[s] for o in _others(graph, n, ax, perms)}
        )
        for g in groups
    }
    version = dict.fromkeys(perms, 0)
    solved_at: dict[str, tuple[int, ...]] = {}
    rng = np.random.default_rng(seed)
    before = objective(graph, wa, wb, perms)
    sweeps = 0
    while sweeps < max_iter:
        sweeps += 1
        order = [groups[i] for i in rng.permutation(len(groups))]
        improved = False
        for g in wrap(order, sweeps) if wrap else order:
            state = tuple(version[o] for o in neighbours[g.name])
            if solved_at.get(g.name) == state:
                continue
            solved_at[g.name] = state
            sims = [
                fixed[s] + _similarity(graph, entries[s], wa, wb, perms, graph.spaces[s].size)
                for s in g.spaces
            ]
            old = sum(_score(c, perms[s]) for c, s in zip(sims, g.spaces, strict=True))
            if g.kv_heads:
                new_perms, new = _solve_kv_groups(g, sims)
            elif g.heads:
                new_perms, new = _solve_heads(g.heads, sims, g.rotary)
            else:
                p, new = _assign(sims[0])
                new_perms = [torch.from_numpy(p)]
            if new - old > _REL_TOL * max(abs(old), abs(new), 1e-30):
                improved = True
                for s, p in zip(g.spaces, new_perms, strict=True):
                    perms[s] = p.to(torch.int64)
                    version[s] += 1
        if not improved:
            break
    return MatchResult(perms, sweeps, before, objective(graph, wa, wb, perms))
