"""History entries: what a transform did, recorded in every output's metadata.

Why: a checkpoint that went through normtool must say so — which transform, with which
parameters, from which source file (SHA-256), and the error the self-check achieved.
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from concurrent.futures import Future
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
    """One history record; ``assumptions`` are the values ``source``'s graph was built with that
    no file recorded (the output's graph stores the values, this says they were guesses)."""
    ck = source.checkpoint
    return {
        "transform": transform,
        "params": params,
        "source": None if ck is None else str(ck.path),
        "source_sha256": None if ck is None else PendingDigest(ck.sha256_async()),
        "errors": errors,
        "summary": summary,
        "assumptions": [a.to_dict() for a in source.assumptions],
        "normtool": __version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


class PendingDigest(str):
    """A source digest still being computed: a unique 64-character stand-in for the hex digest.

    Why: the history goes into the output's header, which is written first, while hashing a
    multi-GB source costs as long as converting it. The writer writes this stand-in (as long
    as the digest, so no offset moves), streams the tensors while the hash runs in its thread,
    then overwrites the stand-in in place (``resolve_digests``) before the file gets its name.
    """

    future: Future[str]

    def __new__(cls, future: Future[str]) -> PendingDigest:
        token = super().__new__(cls, uuid.uuid4().hex + uuid.uuid4().hex)
        token.future = future
        return token


def pending_digests(entries: list[dict[str, Any]]) -> list[PendingDigest]:
    return [v for e in entries for v in e.values() if isinstance(v, PendingDigest)]


def resolve_digests(entries: list[dict[str, Any]]) -> dict[str, str]:
    """Wait for every pending digest in ``entries``; put the real ones in; stand-in → digest."""
    done = {}
    for e in entries:
        for k, v in e.items():
            if isinstance(v, PendingDigest):
                e[k] = done[v] = v.future.result()
    return done


def dumps(entries: list[dict[str, Any]]) -> str:
    """The history as JSON, for writers that cannot patch their header later (digests awaited)."""
    resolve_digests(entries)
    return json.dumps(entries)
