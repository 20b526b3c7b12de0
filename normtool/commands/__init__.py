"""One module per CLI command; ``COMMANDS`` lists them in help order."""

from normtool.commands import inspect

COMMANDS = [
    ("inspect", inspect.inspect),
]
