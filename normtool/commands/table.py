"""The commands ``normtool demo`` runs: every command but the demo itself, in help order.

Why a module of its own: the demo command needs this table, and ``normtool.commands`` (the full
table) imports the demo command; kept apart, the imports stay acyclic.
"""

from collections.abc import Callable

from normtool.commands import (
    barrier,
    bench,
    convert,
    export,
    fold,
    inspect,
    loki,
    merge,
    rotate,
    run,
    verify,
)

WORK_COMMANDS: list[tuple[str, Callable[..., None]]] = [
    ("inspect", inspect.inspect),
    ("verify", verify.verify),
    ("export", export.export),
    ("bench", bench.bench),
    ("convert-ln-to-rms", convert.convert_ln_to_rms),
    ("fold", fold.fold),
    ("rotate", rotate.rotate),
    ("merge", merge.merge),
    ("barrier", barrier.barrier),
    ("loki-head", loki.loki_head),
    ("run", run.run),
]
