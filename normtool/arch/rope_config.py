"""A Hugging Face config's rotary embedding: base, rotated fraction and scaling, as ``rope`` attrs.

Why a reader of its own: the same facts are written two ways. Configs saved by transformers 4
(most of the Hub) hold ``rope_theta`` and ``rope_scaling`` (``{"type" | "rope_type": …}``);
transformers 5 writes one ``rope_parameters`` object holding the theta too. Both are read here
into the ``rope`` op's attributes (``normtool.rotary`` computes them); a scaling type normtool
does not compute is refused by name rather than run unscaled.
"""

from __future__ import annotations

from typing import Any

from normtool.errors import NormtoolError
from normtool.io.store import Checkpoint
from normtool.rotary import SCALING_KEYS, scaling_problem

#: transformers' default base when a config does not record one (LlamaConfig's own default).
DEFAULT_THETA = 10000.0


def rope_attrs(
    cfg: dict[str, Any], ck: Checkpoint, layer_type: str = "full_attention"
) -> dict[str, Any]:
    """``{"base": θ, "fraction": f[, "scaling": {...}]}`` from ``cfg`` for layers of
    ``layer_type`` (``full_attention`` or ``sliding_attention``), or NormtoolError.

    Gemma 3 rotates its sliding-window layers with a base of their own: in transformers 5
    ``rope_parameters`` then holds one object per layer type; in 4, ``rope_local_base_freq``
    (unscaled) beside the full layers' ``rope_theta`` and ``rope_scaling``."""
    # the fraction of each head rotated: Phi's partial_rotary_factor, GPT-NeoX's rotary_pct
    # (and rotary_emb_base for the theta) in transformers 4; inside rope_parameters in 5
    fraction = cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0))
    theta = cfg.get("rope_theta", cfg.get("rotary_emb_base", DEFAULT_THETA))
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        if layer_type not in params:
            raise NormtoolError(f"config rope_parameters has no {layer_type!r} entry", ck.path)
        params = params[layer_type]
    if layer_type == "sliding_attention" and "rope_local_base_freq" in cfg and params is None:
        where, scaling, theta = "rope_local_base_freq", None, cfg["rope_local_base_freq"]
    elif isinstance(params, dict):
        where, scaling = "rope_parameters", params
        theta = params.get("rope_theta", theta)
        fraction = params.get("partial_rotary_factor", fraction)
    else:
        where, scaling = "rope_scaling", cfg.get("rope_scaling")
    attrs: dict[str, Any] = {"base": theta, "fraction": fraction}
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise NormtoolError(f"config {where} = {scaling!r} is not an object", ck.path)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            keys = SCALING_KEYS.get(kind, ())
            attrs["scaling"] = {"type": kind, **{k: scaling.get(k) for k in keys}}
    for name in ("base", "fraction"):
        v = attrs[name]
        if not (isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")):
            raise NormtoolError(
                f"config rope {name} = {v!r} is not a finite number above 0", ck.path
            )
    problem = scaling_problem(attrs.get("scaling"))
    if problem:
        raise NormtoolError(f"config {where}: {problem}", ck.path)
    return attrs
