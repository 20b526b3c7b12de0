"""``normtool run``: several passes in one run — one self-check against the original, one write."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normtool import runner, steps
from normtool.commands.common import (
    ActOpt,
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
from normtool.errors import NormtoolError
from normtool.io.atomic import check_output_path
from normtool.io.writer import parse_size


def run(
    path: PathArg,
    step_words: Annotated[
        list[str],
        typer.Argument(
            metavar="STEP",
            help="Passes in order, each NAME[:KEY=VALUE...] with its command's options: "
            + "; ".join(f"{k.name} ({', '.join(k.options)})" for k in steps.STEPS.values())
            + ". E.g. convert-ln-to-rms:compressed fold:only=un.",
        ),
    ],
    output: OutOpt = None,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    act: ActOpt = None,
    no_verify: NoVerifyOpt = False,
    force: ForceOpt = False,
    max_shard_size: MaxShardOpt = "5GB",
    as_json: JsonOpt = False,
) -> None:
    """Chain transforms: each pass plans on the previous one's result, the chain is self-checked
    once against the original (fp64 and fp32), every pass gets its history entry, and the result
    is written once (default: <stem>.<step suffixes>.safetensors)."""
    parsed = [steps.parse(w) for w in step_words]
    if not parsed:
        raise NormtoolError("name at least one step")
    shard = parse_size(max_shard_size)
    model = load(path, arch, heads, act, pn_groups, eps)
    files = [f for s in parsed for f in s.files]
    suffix = "".join(f".{s.kind.suffix(s.options)}" for s in parsed)
    out = output or default_output(path, f"{suffix}.safetensors")
    check_output_path(out, [path, *files], force)  # fail before the work, not after it
    passes = [s.kind.make(s.options, model) for s in parsed]
    params = {"heads": heads, "pn_groups": pn_groups, "eps": eps, "act": act}
    res = runner.run(model, passes, out, [Path(path), *files], force, not no_verify, shard, params)
    emit(as_json, *report(path, res, model))
