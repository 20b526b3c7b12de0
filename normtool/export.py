"""Export a Model to an ONNX file: emit, write atomically, check, and assert the opset.

Why the extra care: an export is a deployment artefact. It must never appear half-written under
its final name, must load where the file alone is copied (weights inline, or in one external
data file ``<name>.data`` beside it once the protobuf 2 GB limit is passed), must pass
``onnx.checker``, and must carry exactly the opset that was asked for.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime
from onnx import TensorProto, helper

from normtool import history
from normtool.errors import CheckFailed, NormtoolError
from normtool.finite import require_finite
from normtool.io.atomic import check_output_path, publish, temp_name
from normtool.load import HISTORY_KEY
from normtool.model import Model
from normtool.runtime.onnx_emit import MAX_OPSET, MIN_OPSET, EmitOptions, emit_onnx

#: Protobuf cannot serialise a message of 2 GiB or more; keep a margin for the graph itself.
EXTERNAL_LIMIT = 2**31 - 1 - 64 * 2**20


@dataclass
class ExportResult:
    path: Path
    data_path: Path | None  # the external data file, when the weights are stored outside
    opset: int
    dtype: str
    nodes: int
    weight_bytes: int
    inputs: list[str]  # the ONNX graph's, in order (a cached export adds the past)
    outputs: list[str]


def _probe(opset: int) -> bytes:
    """A tiny model using the newest op forms the emitter picks at ``opset``."""
    nodes = [helper.make_node("LayerNormalization", ["x", "s"], ["a"], axis=-1)]
    if opset >= 20:
        nodes.append(helper.make_node("Gelu", ["a"], ["b"]))
    else:
        nodes.append(helper.make_node("Relu", ["a"], ["b"]))
    if opset >= 23:
        nodes.append(helper.make_node("RMSNormalization", ["b", "s"], ["y"], axis=-1))
    else:
        nodes.append(helper.make_node("Identity", ["b"], ["y"]))
    g = helper.make_graph(
        nodes,
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor("s", TensorProto.FLOAT, [2], [1.0, 1.0])],
    )
    ids = [helper.make_opsetid("", opset)]
    m = helper.make_model(g, opset_imports=ids)
    m.ir_version = helper.find_min_ir_version_for(ids)
    return m.SerializeToString()


@functools.cache
def default_opset() -> int:
    """The highest opset in 17..23 whose op forms the installed ONNX Runtime loads."""
    for opset in range(MAX_OPSET, MIN_OPSET - 1, -1):
        try:
            onnxruntime.InferenceSession(_probe(opset), providers=["CPUExecutionProvider"])
            return opset
        except Exception:  # noqa: BLE001,S112 - any failure means "not this opset"
            continue
    return MIN_OPSET


def _written_opset(path: Path) -> int | None:
    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _stale_data(out: Path, inputs: Sequence[Path]) -> Path | None:
    """``<out>.data`` when the ONNX file now at ``out`` (about to be replaced) keeps its weights
    there: once the new file is in place nothing refers to it. Only that name, only when the
    old file says so, never an input."""
    data = out.with_name(out.name + ".data")
    if not (out.is_file() and data.is_file()):
        return None
    if any(data.resolve() == Path(i).resolve() for i in inputs):
        return None
    try:
        old = onnx.load(str(out), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file we wrote: leave its neighbours alone
        return None
    uses = any(
        e.key == "location" and e.value == data.name
        for t in old.graph.initializer
        for e in t.external_data
    )
    return data if uses else None


def export_model(
    model: Model,
    out: Path,
    opset: int | None = None,
    dtype: str = "fp32",
    inputs: Sequence[Path] = (),
    force: bool = False,
    attention: str = "decomposed",
    external_limit: int = EXTERNAL_LIMIT,
    target: str = "ort",
    kv_cache: bool = False,
) -> ExportResult:
    """Write ``model`` as ONNX to ``out``; ``inputs`` are never overwritten.

    Everything is written and checked in a temporary folder beside ``out`` and moved into place
    only afterwards (the data file first, so a visible model always finds its weights). An
    inline export replacing one with external data (``--force``) removes the old data file.
    """
    out = Path(out)
    opts = EmitOptions(opset or default_opset(), dtype, attention, target, kv_cache)
    opts.check()
    check_output_path(out, inputs, force)
    require_finite(model)
    proto = emit_onnx(model.graph, model.weights(), opts)
    helper.set_model_props(
        proto,
        {
            **{p.key: p.value for p in proto.metadata_props},
            HISTORY_KEY: history.dumps(model.history),
        },
    )
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    data_path = out.with_name(out.name + ".data") if weight_bytes > external_limit else None
    if data_path is not None:
        check_output_path(data_path, inputs, force)
    stale = _stale_data(out, inputs) if data_path is None else None  # else replaced
    tmpdir = temp_name(out)
    tmpdir.mkdir()
    try:
        tmp = tmpdir / out.name
        onnx.save_model(
            proto,
            str(tmp),
            save_as_external_data=data_path is not None,
            all_tensors_to_one_file=True,
            location=data_path.name if data_path else None,
            size_threshold=1024,  # shape constants stay inline, readable by shape inference
        )
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as e:
            raise CheckFailed(f"onnx.checker rejects the export: {e}", out) from e
        written = _written_opset(tmp)
        if written != opts.opset:
            raise CheckFailed(f"export has opset {written}, {opts.opset} was requested", out)
        if data_path is not None:
            publish(tmpdir / data_path.name, data_path, force)
        publish(tmp, out, force)
        if stale is not None:
            stale.unlink(missing_ok=True)
    except OSError as e:  # a full disk, a quota, a folder gone: named, one line
        raise NormtoolError(f"cannot write: {e.strerror or e}", out) from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return ExportResult(
        out,
        data_path,
        opts.opset,
        dtype,
        len(proto.graph.node),
        weight_bytes,
        [i.name for i in proto.graph.input],
        [o.name for o in proto.graph.output],
    )
