"""Write a Model as a normtool checkpoint: safetensors whose metadata hold the graph and history.

The file alone is enough to run, export, verify or transform it again. Tensors are produced one
at a time (read from the source checkpoint or taken from a pass's results) and streamed into an
atomic temporary file, so memory stays bounded and no partial output ever carries the final name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from normtool import __version__
from normtool.graph import Source
from normtool.io.atomic import atomic_path
from normtool.io.safetensors_format import DTYPES, write_stream
from normtool.load import GRAPH_KEY, HISTORY_KEY
from normtool.model import Model


def save_model(
    model: Model,
    out: Path,
    inputs: Sequence[Path] = (),
    force: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> Path:
    """Write ``model`` to ``out`` (a ``.safetensors`` file), keeping each tensor's dtype."""
    graph = model.graph.copy()
    for name, spec in graph.tensors.items():
        graph.tensors[name] = replace(spec, source=Source(name))
    meta = {
        GRAPH_KEY: graph.to_json(),
        HISTORY_KEY: json.dumps(model.history),
        "normtool.version": __version__,
        "format": "pt",
    }
    specs = [(n, DTYPES[s.dtype], s.shape) for n, s in graph.tensors.items()]
    dtype_of = {n: d for n, d, _ in specs}

    def produce(name: str) -> torch.Tensor:
        return model.tensor(name).to(dtype_of[name])

    with atomic_path(out, inputs, force) as tmp, tmp.open("wb") as f:
        write_stream(f, specs, produce, meta, on_tensor)
    return out
