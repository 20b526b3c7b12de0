"""``normtool convert-ln-to-rms``: exact Pre-LN → Pre-RMSNorm / Pre-CRMSNorm, self-verified."""

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
from normtool.passes.ln_to_rms import ConvertLnToRms


def convert_ln_to_rms(
    path: PathArg,
    output: OutOpt = None,
    compressed: Annotated[
        bool, typer.Option("--compressed", help="CRMSNorm: drop the stream's last coordinate.")
    ] = False,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    no_verify: NoVerifyOpt = False,
    force: ForceOpt = False,
    max_shard_size: MaxShardOpt = "5GB",
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a Pre-LN transformer to Pre-RMSNorm (or Pre-CRMSNorm), computing the same function."""
    shard = parse_size(max_shard_size)
    model = load(path, arch, heads, None, pn_groups, eps)
    out = output or default_output(path, ".crms.safetensors" if compressed else ".rms.safetensors")
    check_output_path(out, [path], force)  # fail before the work, not after it
    res = runner.run(
        model, [ConvertLnToRms(compressed)], out, [Path(path)], force, not no_verify, shard
    )
    emit(as_json, *report(path, res, model))
