"""Transforms: functions Model → Model with precondition checks that return reasons.

``APPLICABILITY`` lists, for ``inspect``, each transform's name and its check: a function of the
graph returning the reasons it does not apply (empty: it applies).
"""

from __future__ import annotations

from collections.abc import Callable

from normtool.graph import Graph
from normtool.loki import head as loki_head
from normtool.passes import fold, ln_to_rms

APPLICABILITY: list[tuple[str, Callable[[Graph], list[str]]]] = [
    ("convert-ln-to-rms", ln_to_rms.check),
    ("fold", fold.applicability),
    ("loki-head", loki_head.check),
]
