"""Write a Model as a normtool checkpoint: safetensors whose metadata hold the graph and history.

The file alone is enough to run, export, verify or transform it again. Tensors are produced one
at a time (read from the source checkpoint or taken from a pass's results) and streamed into an
atomic temporary file, so memory stays bounded and no partial output ever carries the final name.

Checkpoints larger than ``max_shard_size`` are written the Hugging Face way: shards
``<stem>-00001-of-0000n.safetensors`` and an index ``<stem>.safetensors.index.json`` whose
``weight_map`` names each tensor's shard. The graph and history go into the index's
``metadata`` and into every shard, so any shard still says what it belongs to. All files are
written in a temporary folder beside the output and moved into place shards first, index last:
the index is the name a user opens, and it appears only once every shard it lists is there.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from normtool import __version__, history
from normtool.errors import NormtoolError
from normtool.graph import Source
from normtool.io.atomic import atomic_path, check_output_path, publish, temp_name
from normtool.io.safetensors_format import DTYPES, write_stream
from normtool.load import GRAPH_KEY, HISTORY_KEY
from normtool.model import Model

#: ``transformers``' default ``max_shard_size`` ("5GB", decimal units as it parses them).
DEFAULT_MAX_SHARD = 5 * 10**9
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

Spec = tuple[str, torch.dtype, tuple[int, ...]]


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5·10⁹, ``"500MB"``, ``"2GiB"`` (binary), or plain bytes; NormtoolError else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if m is None or unit not in _UNITS:
        raise NormtoolError(
            f"--max-shard-size {text!r}: expected bytes or a size like 5GB, 500MB, 2GiB"
        )
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise NormtoolError(f"--max-shard-size {text!r} must be at least one byte")
    return size


def _nbytes(spec: Spec) -> int:
    return math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()


def plan_shards(specs: Sequence[Spec], max_bytes: int) -> list[list[Spec]]:
    """Consecutive groups of at most ``max_bytes`` each; a larger tensor gets a shard of its own
    (as ``transformers`` does: a tensor is never split)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        n = _nbytes(spec)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards


def shard_paths(out: Path, n: int) -> tuple[Path, list[Path]]:
    """The index path and the ``n`` shard paths for the output ``out`` (``x.safetensors``)."""
    stem = out.name.removesuffix(".safetensors")
    index = out.with_name(f"{stem}.safetensors.index.json")
    return index, [out.with_name(f"{stem}-{i:05d}-of-{n:05d}.safetensors") for i in range(1, n + 1)]


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

    Returns the path to open: ``out``, or the index beside it when the tensors exceed
    ``max_shard_size`` bytes and are written as shards. ``check(name, tensor)`` vets each
    tensor (or row block) as written, in the writing thread (see ``write_stream``).
    """
    out = Path(out)
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
        "normtool.version": __version__,
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

    shards = plan_shards(specs, max_shard_size)
    if len(shards) == 1:
        with atomic_path(out, inputs, force) as tmp, tmp.open("wb") as f:
            write_stream(f, specs, produce, meta, on_tensor, digests, check)
        path = out
    else:
        path = _save_sharded(out, shards, produce, meta, inputs, force, on_tensor, digests, check)
    history.resolve_digests(model.history)
    return path


def _save_sharded(
    out: Path,
    shards: list[list[Spec]],
    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    meta: dict[str, str],
    inputs: Sequence[Path],
    force: bool,
    on_tensor: Callable[[str], None] | None,
    digests: Callable[[], dict[str, str]],
    check: Callable[[str, torch.Tensor], None] | None,
) -> Path:
    index, paths = shard_paths(out, len(shards))
    for p in (index, *paths):
        check_output_path(p, inputs, force)
    tmpdir = temp_name(index)
    moved: list[Path] = []
    try:
        tmpdir.mkdir()
        weight_map: dict[str, str] = {}
        for shard, path in zip(shards, paths, strict=True):
            with (tmpdir / path.name).open("wb") as f:
                write_stream(f, shard, produce, meta, on_tensor, digests, check)
            weight_map.update(dict.fromkeys((name for name, _, _ in shard), path.name))
        total = sum(_nbytes(s) for shard in shards for s in shard)
        doc = {"metadata": {"total_size": total, **meta}, "weight_map": weight_map}
        text = json.dumps(doc, indent=2) + "\n"
        for token, digest in digests().items():
            text = text.replace(token, digest)
        (tmpdir / index.name).write_text(text, encoding="utf-8")
        for p in (*paths, index):  # the index last: it appears only with all its shards
            publish(tmpdir / p.name, p, force)
            moved.append(p)
    except BaseException as e:
        for p in moved:
            p.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise NormtoolError(f"cannot write: {e.strerror or e}", out) from e
        raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return index
