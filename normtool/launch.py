"""The process entry point (``normtool`` and ``python -m normtool``).

Why apart from ``cli``: importing the CLI imports torch, about a second on one core. Work that
needs only the command line — hashing the source checkpoints whose digests the outputs will
record (``io.digest.prefetch``) — starts here first, in a background thread, and overlaps it.
The cyclic garbage collector is paused during the import (it would scan the hundreds of
thousands of objects the import creates, ~0.2 s, and find no garbage), and those objects are
then frozen out of later collections.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    from normtool.io.digest import prefetch

    prefetch(sys.argv[1:])
    gc.disable()
    try:
        from normtool.cli import main as run
    finally:
        gc.freeze()
        gc.enable()
    run()
