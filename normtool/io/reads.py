"""The files this process reads: refused up front unless regular, remembered so no output
replaces one.

Why one registry: an output must never replace anything the run reads — not only the paths
named on the command line but the shards an index names, the ``config.json`` beside a
checkpoint, a metric or label file, an ONNX model's external data. Each reader calls
:func:`note` before it opens a file; ``io.atomic`` checks every output against the list.

Why refuse non-regular files here: opening a FIFO for reading blocks until a writer appears
(forever, in a CI job), and a character device such as ``/dev/zero`` never ends. A model is
read from regular files only.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from normtool.errors import NormtoolError

_lock = threading.Lock()
_read: dict[Path, tuple[int, int] | None] = {}

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(mode: int) -> str | None:
    """``"a FIFO (named pipe)"`` etc. for a special file's ``st_mode``; None for files, folders."""
    return next((name for test, name in _KINDS if test(mode)), None)


def note(path: str | Path) -> Path:
    """Record that ``path`` is about to be read; NormtoolError unless it is a regular file.

    A missing file is left to the reader (it says what it was looking for).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise NormtoolError(f"cannot read: {e.strerror or e}", path) from e
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise NormtoolError(f"is {kind}, not a regular file; refusing to read it", path)
    with _lock:
        _read[path.resolve()] = (st.st_dev, st.st_ino)
    return path


def collides(out: Path) -> Path | None:
    """The file this process read that writing ``out`` would replace, or None.

    Compared by resolved path and by device and inode (a hard link or another spelling of the
    same file counts). A folder output collides with every read file inside it.
    """
    resolved = out.resolve()
    try:
        st = os.stat(out)
        ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        ident = None
    with _lock:
        items = list(_read.items())
    for path, pid in items:
        if path == resolved or (ident is not None and pid == ident) or resolved in path.parents:
            return path
    return None


def forget() -> None:
    """Clear the registry (one CLI command per process; tests run many in one)."""
    with _lock:
        _read.clear()
