"""Metrics over a label space, as the two queries Loki needs: a block of squared distances
(observed classes × candidate labels, for the head's D²) and elementwise pairs (for evaluation).

Three kinds (DESIGN §3.4): a distance matrix, a tree (hop distance, ``normtool.loki.tree``) and
label embeddings (Euclidean). Each knows its points by name; ``default_labels`` is the label
space used when no ``--labels`` file is given (a tree's leaves in first-seen order; every point
of a matrix or an embedding table). All arithmetic is float64: squared distances are summed
over up to K classes and then compared, so they are computed exactly before being stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from normtool.loki.tree import Tree


@dataclass
class MatrixMetric:
    """A validated square distance matrix (possibly memory-mapped)."""

    names: list[str]
    distances: np.ndarray  # [n, n], symmetric, non-negative, zero diagonal
    kind: str = "distances"

    @property
    def default_labels(self) -> list[int]:
        return list(range(len(self.names)))

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        d = np.asarray(self.distances[np.ix_(rows, cols)], dtype=np.float64)
        return d * d

    def pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = np.asarray(self.distances[a, b], dtype=np.float64)
        return d * d


@dataclass
class TreeMetric:
    """Hop distance in a rooted tree; any node (leaf or internal) can be a label."""

    tree: Tree
    kind: str = "tree"

    @property
    def names(self) -> list[str]:
        return self.tree.names

    @property
    def default_labels(self) -> list[int]:
        return self.tree.leaves

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.tree.squared_block(rows, cols)

    def pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.tree.squared(a, b)


@dataclass
class EmbeddingMetric:
    """Euclidean distance between label embeddings (one row per label)."""

    names: list[str]
    vectors: np.ndarray  # float64 [n, dim], finite
    kind: str = "embeddings"

    @property
    def default_labels(self) -> list[int]:
        return list(range(len(self.names)))

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        a, b = self.vectors[rows], self.vectors[cols]
        # |a|² + |b|² − 2a·b: a (rows × cols) block without a (rows × cols × dim) temporary;
        # clamped because rounding can make an exact 0 slightly negative
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        return np.maximum(sq, 0.0)

    def pairs(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        diff = self.vectors[a] - self.vectors[b]
        return (diff * diff).sum(-1)


Metric = MatrixMetric | TreeMetric | EmbeddingMetric
