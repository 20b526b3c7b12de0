"""The process entry point (``normtool`` and ``python -m normtool``).

Why apart from ``cli``: importing the CLI imports torch, about a second on one core. Work that
needs only the command line — hashing the source checkpoints whose digests the outputs will
record (``io.digest.prefetch``) — starts here first, in a background thread, and overlaps it.
"""

from __future__ import annotations

import sys


def main() -> None:
    from normtool.io.digest import prefetch

    prefetch(sys.argv[1:])
    from normtool.cli import main as run

    run()
