"""``normtool fold``: fold UN / PowerNorm / BatchNorm into adjacent layers and bake Weight
Standardization, self-verified."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normtool import runner
from normtool.commands.common import (
    ArchOpt,
    EpsOpt,
    ForceOpt,
    HeadsOpt,
    JsonOpt,
    MaxShardOpt,
    NoVerifyOpt,
    OutOpt,
    PathArg,
    PnGroupsOpt,
    default_output,
    emit,
    load,
    report,
)
from normtool.io.atomic import check_output_path
from normtool.io.writer import parse_size
from normtool.passes.fold import SELECTORS
from normtool.passes.rms_gain import fold_pass


def fold(
    path: PathArg,
    output: OutOpt = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            help="Comma-separated kinds to fold: un, powernorm, batchnorm, ws (all of these); "
            "or rms-gain alone: RMSNorm gains into their linear readers (not in the default).",
        ),
    ] = None,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    no_verify: NoVerifyOpt = False,
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
    step = fold_pass(None if only is None else tuple(kinds))
    params = {"heads": heads, "pn_groups": pn_groups, "eps": eps}
    res = runner.run(model, [step], out, [Path(path)], force, not no_verify, shard, params)
    emit(as_json, *report(path, res, model))
