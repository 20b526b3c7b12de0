"""Labelled data files for ``barrier`` and ``merge --calib``: ``inputs`` (and ``labels``).

A ``.safetensors`` or ``.npz`` file (``allow_pickle=False``: data files are never code). The
inputs must fit the graph's first input: token ids (integers inside the vocabulary) or float
features/pixels whose trailing shape matches.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from normtool.analysis import size_free
from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.io import reads
from normtool.io.safetensors_format import read_header


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not reads.note(path).is_file():
        raise NormtoolError("no such data file", path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        read_header(path)
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise NormtoolError(f"not a readable .npz file ({e})", path) from e
    raise NormtoolError(f"data must be .safetensors or .npz, not {suffix or '(none)'!r}", path)


def load_data(
    path: Path, graph: Graph, need_labels: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels)`` checked against ``graph``'s first input; labels None if absent."""
    arrays = _read(path)
    if "inputs" not in arrays:
        raise NormtoolError(f"no 'inputs' array (found: {', '.join(arrays) or 'none'})", path)
    x = arrays["inputs"]
    y = arrays.get("labels")
    if need_labels and y is None:
        raise NormtoolError("no 'labels' array", path)
    spec = graph.inputs[0]
    if x.dim() != len(spec.shape) or len(x) == 0:
        raise NormtoolError(
            f"'inputs' has shape {tuple(x.shape)}; the model takes {list(spec.shape)}", path
        )
    free = (2, 3) if size_free(graph, spec) else ()  # a CNN's image: any height and width
    for ax, d in enumerate(spec.shape):
        if isinstance(d, int) and x.shape[ax] != d and ax not in free:
            raise NormtoolError(
                f"'inputs' has shape {tuple(x.shape)}; the model takes {list(spec.shape)}", path
            )
    if spec.kind == "tokens":
        if x.is_floating_point() or x.dtype == torch.bool:
            raise NormtoolError("'inputs' must be integer token ids", path)
        x = x.long()
        if bool((x < 0).any()) or bool((x >= spec.vocab).any()):
            raise NormtoolError(f"'inputs' has token ids outside 0..{spec.vocab - 1}", path)
    elif not x.is_floating_point():
        x = x.float()
    if y is not None:
        if y.is_floating_point() or len(y) != len(x):
            raise NormtoolError(
                f"'labels' must be integers, one per input row (got {y.dtype} {tuple(y.shape)})",
                path,
            )
        y = y.long()
    return x, y
