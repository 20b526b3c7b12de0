"""Recognising what normtool wrote, so that ``--force`` replaces nothing else.

Why: ``-o DIR --force`` once deleted a whole folder — the input checkpoint in it included.
``--force`` means "replace my previous output", so it replaces a file or folder only when it
carries normtool's mark, in the format its name says:

- safetensors (and a sharded output's ``*.index.json``): a ``normtool.*`` metadata key;
- ONNX: a ``normtool.*`` metadata property; its ``.data`` file: named by such a model;
- PyTorch ``.pt/.pth/.bin`` (zip archives): the archive comment :data:`TORCH_MARK`
  (``torch.load`` ignores it);
- PNG plots: a ``Software`` text chunk starting with ``normtool``;
- a folder (a Hugging Face folder output): its weight files carry :data:`FILES_KEY`, the list
  of every file normtool put there, and the folder holds nothing else.
"""

from __future__ import annotations

import contextlib
import json
import struct
import zipfile
from pathlib import Path

from normtool.errors import NormtoolError
from normtool.io.safetensors_format import read_header

TORCH_MARK = b"normtool output"
PNG_SOFTWARE = "normtool"
#: safetensors metadata key of a folder output: JSON list of the file names normtool wrote.
FILES_KEY = "normtool.files"
_PNG_CHUNK_LIMIT = 100 * 1024 * 1024
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def mark_torch(path: Path) -> None:
    """Put normtool's mark on a PyTorch zip archive just written (its comment only)."""
    with zipfile.ZipFile(path, "a") as z:
        z.comment = TORCH_MARK


def safetensors_metadata(path: Path) -> dict | None:
    """The ``__metadata__`` of a safetensors file, or None if it is not a readable one."""
    try:
        return read_header(path)[1]
    except NormtoolError:
        return None


def _has_mark(meta: dict | None) -> bool:
    return meta is not None and any(str(k).startswith("normtool.") for k in meta)


def _onnx_props(path: Path) -> dict[str, str] | None:
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf raises several untyped parse errors
        return None
    return {p.key: p.value for p in proto.metadata_props}


def _png_software(path: Path) -> str | None:
    """The PNG's ``Software`` tEXt value, or None."""
    try:
        with path.open("rb") as f:
            if f.read(8) != _PNG_SIGNATURE:
                return None
            while head := f.read(8):
                size, kind = struct.unpack(">I4s", head)
                if kind == b"IEND" or size > _PNG_CHUNK_LIMIT:
                    return None
                body = f.read(size)
                f.read(4)  # CRC
                if kind == b"tEXt" and body.startswith(b"Software\0"):
                    return body[len(b"Software\0") :].decode("latin-1")
    except (OSError, struct.error):
        return None
    return None


def _file_reason(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".safetensors"):
        ok = _has_mark(safetensors_metadata(path))
    elif name.endswith(".index.json"):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            ok = isinstance(doc, dict) and _has_mark(doc.get("metadata"))
        except (OSError, ValueError, RecursionError):
            ok = False
    elif name.endswith(".onnx"):
        ok = _has_mark(_onnx_props(path))
    elif name.endswith(".onnx.data"):
        model = path.with_name(path.name[: -len(".data")])
        ok = model.is_file() and _has_mark(_onnx_props(model))
    elif name.endswith((".pt", ".pth", ".bin")):
        try:
            with zipfile.ZipFile(path) as z:
                ok = z.comment == TORCH_MARK
        except (OSError, zipfile.BadZipFile):
            ok = False
    elif name.endswith(".png"):
        ok = (_png_software(path) or "").startswith(PNG_SOFTWARE)
    else:
        return f"{path.name} is no file normtool writes"
    return None if ok else f"{path.name} exists and was not written by normtool"


def _folder_reason(path: Path) -> str | None:
    try:
        present = {p.name for p in path.iterdir()}
    except OSError as e:
        return f"cannot list the folder ({e.strerror or e})"
    written: set[str] = set()
    for name in sorted(present):
        if name.endswith(".safetensors"):
            meta = safetensors_metadata(path / name) or {}
            with contextlib.suppress(ValueError, TypeError, RecursionError):
                written.update(json.loads(meta.get(FILES_KEY, "[]")))
    if not written:
        return "the folder exists and was not written by normtool"
    other = sorted(present - written)
    if other:
        return f"the folder holds files normtool did not write ({other[0]!r}, {len(other)} in all)"
    return None


def not_replaceable(path: Path) -> str | None:
    """Why ``--force`` must not replace ``path`` (None: normtool wrote it, replace away)."""
    if path.is_dir():
        return _folder_reason(path)
    return _file_reason(path)
