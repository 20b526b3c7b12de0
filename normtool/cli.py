"""The ``normtool`` command line: one thin function per command (in ``normtool.commands``).

Only this module configures output: errors become one line on stderr with the exit code the
error carries (2 bad input, 1 check failed, 3 device unavailable); ``--debug`` anywhere on the
command line shows the traceback instead; ``--quiet`` (or CI / no terminal) hides progress bars.
"""

from __future__ import annotations

import sys
import traceback

import typer

from normtool.commands import COMMANDS
from normtool.commands.common import STATE
from normtool.errors import NormtoolError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Exact, verified post-hoc rewrites of trained networks. Exit codes: 0 ok, "
    "1 check failed, 2 bad input or usage, 3 requested device unavailable.",
)


@app.callback()
def _root() -> None:
    """Exact, verified post-hoc rewrites of trained networks."""


for _name, _fn in COMMANDS:
    app.command(_name)(_fn)


def _fail(message: str, code: int) -> None:
    print(f"normtool: error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    STATE.debug = "--debug" in args
    STATE.quiet = "--quiet" in args
    args = [a for a in args if a not in ("--debug", "--quiet")]
    try:
        rv = app(args=args, prog_name="normtool", standalone_mode=False)
    except NormtoolError as e:
        if STATE.debug:
            traceback.print_exc()
        _fail(str(e), e.exit_code)
    except (KeyboardInterrupt, BrokenPipeError):
        _fail("interrupted", 2)
    except Exception as e:  # noqa: BLE001 - anything else is still reported in one line
        if STATE.debug:
            traceback.print_exc()
        if hasattr(e, "format_message"):  # Typer's (vendored click) usage errors and aborts
            text = e.format_message().strip()
            _fail(text.splitlines()[0] if text else "aborted", 2)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        _fail(f"unexpected {type(e).__name__}: {msg} (rerun with --debug for details)", 2)
    sys.exit(rv if isinstance(rv, int) else 0)
