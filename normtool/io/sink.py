"""Where a streamed checkpoint's bytes go: large files with direct I/O (``O_DIRECT``).

Why: a buffered write first copies every byte into page-cache pages the kernel must allocate.
On the virtual machines this project runs on, fresh pages are expensive and erratic: the same
1.6 GB buffered write took 0.4 s or 3.3-4.3 s from one run to the next (free memory handed back
to the host must be faulted in again), while ``O_DIRECT`` wrote it in 0.9 s every time: the disk
reads the staging blocks by DMA, with no page cache to fill. On any machine, a multi-GB
checkpoint written through the page cache also evicts what is cached (the source being read)
and leaves gigabytes dirty for the flusher. So outputs from ``DIRECT_MIN_BYTES`` on are written
directly, where the file system allows it; others, and file systems that refuse ``O_DIRECT``
(older tmpfs, some network mounts), are written the ordinary way.

Direct I/O needs block-aligned memory, lengths and offsets: bytes are gathered into a
page-aligned block and written whole; the last block is padded and the file cut back to its
true length.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import mmap
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

import numpy as np

#: Offset and length granularity: a multiple of every common logical block size (512, 4096).
ALIGN = 4096
#: Bytes per direct write: large enough to keep the disk busy, small enough to stay cached.
BLOCK = 8 << 20
#: Outputs below this are written buffered: direct I/O would only add a disk wait.
DIRECT_MIN_BYTES = 256 << 20


class Appender:
    """Appends bytes from offset 0 to ``fd``, already switched to ``O_DIRECT``.

    Two staging blocks: while one is written (by a thread of its own, the disk's DMA needing no
    CPU), the other is filled; numpy copies without holding the GIL, so filling overlaps the
    caller's computing too. ``close`` writes the tail, cuts the padding and switches
    ``O_DIRECT`` off, so ``patch`` and anything after are ordinary writes. Falls back to
    ordinary writes for the rest of the file when a direct write is refused (EINVAL).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0  # bytes handed to ``write`` so far
        self.blocks = [mmap.mmap(-1, BLOCK) for _ in range(2)]  # anonymous maps: page-aligned
        self.arrays = [np.frombuffer(b, dtype=np.uint8) for b in self.blocks]
        self.pending: list[Future | None] = [None, None]
        self.current = 0
        self.fill = 0
        self.io = ThreadPoolExecutor(1)

    def write(self, data: memoryview | bytes) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        while len(src):
            n = min(len(src), BLOCK - self.fill)
            np.copyto(self.arrays[self.current][self.fill : self.fill + n], src[:n])
            self.fill += n
            self.size += n
            src = src[n:]
            if self.fill == BLOCK:
                self._submit(BLOCK)

    def _submit(self, length: int) -> None:
        """Hand the current block (``length`` bytes of it) to the I/O thread, then wait until
        the other block is free to be filled."""
        i, at = self.current, self.size - self.fill
        self.pending[i] = self.io.submit(self._put, i, length, at)
        self.current, self.fill = 1 - i, 0
        self._wait(self.current)

    def _put(self, i: int, length: int, at: int) -> None:
        view = memoryview(self.blocks[i])[:length]
        try:
            _write_all(self.fd, view, at)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # refused (a device whose blocks are larger than ALIGN, a file system that takes
            # the flag but not the write): this block and the rest go the ordinary way; what
            # was written directly is on disk, and positioned writes make the switch safe
            _set_direct(self.fd, False)
            _write_all(self.fd, view, at)
        finally:
            view.release()

    def _wait(self, i: int) -> None:
        if self.pending[i] is not None:
            self.pending[i], done = None, self.pending[i]
            done.result()

    def close(self) -> None:
        """Write what is staged, and end ``O_DIRECT`` (later patches are ordinary writes)."""
        try:
            if self.fill:
                padded = -(-self.fill // ALIGN) * ALIGN
                self.arrays[self.current][self.fill : padded] = 0
                self._submit(padded)
            self._wait(0)
            self._wait(1)
            os.ftruncate(self.fd, self.size)  # cut the last block's padding
            os.lseek(self.fd, self.size, os.SEEK_SET)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop: let a write under way end, free the blocks, end ``O_DIRECT`` (idempotent)."""
        self.io.shutdown()
        _set_direct(self.fd, False)
        self.arrays.clear()
        for b in self.blocks:
            # a view still referenced (by a traceback) keeps its block: freed with the view
            with contextlib.suppress(BufferError):
                b.close()

    def patch(self, offset: int, data: bytes) -> None:
        """Overwrite bytes already written (after ``close``)."""
        _write_all(self.fd, memoryview(data), offset)


class FileAppender:
    """The same interface over any writable binary file object (a BytesIO, a small file)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def write(self, data: memoryview | bytes) -> None:
        self.f.write(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def patch(self, offset: int, data: bytes) -> None:
        end = self.f.tell()
        self.f.seek(offset)
        self.f.write(data)
        self.f.seek(end)


def appender(f: BinaryIO, total: int) -> Appender | FileAppender:
    """An appender for ``f``, a file just opened for writing that will hold ``total`` bytes:
    its descriptor, directly from ``DIRECT_MIN_BYTES`` on, when it is a fresh regular file."""
    if total < DIRECT_MIN_BYTES:
        return FileAppender(f)
    try:
        fd = f.fileno()
        f.flush()
        fresh = stat.S_ISREG(os.fstat(fd).st_mode) and os.lseek(fd, 0, os.SEEK_CUR) == 0
    except (OSError, io.UnsupportedOperation):  # no descriptor, or not seekable (a pipe)
        return FileAppender(f)
    if not fresh or not _set_direct(fd, True):
        return FileAppender(f)
    return Appender(fd)


def _set_direct(fd: int, on: bool) -> bool:
    """Switch ``O_DIRECT`` on ``fd``; False where the platform or file system refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return True


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """``data`` at ``offset``, however many calls it takes. Each remainder's view is released
    even when a call fails, so a traceback holds no view that would keep a block mapped."""
    done = 0
    while done < len(data):
        with data[done:] as rest:
            done += os.pwrite(fd, rest, offset + done)
