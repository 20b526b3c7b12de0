"""``normtool convert-ln-to-rms``: exact Pre-LN → Pre-RMSNorm / Pre-CRMSNorm, self-verified."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import torch
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
from normtool.passes.ln_to_rms import convert_ln_to_rms as convert
from normtool.save import save_model
from normtool.selfcheck import self_check


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
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the fp64/fp32 self-check before writing.")
    ] = False,
    force: ForceOpt = False,
    max_shard_size: MaxShardOpt = "5GB",
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a Pre-LN transformer to Pre-RMSNorm (or Pre-CRMSNorm), computing the same function."""
    shard = parse_size(max_shard_size)
    model = load(path, arch, heads, None, pn_groups, eps)
    out = output or default_output(path, ".crms.safetensors" if compressed else ".rms.safetensors")
    check_output_path(out, [path], force)  # fail before the work, not after it
    try:
        conv = convert(model, compressed)
    except NormtoolError as e:
        raise type(e)(e.message, e.path or path) from e
    errors: dict[str, float] | None = None
    if not no_verify:
        errors, bad = self_check(model, conv.exact(), conv.model({}))
        if bad:
            conv.scan()  # NaN/Inf weights (in the source, or by overflow) explain it: name them
            if compressed and any(" RMS error " in b for b in bad):
                bad.append(
                    "CRMS in fp16/bf16 carries the rounding of every stored stream coordinate "
                    "into the implied one; plain RMSNorm (without --compressed) does not"
                )
            raise CheckFailed("self-verification failed, nothing written: " + "; ".join(bad), path)
    summary = conv.summary()
    entry = history.entry("convert-ln-to-rms", model, {"compressed": compressed}, errors, summary)
    # The writer thread writes one tensor while the next is computed: give that computation one
    # torch thread, since two more threads on a 2-core machine oversubscribe it (measured: the
    # rewrite took 2-3x longer with torch's default two threads beside the writer).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        with conv.explaining():
            out = save_model(
                conv.model(entry), out, [Path(path)], force, max_shard_size=shard, check=conv.check
            )
    finally:
        torch.set_num_threads(threads)
    payload: dict[str, Any] = {
        "input": str(path),
        "output": str(out),
        "norm": "crmsnorm" if compressed else "rmsnorm",
        "dropped_coordinate": conv.dropped,
        "norms": conv.norms,
        "readers": conv.readers,
        "writers": conv.writers,
        "created_biases": conv.created_biases,
        "untied": [{"tensor": a, "was_tied_to": b} for a, b in conv.untied],
        "notes": conv.notes,
        "verified": errors is not None,
        "errors": errors,
        "summary": summary,
        "assumptions": assumed(model),
    }
    lines = [f"{path} -> {out}", f"  {summary}"]
    lines += [f"  untied {a} from {b}: each is now its own tensor" for a, b in conv.untied]
    lines += [f"  {n}" for n in conv.notes]
    if errors is None:
        lines.append("  not verified (--no-verify)")
    else:
        lines.append("  verified: " + selfcheck.summary(errors))
    emit(as_json, payload, lines)
