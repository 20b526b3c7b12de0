"""Non-finite weights: found by ``inspect``, refused by every transform.

Why refuse: a NaN or Inf weight makes the model's outputs NaN for some or all inputs, so a
transform's self-check cannot pass or fail meaningfully and folding it into other tensors would
spread it. Why one function: every transform and ``inspect`` must agree on what counts. The scan
reads one stored tensor at a time (tied graph tensors once), so it stays within bounded memory
on checkpoints larger than memory.
"""

from __future__ import annotations

from normtool.errors import NormtoolError
from normtool.model import Model


def nonfinite_tensors(model: Model) -> dict[str, int]:
    """``{graph tensor: number of NaN/Inf values}`` for every float tensor that has any."""
    found: dict[str, int] = {}
    seen: set[object] = set()
    for name, spec in model.graph.tensors.items():
        src = None if name in model.overrides else spec.source
        if src is not None and src in seen:
            continue
        seen.add(src)
        t = model.tensor(name)
        if t.is_floating_point():
            # in chunks: isfinite's temporaries (|t|, masks) would otherwise double the peak
            flat, step = t.reshape(-1), 1 << 22
            bad = flat.numel() - sum(
                int(flat[i : i + step].isfinite().count_nonzero())
                for i in range(0, flat.numel(), step)
            )
            if bad:
                found[name] = bad
    return found


def require_finite(model: Model) -> None:
    """Raise NormtoolError (exit 2) naming the first tensor with NaN/Inf values, and its file."""
    bad = nonfinite_tensors(model)
    if not bad:
        return
    name, count = next(iter(bad.items()))
    key = model.graph.tensors[name].source.key
    stored = f" (stored as {key!r})" if key != name else ""
    more = f"; {len(bad) - 1} more tensor(s) too" if len(bad) > 1 else ""
    raise NormtoolError(
        f"tensor {name!r}{stored} holds NaN or Inf values ({count}){more}: refusing to transform "
        "non-finite weights",
        model.checkpoint.path if model.checkpoint else None,
    )
