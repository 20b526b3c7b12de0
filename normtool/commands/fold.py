"""``normtool fold``: fold UN / PowerNorm / BatchNorm into adjacent layers and bake Weight
Standardization, self-verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from normtool import history, selfcheck
from normtool.commands.common import (
    ArchOpt,
    EpsOpt,
    ForceOpt,
    HeadsOpt,
    JsonOpt,
    MaxShardOpt,
    OutOpt,
    PathArg,
    PnGroupsOpt,
    assumed,
    default_output,
    emit,
    load,
)
from normtool.errors import CheckFailed, NormtoolError
from normtool.io.atomic import check_output_path
from normtool.io.writer import parse_size
from normtool.passes.fold import SELECTORS, FoldResult, fold_norms
from normtool.save import save_model
from normtool.selfcheck import self_check


def _lines(path: Path, out: Path, r: FoldResult, errors: dict[str, float] | None) -> list[str]:
    lines = [f"{path} -> {out}", f"  {r.summary()}"]
    lines += [
        f"  baked {b.name} (ws_conv2d, variant {b.variant}, eps {b.eps:g}): standardised weight "
        "stored, now conv2d"
        for b in r.baked
    ]
    for f in r.folded:
        kept = f", kept {f.kept}" if f.kept else ""
        into = ", ".join(f.into[:6]) + (f" (+{len(f.into) - 6})" if len(f.into) > 6 else "")
        lines.append(f"  folded {f.name} ({f.kind}, {f.placement}): {f.how} into {into}{kept}")
    lines += [f"  skipped {s.name} ({s.kind}): {s.reason}" for s in r.skipped]
    lines += [f"  {u}" for u in r.untied]
    lines += [f"  {n}" for n in r.notes]
    if r.scale_range is not None:
        lo, hi = r.scale_range
        lines.append(f"  re-based residual stream: accumulated scale |D| in [{lo:.3g}, {hi:.3g}]")
    if errors is None:
        lines.append("  not verified (--no-verify)")
    else:
        lines.append("  verified: " + selfcheck.summary(errors))
    return lines


def fold(
    path: PathArg,
    output: OutOpt = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only", help="Comma-separated kinds to fold: un, powernorm, batchnorm, ws (all)."
        ),
    ] = None,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the fp64/fp32 self-check before writing.")
    ] = False,
    force: ForceOpt = False,
    max_shard_size: MaxShardOpt = "5GB",
    as_json: JsonOpt = False,
) -> None:
    """Fold UN, PowerNorm and BatchNorm into neighbouring layers, computing the same function.

    Weight-standardised convs are baked first (their standardised weight stored). Pre-Norm:
    into the readers; Conv/Linear→BN: backward into the layer; Post-Norm: the residual stream
    is re-based so every norm disappears. Prints what was baked, folded and skipped, with
    reasons; self-verifies (fp64 and fp32) before writing.
    """
    kinds = list(SELECTORS) if only is None else [k.strip() for k in only.split(",") if k.strip()]
    shard = parse_size(max_shard_size)
    model = load(path, arch, heads, None, pn_groups, eps)
    out = output or default_output(path, ".folded.safetensors")
    check_output_path(out, [path], force)  # fail before the work, not after it
    try:
        result = fold_norms(model, None if only is None else kinds)
    except NormtoolError as e:
        raise type(e)(e.message, e.path or path) from e
    errors = None
    if not no_verify:
        errors, bad = self_check(model, result.exact, result.model)
        if bad:
            raise CheckFailed("self-verification failed, nothing written: " + "; ".join(bad), path)
    summary = result.summary()
    params = {"only": kinds, "heads": heads, "pn_groups": pn_groups, "eps": eps}
    result.model.history.append(history.entry("fold", model, params, errors, summary))
    out = save_model(result.model, out, [Path(path)], force, max_shard_size=shard)
    payload: dict[str, Any] = {
        "input": str(path),
        "output": str(out),
        "baked": [vars(b) for b in result.baked],
        "folded": [vars(f) for f in result.folded],
        "skipped": [vars(s) for s in result.skipped],
        "untied": result.untied,
        "notes": result.notes,
        "scale_range": result.scale_range,
        "verified": errors is not None,
        "assumptions": assumed(model),
        "errors": errors,
        "summary": summary,
    }
    emit(as_json, payload, _lines(path, out, result, errors))
