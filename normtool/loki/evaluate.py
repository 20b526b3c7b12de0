"""``--eval DATA``: how far argmax and Loki predictions land from the true labels.

DATA is a ``.safetensors`` or ``.npz`` file holding the model's inputs (under the graph input
names, or ``inputs`` for a single-input model) and ``labels``: integer indices into the N
labels of the label space (so unobserved labels can be true labels too). Reported for both
predictors: the mean squared distance ``E[d(ŷ, y)²]`` under the metric (the quantity Loki
minimises in expectation) and top-1 accuracy. Argmax predicts output i's label, ``observed[i]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from normtool.errors import NormtoolError
from normtool.io import reads
from normtool.io.safetensors_format import read_header
from normtool.loki.head import OUTPUT
from normtool.loki.labels import LabelSpace
from normtool.model import Model
from normtool.runtime.torch_exec import run_graph


def load_eval_data(
    path: Path, model: Model, n_labels: int
) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    """Inputs by graph input name, and labels as int64 indices; NormtoolError on any mismatch."""
    arrays = _read_arrays(path)
    names = [i.name for i in model.graph.inputs]
    if len(names) == 1 and names[0] not in arrays and "inputs" in arrays:
        arrays[names[0]] = arrays.pop("inputs")
    missing = [n for n in [*names, "labels"] if n not in arrays]
    if missing:
        raise NormtoolError(
            f"eval data lacks {missing} (has {sorted(arrays)}); it needs the model inputs "
            f"{names} (or 'inputs') and 'labels'",
            path,
        )
    labels = arrays["labels"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise NormtoolError(
            f"'labels' must be a 1-D integer array, got {labels.dtype}{labels.shape}", path
        )
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise NormtoolError(f"'labels' must index the {n_labels} labels (0..{n_labels - 1})", path)
    inputs = {n: torch.from_numpy(np.ascontiguousarray(arrays[n])) for n in names}
    for n, x in inputs.items():
        if x.shape[0] != labels.size:
            raise NormtoolError(
                f"input {n!r} has {x.shape[0]} rows but there are {labels.size} labels", path
            )
    return inputs, labels.astype(np.int64)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    suffix = path.suffix.lower()
    if not reads.note(path).is_file():
        raise NormtoolError("no such eval data file", path)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (ValueError, OSError) as e:
            raise NormtoolError(f"not a readable .npz ({e})", path) from e
    if suffix == ".safetensors":
        from safetensors import safe_open

        read_header(path)
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k).numpy() for k in f.keys()}  # noqa: SIM118
    raise NormtoolError("eval data must be .safetensors or .npz", path)


def evaluate(
    model: Model,
    space: LabelSpace,
    data: Path,
    batch: int = 256,
    progress: Callable[[Iterable[int], int], Iterator[int]] | None = None,
) -> dict[str, dict[str, float] | int]:
    """Mean squared distance and top-1 accuracy of argmax and Loki on ``data``."""
    inputs, labels = load_eval_data(data, model, space.n)
    starts: Iterable[int] = range(0, labels.size, batch)
    if progress is not None:
        starts = progress(starts, -(-labels.size // batch))
    argmax, loki = [], []
    for s in starts:
        out = run_graph(
            model.graph, model.weights(), {k: v[s : s + batch] for k, v in inputs.items()}
        )
        argmax.append(space.observed[out["logits"].argmax(-1).numpy()])
        loki.append(out[OUTPUT].numpy())
    result: dict[str, dict[str, float] | int] = {"examples": int(labels.size)}
    for name, pred in (("argmax", argmax), ("loki", loki)):
        p = np.concatenate(pred) if pred else np.zeros(0, dtype=np.int64)
        sq = space.metric.pairs(space.points[p], space.points[labels])
        result[name] = {
            "mean_squared_distance": float(sq.mean()) if sq.size else float("nan"),
            "top1_accuracy": float((p == labels).mean()) if p.size else float("nan"),
        }
    return result
