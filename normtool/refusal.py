"""Refusals: one short line naming the first reason, the full list left to ``normtool inspect``.

Why one short line: a pass finds every reason it cannot apply (a Post-LN BERT has eight, a
GPT-2 has a LayerNorm per block), and joined together they made error lines of 900 to
several thousand characters that a terminal wraps and a CI log buries. The first reason
(reasons are listed most telling first) plus a count says what is wrong; ``normtool inspect``
lists them all, one per line.

Budget: the whole line the CLI prints (``normtool: error: PATH: WHAT: REASON (+N more; run
`normtool inspect PATH` for the full list)``) is held to ``WIDTH`` characters by shortening the
reason, never the path: the path is the user's and must stay copyable. So the line fits in
``WIDTH`` whenever the path has at most 20 characters (``models/gpt2-medium/``); a longer one
lengthens it, since a reason is never cut below ``MIN_REASON`` characters. Reasons are written
to make their point within those (the layer first, then what blocks it). A lone reason is not
cut: it is the whole message, as long as its writer made it.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from normtool.errors import NormtoolError

#: The longest refusal line aimed at, path and the CLI's prefix included.
WIDTH = 200
#: The shortest a reason is cut to, however long the path.
MIN_REASON = 60
#: What the CLI prints before ``PATH: message`` (normtool.cli).
CLI_PREFIX = "normtool: error: "


def refusal_line(
    what: str, reasons: Sequence[str], path: str | Path | None, listed: bool = True
) -> str:
    """``WHAT: first reason (+N more; run `normtool inspect PATH` for the full list)``, the
    first reason shortened at a word so that the CLI's line stays within ``WIDTH``. A lone
    reason is the whole story and stays whole (reasons are ours, and short). ``listed``: false
    when inspect does not list these reasons (they follow from options such as ``--only``),
    and the pointer is left out rather than sending the user to a list that is not there."""
    if len(reasons) == 1:
        return f"{what}: {reasons[0]}"
    where = "" if path is None else " " + shlex.quote(str(path))
    more = f"+{len(reasons) - 1} more"
    tail = f" ({more}; run `normtool inspect{where}` for the full list)" if listed else f" ({more})"
    used = len(CLI_PREFIX) + (0 if path is None else len(f"{path}: ")) + len(f"{what}: ")
    return f"{what}: {_fit(reasons[0], WIDTH - used - len(tail))}{tail}"


def _fit(reason: str, room: int) -> str:
    """``reason`` cut to ``room`` characters (at least ``MIN_REASON``) with "…", at the last
    space when one is near the end (a name is then never cut in half)."""
    room = max(MIN_REASON, room)
    if len(reason) <= room:
        return reason
    cut = reason[: room - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space >= room - 20 else cut).rstrip(" ,;:") + "…"


def refusal(
    what: str, reasons: Sequence[str], path: str | Path | None = None, listed: bool = True
) -> NormtoolError:
    """The bad-input error (exit 2) for a transform that does not apply, as one short line."""
    return NormtoolError(refusal_line(what, reasons, path, listed), path)
