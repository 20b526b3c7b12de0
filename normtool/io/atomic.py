"""Atomic outputs: write beside the target under a temporary name, rename when complete.

Why: a crash, a kill or a failed self-verification must never leave a half-written file under
the name a user (or a CI step) will pick up, and no output may ever replace an input.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from normtool.errors import NormtoolError


def check_output_path(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse outputs that would overwrite an input, go through a symlink, or clobber a file."""
    if out.is_symlink():
        raise NormtoolError("output path is a symlink; refusing to write through it", out)
    resolved = out.resolve()
    for i in inputs:
        ir = Path(i).resolve()
        if resolved == ir or (ir.is_dir() and ir in resolved.parents):
            raise NormtoolError(f"output would overwrite the input {i}", out)
    if out.exists() and not force:
        raise NormtoolError("output exists (use --force to replace it)", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise NormtoolError(f"output folder {parent} does not exist", out)
    try:  # a real probe: access() says yes to root even where nothing can be created
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise NormtoolError(f"output folder {parent} is not writable ({e.strerror})", out) from e


@contextmanager
def atomic_path(out: Path, inputs: Sequence[Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on clean exit it replaces ``out`` atomically.

    Works for files and folders (a Hugging Face folder output). On any exception the temporary
    is removed and ``out`` is left as it was.
    """
    out = Path(out)
    check_output_path(out, inputs, force)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if out.is_dir() and not out.is_symlink():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, NormtoolError):
            raise NormtoolError(f"cannot write: {e.strerror or e}", out) from e
        raise
