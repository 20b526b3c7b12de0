"""``normtool inspect``: what is this model, and which transforms apply (with reasons)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from normtool.analysis import norms
from normtool.commands.common import ActOpt, ArchOpt, HeadsOpt, JsonOpt, PathArg, emit, load
from normtool.finite import nonfinite_tensors
from normtool.passes import APPLICABILITY


def describe(model) -> dict[str, Any]:
    g = model.graph
    dtypes = Counter(s.dtype for s in g.tensors.values())
    norm_list = [{"op": o.name, "kind": o.kind, "placement": where} for o, where in norms(g)]
    transforms = {}
    for name, check in APPLICABILITY:
        reasons = check(g)
        transforms[name] = {"applies": not reasons, "reasons": reasons}
    return {
        "family": g.family,
        "info": g.info,
        "inputs": [{"name": i.name, "kind": i.kind, "shape": list(i.shape)} for i in g.inputs],
        "outputs": g.outputs,
        "parameters": model.param_count(),
        "dtypes": dict(dtypes),
        "norms": norm_list,
        "norm_summary": dict(Counter(f"{n['kind']}/{n['placement']}" for n in norm_list)),
        "transforms": transforms,
        "history": model.history,
        "non_finite": nonfinite_tensors(model),
    }


def inspect(
    path: PathArg,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    act: ActOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show family, sizes, parameters, dtypes, norms and their placement, applicable transforms."""
    d = describe(load(path, arch, heads, act))
    lines = [
        f"{path}: {d['family']}",
        "  " + ", ".join(f"{k}={v}" for k, v in d["info"].items()),
        f"  parameters: {d['parameters']:,}  dtypes: "
        + ", ".join(f"{k}×{v}" for k, v in d["dtypes"].items()),
        "  inputs: " + ", ".join(f"{i['name']}{i['shape']}" for i in d["inputs"]),
        "  norms: " + (", ".join(f"{k}: {v}" for k, v in d["norm_summary"].items()) or "none"),
    ]
    for name, t in d["transforms"].items():
        lines.append(
            f"  {name}: "
            + ("applies" if t["applies"] else "does not apply: " + "; ".join(t["reasons"]))
        )
    bad = d["non_finite"]
    lines.append(
        "  non-finite: "
        + (", ".join(f"{n} ({k} NaN/Inf)" for n, k in bad.items()) if bad else "none")
    )
    for h in d["history"]:
        lines.append(f"  history: {h.get('transform')} {h.get('summary', '')}")
    emit(as_json, d, lines)
