"""Write a Model: as a normtool checkpoint (graph and history in the safetensors metadata), or
back in its source checkpoint's own format.

Why this sits above ``normtool.io``: turning a Model into tensors and metadata needs the graph,
the history and the loaded checkpoint; writing those bytes atomically (streamed, sharded, in a
Hugging Face folder) does not. io keeps the byte-level formats and publishing, and this module
feeds them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from normtool import __version__, history
from normtool.errors import NormtoolError
from normtool.graph import Source
from normtool.io.keys import GRAPH_KEY, HISTORY_KEY, VERSION_KEY
from normtool.io.safetensors_format import DTYPES
from normtool.io.source_writer import is_normtool, write_like_checkpoint
from normtool.io.writer import DEFAULT_MAX_SHARD, write_checkpoint
from normtool.model import Model, read_view, sliced


def save_model(
    model: Model,
    out: Path,
    inputs: Sequence[Path] = (),
    force: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
    check: Callable[[str, torch.Tensor], None] | None = None,
) -> Path:
    """Write ``model`` to ``out`` (a ``.safetensors`` file), keeping each tensor's dtype.

    The file alone is enough to run, export, verify or transform it again. Returns the path to
    open: ``out``, or the index beside it when the tensors exceed ``max_shard_size`` bytes and
    are written as shards. ``check(name, tensor)`` vets each tensor (or row block) as written.
    """
    graph = model.graph.copy()
    flipped = set()
    for name, spec in graph.tensors.items():
        src = spec.source
        # A matrix stored transposed (GPT-2's Conv1D keeps [in, out]) stays so: a pass's
        # elementwise rewrite of the view keeps its memory layout, and writing it back in the
        # graph's orientation would cost a transposing copy of every such weight.
        keep = src.transpose and src.reshape is None and len(spec.shape) == 2
        graph.tensors[name] = replace(spec, source=Source(name, transpose=keep))
        if keep:
            flipped.add(name)
    meta = {
        GRAPH_KEY: graph.to_json(),
        HISTORY_KEY: json.dumps(model.history),
        VERSION_KEY: __version__,
        "format": "pt",
    }
    specs = [
        (n, DTYPES[s.dtype], s.shape[::-1] if n in flipped else s.shape)
        for n, s in graph.tensors.items()
    ]
    dtype_of = {n: d for n, d, _ in specs}

    def produce(name: str) -> torch.Tensor | Iterable[torch.Tensor]:
        if name in flipped:
            return model.tensor(name).to(dtype_of[name]).t()
        return (b.to(dtype_of[name]) for b in model.row_blocks(name))

    pending = history.pending_digests(model.history)

    def digests() -> dict[str, str]:
        return {str(p): p.future.result() for p in pending}

    path = write_checkpoint(
        Path(out), specs, produce, meta, inputs, force, on_tensor, digests, check, max_shard_size
    )
    history.resolve_digests(model.history)
    return path


class _Assembler:
    """Stored tensors of ``model.checkpoint`` rebuilt from the model's graph tensors.

    Each stored tensor is re-assembled from the graph tensors whose ``TensorSpec.source`` points
    at it: views are un-reshaped, un-transposed and written into their slices (GPT-2's fused
    ``c_attn``), and every view is read back from the result and must equal the graph tensor it
    came from — so tied weights (one stored tensor, several graph tensors) are written once and
    must agree. Stored tensors the graph does not use are copied unchanged.
    """

    def __init__(self, model: Model) -> None:
        if model.checkpoint is None:
            raise ValueError("model has no source checkpoint")
        self.model = model
        self.ck = model.checkpoint
        self.by_key: dict[str, list[str]] = {}
        for name, spec in model.graph.tensors.items():
            self.by_key.setdefault(spec.source.key, []).append(name)

    def __call__(self, key: str) -> torch.Tensor:
        names = self.by_key.get(key)
        stored = self.ck.get(key)
        if not names:
            return stored
        graph = self.model.graph
        out = stored.clone()
        values = {}
        for name in names:
            src = graph.tensors[name].source
            v = self.model.tensor(name).to(stored.dtype)
            values[name] = v
            target = out
            if src.slice is not None:
                target = sliced(out, src.slice)
            # undo read_view's steps in reverse: reshape, then transpose
            view = v.reshape(target.t().shape if src.transpose else target.shape)
            target.copy_(view.t() if src.transpose else view)
        for name, v in values.items():
            if not torch.equal(read_view(self.ck, graph.tensors[name].source, {key: out}), v):
                others = [n for n in names if n != name]
                raise NormtoolError(
                    f"graph tensors {name!r} and {others} share the stored tensor {key!r} but "
                    "now differ; untie them before writing"
                )
        return out


def save_like_source(
    model: Model,
    out: Path,
    inputs: Sequence[Path] = (),
    force: bool = False,
    max_shard_size: int = DEFAULT_MAX_SHARD,
) -> Path:
    """Write ``model`` to ``out`` in its source checkpoint's format; returns the path to open
    (``out``, or the index of a sharded normtool output: see ``save_model``).

    The model's history is stored as JSON under ``normtool.history`` in every safetensors file's
    metadata (a ``.pt`` output cannot carry metadata).
    """
    ck = model.checkpoint
    if ck is None:
        raise ValueError("model has no source checkpoint")
    if is_normtool(ck):
        return save_model(model, out, inputs, force, max_shard_size=max_shard_size)
    meta = {k: v for k, v in ck.metadata.items() if k not in (GRAPH_KEY, HISTORY_KEY)}
    meta.update({"format": "pt", HISTORY_KEY: history.dumps(model.history)})
    return write_like_checkpoint(ck, out, _Assembler(model), meta, inputs, force)
