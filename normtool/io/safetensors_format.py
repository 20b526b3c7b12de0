"""The safetensors container, checked before any library touches it, and written as a stream.

Why our own header check: files come from strangers. ``safe_open`` rejects many bad files but
its messages name neither our file nor the fix, and a declared size that disagrees with the
bytes must never reach a memory map. Why our own writer: ``safetensors.torch.save_file`` needs
every tensor in memory at once; writing the header first (offsets follow from shapes) and then
each tensor as it is produced keeps transforms of large checkpoints within bounded memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from normtool.errors import NormtoolError
from normtool.io.sink import appender

MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Tensors above this size are written before the next one is produced (bounded peak memory).
OVERLAP_MAX_BYTES = 64 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and check a safetensors header.

    Returns ``(entries, metadata)`` where ``entries[name] = {"dtype", "shape", "data_offsets"}``.
    Raises NormtoolError naming the file for: a file shorter than its header, a header that is
    not UTF-8 JSON, unknown dtypes, bad shapes, sizes that disagree with offsets, offsets out of
    range or overlapping.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NormtoolError("not a safetensors file: shorter than 8 bytes", path)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise NormtoolError(
                    f"corrupt safetensors: header length {n} beyond the file's {size} bytes "
                    "(truncated or not safetensors)",
                    path,
                )
            raw = f.read(n)
    except OSError as e:
        raise NormtoolError(f"cannot read: {e.strerror or e}", path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormtoolError(f"corrupt safetensors: header is not UTF-8 JSON ({e})", path) from e
    except RecursionError as e:
        raise NormtoolError("corrupt safetensors: header JSON nested too deeply", path) from e
    if not isinstance(header, dict):
        raise NormtoolError("corrupt safetensors: header is not a JSON object", path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise NormtoolError("corrupt safetensors: __metadata__ must map strings to strings", path)
    data_size = size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise NormtoolError(f"corrupt safetensors: bad entry for tensor {name!r}", path)
        if e["dtype"] not in DTYPES:
            raise NormtoolError(f"tensor {name!r} has unknown dtype {e['dtype']!r}", path)
        shape, offs = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
            raise NormtoolError(f"tensor {name!r} has a bad shape {shape!r}", path)
        if not (
            isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
        ) or not (0 <= offs[0] <= offs[1] <= data_size):
            raise NormtoolError(
                f"tensor {name!r} has data offsets {offs!r} outside the file's {data_size} data bytes",
                path,
            )
        numel = 1
        for s in shape:
            numel *= s
        if numel * ITEMSIZE[e["dtype"]] != offs[1] - offs[0]:
            raise NormtoolError(
                f"tensor {name!r}: shape {shape} of {e['dtype']} needs "
                f"{numel * ITEMSIZE[e['dtype']]} bytes but offsets give {offs[1] - offs[0]}",
                path,
            )
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (a0, a1, an), (b0, _b1, bn) in zip(spans, spans[1:], strict=False):
        if b0 < a1 and a1 > a0:
            raise NormtoolError(f"tensors {an!r} and {bn!r} overlap in the file", path)
    # safetensors requires the data section to be covered exactly, without gaps or a tail
    end = 0
    for a0, a1, name in spans:
        if a0 != end:
            raise NormtoolError(f"corrupt safetensors: gap before tensor {name!r}", path)
        end = a1
    if end != data_size:
        raise NormtoolError(
            f"corrupt safetensors: {data_size - end} bytes after the last tensor", path
        )
    return header, meta


def write_stream(
    f,
    specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    metadata: dict[str, str],
    on_tensor: Callable[[str], None] | None = None,
    late: Callable[[], dict[str, str]] | None = None,
    check: Callable[[str, torch.Tensor], None] | None = None,
) -> None:
    """Write a safetensors file to the open binary file ``f``, one tensor at a time.

    ``specs`` fixes names, dtypes and shapes up front (the header precedes the data);
    ``produce(name)`` must then return a tensor of exactly that dtype and shape, or an iterable
    of consecutive row blocks (first axis) that together make it. ``late()``, called once the
    data are written, maps stand-ins in the metadata to their final values of the same length
    (a digest computed meanwhile), which are then written over the stand-ins in place.
    ``check(name, tensor)`` runs on each tensor or block in the writing thread, before it is
    written, beside the producing of the next (it raises to stop the write).
    """
    specs = list(specs)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    out = appender(f, 8 + len(raw) + offset)

    def put(name: str, t: torch.Tensor) -> None:
        if check is not None:
            check(name, t)
        if t.numel():
            out.write(t.reshape(-1).view(torch.uint8).numpy().data)

    # One tensor (or block) is written by a second thread while the next is produced (copies
    # and file writes release the GIL): computing and writing overlap. A large one is written
    # before the next is produced, so peak memory stays one large tensor (or block) plus small
    # ones.
    pending: tuple[Future, int] | None = None

    def settle() -> None:
        nonlocal pending
        if pending is not None:
            pending[0].result()
            pending = None

    try:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        with ThreadPoolExecutor(1) as writer:
            for name, dtype, shape in specs:
                made = produce(name)
                whole = isinstance(made, torch.Tensor)
                blocks = iter((made,) if whole else made)
                rows = 0
                while True:
                    if pending is not None and pending[1] > OVERLAP_MAX_BYTES:
                        settle()
                    t = next(blocks, None)
                    if t is None:
                        break
                    fits = bool(shape) and t.dim() > 0 and tuple(shape[1:]) == tuple(t.shape[1:])
                    if t.dtype != dtype or not (tuple(t.shape) == tuple(shape) if whole else fits):
                        raise RuntimeError(
                            f"tensor {name!r} produced as {t.dtype}{tuple(t.shape)}, "
                            f"declared {dtype}{tuple(shape)}"
                        )
                    rows += t.shape[0] if t.dim() else 1
                    t = t.detach().contiguous().cpu()
                    settle()
                    pending = (writer.submit(put, name, t), t.numel() * t.element_size())
                    del t  # the writer holds it until written; not kept while the next is made
                if not whole and rows != shape[0]:
                    raise RuntimeError(f"tensor {name!r}: blocks of {rows} rows, declared {shape}")
                if on_tensor is not None:
                    on_tensor(name)
            settle()
        out.close()
    except BaseException:
        out.abort()  # stop its I/O and free its blocks; the caller discards the file
        raise
    for token, value in (late() if late is not None else {}).items():
        old, new = token.encode(), value.encode()
        if len(old) != len(new) or old not in raw:
            raise RuntimeError(f"metadata stand-in {token!r} missing or of another length")
        at = raw.find(old)
        while at >= 0:
            out.patch(8 + at, new)
            at = raw.find(old, at + 1)
