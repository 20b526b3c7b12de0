"""What a transform is to the runner: a pass that says whether it applies and plans a Rewrite.

Why this split: a pass only *plans* — the new graph and a recipe per changed tensor
(``normtool.passes.recipes``), plus what it wants to report. Checking the result against the
original, recording the history and writing the file are the runner's (``normtool.runner``),
the same for every pass and for a chain of them, so no command repeats that sequence and no
pass writes its own history entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from normtool.graph import Graph
from normtool.model import Model, Override
from normtool.passes.recipes import Engine


@dataclass
class Rewrite:
    """One planned pass over one source model.

    ``stored()`` is the result as it will be written (rewritten tensors rounded to their stored
    dtypes); ``exact()`` the same graph with them in float64, unrounded — the maths the fp64
    self-check holds to 1e-9. ``values``: tensors the pass computed outright (small: a Loki
    head's D²), the same in both. ``report``/``lines``: the pass's own JSON fields and human
    lines. ``equivalent``: the result computes the source's outputs (the runner self-checks it);
    ``verify``: a pass's own check of the written result instead (a Loki head adds an output),
    returning the errors for its history entry. ``explain(bad)``: more reasons for a failed
    self-check (CRMS in half precision).
    """

    transform: str
    params: dict[str, Any]
    graph: Graph
    engine: Engine
    summary: str
    report: dict[str, Any] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    values: Mapping[str, Override] = field(default_factory=dict)
    equivalent: bool = True
    verify: Callable[[Model], dict[str, float]] | None = None
    explain: Callable[[list[str]], list[str]] | None = None

    @property
    def source(self) -> Model:
        return self.engine.source

    def _model(self, exact: bool) -> Model:
        m = self.engine.model(self.graph, exact)
        m.overrides.update(self.values)
        return m

    def stored(self) -> Model:
        return self._model(False)

    def exact(self) -> Model:
        return self._model(True)


class Pass(Protocol):
    """A transform: ``name`` (its command and history name), ``applicability(graph)`` — the
    reasons it does not apply (empty: it does), for ``inspect`` and refusals — and
    ``plan(model)``, which raises NormtoolError naming why it cannot."""

    name: str

    def applicability(self, graph: Graph) -> list[str]: ...

    def plan(self, model: Model) -> Rewrite: ...
