"""Open any supported checkpoint as one lazy tensor store.

Supported: a ``.safetensors`` file (``config.json`` beside it is read when present); a Hugging
Face model folder, single-file or sharded (``*.index.json``); a PyTorch ``.pt``/``.pth``/``.bin``
state dict (``weights_only=True`` only, never plain unpickling); normtool's own outputs, whose
safetensors metadata carry the graph and history.

Why lazy: checkpoints can be larger than memory. Each tensor is read only when asked for,
into a tensor the caller owns: a large one as a private (copy-on-write) mapping of its own byte
range, which costs no copy and whose pages leave the process with the tensor — not one mapping
of the whole file, whose touched pages would stay resident for as long as the file is open;
a small one by a positioned read. Headers are checked first (see ``safetensors_format``).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import weakref
import zipfile
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normtool.errors import NormtoolError
from normtool.io import digest, reads
from normtool.io.digest import WEIGHT_FILES
from normtool.io.safetensors_format import DTYPE_NAMES, DTYPES, read_header

MAP_MIN_BYTES = 1 << 20  # smaller tensors are read: a mapping per bias costs more than a copy
TORCH_SUFFIXES = {".pt", ".pth", ".bin"}


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


@dataclass
class Checkpoint:
    """Tensors of one checkpoint, read on demand; plus its config and safetensors metadata."""

    path: Path
    format: str  # "safetensors" | "hf-folder" | "torch"
    config: dict | None
    metadata: dict[str, str]
    files: list[Path]
    _where: dict[str, Path] = field(default_factory=dict, repr=False)
    _entries: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict, repr=False)
    _spans: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    _eager: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False)
    #: A PyTorch file's tensors nested under this key (``state_dict``/``model``), else None:
    #: written back the same way, so the user's loading code keeps working.
    nest: str | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return DTYPES[self._entries[key][0]]

    def get(self, key: str) -> torch.Tensor:
        """Materialise one tensor: a fresh tensor read from its byte range (safetensors)."""
        if key in self._eager:
            return self._eager[key]
        if key not in self._entries:
            raise NormtoolError(f"tensor {key!r} not found", self.path)
        return self._read(key, 0, self.shape(key))

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first axis) of a tensor, reading only their bytes.

        Why: passes that rewrite a large tensor row block by row block (an embedding, an LM
        head) then never hold its input whole.
        """
        if key in self._eager or key not in self._entries:
            return self.get(key)[start:stop]
        shape = self.shape(key)
        start, stop = min(start, shape[0]), min(stop, shape[0])
        return self._read(key, start, (max(0, stop - start), *shape[1:]))

    def _read(self, key: str, row: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A fresh tensor of ``shape``: the stored bytes of ``key`` from row ``row`` on.

        Large reads map the bytes copy-on-write instead of copying them (a private mapping:
        writes to the tensor never reach the file). The mapping lives exactly as long as the
        tensor, so its pages leave the process with it, as a read buffer's would.
        """
        dtype = self.dtype(key)
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        f = self._where[key]
        at = self._spans[key][0] + row * (math.prod(shape[1:]) * dtype.itemsize)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        try:
            fd = self._fd(f)
            if nbytes >= MAP_MIN_BYTES:
                if at + nbytes > os.fstat(fd).st_size:
                    raise NormtoolError(f"tensor {key!r} is cut short (file changed?)", f)
                base = at - at % mmap.ALLOCATIONGRANULARITY
                mm = mmap.mmap(fd, at + nbytes - base, offset=base, access=mmap.ACCESS_COPY)
                t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=at - base)
                return t.view(shape)
            t = torch.empty(shape, dtype=dtype)
            got = os.preadv(fd, [t.reshape(-1).view(torch.uint8).numpy()], at)
        except OSError as e:
            raise NormtoolError(f"cannot read: {e.strerror or e}", f) from e
        if got != nbytes:
            raise NormtoolError(f"tensor {key!r} is cut short (file changed?)", f)
        return t

    def _fd(self, f: Path) -> int:
        """A descriptor of weight file ``f``, opened once (closed when the checkpoint goes)."""
        if f not in self._fds:
            self._fds[f] = os.open(f, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if len(self._fds) == 1:
                weakref.finalize(self, _close_all, self._fds)
        return self._fds[f]

    def sha256(self) -> str:
        """Digest of the weight files (in order), recorded in every output's history."""
        return self.sha256_async().result()

    def sha256_async(self) -> Future[str]:
        """The digest, computed once in a background thread (see ``digest``): it runs beside
        the rewrite and the write instead of before them."""
        return digest.sha256_async(self.files, self.path)

    # ---- construction ----------------------------------------------------------------------
    def _add_safetensors(self, f: Path, only: set[str] | None = None) -> dict[str, str]:
        entries, meta = read_header(reads.note(f))
        with f.open("rb") as fh:
            data_start = 8 + int.from_bytes(fh.read(8), "little")
        for k, e in entries.items():
            if only is not None and k not in only:
                continue
            if k in self._entries:
                raise NormtoolError(f"tensor {k!r} appears in more than one shard", f)
            self._entries[k] = (e["dtype"], tuple(e["shape"]))
            self._where[k] = f
            self._spans[k] = (data_start + e["data_offsets"][0], data_start + e["data_offsets"][1])
        return meta

    def _add_torch(self, f: Path) -> None:
        sd, self.nest = load_torch_state_dict(reads.note(f))
        for k, t in sd.items():
            if k in self._entries:
                raise NormtoolError(f"tensor {k!r} appears in more than one shard", f)
            name = DTYPE_NAMES.get(t.dtype)
            if name is None:
                raise NormtoolError(f"tensor {k!r} has unsupported dtype {t.dtype}", f)
            self._entries[k] = (name, tuple(t.shape))
            self._eager[k] = t


def load_torch_state_dict(f: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Load a pickled state dict with ``weights_only=True``: objects that would run code are refused.

    Accepts a flat ``{name: tensor}`` or one nested under ``state_dict`` / ``model``; returns it
    and the key it was nested under (None when flat).
    """
    try:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise NormtoolError(
            f"refused: the pickle needs more than tensors to load ({first[:200]}); "
            "only weights_only state dicts are read",
            f,
        ) from e
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise NormtoolError(
            f"not a readable PyTorch state dict ({str(e).splitlines()[0][:200]})", f
        ) from e
    nest = None
    if isinstance(obj, dict):
        nest = next((k for k in ("state_dict", "model") if isinstance(obj.get(k), dict)), None)
        obj = obj[nest] if nest else obj
    if not isinstance(obj, dict) or not obj:
        raise NormtoolError("not a state dict (expected a mapping of names to tensors)", f)
    for k, v in obj.items():
        problem = _entry_problem(k, v)
        if problem:
            raise NormtoolError(problem, f)
    return obj, nest


def _entry_problem(key: object, value: object) -> str | None:
    """Why one state-dict entry cannot be a stored tensor (None: it can).

    Why check here: ``weights_only`` unpickling accepts int keys, sparse, nested, quantized and
    meta tensors, which every later step (names, reshapes, reads) assumes away; refusing them at
    load gives one line naming the entry instead of an error deep inside a transform.
    """
    if not isinstance(key, str):
        return f"key {key!r} ({type(key).__name__}) is not a tensor name: keys must be strings"
    if not isinstance(value, torch.Tensor):
        return f"entry {key!r} is not a tensor"
    if value.layout != torch.strided or value.is_nested:
        layout = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
        return f"tensor {key!r} is {layout}; only dense tensors are read"
    if value.is_meta:
        return f"tensor {key!r} is a meta tensor (a shape without data)"
    if value.is_quantized:
        return f"tensor {key!r} is quantized ({value.dtype}); only plain tensors are read"
    return None


def _read_json(f: Path) -> dict:
    try:
        d = json.loads(reads.note(f).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NormtoolError(f"not valid JSON ({e})", f) from e
    except RecursionError as e:
        raise NormtoolError("JSON nested too deeply to read", f) from e
    if not isinstance(d, dict):
        raise NormtoolError("expected a JSON object", f)
    return d


def _open_index(ck: Checkpoint, index: Path) -> None:
    d = _read_json(index)
    wm = d.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise NormtoolError("index has no weight_map", index)
    by_file: dict[str, set[str]] = {}
    for k, fname in wm.items():
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
            raise NormtoolError(f"index names a bad shard file {fname!r} for {k!r}", index)
        by_file.setdefault(fname, set()).add(k)
    for fname, keys in sorted(by_file.items()):
        f = index.parent / fname
        if not f.is_file():
            raise NormtoolError(f"shard {fname} listed in the index is missing", index)
        ck.files.append(f)
        if fname.endswith(".safetensors"):
            meta = ck._add_safetensors(f, keys)
            ck.metadata = ck.metadata or meta  # a sharded normtool output: graph in every shard
        else:
            ck._add_torch(f)
        missing = keys - set(ck._entries)
        if missing:
            raise NormtoolError(f"shard lacks tensor {sorted(missing)[0]!r} listed in the index", f)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open ``path`` (file or Hugging Face folder) lazily; NormtoolError on anything unreadable."""
    path = Path(path)
    if not path.exists():
        raise NormtoolError("no such file or folder", path)
    config = None
    meta: dict[str, str] = {}
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise NormtoolError("folder has no config.json (not a Hugging Face model folder)", path)
        config = _read_json(cfg)
        ck = Checkpoint(path, "hf-folder", config, {}, [])
        for name in WEIGHT_FILES:
            f = path / name
            if not f.is_file():
                continue
            if name.endswith(".index.json"):
                _open_index(ck, f)
            elif name.endswith(".safetensors"):
                ck.files.append(f)
                ck.metadata = ck._add_safetensors(f)
            else:
                ck.files.append(f)
                ck._add_torch(f)
            break
        else:
            raise NormtoolError(
                "folder has no weights (model.safetensors, its index, or pytorch_model.bin)", path
            )
        return ck
    suffix = path.suffix.lower()
    if path.name.endswith(".index.json"):
        ck = Checkpoint(path, "hf-folder", None, {}, [])
        _open_index(ck, path)
    elif suffix == ".safetensors":
        ck = Checkpoint(path, "safetensors", None, {}, [path])
        meta = ck._add_safetensors(path)
        ck.metadata = meta
    elif suffix in TORCH_SUFFIXES:
        ck = Checkpoint(path, "torch", None, {}, [path])
        ck._add_torch(path)
    else:
        raise NormtoolError(
            f"unsupported file type {suffix or '(none)'!r}: expected .safetensors, .pt, .pth, "
            ".bin, .onnx (where a command reads ONNX) or a Hugging Face model folder",
            path,
        )
    cfg = path.parent / "config.json"
    if cfg.is_file() and "normtool.graph" not in ck.metadata:
        ck.config = _read_json(cfg)
    if not ck.keys():
        raise NormtoolError("checkpoint holds no tensors", path)
    return ck
