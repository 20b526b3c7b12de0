"""Refusals before merging: models that do not share one architecture, and non-finite weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normtool.errors import NormtoolError
from normtool.model import Model


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
                raise NormtoolError(f"tensor {name!r} of the first model is missing", where)
            if other.shape != spec.shape:
                raise NormtoolError(
                    f"tensor {name!r} has shape {other.shape}, the first model's has {spec.shape}",
                    where,
                )
        extra = [n for n in gb.tensors if n not in ga.tensors]
        if extra:
            raise NormtoolError(f"tensor {extra[0]!r} is not in the first model", where)
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


def check_finite(model: Model, weights: dict[str, torch.Tensor]) -> None:
    """Weights with NaN or Inf cannot be matched or averaged meaningfully: refuse, naming one."""
    for name, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NormtoolError(
                f"tensor {name!r} holds NaN or Inf values",
                model.checkpoint.path if model.checkpoint else None,
            )
