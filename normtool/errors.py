"""Error types that carry the exit code the CLI must return.

Library code raises these; only the CLI turns them into a one-line message and an exit code,
so every command reports bad input the same way (DESIGN §1: 1 check failed, 2 bad input or
usage, 3 requested device unavailable).
"""

from __future__ import annotations

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
