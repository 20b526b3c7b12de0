"""The process entry point (``normtool`` and ``python -m normtool``).

Why apart from ``cli``: importing the CLI imports torch, about a second on one core. Work that
needs only the command line — hashing the source checkpoints whose digests the outputs will
record (``io.digest.prefetch``) — starts here first, in a background thread, and overlaps it.
The cyclic garbage collector is paused during the import (it would scan the hundreds of
thousands of objects the import creates, ~0.2 s, and find no garbage), and those objects are
then frozen out of later collections.

The C allocator is tuned here too (``_keep_freed_memory``), for the command-line process only:
a library user's process keeps its own allocator settings.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import signal
import sys

from normtool.errors import Interrupted, address_space_limit, fail, out_of_memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MIN_ADDRESS_SPACE = 1 << 30


def _keep_freed_memory() -> None:
    """Let glibc reuse freed blocks up to 1 GiB instead of unmapping them.

    Why: by default glibc serves blocks above 32 MiB with fresh ``mmap``s and returns them on
    free, so every activation of a model run (a 1024 × 50,257 float64 logits batch is 411 MB)
    costs new pages that the kernel must fault in and zero — again for every batch and every
    dtype of a self-check. Kept in the heap (no trimming), the pages are reused. Measured
    (paired runs, 2 cores): ``verify`` of a 6-layer GPT-2-medium-shaped pair 30.1 → 19.9 s
    (system CPU 22 → 9 s); the default ``convert-ln-to-rms`` of the 24-layer one, self-check
    included, 46.3 → 36.0 s. The price: peak RSS +3-9% in those runs, since the heap keeps
    what it peaked at and freed blocks that small allocations pinned in place stay resident
    as holes — bounded by one run's working set, and the process ends after one command.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already uses
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): leave it be
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, -1)  # -1: never give the heap's top back


def _on_signal(signum: int, frame: object) -> None:
    """Turn SIGINT/SIGTERM/SIGHUP into ``Interrupted``; later ones are ignored, so that the
    clean-up the first one starts (removing temporary outputs) is not itself cut short."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def _check_memory_limit() -> None:
    """Refuse to start under a virtual-memory limit too small to load torch.

    Why up front: below ~700 MiB the import dies inside native code — ``std::bad_alloc``
    aborting the process (exit 134) or OpenBLAS giving up — where no handler can turn it into
    a message. Measured here (torch 2.13 CPU): ``inspect`` of a small model needs ~700 MiB of
    address space, ``export`` ~900 MiB (ONNX and ONNX Runtime load too).
    """
    soft = address_space_limit()
    if soft is not None and soft < MIN_ADDRESS_SPACE:
        fail(
            f"virtual memory limit (ulimit -v) is {soft >> 20} MiB; normtool needs at least "
            f"{MIN_ADDRESS_SPACE >> 20} MiB to load torch and ONNX Runtime (out of memory)",
            2,
        )


def main() -> None:
    for s in SIGNALS:
        signal.signal(s, _on_signal)
    _check_memory_limit()
    try:
        _keep_freed_memory()
        _prefetch(sys.argv[1:])
        gc.disable()
        try:
            from normtool.cli import main as run
        finally:
            gc.freeze()
            gc.enable()
    except Interrupted as e:
        fail(f"interrupted ({e.name}) while starting; nothing was written", e.exit_code)
    except MemoryError:
        fail(out_of_memory("while starting"), 2)
    except (ImportError, OSError) as e:  # torch cannot load: most often a memory limit
        if "--debug" in sys.argv:
            raise
        limited = address_space_limit() is not None
        fail(out_of_memory("while starting") if limited else f"cannot start: {e}", 2)
    run()


def _prefetch(args: list[str]) -> None:
    """Warm the source digests; never fails the command (the loader reports bad files)."""
    from normtool.io.digest import prefetch

    with contextlib.suppress(Exception):  # noqa: BLE001 - an optimisation, never an error
        prefetch(args)
