"""SHA-256 of a checkpoint's weight files, hashed in a background thread, once per process.

Why a module of its own, free of torch: every output's history records the digest of its
source, and hashing a multi-GB checkpoint costs about as long as converting it (SHA-256 runs at
~1 GB/s here). Importing torch costs about a second on one core. ``prefetch`` starts the hash of
the checkpoints named on the command line *before* that import, so on a machine with a second
core the two overlap; the checkpoint later finds the digest under way (``sha256_async``). A
digest is keyed by each file's path, size and modification time: a file changed in between is
hashed again, and a wrong guess of what to prefetch costs background CPU only, never a wrong
digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

from normtool.errors import NormtoolError

WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# commands whose outputs record their source's digest, and options whose value is an output
RECORDING = {"convert-ln-to-rms", "fold", "merge", "loki-head", "export"}
OUTPUT_OPTIONS = {"-o", "--output", "--dir", "--save-perms", "--plot"}

_lock = threading.Lock()
_digests: dict[tuple, Future[str]] = {}


def _signature(files: Sequence[Path]) -> tuple:
    """What identifies the bytes of ``files`` without reading them (OSError if one is gone)."""
    sig = []
    for f in files:
        st = os.stat(f)
        sig.append((str(Path(f).resolve()), st.st_size, st.st_mtime_ns))
    return tuple(sig)


def sha256_async(files: Sequence[Path], name: Path) -> Future[str]:
    """The hex SHA-256 of ``files`` read in order; NormtoolError (naming ``name``) if unreadable.

    Computed once per process per unchanged set of files, in a daemon thread: an error exit
    does not wait for the hash of a file it no longer needs.
    """
    try:
        key = _signature(files)
    except OSError as e:
        done: Future[str] = Future()
        done.set_exception(NormtoolError(f"cannot read: {e.strerror or e}", name))
        return done
    with _lock:
        if key not in _digests:
            _digests[key] = Future()
            threading.Thread(target=_hash, args=(files, name, _digests[key]), daemon=True).start()
        return _digests[key]


def _hash(files: Sequence[Path], name: Path, done: Future[str]) -> None:
    try:
        h = hashlib.sha256()
        buf = memoryview(bytearray(1 << 22))  # one buffer, refilled: no fresh memory per block
        for f in files:
            with open(f, "rb") as fh:
                while n := fh.readinto(buf):
                    h.update(buf[:n])
        done.set_result(h.hexdigest())
    except OSError as e:
        done.set_exception(NormtoolError(f"cannot read: {e.strerror or e}", name))


def weight_files(path: Path) -> list[Path]:
    """The weight files a checkpoint path stands for, in the order they are hashed; [] when
    it names none (the loader, not this guess, reports what is wrong with it)."""
    index = None
    if path.is_dir():
        found = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not found:
            return []
        if not found[0].name.endswith(".index.json"):
            return found[:1]
        index = found[0]
    elif path.name.endswith(".index.json"):
        index = path
    elif path.suffix.lower() in WEIGHT_SUFFIXES and path.is_file():
        return [path]
    if index is None:
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [index.parent / n for n in sorted(set(weight_map.values()))]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def prefetch(args: Sequence[str]) -> None:
    """Start hashing the checkpoints named in a command line that records source digests.

    Options' values that name outputs are skipped (an output replaced with ``--force`` is
    no source). Anything unexpected is ignored: this only warms ``sha256_async``.
    """
    words = [a for a in args if not a.startswith("-")]
    if not words or words[0] not in RECORDING:
        return
    skip = False
    for a in args[args.index(words[0]) + 1 :]:
        if skip or a.startswith("-"):
            skip = a in OUTPUT_OPTIONS
            continue
        files = weight_files(Path(a))
        if files:
            sha256_async(files, Path(a))
