"""One module per CLI command; ``COMMANDS`` lists them in help order."""

from normtool.commands import convert, fold, inspect, loki, verify

COMMANDS = [
    ("inspect", inspect.inspect),
    ("verify", verify.verify),
    ("convert-ln-to-rms", convert.convert_ln_to_rms),
    ("fold", fold.fold),
    ("loki-head", loki.loki_head),
]
