"""Write a Model back in the format it was read from, under the checkpoint's own tensor names.

Why: a merged (or otherwise transformed) model is most useful where the original was — a Hugging
Face folder that ``from_pretrained`` loads, a plain state dict the user's own code loads. Each
stored tensor is re-assembled from the graph tensors whose ``TensorSpec.source`` points at it:
views are un-reshaped, un-transposed and written into their slices (GPT-2's fused ``c_attn``), and every view
is read back from the result and must equal the graph tensor it came from — so tied weights
(one stored tensor, several graph tensors) are written once and must agree. Stored tensors the
graph does not use are copied unchanged; so are the folder's non-weight files (``config.json``,
tokenizer files). Sharded inputs keep their sharding; ``.bin`` weights are written as
safetensors. Everything goes through ``atomic_path``.

A normtool checkpoint (graph in its metadata) is written by ``normtool.io.writer.save_model``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from normtool import history
from normtool.errors import NormtoolError
from normtool.io import provenance, reads
from normtool.io.atomic import atomic_path
from normtool.io.safetensors_format import write_stream
from normtool.io.store import TORCH_SUFFIXES, WEIGHT_FILES, Checkpoint
from normtool.io.writer import DEFAULT_MAX_SHARD, save_model
from normtool.load import GRAPH_KEY, HISTORY_KEY
from normtool.model import Model, read_view

#: Files in a model folder that hold weights: never copied (they would be stale).
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx"}


def is_normtool(ck: Checkpoint) -> bool:
    return GRAPH_KEY in ck.metadata


def default_output_name(ck: Checkpoint, tag: str) -> Path:
    """``<stem>.<tag><suffix>`` beside a file input; ``<name>.<tag>`` beside a folder."""
    p = ck.path
    if ck.format == "hf-folder":
        folder = p if p.is_dir() else p.parent
        return folder.parent / f"{folder.name}.{tag}"
    suffix = ".safetensors" if is_normtool(ck) else p.suffix
    return p.parent / f"{p.stem}.{tag}{suffix}"


class _Assembler:
    """Stored tensors of ``model.checkpoint`` rebuilt from the model's graph tensors."""

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
                axis, start, stop = src.slice
                target = out.narrow(axis, start, stop - start)
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


def _folder_files(src: Path) -> list[Path]:
    """The files of a model folder that a folder output carries over (config, tokenizer…)."""
    return [
        f
        for f in sorted(src.iterdir())
        if f.is_file()
        and not f.is_symlink()
        and f.suffix.lower() not in WEIGHT_SUFFIXES
        and not f.name.endswith(".index.json")
    ]


def _shards(ck: Checkpoint) -> list[tuple[str, list[str]]]:
    """``[(output file name, keys)]``: the input's sharding, with ``.bin`` shards renamed."""
    keys = ck.keys()
    if len(ck.files) == 1:
        return [("model.safetensors", keys)]
    if ck.path.is_file():
        index = ck.path
    else:
        index = next(ck.path / n for n in WEIGHT_FILES if (ck.path / n).is_file())
    wm = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(wm[k], []).append(k)

    def rename(fname: str) -> str:
        p = Path(fname)
        if p.suffix in TORCH_SUFFIXES:
            return p.stem.replace("pytorch_model", "model") + ".safetensors"
        return fname

    return [(rename(f), ks) for f, ks in sorted(by_file.items())]


def _write_safetensors(
    ck: Checkpoint, keys: list[str], produce: _Assembler, path: Path, meta: dict[str, str]
) -> int:
    specs = [(k, ck.dtype(k), ck.shape(k)) for k in keys]
    with path.open("wb") as f:
        write_stream(f, specs, produce, meta)
    return sum(torch.empty((), dtype=d).element_size() * math.prod(s) for _, d, s in specs)


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
    metadata (a ``.pt`` output cannot carry metadata; it keeps the input's nesting under
    ``state_dict``/``model``).
    """
    ck = model.checkpoint
    if ck is None:
        raise ValueError("model has no source checkpoint")
    if is_normtool(ck):
        return save_model(model, out, inputs, force, max_shard_size=max_shard_size)
    produce = _Assembler(model)
    meta = {k: v for k, v in ck.metadata.items() if k not in (GRAPH_KEY, HISTORY_KEY)}
    meta.update({"format": "pt", HISTORY_KEY: history.dumps(model.history)})
    with atomic_path(out, inputs, force) as tmp:
        if ck.format == "torch":
            tensors = {k: produce(k) for k in ck.keys()}  # noqa: SIM118
            # the input's wrapper key kept, its other entries (optimizer state, epoch…) not:
            # they describe the training of the input, not this model
            torch.save({ck.nest: tensors} if ck.nest else tensors, tmp)
            provenance.mark_torch(tmp)
        elif ck.format == "safetensors":
            _write_safetensors(ck, ck.keys(), produce, tmp, meta)
        else:
            tmp.mkdir()
            folder = ck.path if ck.path.is_dir() else ck.path.parent
            extra = _folder_files(folder)
            for f in extra:
                shutil.copy2(reads.note(f), tmp / f.name)
            shards = _shards(ck)
            names = [f.name for f in extra] + [fname for fname, _ in shards]
            names += ["model.safetensors.index.json"] if len(shards) > 1 else []
            meta[provenance.FILES_KEY] = json.dumps(names)  # what --force may replace later
            weight_map, total = {}, 0
            for fname, keys in shards:
                total += _write_safetensors(ck, keys, produce, tmp / fname, meta)
                weight_map.update(dict.fromkeys(keys, fname))
            if len(shards) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps(index, indent=2) + "\n", encoding="utf-8"
                )
    return out
