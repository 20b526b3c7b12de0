"""One module per CLI command; ``COMMANDS`` lists them in help order."""

from normtool.commands import (
    barrier,
    bench,
    convert,
    demo,
    export,
    fold,
    inspect,
    loki,
    merge,
    verify,
)

COMMANDS = [
    ("inspect", inspect.inspect),
    ("verify", verify.verify),
    ("export", export.export),
    ("bench", bench.bench),
    ("convert-ln-to-rms", convert.convert_ln_to_rms),
    ("fold", fold.fold),
    ("merge", merge.merge),
    ("barrier", barrier.barrier),
    ("loki-head", loki.loki_head),
    ("demo", demo.demo),
]
