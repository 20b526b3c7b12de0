"""Loss and accuracy along the straight line between two models, and its barrier.

``barrier = max_α [ L((1−α)·A + α·B) − ((1−α)·L(A) + α·L(B)) ]`` (Frankle et al. 2020; the
measure Git Re-Basin reports): how far the path rises above the chord between its endpoints.
Zero means the two models are linearly mode-connected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from normtool.graph import Graph
from normtool.merge.bn_repair import has_batchnorm, recompute_batchnorm
from normtool.merge.interpolate import interpolate
from normtool.runtime.torch_exec import run_graph

Weights = Mapping[str, torch.Tensor]


@dataclass
class PathCurve:
    alphas: list[float]
    losses: list[float]
    accuracies: list[float]
    barrier: float
    bn_recomputed: bool  # BatchNorm statistics re-measured on the data at interior points


def evaluate(
    graph: Graph, weights: Weights, x: torch.Tensor, y: torch.Tensor, batch: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of the graph's first output against ``y``."""
    total_loss, correct, count = 0.0, 0, 0
    name = graph.inputs[0].name
    for i in range(0, len(x), batch):
        logits = run_graph(graph, weights, {name: x[i : i + batch]})[graph.outputs[0]]
        logits = logits.reshape(-1, logits.shape[-1])
        labels = y[i : i + batch].reshape(-1)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += len(labels)
    return total_loss / count, correct / count


def barrier_height(alphas: list[float], losses: list[float]) -> float:
    """Largest rise of the loss above the line through the endpoint losses."""
    l0, l1 = losses[0], losses[-1]
    return max(loss - ((1 - a) * l0 + a * l1) for a, loss in zip(alphas, losses, strict=True))


def linear_path(
    graph: Graph,
    wa: Weights,
    wb: Weights,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    wrap: Callable[[Iterable[float]], Iterable[float]] | None = None,
) -> PathCurve:
    """Evaluate ``steps`` evenly spaced points α ∈ [0, 1] from ``wa`` (α=0) to ``wb`` (α=1).

    With BatchNorm, the statistics of interior points are recomputed on ``x`` (stale statistics
    would measure the wrong network); the endpoints keep their own.
    """
    alphas = [i / (steps - 1) for i in range(steps)]
    repair = has_batchnorm(graph)
    losses, accs = [], []
    for a in wrap(alphas) if wrap else alphas:
        w = interpolate(graph, [wa, wb], [1 - a, a])
        if repair and 0 < a < 1:
            w.update(recompute_batchnorm(graph, w, x))
        loss, acc = evaluate(graph, w, x, y)
        losses.append(loss)
        accs.append(acc)
    return PathCurve(alphas, losses, accs, barrier_height(alphas, losses), repair)
