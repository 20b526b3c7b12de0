"""``normtool loki-head``: append a Loki prediction (Fréchet mean under a label metric) to a
classifier, self-verified, optionally evaluated on labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from normtool import runner
from normtool.commands.common import (
    ActOpt,
    ArchOpt,
    EpsOpt,
    ForceOpt,
    HeadsOpt,
    JsonOpt,
    OutOpt,
    PathArg,
    PnGroupsOpt,
    assumed,
    default_output,
    emit,
    load,
    progress,
)
from normtool.errors import NormtoolError
from normtool.io.atomic import check_output_path
from normtool.loki.evaluate import evaluate
from normtool.loki.head import LokiHead, check
from normtool.loki.metric_files import KINDS, load_label_space
from normtool.model import Model
from normtool.refusal import refusal


def loki_head(
    path: PathArg,
    metric: Annotated[
        Path,
        typer.Option(
            "--metric",
            help="Label metric: distance matrix (.npy/.safetensors/.csv with a header of "
            "names), tree (.tsv child<TAB>parent, or .json), or label embeddings.",
        ),
    ],
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="The N labels, one per line; any tree node may be a label (default: tree "
            "leaves in first-seen order, or every point of the matrix / embeddings).",
        ),
    ] = None,
    observed: Annotated[
        Path | None,
        typer.Option(
            "--observed",
            help="Line i: the label of model output i. Required unless outputs = labels.",
        ),
    ] = None,
    metric_kind: Annotated[
        str,
        typer.Option("--metric-kind", help=f"How to read --metric: {', '.join(KINDS)}."),
    ] = "auto",
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    act: ActOpt = None,
    output: OutOpt = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval",
            help="Labelled data (.safetensors/.npz: model inputs and 'labels' indexing the N "
            "labels): report mean squared distance and accuracy of argmax vs Loki.",
        ),
    ] = None,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the self-check before writing.")
    ] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Add a Loki head: output 'prediction' = argmin_y Σ p_i d(y, λ_i)² (ties: lowest label index)."""
    model = load(path, arch, heads, act, pn_groups, eps)
    reasons = check(model.graph)
    if reasons:
        raise refusal("cannot add a Loki head", reasons, path)
    out = output or default_output(path, ".loki.safetensors")
    check_output_path(out, [path, metric], force)  # fail before the work, not after it
    k = model.graph.spaces[model.graph.value_spaces["logits"]].size
    try:
        space = load_label_space(metric, metric_kind, labels, observed, k)
    except NormtoolError as e:  # name the model when the problem is not in one file
        raise type(e)(e.message, e.path or path) from e
    res = None

    def evaluated(new: Model) -> None:  # before writing: a bad --eval file leaves no output
        nonlocal res
        if eval_data is not None:
            res = evaluate(new, space, eval_data, progress=lambda it, n: progress(it, "eval", n))

    params = {"metric": str(metric), "metric_kind": space.metric.kind}
    done = runner.run(
        model,
        [LokiHead(space, params)],
        out,
        [Path(path), metric],
        force,
        verify=not no_verify,
        before_write=evaluated,
    )
    new = done.model
    errors = new.history[-1]["errors"]
    payload: dict[str, Any] = {
        "input": str(path),
        "output": str(out),
        "metric": space.metric.kind,
        "labels": space.n,
        "observed": space.k,
        "unobserved": space.n - len(set(space.observed.tolist())),
        "ties": "lowest label index",
        "duplicate_labels_masked": new.graph.info["loki"]["duplicate_labels_masked"],
        "verified": errors is not None,
        "errors": errors,
        "assumptions": assumed(model),
    }
    lines = [
        f"{path} -> {out}",
        f"  Loki head: {space.k} outputs -> {space.n} labels ({space.metric.kind} metric, "
        f"{payload['unobserved']} unobserved); ties go to the lowest label index",
        "  not verified (--no-verify)"
        if errors is None
        else f"  verified: predictions minimise the float64 risk "
        f"({int(errors['prediction_mismatches'])} near-tie differences)",
    ]
    if res is not None:
        payload["eval"] = res
        lines.append(f"  eval on {res['examples']} examples:")
        for name in ("argmax", "loki"):
            r = res[name]
            lines.append(
                f"    {name:<7} mean squared distance {r['mean_squared_distance']:.4f}  "
                f"top-1 accuracy {r['top1_accuracy']:.2%}"
            )
    emit(as_json, payload, lines)
