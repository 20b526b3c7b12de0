"""Error types that carry the exit code the CLI must return.

Library code raises these; only the CLI turns them into a one-line message and an exit code,
so every command reports bad input the same way (DESIGN §1: 1 check failed, 2 bad input or
usage, 3 requested device unavailable).
"""

from __future__ import annotations

import resource
import signal
import sys
from pathlib import Path


class NormtoolError(Exception):
    """Bad input or usage (exit 2). ``path`` names the file the problem is in, when there is one."""

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class CheckFailed(NormtoolError):
    """A numerical check did not pass (exit 1): not equivalent, or a regression."""

    exit_code = 1


class DeviceUnavailable(NormtoolError):
    """A requested device or execution provider cannot be used here (exit 3)."""

    exit_code = 3


class Interrupted(BaseException):
    """A signal asked the process to stop (SIGINT, SIGTERM, SIGHUP).

    Why a BaseException raised from the signal handler: the stack unwinds through every
    ``finally`` and ``except BaseException`` on the way out, so temporary outputs are removed
    exactly as after any other failure, and ``except Exception`` never swallows it. Exit code
    128 + the signal's number, the shell's convention (130 for Ctrl-C).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.exit_code = 128 + signum
        self.name = signal.Signals(signum).name


def one_line(message: str) -> str:
    """``message`` with control characters escaped (a file name may hold a newline): the error
    stays one line that a CI log or a parser reads as one."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)


def fail(message: str, code: int) -> None:
    """Print ``normtool: error: <message>`` as one line on stderr and exit with ``code``."""
    print(f"normtool: error: {one_line(message)}", file=sys.stderr)
    sys.exit(code)


def address_space_limit() -> int | None:
    """The process's virtual-memory limit in bytes (``ulimit -v``), or None where unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def out_of_memory(during: str) -> str:
    """The one-line message for a MemoryError, naming the process's memory limit if set."""
    soft = address_space_limit()
    limit = "" if soft is None else f" (virtual memory limit, ulimit -v: {soft >> 20} MiB)"
    return f"out of memory {during}{limit}"
