"""``normtool merge``: weight-match two or more models and interpolate them (DESIGN §3.3)."""

from __future__ import annotations

import sys
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
    MaxShardOpt,
    OutOpt,
    PnGroupsOpt,
    assumed,
    emit,
    load,
    progress,
)
from normtool.io.source_writer import default_output_name
from normtool.io.writer import parse_size
from normtool.merge.interpolate import parse_weights
from normtool.merge.merge import MergeOptions, merge_models, save_perms
from normtool.save import save_like_source

MethodOpt = Annotated[
    str, typer.Option("--method", help="match: weight matching first (default); average: naive.")
]
MaxIterOpt = Annotated[
    int,
    typer.Option("--max-iter", min=1, help="Most weight-matching sweeps (and MergeMany rounds)."),
]
SeedOpt = Annotated[
    int,
    typer.Option("--seed", min=0, max=2**63 - 1, help="Seed of the random group order per sweep."),
]


def sweep_bar(groups, sweep: int):
    """One progress bar per weight-matching sweep, over its groups."""
    groups = list(groups)
    return progress(groups, f"sweep {sweep}", total=len(groups))


def merge(
    models: Annotated[
        list[Path], typer.Argument(help="Two or more checkpoints of one architecture.")
    ],
    output: OutOpt = None,
    method: MethodOpt = "match",
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Comma-separated weights summing to 1 (default: equal)."),
    ] = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="3+ models: match all to the first, not MergeMany.")
    ] = False,
    max_iter: MaxIterOpt = 100,
    seed: SeedOpt = 0,
    calib: Annotated[
        Path | None,
        typer.Option(
            "--calib", help="Data (.safetensors/.npz with 'inputs') to recompute BatchNorm."
        ),
    ] = None,
    save_perms_to: Annotated[
        Path | None,
        typer.Option("--save-perms", help="Write the permutations (safetensors index vectors)."),
    ] = None,
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    act: ActOpt = None,
    force: ForceOpt = False,
    max_shard_size: MaxShardOpt = "5GB",
    as_json: JsonOpt = False,
) -> None:
    """Merge models: permute each into a shared basis (weight matching), then interpolate."""
    shard = parse_size(max_shard_size)
    loaded = [load(p, arch, heads, act, pn_groups, eps) for p in models]
    opts = MergeOptions(
        method=method,
        weights=parse_weights(weights, len(models)) if len(models) > 1 else None,
        reference=reference,
        max_iter=max_iter,
        seed=seed,
        calib=calib,
    )
    r = merge_models(loaded, opts, sweep_bar)
    ck = loaded[0].checkpoint
    out = output or default_output_name(ck, "merged")
    out = save_like_source(r.model, out, models, force, shard)
    if save_perms_to is not None:
        save_perms(r.perms, save_perms_to, models, force)
    if r.batchnorm == "stale":
        print(
            "WARNING: BatchNorm running statistics of the interpolated model are STALE "
            "(interpolation changes activation statistics); pass --calib DATA to recompute them",
            file=sys.stderr,
        )
    payload = {
        "output": str(out),
        "perms": str(save_perms_to) if save_perms_to else None,
        "groups": r.groups,
        "skipped_spaces": r.skipped,
        "permutation_rel_err": r.permutation_error,
        **r.params,
        "assumptions": assumed(*loaded),
    }
    lines = [
        f"{out}: merged {len(models)} {r.model.graph.family} models "
        f"({r.params['algorithm']}, weights {','.join(f'{w:g}' for w in r.params['weights'])})",
        f"  permutation groups: {r.groups}, sweeps: {r.sweeps}"
        + (f", MergeMany rounds: {r.rounds}" if r.params["algorithm"] == "merge_many" else ""),
        f"  L2 distance between models: before {r.l2[0]:.6g}, after {r.l2[1]:.6g}",
        f"  objective Σ<W_i, W_j>: before {r.objective[0]:.6g}, after {r.objective[1]:.6g}",
        f"  permuted models compute their original function (relative error "
        f"{r.permutation_error:.2g})",
        f"  BatchNorm statistics: {r.batchnorm}",
    ]
    lines += [f"  skipped space {s}: {why}" for s, why in r.skipped.items()]
    if save_perms_to is not None:
        lines.append(f"  permutations: {save_perms_to}")
    emit(as_json, payload, lines)
