"""ONNX files from strangers: external data must stay inside the model's folder, and what the
file declares it will allocate or repeat must fit the limits.

Why: an ONNX tensor stored as external data names its file by a ``location`` relative to the
model. ``/etc/shadow`` or ``../../secret`` would make ONNX or ONNX Runtime read a file the user
never meant to hand over (or a device node that never ends). Every place normtool reads ONNX calls
:func:`check_external_data` first, so such a file is refused (exit 2) before either library
touches its data. Only the protobuf is parsed here, never the external data itself.
:func:`check_declared_sizes` then refuses constant shapes and loop counts no run could
meet.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import onnx
from onnx import helper, numpy_helper

from normtool.errors import NormtoolError
from normtool.io import reads


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor the graph stores: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    yield from _node_tensors(graph.node)


def _escapes(location: str, folder: Path) -> bool:
    posix, win = PurePosixPath(location), PureWindowsPath(location)
    if not location or posix.is_absolute() or win.is_absolute() or win.drive:
        return True
    if ".." in posix.parts or ".." in win.parts:
        return True
    target = (folder / location).resolve()  # a symlink inside the folder may point out of it
    return folder.resolve() not in target.parents


def check_external_data(path: str | Path) -> onnx.ModelProto:
    """Refuse ``path`` when any external-data location is absolute or leaves its folder.

    Returns the model without its external data, for the checks that follow."""
    path = reads.note(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several untyped parse errors
        raise NormtoolError(f"not a readable ONNX model ({type(e).__name__})", path) from e
    stored = [*_tensors(proto.graph)]
    for f in proto.functions:
        stored += _node_tensors(f.node)
    for t in stored:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if _escapes(loc, path.parent):
            raise NormtoolError(
                f"tensor {t.name!r} names external data {loc!r} outside the model's folder; "
                "refused (external data must sit beside the model)",
                path,
            )
        reads.note(path.parent / loc)
    return proto


# ---- declared sizes and fixed loop counts: refused before ONNX Runtime runs anything ------
#: Shape-like constants are read up to this many elements; larger tensors are never read here.
_SMALL = 64
#: A lower bound on ONNX Runtime's cost per Loop iteration, even for an empty body (measured
#: ~4 µs on this project's CPU VM; 1 µs leaves room for faster machines). A loop whose fixed
#: trip count times this exceeds the time limit cannot finish within it.
MIN_ITERATION_S = 1e-6


@dataclass(frozen=True)
class _Declared:
    elem_type: int
    dims: tuple[int | None, ...] | None  # None: rank unknown; a None dim: symbolic

    @property
    def itemsize(self) -> int:
        """Bytes per element; 1 when the type is unknown (a lower bound never over-refuses)."""
        try:
            return max(1, helper.tensor_dtype_to_np_dtype(self.elem_type).itemsize)
        except Exception:  # noqa: BLE001 - undefined, string or unknown element types
            return 1


@dataclass(frozen=True)
class _Scope:
    consts: dict[str, np.ndarray]
    types: dict[str, _Declared]

    def ints(self, name: str) -> list[int] | None:
        a = self.consts.get(name)
        return None if a is None or a.dtype.kind not in "iub" else [int(v) for v in a.reshape(-1)]

    def scalar(self, name: str) -> float | None:
        a = self.consts.get(name)
        return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None

    def itemsize(self, name: str) -> int:
        return self.types.get(name, _Declared(onnx.TensorProto.UNDEFINED, None)).itemsize


def _readable(t: onnx.TensorProto) -> bool:
    return t.data_location != onnx.TensorProto.EXTERNAL and math.prod(t.dims) <= _SMALL


def _array(t: onnx.TensorProto) -> np.ndarray | None:
    try:
        return numpy_helper.to_array(t) if _readable(t) else None
    except Exception:  # noqa: BLE001 - a malformed tensor is ONNX Runtime's to report
        return None


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return _array(a.t)
        if a.name == "value_int":
            return np.array(a.i)
        if a.name == "value_ints":
            return np.array(a.ints)
    return None


def _constants(graph: onnx.GraphProto, outer: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Small constants visible in ``graph``: initializers, ``Constant`` nodes, outer scopes."""
    found = dict(outer)
    for t in graph.initializer:
        if (a := _array(t)) is not None:
            found[t.name] = a
    for n in graph.node:
        if n.op_type == "Constant" and (a := _constant_value(n)) is not None:
            found[n.output[0]] = a
    return found


