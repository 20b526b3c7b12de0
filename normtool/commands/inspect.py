"""``normtool inspect``: what is this model, and which transforms apply (with reasons)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from normtool.analysis import current_info, norms, parameter_count
from normtool.commands.common import (
    ActOpt,
    ArchOpt,
    EpsOpt,
    HeadsOpt,
    JsonOpt,
    PathArg,
    PnGroupsOpt,
    assumed,
    emit,
    load,
)
from normtool.finite import nonfinite_tensors
from normtool.passes import APPLICABILITY


def describe(model) -> dict[str, Any]:
    g = model.graph
    dtypes = Counter(s.dtype for s in g.tensors.values())
    norm_list = [
        {"op": o.name, "kind": o.kind, "placement": where}
        | {k: o.attrs[k] for k in ("eps", "groups") if k in o.attrs}
        for o, where in norms(g)
    ]
    transforms = {}
    for name, check in APPLICABILITY:
        reasons = check(g)
        transforms[name] = {"applies": not reasons, "reasons": reasons}
    return {
        "family": g.family,
        "info": current_info(g),
        "inputs": [{"name": i.name, "kind": i.kind, "shape": list(i.shape)} for i in g.inputs],
        "outputs": g.outputs,
        "parameters": parameter_count(g),
        "dtypes": dict(dtypes),
        "norms": norm_list,
        "norm_summary": dict(Counter(f"{n['kind']}/{n['placement']}" for n in norm_list)),
        "norm_eps": _per_kind(norm_list, "eps"),
        "norm_groups": _per_kind(norm_list, "groups"),
        "assumptions": assumed(model),
        "assumed_earlier": [
            {"transform": h.get("transform"), **a}
            for h in model.history
            for a in h.get("assumptions") or ()
        ],
        "transforms": transforms,
        "history": model.history,
        "non_finite": nonfinite_tensors(model),
    }


def _per_kind(norm_list: list[dict[str, Any]], key: str) -> dict[str, list[Any]]:
    """Norm kind → the distinct values of ``key`` its ops use (eps, PowerNorm groups)."""
    out: dict[str, list[Any]] = {}
    for n in norm_list:
        if key in n and n[key] not in out.setdefault(n["kind"], []):
            out[n["kind"]].append(n[key])
    return {k: v for k, v in out.items() if v}


def _assumption_lines(d: dict[str, Any]) -> list[str]:
    lines = [f"  assumed: {a['what']} = {a['value']} ({a['why']})" for a in d["assumptions"]]
    lines += [
        f"  assumed by {a['transform']}'s source: {a['what']} = {a['value']} ({a['why']})"
        for a in d["assumed_earlier"]
    ]
    return lines


def _transform_lines(name: str, reasons: list[str]) -> list[str]:
    """``name: applies``, or why not: one reason inline, several one per line (the full list
    that a refusal's one line points to)."""
    if len(reasons) <= 1:
        return [f"  {name}: " + (f"does not apply: {reasons[0]}" if reasons else "applies")]
    return [f"  {name}: does not apply ({len(reasons)} reasons):"] + [f"    - {r}" for r in reasons]


def inspect(
    path: PathArg,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    act: ActOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show family, sizes, parameters, dtypes, norms and their placement, applicable transforms."""
    d = describe(load(path, arch, heads, act, pn_groups, eps))
    lines = [
        f"{path}: {d['family']}",
        "  " + ", ".join(f"{k}={v}" for k, v in d["info"].items()),
        f"  parameters: {d['parameters']:,}  dtypes: "
        + ", ".join(f"{k}×{v}" for k, v in d["dtypes"].items()),
        "  inputs: " + ", ".join(f"{i['name']}{i['shape']}" for i in d["inputs"]),
        "  norms: " + (", ".join(f"{k}: {v}" for k, v in d["norm_summary"].items()) or "none"),
    ]
    if d["norm_eps"]:
        lines.append(
            "  norm eps: "
            + ", ".join(f"{k} {', '.join(f'{e:g}' for e in v)}" for k, v in d["norm_eps"].items())
        )
    if d["norm_groups"]:
        lines.append(
            "  norm groups: "
            + ", ".join(f"{k} {', '.join(map(str, v))}" for k, v in d["norm_groups"].items())
        )
    lines += _assumption_lines(d)
    for name, t in d["transforms"].items():
        lines += _transform_lines(name, t["reasons"])
    bad = d["non_finite"]
    lines.append(
        "  non-finite: "
        + (", ".join(f"{n} ({k} NaN/Inf)" for n, k in bad.items()) if bad else "none")
    )
    for h in d["history"]:
        lines.append(f"  history: {h.get('transform')} {h.get('summary', '')}")
    emit(as_json, d, lines)
