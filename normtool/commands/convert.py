"""``normtool convert-ln-to-rms``: exact Pre-LN → Pre-RMSNorm / Pre-CRMSNorm, self-verified."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from normtool import history
from normtool.commands.common import (
    ArchOpt,
    ForceOpt,
    HeadsOpt,
    JsonOpt,
    MaxShardOpt,
    OutOpt,
    PathArg,
    default_output,
    emit,
    load,
)
from normtool.errors import CheckFailed, NormtoolError
from normtool.io.atomic import check_output_path
from normtool.io.writer import parse_size, save_model
from normtool.model import Model
from normtool.passes.ln_to_rms import Conversion
from normtool.passes.ln_to_rms import convert_ln_to_rms as convert
from normtool.verify import TorchRunner, compare, compare_models

#: The self-check's bars (issue 3): float64 error relative to the logit scale — the maths must
#: be exact up to rounding — and float32 max-abs on the logits as stored and run.
FP64_MAX_REL = 1e-9
FP32_MAX_ABS = 1e-4


#: Half-precision checkpoints: the converted model's error against the float64 original may be
#: at most this multiple of the original's own error in that dtype (issue 3), since rounding the
#: rewritten weights to 11 (fp16) or 8 (bf16) bits cannot meet a float32 bar.
HALF_RATIO = 1.5
_HALF = {"F16": "fp16", "BF16": "bf16"}


def self_check(source: Model, conv: Conversion) -> tuple[dict[str, float], list[str]]:
    """Errors of the converted model against the original on seeded random inputs, and the
    failed bars (empty: passed).

    fp64: the unrounded converted tensors (so the check measures the maths, not the storage
    rounding). fp32: the tensors as they will be written, run in float32 on both sides. For
    fp16/bf16 checkpoints the stored-dtype bar replaces the fp32 one: both models run in that
    dtype against the original in float64.
    """
    r64 = compare_models(source, conv.exact(), "fp64")
    converted = conv.model({})
    errors = {"fp64_max_rel": r64.max_rel, "fp64_max_abs": r64.max_abs}
    bad = []
    if not r64.max_rel <= FP64_MAX_REL:
        bad.append(f"fp64 relative error {r64.max_rel:.3g} > {FP64_MAX_REL:g}")
    half = sorted({_HALF[s.dtype] for s in source.graph.tensors.values() if s.dtype in _HALF})
    if not half:
        r32 = compare_models(source, converted, "fp32")
        errors.update(fp32_max_abs=r32.max_abs, fp32_max_rel=r32.max_rel)
        if not r32.max_abs <= FP32_MAX_ABS:
            bad.append(f"fp32 max-abs error {r32.max_abs:.3g} > {FP32_MAX_ABS:g}")
    for dt in half:
        ref = TorchRunner(source, "fp64", "original fp64")
        own = compare(ref, TorchRunner(source, dt, "original"), dt).max_abs
        new = compare(ref, TorchRunner(converted, dt, "converted"), dt).max_abs
        errors.update({f"{dt}_max_abs": new, f"{dt}_original_max_abs": own})
        if not new <= HALF_RATIO * own:
            bad.append(f"{dt} error {new:.3g} > {HALF_RATIO}x the original's {own:.3g}")
    return errors, bad


def convert_ln_to_rms(
    path: PathArg,
    output: OutOpt = None,
    compressed: Annotated[
        bool, typer.Option("--compressed", help="CRMSNorm: drop the stream's last coordinate.")
    ] = False,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the fp64/fp32 self-check before writing.")
    ] = False,
    force: ForceOpt = False,
    max_shard_size: MaxShardOpt = "5GB",
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a Pre-LN transformer to Pre-RMSNorm (or Pre-CRMSNorm), computing the same function."""
    shard = parse_size(max_shard_size)
    model = load(path, arch, heads)
    out = output or default_output(path, ".crms.safetensors" if compressed else ".rms.safetensors")
    check_output_path(out, [path], force)  # fail before the work, not after it
    try:
        conv = convert(model, compressed)
    except NormtoolError as e:
        raise type(e)(e.message, e.path or path) from e
    errors: dict[str, float] | None = None
    if not no_verify:
        errors, bad = self_check(model, conv)
        if bad:
            raise CheckFailed("self-verification failed, nothing written: " + "; ".join(bad), path)
    summary = conv.summary()
    entry = history.entry("convert-ln-to-rms", model, {"compressed": compressed}, errors, summary)
    # The writer thread writes one tensor while the next is computed: give that computation one
    # torch thread, since two more threads on a 2-core machine oversubscribe it (measured: the
    # rewrite took 2-3x longer with torch's default two threads beside the writer).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 2) - 1)))
    try:
        out = save_model(conv.model(entry), out, [Path(path)], force, max_shard_size=shard)
    finally:
        torch.set_num_threads(threads)
    payload: dict[str, Any] = {
        "input": str(path),
        "output": str(out),
        "norm": "crmsnorm" if compressed else "rmsnorm",
        "norms": conv.norms,
        "readers": conv.readers,
        "writers": conv.writers,
        "created_biases": conv.created_biases,
        "untied": [{"tensor": a, "was_tied_to": b} for a, b in conv.untied],
        "verified": errors is not None,
        "errors": errors,
        "summary": summary,
    }
    lines = [f"{path} -> {out}", f"  {summary}"]
    lines += [f"  untied {a} from {b}: each is now its own tensor" for a, b in conv.untied]
    if errors is None:
        lines.append("  not verified (--no-verify)")
    else:
        lines.append("  verified: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    emit(as_json, payload, lines)
