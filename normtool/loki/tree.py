"""Tree metrics: hop distance through the lowest common ancestor, without an N×N matrix.

``d(u, v) = depth(u) + depth(v) − 2·depth(lca(u, v))``. Only the *depth* of the LCA is needed,
and that is the minimum depth on the Euler tour between the first visits of ``u`` and ``v``: a
range-minimum query answered in O(1) from a sparse table. Every query is a pair of numpy
gathers, so a (K, N) block of squared distances costs O(K·N) vectorised work and O(V log V)
memory for the table — never the O(N²) matrix (DESIGN §3.4, issue 6: N up to 100,000).

A tree arrives as an edge list ``(child, parent)`` in file order (``parent`` None: a declared
root). ``build_tree`` rejects what is not a single rooted tree — a node with two parents, a
cycle, several roots — naming the offending nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normtool.errors import NormtoolError


@dataclass
class Tree:
    """A rooted tree over ``names`` (first-seen order) with an LCA-depth index."""

    names: list[str]
    parent: np.ndarray  # int64 [V], −1 at the root
    depth: np.ndarray  # int64 [V]
    leaves: list[int]  # nodes that are nobody's parent, first-seen order
    _first: np.ndarray  # int64 [V]: first position of each node on the Euler tour
    _table: np.ndarray  # int32 [levels, 2V−1]: _table[k, i] = min depth on tour[i : i + 2^k]
    _log2: np.ndarray  # int64 [2V]: floor(log2(n)), exact in integers

    def lca_depth(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Depth of the lowest common ancestor of each pair ``(a[i], b[i])`` (broadcasting)."""
        fa, fb = self._first[a], self._first[b]
        lo, hi = np.minimum(fa, fb), np.maximum(fa, fb)
        k = self._log2[hi - lo + 1]
        return np.minimum(self._table[k, lo], self._table[k, hi - (1 << k) + 1]).astype(np.int64)

    def squared(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Squared hop distances between ``a`` and ``b`` (broadcasting), float64."""
        d = self.depth[a] + self.depth[b] - 2 * self.lca_depth(a, b)
        return (d * d).astype(np.float64)

    def squared_block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Squared hop distances, float64 [len(rows), len(cols)].

        Per row ``u`` one sweep of the tour: the running minimum of the depths outward from
        ``u``'s first visit (rightward, and leftward reversed) is the LCA depth with every node
        at once — O(V + N) per row in two numpy scans, several times faster than ``len(cols)``
        sparse-table queries with their scattered gathers.
        """
        tour = self._table[0]  # int32 depths along the tour
        first_cols = self._first[cols]
        depth_cols = self.depth[cols]
        sweep = np.empty_like(tour)
        out = np.empty((len(rows), len(cols)), dtype=np.float64)
        for r, u in enumerate(rows):
            f = self._first[u]
            np.minimum.accumulate(tour[f:], out=sweep[f:])
            np.minimum.accumulate(tour[f::-1], out=sweep[f::-1])
            np.subtract(depth_cols + self.depth[u], 2 * sweep[first_cols], out=out[r])
        return np.square(out, out=out)


def build_tree(edges: Sequence[tuple[str, str | None]], path: Path | str) -> Tree:
    """Validate an edge list and index it. Raises NormtoolError (naming ``path``) unless the
    edges form exactly one rooted tree."""
    index: dict[str, int] = {}
    names: list[str] = []

    def node(name: str) -> int:
        i = index.get(name)
        if i is None:
            i = index[name] = len(names)
            names.append(name)
        return i

    parent_of: dict[int, int] = {}
    is_parent: set[int] = set()
    for child, par in edges:
        c = node(child)
        if par is None:
            continue
        p = node(par)
        if c == p:
            raise NormtoolError(f"tree has a cycle: {child!r} is its own parent", path)
        old = parent_of.get(c)
        if old is not None and old != p:
            raise NormtoolError(
                f"tree node {child!r} has two parents ({names[old]!r} and {par!r})", path
            )
        parent_of[c] = p
        is_parent.add(p)
    if not names:
        raise NormtoolError("tree is empty", path)
    roots = [i for i in range(len(names)) if i not in parent_of]
    if not roots:
        raise NormtoolError("tree has a cycle: every node has a parent (no root)", path)
    if len(roots) > 1:
        shown = ", ".join(repr(names[r]) for r in roots[:5])
        more = f" and {len(roots) - 5} more" if len(roots) > 5 else ""
        raise NormtoolError(f"tree has {len(roots)} roots ({shown}{more}); it needs one", path)

    v = len(names)
    children: list[list[int]] = [[] for _ in range(v)]
    for c in range(v):  # first-seen order of children
        if c in parent_of:
            children[parent_of[c]].append(c)
    parent = np.full(v, -1, dtype=np.int64)
    for c, p in parent_of.items():
        parent[c] = p
    depth = np.zeros(v, dtype=np.int64)
    first = np.full(v, -1, dtype=np.int64)
    tour: list[int] = []
    stack = [(roots[0], 0)]
    while stack:  # iterative DFS: deep trees must not hit Python's recursion limit
        n, next_child = stack.pop()
        if next_child == 0:
            first[n] = len(tour)
        tour.append(int(depth[n]))
        if next_child < len(children[n]):
            c = children[n][next_child]
            depth[c] = depth[n] + 1
            stack.append((n, next_child + 1))
            stack.append((c, 0))
    unreached = np.flatnonzero(first < 0)
    if unreached.size:
        raise NormtoolError(
            f"tree has a cycle through {names[unreached[0]]!r} (not reachable from the root "
            f"{names[roots[0]]!r})",
            path,
        )
    levels = [np.asarray(tour, dtype=np.int32)]
    while (1 << len(levels)) <= len(tour):
        prev, half = levels[-1], 1 << (len(levels) - 1)
        levels.append(np.minimum(prev[:-half], prev[half:]))
    # one padded 2-D table, so a query is a single gather whatever its span
    table = np.full((len(levels), len(tour)), np.iinfo(np.int32).max, dtype=np.int32)
    for k, row in enumerate(levels):
        table[k, : row.size] = row
    log2 = np.zeros(len(tour) + 1, dtype=np.int64)
    for k in range(1, len(levels)):
        log2[1 << k :] += 1
    leaves = [i for i in range(v) if i not in is_parent]
    return Tree(names, parent, depth, leaves, first, table, log2)
