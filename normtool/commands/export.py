"""``normtool export``: a checkpoint as an ONNX file (dynamic batch and sequence axes)."""

from __future__ import annotations

from typing import Annotated

import typer

from normtool import history
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
)

OpsetOpt = Annotated[
    int | None,
    typer.Option("--opset", help="ONNX opset, 17..23 (default: 23, or the highest ORT runs)."),
]
OutputsOpt = Annotated[
    str,
    typer.Option(
        "--outputs",
        help="model: the model's own outputs; hidden: last_hidden_state (and pooler_output "
        "where the model has a pooler) instead of its task head.",
    ),
]
PoolingOpt = Annotated[
    str | None,
    typer.Option(
        "--pooling",
        help="mean (over attention_mask) or cls: add a sentence_embedding output pooled from "
        "the hidden states.",
    ),
]
NormalizeOpt = Annotated[
    bool, typer.Option("--normalize", help="L2-normalise the sentence_embedding (--pooling).")
]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="fp32, or fp16 (norm statistics and softmax stay fp32)."),
]


def export(
    path: PathArg,
    output: OutOpt = None,
    opset: OpsetOpt = None,
    dtype: DtypeOpt = "fp32",
    arch: ArchOpt = None,
    heads: HeadsOpt = None,
    pn_groups: PnGroupsOpt = None,
    eps: EpsOpt = None,
    act: ActOpt = None,
    force: ForceOpt = False,
    portable: Annotated[
        bool,
        typer.Option(
            "--portable",
            help="Standard ONNX ops only (default: ONNX Runtime's fused contrib kernels).",
        ),
    ] = False,
    outputs: OutputsOpt = "model",
    pooling: PoolingOpt = None,
    normalize: NormalizeOpt = False,
    kv_cache: Annotated[
        bool,
        typer.Option(
            "--kv-cache",
            help="Causal token models: past_key_values.N.key/value in, present.N.key/value out "
            "(Optimum's names; attention_mask covers past + current tokens, position_ids given).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export to ONNX (default output: <stem>.onnx beside the input)."""
    target = "portable" if portable else "ort"
    # imported here: onnx and onnxruntime cost every other command ~0.1 s at start-up
    from normtool.export import default_opset, export_model
    from normtool.outputs import check_choices, select_outputs
    from normtool.runtime.onnx_emit import EmitOptions

    opts = EmitOptions(opset or default_opset(), dtype, target=target, kv_cache=kv_cache)
    opts.check()  # refuse a bad --opset/--dtype before reading anything
    check_choices(outputs, pooling, normalize)
    out = output or default_output(path, ".onnx")
    model = select_outputs(
        load(path, arch, heads, act, pn_groups, eps), outputs, pooling, normalize
    )
    if model.assumptions:  # the ONNX file must say which values were guessed, as outputs do
        summary = f"ONNX opset {opts.opset}, {dtype}"
        model.history.append(history.entry("export", model, {"dtype": dtype}, None, summary))
    res = export_model(
        model, out, opts.opset, dtype, [path], force, target=target, kv_cache=kv_cache
    )
    payload = {
        "output": str(res.path),
        "external_data": str(res.data_path) if res.data_path else None,
        "opset": res.opset,
        "dtype": res.dtype,
        "nodes": res.nodes,
        "weight_bytes": res.weight_bytes,
        "inputs": res.inputs,
        "outputs": res.outputs,
        "assumptions": assumed(model),
    }
    extra = f", weights in {res.data_path}" if res.data_path else ""
    line = f"wrote {res.path} (opset {res.opset}, {res.dtype}, {res.nodes} nodes{extra})"
    emit(as_json, payload, [line])
