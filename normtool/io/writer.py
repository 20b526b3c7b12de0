"""Write streamed tensors as one safetensors file or as Hugging Face shards, atomically.

Tensors are produced one at a time (read from the source checkpoint or taken from a pass's
results) and streamed into an atomic temporary file, so memory stays bounded and no partial
output ever carries the final name. What the tensors and metadata are (a Model's graph and
history) is decided above this layer, in ``normtool.save``.

Checkpoints larger than ``max_shard_size`` are written the Hugging Face way: shards
``<stem>-00001-of-0000n.safetensors`` and an index ``<stem>.safetensors.index.json`` whose
``weight_map`` names each tensor's shard. The metadata go into the index's ``metadata`` and
into every shard, so any shard still says what it belongs to (graph and history). All files are
written in a temporary folder beside the output and moved into place shards first, index last:
the index is the name a user opens, and it appears only once every shard it lists is there.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from normtool.errors import NormtoolError
from normtool.io.atomic import atomic_path, check_output_path, publish, temp_name
from normtool.io.safetensors_format import write_stream

#: ``transformers``' default ``max_shard_size`` ("5GB", decimal units as it parses them).
DEFAULT_MAX_SHARD = 5 * 10**9
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

Spec = tuple[str, torch.dtype, tuple[int, ...]]
#: A tensor by name, whole or as consecutive row blocks (bounded memory for large matrices).
Producer = Callable[[str], torch.Tensor | Iterable[torch.Tensor]]


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


def write_checkpoint(
    out: Path,
    specs: Sequence[Spec],
    produce: Producer,
    meta: dict[str, str],
    inputs: Sequence[Path] = (),
    force: bool = False,
    on_tensor: Callable[[str], None] | None = None,
    digests: Callable[[], dict[str, str]] = dict,
    check: Callable[[str, torch.Tensor], None] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD,
) -> Path:
    """Stream the tensors ``specs`` names (``produce(name)`` gives each, whole or in row blocks)
    into ``out`` with ``meta`` in every header, atomically; returns the path to open.

    That path is ``out``, or the index beside it when the tensors exceed ``max_shard_size``
    bytes and are written as shards. ``digests()`` maps stand-ins in ``meta`` to the values
    they are replaced by once known; ``check(name, tensor)`` vets each tensor (or row block) as
    written, in the writing thread (see ``write_stream``). What the tensors and metadata mean
    is the caller's business (``normtool.save``): this layer only knows the bytes.
    """
    shards = plan_shards(specs, max_shard_size)
    if len(shards) > 1:
        return _save_sharded(out, shards, produce, meta, inputs, force, on_tensor, digests, check)
    with atomic_path(out, inputs, force) as tmp, tmp.open("wb") as f:
        write_stream(f, specs, produce, meta, on_tensor, digests, check)
    return out


def _save_sharded(
    out: Path,
    shards: list[list[Spec]],
    produce: Producer,
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
