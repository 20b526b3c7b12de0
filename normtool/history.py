"""History entries: what a transform did, recorded in every output's metadata.

Why: a checkpoint that went through normtool must say so — which transform, with which
parameters, from which source file (SHA-256), and the error the self-check achieved.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from normtool import __version__
from normtool.model import Model


def entry(
    transform: str,
    source: Model,
    params: dict[str, Any],
    errors: dict[str, float] | None,
    summary: str,
) -> dict[str, Any]:
    ck = source.checkpoint
    return {
        "transform": transform,
        "params": params,
        "source": None if ck is None else str(ck.path),
        "source_sha256": None if ck is None else ck.sha256(),
        "errors": errors,
        "summary": summary,
        "normtool": __version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
