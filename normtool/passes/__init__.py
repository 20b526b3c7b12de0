"""Transforms as passes: each says why it does not apply (``applicability``) and plans a
``Rewrite`` (``plan``); ``normtool.runner`` checks, records and writes the result, for one pass
or a chain.

``APPLICABILITY`` lists, for ``inspect``, each transform's name and its check: a function of the
graph returning the reasons it does not apply (empty: it applies).
"""

from __future__ import annotations

from collections.abc import Callable

from normtool.graph import Graph
from normtool.loki import head as loki_head
from normtool.passes.fold import Fold
from normtool.passes.ln_to_rms import ConvertLnToRms
from normtool.passes.rms_gain import RmsGain
from normtool.passes.rotate import Rotate

APPLICABILITY: list[tuple[str, Callable[[Graph], list[str]]]] = [
    ("convert-ln-to-rms", ConvertLnToRms().applicability),
    ("fold", Fold().applicability),
    ("fold --only rms-gain", RmsGain().applicability),
    ("rotate", Rotate().applicability),
    ("loki-head", loki_head.check),
]
