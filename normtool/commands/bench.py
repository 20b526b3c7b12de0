"""``normtool bench``: ONNX Runtime latency of one or more models, interleaved, with ratios."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normtool.commands.common import (
    STATE,
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
)
from normtool.errors import NormtoolError


def _ints(text: str, flag: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise NormtoolError(f"{flag} {text!r}: expected comma-separated integers") from e
    if not vals or any(v < 1 for v in vals):
        raise NormtoolError(f"{flag} {text!r}: expected positive integers")
    return vals


def _interval(ci: list[float] | None) -> str:
    """``[lo, hi]``, or ``-`` where there were too few blocks of rounds for an interval."""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def bench(
    models: Annotated[
        list[Path], typer.Argument(help="ONNX files or checkpoints (exported on the fly).")
    ],
    provider: Annotated[str, typer.Option(help="auto | cuda | tensorrt | cpu")] = "auto",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,8",
    seq: Annotated[
        str, typer.Option(help="Sequence lengths (token models), comma-separated.")
    ] = "128,512",
    warmup: Annotated[int, typer.Option(help="Untimed runs per model first.")] = 10,
    iters: Annotated[int, typer.Option(help="Timed runs per model (interleaved).")] = 50,
    sessions: Annotated[
        int,
        typer.Option(
            help="Split the runs over this many sets of fresh sessions (each warmed up): the "
            "ratio's interval then covers where ORT placed a session, not only run-to-run noise."
        ),
    ] = 5,
    ci_level: Annotated[
        float, typer.Option(help="Confidence level of each ratio's interval.")
    ] = 0.95,
    threads: Annotated[
        int | None, typer.Option(help="ORT intra-op threads (default: ORT's).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="fp32 | fp16 for checkpoints exported on the fly.")
    ] = "fp32",
    tf32: Annotated[
        bool, typer.Option("--tf32", help="Allow TF32 on CUDA (off by default).")
    ] = False,
    cuda_graph: Annotated[
        bool,
        typer.Option(
            "--cuda-graph", help="Replay ORT CUDA graphs (CUDA only; static shapes, IO binding)."
        ),
    ] = False,
    time_limit: TimeLimitOpt = None,
    memory_limit: MemoryLimitOpt = None,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    act: ActOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Time models with ONNX Runtime: median, p90, p99, throughput, ratio to the first model."""
    if dtype not in ("fp32", "fp16"):
        raise NormtoolError(f"--dtype {dtype!r}: use fp32 or fp16")
    if warmup < 0 or iters < 1:
        raise NormtoolError("--warmup must be >= 0 and --iters >= 1")
    bound_onnx_runs(time_limit, memory_limit)

    def say(b: int, s: int | None, k: int, sets: int) -> None:
        if not (as_json or STATE.quiet):
            shape = f"batch={b}" + (f" seq={s}" if s else "")
            print(f"  timing {shape}, sessions {k}/{sets} ...", flush=True)

    from normtool.bench import run_bench  # onnx + onnxruntime: ~0.1 s, paid only here

    r = run_bench(
        models,
        provider,
        _ints(batch, "--batch"),
        _ints(seq, "--seq"),
        warmup,
        iters,
        threads,
        dtype,
        tf32,
        arch,
        heads,
        act,
        on_shape=say,
        cuda_graph=cuda_graph,
        sessions=sessions,
        ci_level=ci_level,
        pn_groups=pn_groups,
        eps=eps,
    )
    graph = ", CUDA graphs" if r["cuda_graph"] else ""
    exact = ", ".join(r["results"][0]["models"][0]["providers"])
    lines = [f"provider: {r['provider']} [{exact}] ({r['device']}{graph})"]
    if r["fallback"]:
        lines.append(f"note: {r['fallback']}")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
    level = f"{r['ci_level'] * 100:g}% CI"
    lines.append(
        f"{'batch':>5} {'seq':>5}  {'model':<32} {'median ms':>10} {'p90 ms':>9} {'p99 ms':>9} {'items/s':>9} {'ratio':>6} {level:<16} verdict"
    )
    for res in r["results"]:
        for m in res["models"]:
            lines.append(
                f"{res['batch']:>5} {res['seq'] or '-':>5}  {m['model'][:32]:<32} {m['median_ms']:>10.3f} "
                f"{m['p90_ms']:>9.3f} {m['p99_ms']:>9.3f} {m['throughput']:>9.1f} {m['ratio']:>6.3f} "
                f"{_interval(m['ratio_ci']):<16} {m['verdict']}"
            )
    lines.append(f"ratio: time / first model's; {level}: {r['ci_method']}")
    emit(as_json, r, lines)
