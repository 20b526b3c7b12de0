"""The ``normtool`` command line: one thin function per command (in ``normtool.commands``).

Only this module configures output: errors become one line on stderr with the exit code the
error carries (2 bad input, 1 check failed, 3 device unavailable, 128 + N for signal N: 130
for Ctrl-C); ``--debug`` anywhere on the command line shows the traceback instead; ``--quiet``
(or CI / no terminal) hides progress bars. Library warnings (torch's ``UserWarning``s) are
silenced unless ``--debug``: they would precede, and bury, the one line a CI log must show.
"""

from __future__ import annotations

import re
import sys
import traceback
import warnings
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from normtool import __version__
from normtool.commands import COMMANDS
from normtool.commands.common import STATE
from normtool.errors import (
    Interrupted,
    NormtoolError,
    address_space_limit,
    fail,
    out_of_memory,
)
from normtool.io import reads


class _Command(TyperCommand):
    """Help screens a person reads: flags without a ``<bool>`` type, arguments in the usage
    line as ``PATH`` rather than ``{path}`` (Typer's defaults in this version)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = (p.metavar or p.name or "").upper() + ("..." if p.nargs != 1 else "")
                pieces.append(name if p.required else f"[{name}]")
        return pieces


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Exact, verified post-hoc rewrites of trained networks. Exit codes: 0 ok, "
    "1 check failed, 2 bad input or usage, 3 requested device unavailable, 130 interrupted. "
    "--debug and --quiet may appear anywhere on the command line.",
)


def _version(value: bool) -> None:
    if value:
        print(f"normtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Exact, verified post-hoc rewrites of trained networks."""


#: Said under every command's options: the two flags the entry point takes anywhere on the line.
GLOBAL_FLAGS = (
    "Anywhere on the line: --debug (a traceback instead of the one-line error), "
    "--quiet (no progress bars)."
)

for _name, _fn in COMMANDS:
    app.command(_name, cls=_Command, epilog=GLOBAL_FLAGS)(_fn)


def _usage_text(e: Exception) -> str:
    text = e.format_message().strip()  # type: ignore[attr-defined]
    return text.splitlines()[0] if text else "aborted"


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    STATE.debug = "--debug" in args
    STATE.quiet = "--quiet" in args
    args = [a for a in args if a not in ("--debug", "--quiet")] or ["--help"]
    reads.forget()
    try:
        with warnings.catch_warnings():
            if not STATE.debug:
                warnings.simplefilter("ignore")
            rv = app(args=args, prog_name="normtool", standalone_mode=False)
    except Interrupted as e:
        fail(f"interrupted ({e.name}); nothing was written", e.exit_code)
    except KeyboardInterrupt:
        fail("interrupted; nothing was written", 130)
    except BrokenPipeError:
        fail("output pipe closed", 2)
    except NormtoolError as e:
        if STATE.debug:
            traceback.print_exc()
        fail(str(e), e.exit_code)
    except Exception as e:  # noqa: BLE001 - anything else is still reported in one line
        if STATE.debug:
            traceback.print_exc()
        fail(_describe(e), 2)
    sys.exit(rv if isinstance(rv, int) else 0)


def _describe(e: Exception) -> str:
    """One line for an error no command turned into a NormtoolError."""
    if hasattr(e, "format_message"):  # Typer's (vendored click) usage errors and aborts
        return _usage_text(e)
    limited = address_space_limit() is not None
    if isinstance(e, MemoryError) or (limited and isinstance(e, ImportError)):
        return out_of_memory("while running")
    asked = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(e))
    if asked:  # torch's CPU allocator refusing one block
        return out_of_memory(f"while running: one tensor needed {int(asked[1]) / 2**30:.3g} GiB")
    if isinstance(e, RecursionError):
        return "input nested too deeply to read (a JSON file or a pickle)"
    if isinstance(e, OSError) and (e.filename or e.strerror):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}"
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}: {msg} (rerun with --debug for details)"
