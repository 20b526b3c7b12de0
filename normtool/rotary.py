"""Rotary embedding frequencies, with the context-extension rescalings checkpoints record.

Why one module without torch: the executor (``runtime.torch_exec``) and the ONNX emitter
(``runtime.onnx_emit``) must rotate by the same angles, and the graph validates a ``rope`` op's
``scaling`` before either runs. The frequencies are computed here once, in Python floats
(float64), and each runtime rounds them to its own dtype.

Scalings (the ``scaling`` attribute of a ``rope`` op; absent: none), as Hugging Face configs name
them in ``rope_scaling`` / ``rope_parameters``:

* ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by ``factor``
  (the same as positions divided by it);
* ``llama3`` (Llama 3.1): with wavelengths ``λ_i = 2π/θ_i`` and ``L`` the original context,
  frequencies with ``λ > L/low_freq_factor`` are divided by ``factor``, those with
  ``λ < L/high_freq_factor`` kept, and those between interpolated:
  ``θ' = (1 − s)·θ/factor + s·θ`` with ``s = (L/λ − low) / (high − low)``.

Scalings that also rescale the cos/sin tables or depend on the running sequence length
(``dynamic``, ``yarn``, ``longrope``…) are not supported and are refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

#: The numeric keys each supported scaling type needs.
SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def scaling_problem(scaling: Any) -> str | None:
    """Why ``scaling`` (a ``rope`` op's attribute) cannot be computed, or None."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        return f"scaling {scaling!r} is not an object"
    kind = scaling.get("type")
    if kind not in SCALING_KEYS:
        return f"rope scaling type {kind!r} is not supported (supported: {', '.join(SCALING_KEYS)})"
    for key in SCALING_KEYS[kind]:
        v = scaling.get(key)
        if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)):
            return f"rope scaling {key} {v!r} is not a finite number"
        if v <= 0:
            return f"rope scaling {key} {v!r} is not above 0"
    extra = sorted(set(scaling) - {"type", *SCALING_KEYS[kind]})
    if extra:
        return f"rope scaling {kind} has unknown keys {extra}"
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        return "rope scaling llama3 needs high_freq_factor above low_freq_factor"
    return None


def inv_frequencies(
    dims: int, base: float, scaling: Mapping[str, Any] | None = None
) -> list[float]:
    """``θ_i = base^(−2i/dims)`` for ``i < dims/2``, rescaled by ``scaling`` (module docstring)."""
    inv = [1.0 / base ** (2 * i / dims) for i in range(dims // 2)]
    if scaling is None:
        return inv
    factor = float(scaling["factor"])
    if scaling["type"] == "linear":
        return [t / factor for t in inv]
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    out = []
    for t in inv:
        wavelength = 2 * math.pi / t
        if wavelength < context / high:
            out.append(t)
        elif wavelength > context / low:
            out.append(t / factor)
        else:
            s = (context / wavelength - low) / (high - low)
            out.append((1 - s) * t / factor + s * t)
    return out
