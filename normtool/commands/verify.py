"""``normtool verify A B``: are two models (checkpoints or ONNX files) the same function?

The CI gate: exit 0 equivalent, 1 not (CheckFailed), 2 when they cannot be compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normtool.commands.common import (
    ActOpt,
    ArchOpt,
    EpsOpt,
    HeadsOpt,
    JsonOpt,
    MemoryLimitOpt,
    PnGroupsOpt,
    TimeLimitOpt,
    bound_onnx_runs,
    emit,
    memory_limit_bytes,
    progress,
)
from normtool.errors import CheckFailed
from normtool.verify import (
    DEFAULT_SAMPLES,
    VERIFY_MEMORY_LIMIT,
    Report,
    compare,
    open_runners,
)

ModelArg = Annotated[Path, typer.Argument(help="Checkpoint, model folder or .onnx file.")]


def _num(x: float) -> str:
    return f"{x:.3g}"


def report_lines(r: Report) -> list[str]:
    seq = r.batches[0][1] is not None
    shapes = ", ".join(f"{b}×{s}" if seq else str(b) for b, s in r.batches)
    lines = [
        f"verify {r.a} (reference) vs {r.b}",
        f"  {r.dtype}, seed {r.seed}, {len(r.batches)} batches ({'batch×seq' if seq else 'batch'}): "
        f"{shapes}",
        f"  {'output':<12} {'max abs':>10} {'scale':>10} {'max rel':>10} {'limit':>10} "
        f"{'agree':>8}  result",
    ]
    for o in r.outputs:
        agree = "" if o.agreement is None else f"{o.agreement:.1%}"
        lines.append(
            f"  {o.name:<12} {_num(o.max_abs):>10} {_num(o.scale):>10} {_num(o.max_rel):>10} "
            f"{_num(o.limit):>10} {agree:>8}  {'ok' if o.ok else 'FAIL'}"
        )
    for who, names in r.not_compared.items():
        lines.append(f"  not compared (only in {r.a if who == 'a' else r.b}): {', '.join(names)}")
    verdict = "equivalent" if r.ok else "NOT equivalent"
    lines.append(f"{verdict} ({r.dtype}: atol {r.atol:g}, rtol {r.rtol:g} of the output's scale)")
    return lines


def verify(
    a: ModelArg,
    b: ModelArg,
    atol: Annotated[
        float | None, typer.Option("--atol", help="Absolute tolerance (default per dtype).")
    ] = None,
    rtol: Annotated[
        float | None,
        typer.Option("--rtol", help="Tolerance relative to max|A output| (default per dtype)."),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, max=10_000, help="Number of random input batches.")
    ] = DEFAULT_SAMPLES,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=2**63 - 1, help="Seed of the random inputs.")
    ] = 0,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype",
            help="Run dtype and tolerances: fp64, fp32, fp16, bf16 (default: the lowest "
            "precision the two models are stored or exported in).",
        ),
    ] = None,
    provider: Annotated[
        str, typer.Option("--provider", help="ONNX Runtime provider: auto, cpu, cuda, tensorrt.")
    ] = "auto",
    time_limit: TimeLimitOpt = None,
    memory_limit: MemoryLimitOpt = None,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    act: ActOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare A (reference) and B on seeded random inputs; exit 0 equivalent, 1 not."""
    if any(p.suffix.lower() == ".onnx" for p in (a, b)):
        bound_onnx_runs(time_limit, memory_limit)
    limit = memory_limit_bytes(memory_limit)
    (ra, rb), prec = open_runners([a, b], dtype, arch, heads, act, provider, pn_groups, eps)
    name = prec.name
    report = compare(
        ra,
        rb,
        name,
        samples,
        seed,
        atol,
        rtol,
        lambda plan: progress(plan, "verify", len(plan)),
        max_memory=VERIFY_MEMORY_LIMIT if limit is None else limit,
    )
    assumed = [(r.label, x) for r in (ra, rb) for x in r.assumptions]
    assumptions = [{"file": f, **x.to_dict()} for f, x in assumed]
    extra = {"precision": prec.name, "precision_reason": prec.reason, "assumptions": assumptions}
    lines = report_lines(report)
    lines.insert(2, f"  precision {prec.name}: {prec.reason}")
    # a failed comparison keeps stderr to its one error line; the report names the assumptions,
    # which may be why the models differ
    lines += [f"  assumed for {f}: {x.line()}" for f, x in assumed]
    emit(as_json, report.to_dict() | extra, lines, announce=report.ok)
    if not report.ok:
        raise CheckFailed("not equivalent: " + "; ".join(report.failures()), b)