def _declared(graph: onnx.GraphProto, outer: dict[str, _Declared]) -> dict[str, _Declared]:
    """Element type and (when fixed) dims of every tensor whose type the file states."""
    found = dict(outer)
    for v in (*graph.input, *graph.value_info, *graph.output):
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        found[v.name] = _Declared(t.elem_type, dims if t.HasField("shape") else None)
    for t in graph.initializer:
        found[t.name] = _Declared(t.data_type, tuple(t.dims))
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    found[n.output[0]] = _Declared(a.t.data_type, tuple(a.t.dims))
    return found


def _arg(node: onnx.NodeProto, k: int) -> str:
    return node.input[k] if len(node.input) > k else ""


def _value_type(node: onnx.NodeProto) -> int:
    value = next((a.t for a in node.attribute if a.name == "value"), None)
    return value.data_type if value is not None else onnx.TensorProto.FLOAT


def _range_length(node: onnx.NodeProto, s: _Scope) -> list[int] | None:
    start, limit, delta = (s.scalar(_arg(node, k)) for k in range(3))
    if start is None or limit is None or not delta:
        return None
    return [max(0, math.ceil((limit - start) / delta))]


def _tile_shape(node: onnx.NodeProto, s: _Scope) -> list[int] | None:
    repeats, source = s.ints(_arg(node, 1)), s.types.get(_arg(node, 0))
    if repeats is None or source is None or source.dims is None or None in source.dims:
        return None
    return [int(d) * r for d, r in zip(source.dims, repeats, strict=False)]


def _resize_sizes(node: onnx.NodeProto, s: _Scope) -> list[int] | None:
    return s.ints(_arg(node, 3)) if _arg(node, 3) else None


def _output_shape(node: onnx.NodeProto, s: _Scope) -> tuple[list[int], int] | None:
    """The shape an allocating op's constant inputs declare, and its bytes per element.

    Expand's output is at least its shape argument (broadcasting only grows it)."""
    first = _arg(node, 0)
    if node.op_type == "ConstantOfShape":
        shape = s.ints(first)
        return None if shape is None else (shape, _Declared(_value_type(node), None).itemsize)
    shape = {
        "Expand": lambda: s.ints(_arg(node, 1)),
        "Tile": lambda: _tile_shape(node, s),
        "Range": lambda: _range_length(node, s),
        "Resize": lambda: _resize_sizes(node, s),
    }.get(node.op_type, lambda: None)()
    return None if shape is None else (shape, s.itemsize(first))


def size_text(n: int) -> str:
    """Bytes for a message: ``6.4 GB``, ``512 MB`` (decimal, as ``--memory-limit`` reads them)."""
    return f"{n / 1e9:.3g} GB" if n >= 10**8 else f"{n / 1e6:.3g} MB"


def _check_allocation(node: onnx.NodeProto, s: _Scope, memory_limit: int, path: Path) -> None:
    found = _output_shape(node, s)
    if found is None:
        return
    shape, itemsize = found
    nbytes = math.prod(max(d, 0) for d in shape) * itemsize
    if nbytes > memory_limit:
        raise NormtoolError(
            f"{node.op_type} node {node.name or node.output[0]!r} declares a {shape} tensor of "
            f"{itemsize}-byte elements: {size_text(nbytes)}, over the "
            f"{size_text(memory_limit)} memory limit (--memory-limit); refused before running",
            path,
        )


