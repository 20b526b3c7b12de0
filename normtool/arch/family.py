"""What an architecture adapter provides: detection and a graph builder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from normtool.graph import Graph
from normtool.io.store import Checkpoint


@dataclass(frozen=True)
class BuildOptions:
    """User-supplied facts a checkpoint may not carry (``--heads``, ``--act``)."""

    heads: int | None = None
    act: str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    detect: Callable[[Checkpoint], bool]
    build: Callable[[Checkpoint, BuildOptions], Graph]
