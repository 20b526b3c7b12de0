"""``normtool rotate``: multiply the residual stream by an orthogonal matrix, self-verified."""

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
from normtool.passes.rotate import KINDS, Rotate


def rotate(
    path: PathArg,
    output: OutOpt = None,
    kind: Annotated[
        str, typer.Option("--kind", help=f"The orthogonal matrix: {', '.join(KINDS)}.")
    ] = "hadamard",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the signs / random matrix.")] = 0,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="Calibration inputs for --kind pca (as barrier --data)."),
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
    """Rotate the residual stream by an orthogonal Q (randomised Hadamard, seeded random, or
    PCA of calibration activations), computing the same function.

    Needs every stream reader to be a weightless RMSNorm or a linear map: run convert-ln-to-rms
    and fold --only rms-gain first (or chain them: normtool run PATH convert-ln-to-rms
    fold:only=rms-gain rotate). Self-verifies (fp64 and fp32) before writing.
    """
    shard = parse_size(max_shard_size)
    model = load(path, arch, heads, None, pn_groups, eps)
    out = output or default_output(path, ".rot.safetensors")
    inputs = [Path(path), *([calib] if calib else [])]
    check_output_path(out, inputs, force)  # fail before the work, not after it
    step = Rotate(kind, seed, calib)
    params = {"heads": heads, "pn_groups": pn_groups, "eps": eps}
    res = runner.run(model, [step], out, inputs, force, not no_verify, shard, params)
    emit(as_json, *report(path, res, model))
