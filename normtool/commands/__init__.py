"""One module per CLI command; ``COMMANDS`` lists them in help order."""

from normtool.commands import demo
from normtool.commands.table import WORK_COMMANDS

COMMANDS = [*WORK_COMMANDS, ("demo", demo.demo)]
