"""Atomic outputs: write beside the target under a temporary name, publish when complete.

Why: a crash, a kill or a failed self-verification must never leave a half-written file under
the name a user (or a CI step) will pick up; no output may ever replace anything the run reads
(``io.reads``); ``--force`` replaces only what normtool itself wrote (``io.provenance``); and of
two runs racing for one new output, exactly one wins — the other fails and replaces nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from normtool.errors import NormtoolError
from normtool.io import provenance, reads

#: Longest file name most file systems take (bytes).
NAME_MAX = 255
#: Characters of the output's name kept in its temporary's name: ``.<name>.tmp-<pid>-<hex>``
#: must itself fit in NAME_MAX.
_TMP_NAME_CHARS = 120


def _input_clash(out: Path, inputs: Sequence[Path]) -> Path | None:
    """The input (a path named on the command line, or any file read so far) ``out`` would
    replace or contain, or None."""
    resolved = out.resolve()
    for i in inputs:
        ir = Path(i).resolve()
        if resolved == ir or ir in resolved.parents or resolved in ir.parents:
            return Path(i)
        try:
            if out.exists() and os.path.samefile(out, i):
                return Path(i)
        except OSError:
            pass
    return reads.collides(out)


def check_output_path(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an output that would replace an input, go through a symlink or into a special
    file, clobber a file without ``--force``, or (with it) replace what normtool did not write."""
    if str(out) in ("", "."):
        raise NormtoolError("output path is empty or the current folder (give a file name)", out)
    if len(out.name.encode()) > NAME_MAX:
        raise NormtoolError(
            f"output file name is {len(out.name.encode())} bytes long; file systems take at "
            f"most {NAME_MAX}",
            out,
        )
    if out.is_symlink():
        raise NormtoolError("output path is a symlink; refusing to write through it", out)
    clash = _input_clash(out, inputs)
    if clash is not None:
        raise NormtoolError(f"output would overwrite the input {clash}", out)
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise NormtoolError(f"cannot check the output ({e.strerror or e})", out) from e
    if st is not None:
        kind = reads.special_kind(st.st_mode)
        if kind is not None:
            raise NormtoolError(f"output is {kind}; refusing to replace it", out)
        if not force:
            raise NormtoolError("output exists (use --force to replace it)", out)
        why = provenance.not_replaceable(out)
        if why is not None:
            raise NormtoolError(f"--force replaces only normtool's own outputs: {why}", out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise NormtoolError(f"output folder {parent} does not exist", out)
    try:  # a real probe: access() says yes to root even where nothing can be created
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        raise NormtoolError(f"output folder {parent} is not writable ({e.strerror})", out) from e


def temp_name(out: Path, tag: str = "tmp") -> Path:
    """A hidden sibling of ``out`` no other run picks: ``.<name>.<tag>-<pid>-<random>``."""
    return out.parent / f".{out.name[:_TMP_NAME_CHARS]}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """``renameat2(RENAME_NOREPLACE)``: True when done; False where the kernel, C library or
    file system lacks it (the caller falls back); OSError(EEXIST) when ``dst`` exists."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _publish_new(tmp: Path, out: Path) -> None:
    """Give ``tmp`` the name ``out`` only if nothing has it: never replaces (EEXIST)."""
    if _rename_noreplace(tmp, out):
        return
    if tmp.is_dir():  # claim the name with an empty folder, then fill it in one rename
        os.mkdir(out)
        os.replace(tmp, out)
    else:
        os.link(tmp, out)
        tmp.unlink()


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished ``tmp`` (file or folder) to ``out``.

    Without ``force`` it never replaces anything: a run that lost a race for the name fails
    (NormtoolError, exit 2) and its work is discarded. With ``force`` an existing ``out`` (checked
    replaceable before the work began) is replaced; a folder by moving the old one aside first.
    """
    try:
        if force and out.is_dir() and not out.is_symlink():
            old = temp_name(out, "old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        elif force and out.exists():
            os.replace(tmp, out)
        else:
            _publish_new(tmp, out)
    except FileExistsError as e:
        raise NormtoolError(
            "output appeared while this run was writing it (another run?); it was left as it "
            "is and nothing was written",
            out,
        ) from e


def remove(tmp: Path) -> None:
    """Delete a temporary file or folder if it is there."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(out: Path, inputs: Sequence[Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; on clean exit it is published as ``out``.

    Works for files and folders (a Hugging Face folder output). On any exception (a signal
    included: the CLI turns SIGTERM/SIGHUP into one) the temporary is removed and ``out`` is
    left as it was. The output is checked again against the inputs just before publishing:
    files read during the work (a metric file, a label list) count too.
    """
    out = Path(out)
    check_output_path(out, inputs, force)
    tmp = temp_name(out)
    try:
        yield tmp
        clash = _input_clash(out, inputs)
        if clash is not None:
            raise NormtoolError(f"output would overwrite the input {clash}", out)
        publish(tmp, out, force)
    except BaseException as e:
        remove(tmp)
        if isinstance(e, OSError) and not isinstance(e, NormtoolError):
            raise NormtoolError(f"cannot write: {e.strerror or e}", out) from e
        raise
