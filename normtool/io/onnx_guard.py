"""ONNX files from strangers: external data must stay inside the model's folder.

Why: an ONNX tensor stored as external data names its file by a ``location`` relative to the
model. ``/etc/shadow`` or ``../../secret`` would make ONNX or ONNX Runtime read a file the user
never meant to hand over (or a device node that never ends). Every place normtool reads ONNX calls
:func:`check_external_data` first, so such a file is refused (exit 2) before either library
touches its data. Only the protobuf is parsed here, never the external data itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from normtool.errors import NormtoolError


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


def check_external_data(path: str | Path) -> None:
    """Refuse ``path`` when any external-data location is absolute or leaves its folder."""
    path = Path(path)
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