def _keeps_going(body: onnx.GraphProto, s: _Scope) -> bool:
    """Whether a Loop body passes its condition on unchanged (or always sets it true)."""
    if len(body.input) < 2 or not body.output:
        return False
    cond_in, cond_out = body.input[1].name, body.output[0].name
    if cond_out == cond_in:
        return True
    producer = next((n for n in body.node if cond_out in n.output), None)
    if producer is not None and producer.op_type == "Identity" and producer.input[0] == cond_in:
        return True
    inner = _constants(body, s.consts).get(cond_out)
    return inner is not None and bool(inner.all())


def _fixed_trips(node: onnx.NodeProto, s: _Scope) -> int | None:
    """The iterations a Loop certainly runs: a constant count and no condition that can stop it."""
    trips = s.ints(_arg(node, 0))
    if not trips:
        return None
    cond = _arg(node, 1)
    if not cond:
        return trips[0]
    start, body = s.ints(cond), next((a.g for a in node.attribute if a.name == "body"), None)
    return trips[0] if start and all(start) and body and _keeps_going(body, s) else None


def _check_loop(node: onnx.NodeProto, s: _Scope, time_limit: float, path: Path) -> None:
    trips = _fixed_trips(node, s)
    if trips is not None and trips * MIN_ITERATION_S > time_limit:
        raise NormtoolError(
            f"Loop node {node.name or node.output[0]!r} runs {trips:,} iterations (a fixed trip "
            f"count, no condition that stops it): at least {trips * MIN_ITERATION_S:.3g} s at "
            f"{MIN_ITERATION_S * 1e6:g} µs each, over the {time_limit:g} s time limit "
            "(--time-limit); refused before running",
            path,
        )


def _check_inputs(graph: onnx.GraphProto, memory_limit: int, path: Path) -> None:
    """Inputs with fixed huge dims: normtool would allocate them itself to feed the model.
    A symbolic dim (batch, seq) counts as 1: the bytes are a lower bound."""
    types = _declared(graph, {})
    for v in graph.input:
        declared = types[v.name]
        if declared.dims is None:
            continue
        nbytes = math.prod(1 if d is None else d for d in declared.dims) * declared.itemsize
        if nbytes > memory_limit:
            raise NormtoolError(
                f"input {v.name!r} declares shape {list(declared.dims)}: {size_text(nbytes)} per "
                f"batch, over the {size_text(memory_limit)} memory limit (--memory-limit)",
                path,
            )


def _check_graph(
    graph: onnx.GraphProto, outer: _Scope, memory_limit: int, time_limit: float, path: Path
) -> None:
    s = _Scope(_constants(graph, outer.consts), _declared(graph, outer.types))
    for node in graph.node:
        _check_allocation(node, s, memory_limit, path)
        if node.op_type == "Loop":
            _check_loop(node, s, time_limit, path)
        for a in node.attribute:
            for g in (*([a.g] if a.HasField("g") else []), *a.graphs):
                _check_graph(g, s, memory_limit, time_limit, path)


def check_declared_sizes(
    proto: onnx.ModelProto, path: str | Path, memory_limit: int, time_limit: float
) -> None:
    """Refuse a model whose own constants declare more than the limits allow.

    Why before the session: ONNX Runtime folds constant subgraphs while it creates a session
    and allocates what a ``ConstantOfShape``/``Expand``/``Tile``/``Range``/``Resize`` with
    constant shape inputs declares, and a ``Loop`` with a fixed count runs to the end. These
    are read off the file (inputs of at most 64 elements; no weight is read). Sizes computed
    only at run time are bounded by the session's memory limit and the per-call time limit
    (``normtool.runtime.ort``).
    """
    path = Path(path)
    top = _Scope({}, {})
    _check_inputs(proto.graph, memory_limit, path)
    _check_graph(proto.graph, top, memory_limit, time_limit, path)
    for f in proto.functions:  # a local function's nodes, checked as a graph of their own
        _check_graph(onnx.GraphProto(node=f.node), top, memory_limit, time_limit, path)
