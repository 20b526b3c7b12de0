"""Write tensors back in a checkpoint's own format, layout and tensor names.

Why: a merged (or otherwise transformed) model is most useful where the original was — a Hugging
Face folder that ``from_pretrained`` loads, a plain state dict the user's own code loads. This
layer writes the bytes: a ``.pt`` state dict (nesting kept), one safetensors file, or a folder
whose non-weight files (``config.json``, tokenizer files) are copied and whose sharding is kept;
``.bin`` weights are written as safetensors. Everything goes through ``atomic_path``. Which
values the stored tensors get (re-assembled from a Model's graph tensors) is decided above, in
``normtool.save``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from normtool.io import provenance, reads
from normtool.io.atomic import atomic_path
from normtool.io.keys import GRAPH_KEY
from normtool.io.safetensors_format import write_stream
from normtool.io.store import TORCH_SUFFIXES, WEIGHT_FILES, Checkpoint

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
    ck: Checkpoint,
    keys: list[str],
    produce: Callable[[str], torch.Tensor],
    path: Path,
    meta: dict[str, str],
) -> int:
    specs = [(k, ck.dtype(k), ck.shape(k)) for k in keys]
    with path.open("wb") as f:
        write_stream(f, specs, produce, meta)
    return sum(torch.empty((), dtype=d).element_size() * math.prod(s) for _, d, s in specs)


def write_like_checkpoint(
    ck: Checkpoint,
    out: Path,
    produce: Callable[[str], torch.Tensor],
    meta: dict[str, str],
    inputs: Sequence[Path] = (),
    force: bool = False,
) -> Path:
    """Write the stored tensors of ``ck`` (each made by ``produce(key)``) to ``out`` in ``ck``'s
    own format, layout and tensor names, atomically; returns ``out``.

    ``meta`` goes into every safetensors file's header (a ``.pt`` output cannot carry metadata;
    it keeps the input's nesting under ``state_dict``/``model``).
    """
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
            _write_folder(ck, produce, tmp, dict(meta))
    return out


def _write_folder(
    ck: Checkpoint, produce: Callable[[str], torch.Tensor], tmp: Path, meta: dict[str, str]
) -> None:
    """A Hugging Face folder: the input's non-weight files copied, its sharding kept."""
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
