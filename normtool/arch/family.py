"""What an architecture adapter provides: detection and a graph builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from normtool.graph import Graph
from normtool.io.store import Checkpoint


@dataclass(frozen=True)
class Assumption:
    """A value a build used that neither the checkpoint nor its config records.

    Why a record and not a default kept quiet: a wrong guess (PowerNorm's group count, a
    LayerNorm eps) gives a model that runs, verifies against itself, and computes something
    else. Every command states these, and every output's history keeps them.
    """

    what: str
    value: int | float | str
    why: str

    def line(self) -> str:
        value = f"{self.value:g}" if isinstance(self.value, float) else self.value
        return f"{self.what} = {value} ({self.why})"

    def to_dict(self) -> dict[str, int | float | str]:
        return {"what": self.what, "value": self.value, "why": self.why}


@dataclass(frozen=True)
class BuildOptions:
    """User-supplied facts a checkpoint may not carry (``--heads``, ``--act``, ``--pn-groups``,
    ``--eps``), and the record of what the build assumed where neither file nor user said.

    ``assumed`` is filled by the builder (``assume``): the options object is the one thing
    every family's ``build`` already receives, so no builder signature changes for it.
    """

    heads: int | None = None
    act: str | None = None
    pn_groups: int | None = None
    eps: float | None = None
    assumed: list[Assumption] = field(default_factory=list, compare=False)

    def assume(self, what: str, value: int | float | str, why: str) -> None:
        """Record an assumption once (a value used by every block is one assumption)."""
        if all(a.what != what for a in self.assumed):
            self.assumed.append(Assumption(what, value, why))


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    detect: Callable[[Checkpoint], bool]
    build: Callable[[Checkpoint, BuildOptions], Graph]
