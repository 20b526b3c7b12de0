"""Refusals before merging: models that do not share one architecture (NaN/Inf: ``normtool.finite``)."""

from __future__ import annotations

from collections.abc import Sequence

from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.model import Model


def _named(graph: Graph, name: str) -> str:
    """The graph tensor's name, with the checkpoint key it is stored under when that differs."""
    key = graph.tensors[name].source.key
    return repr(name) if key == name else f"{name!r} (stored as {key!r})"


def check_same_architecture(models: Sequence[Model]) -> None:
    """Raise naming the first tensor (or space) in which a model differs from the first one."""
    ref = models[0]
    ga = ref.graph
    for m in models[1:]:
        gb = m.graph
        where = m.checkpoint.path if m.checkpoint else None
        if gb.family != ga.family:
            raise NormtoolError(
                f"different architecture: {gb.family}, but the first model is {ga.family}", where
            )
        for name, spec in ga.tensors.items():
            other = gb.tensors.get(name)
            if other is None:
                raise NormtoolError(
                    f"tensor {_named(ga, name)} of the first model is missing", where
                )
            if other.shape != spec.shape:
                raise NormtoolError(
                    f"tensor {_named(gb, name)} has shape {other.shape}, the first model's has "
                    f"{spec.shape}",
                    where,
                )
        extra = [n for n in gb.tensors if n not in ga.tensors]
        if extra:
            raise NormtoolError(f"tensor {_named(gb, extra[0])} is not in the first model", where)
        for name, sp in ga.spaces.items():
            if gb.spaces.get(name) != sp:
                raise NormtoolError(
                    f"space {name!r} differs from the first model's ({gb.spaces.get(name)} vs {sp})",
                    where,
                )
        if [(o.kind, o.inputs, o.params, o.attrs) for o in gb.ops] != [
            (o.kind, o.inputs, o.params, o.attrs) for o in ga.ops
        ]:
            raise NormtoolError("the ops differ from the first model's", where)
