"""The label space (``--labels``) and the class-index → label map (``--observed``).

Why so strict: a classifier's output i means *some* label, and the metric knows labels by name.
Matching the two by position when the orderings differ silently corrupts every prediction
(DESIGN §3.4 "the classic bug"), so the map is explicit by name and the identity is only assumed
when the model has exactly as many outputs as there are labels. Every name must be known,
none may repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normtool.errors import NormtoolError
from normtool.io import reads
from normtool.loki.metric import Metric


@dataclass
class LabelSpace:
    """N candidate labels over a metric, and the label each of the K model outputs means."""

    metric: Metric
    points: np.ndarray  # int64 [N]: metric point of label j
    names: list[str]  # [N]
    observed: np.ndarray  # int64 [K]: label index (into the N labels) of model output i

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def k(self) -> int:
        return len(self.observed)


def read_label_file(path: Path) -> list[str]:
    """One label per line; surrounding whitespace is stripped and blank lines are skipped."""
    try:
        text = reads.note(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise NormtoolError(f"cannot read label list ({e})", path) from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise NormtoolError("label list is empty", path)
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise NormtoolError(f"label {name!r} is listed twice", path)
        seen.add(name)
    return names


def resolve_labels(
    metric: Metric,
    k: int,
    labels: list[str] | None = None,
    observed: list[str] | None = None,
    labels_path: Path | None = None,
    observed_path: Path | None = None,
) -> LabelSpace:
    """Build the label space for a model with ``k`` outputs; NormtoolError on any mismatch."""
    index = {name: i for i, name in enumerate(metric.names)}
    if labels is None:
        points = list(metric.default_labels)
    else:
        unknown = [s for s in labels if s not in index]
        if unknown:
            raise NormtoolError(
                f"{len(unknown)} label(s) not in the metric, e.g. {unknown[0]!r}", labels_path
            )
        points = [index[s] for s in labels]
    names = [metric.names[p] for p in points]
    if observed is None:
        if k != len(names):
            raise NormtoolError(
                f"the model has {k} outputs but the label space has {len(names)} labels: "
                "--observed FILE is required (line i = the label of output i); "
                "an ordering is never guessed"
            )
        obs = np.arange(k, dtype=np.int64)
    else:
        if len(observed) != k:
            raise NormtoolError(
                f"--observed names {len(observed)} labels but the model has {k} outputs",
                observed_path,
            )
        position = {name: j for j, name in enumerate(names)}
        unknown = [s for s in observed if s not in position]
        if unknown:
            raise NormtoolError(
                f"unknown label {unknown[0]!r} in --observed (not in the label space of "
                f"{len(names)} labels)",
                observed_path,
            )
        obs = np.array([position[s] for s in observed], dtype=np.int64)
    return LabelSpace(metric, np.asarray(points, dtype=np.int64), names, obs)
