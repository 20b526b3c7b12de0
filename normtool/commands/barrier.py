"""``normtool barrier``: loss and accuracy along the linear path between two models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from normtool.commands.common import (
    ActOpt,
    ArchOpt,
    EpsOpt,
    ForceOpt,
    HeadsOpt,
    JsonOpt,
    PathArg,
    PnGroupsOpt,
    assumed,
    emit,
    load,
    progress,
)
from normtool.commands.merge import MaxIterOpt, SeedOpt, sweep_bar
from normtool.errors import NormtoolError
from normtool.merge.barrier import METHODS, measure_barrier
from normtool.merge.merge import MergeOptions
from normtool.merge.plot import plot_barrier


def barrier(
    a: PathArg,
    b: PathArg,
    data: Annotated[
        Path,
        typer.Option("--data", help=".safetensors or .npz with 'inputs' and integer 'labels'."),
    ],
    steps: Annotated[int, typer.Option("--steps", min=2, help="Points on the path.")] = 11,
    method: Annotated[
        str, typer.Option("--method", help="match, average (naive) or both.")
    ] = "both",
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write the loss/accuracy plot (PNG).")
    ] = None,
    max_iter: MaxIterOpt = 100,
    seed: SeedOpt = 0,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    act: ActOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure the loss barrier between A and B, naively and after weight matching."""
    if method not in METHODS:
        raise NormtoolError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    ma, mb = load(a, arch, heads, act, pn_groups, eps), load(b, arch, heads, act, pn_groups, eps)
    r = measure_barrier(
        ma,
        mb,
        data,
        steps,
        method,
        MergeOptions(max_iter=max_iter, seed=seed),
        sweep_bar,
        lambda alphas, label: progress(alphas, f"{label} path", total=steps),
    )
    if plot is not None:
        title = f"{a.name} → {b.name} on {data.name} ({r.samples} samples)"
        plot_barrier(r.curves, plot, title, force, [a, b, data])
    payload = {
        "samples": r.samples,
        "sweeps": r.sweeps,
        "plot": str(plot) if plot else None,
        "assumptions": assumed(ma, mb),
        **{
            label: {
                "barrier": c.barrier,
                "alphas": c.alphas,
                "loss": c.losses,
                "accuracy": c.accuracies,
                "batchnorm_recomputed": c.bn_recomputed,
            }
            for label, c in r.curves.items()
        },
    }
    lines = [f"{a} → {b} on {data} ({r.samples} samples)"]
    for label, c in r.curves.items():
        lines.append(
            f"  {label}: barrier {c.barrier:.6g}"
            + ("  (BatchNorm statistics recomputed on the data)" if c.bn_recomputed else "")
        )
        lines.append("    alpha   loss       accuracy")
        lines += [
            f"    {al:5.2f}   {lo:<9.5g}  {ac:.4f}"
            for al, lo, ac in zip(c.alphas, c.losses, c.accuracies, strict=True)
        ]
    if plot is not None:
        lines.append(f"  plot: {plot}")
    emit(as_json, payload, lines)
