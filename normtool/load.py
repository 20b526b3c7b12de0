"""Load any supported checkpoint as a Model: open lazily, recognise, build the graph."""

from __future__ import annotations

import json
import math
from pathlib import Path

from normtool.arch.family import BuildOptions
from normtool.arch.registry import build_graph
from normtool.errors import NormtoolError
from normtool.graph import FLOAT_DTYPES, Graph, Source, sliced_size
from normtool.io.keys import GRAPH_KEY, HISTORY_KEY
from normtool.io.safetensors_format import DTYPE_NAMES
from normtool.io.store import Checkpoint, open_checkpoint
from normtool.model import Model


def load_model(
    path: str | Path,
    arch: str | None = None,
    heads: int | None = None,
    act: str | None = None,
    pn_groups: int | None = None,
    eps: float | None = None,
) -> Model:
    """Open ``path`` and describe it as a Model. normtool outputs carry their own graph.

    ``pn_groups`` and ``eps`` state what a state dict cannot (PowerNorm's group count, a norm's
    eps); without them such values are assumed, and the Model lists each assumption. Like
    ``heads``, they do not apply to normtool outputs, whose graph records the values used.
    """
    _check_options(path, pn_groups, eps)
    ck = open_checkpoint(path)
    if GRAPH_KEY in ck.metadata and arch is None:
        try:
            graph = Graph.from_json(ck.metadata[GRAPH_KEY])
            history = _history(ck.metadata.get(HISTORY_KEY, "[]"))
            _check_sources(graph, ck)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise NormtoolError(f"corrupt normtool graph metadata ({e!r:.200})", path) from e
        except NormtoolError as e:
            raise NormtoolError(f"corrupt normtool graph metadata: {e.message}", path) from e
        _require_float(graph, ck)
        return Model(graph, ck, {}, history)
    opts = BuildOptions(heads=heads, act=act, pn_groups=pn_groups, eps=eps)
    graph = build_graph(ck, arch, opts)
    _require_float(graph, ck)
    return Model(graph, ck, {}, [], list(opts.assumed))


def _require_float(graph: Graph, ck: Checkpoint) -> None:
    """Every tensor an op uses must be stored as a float, with at least one value: the header
    decides, not metadata.

    Why at load: integer or boolean weights (U8, I64, BOOL) would be cast to floats by the
    executor but not by ONNX Runtime, and every transform's arithmetic assumes floats; a
    quantized or mask tensor is not a weight these rewrites are defined for. A weight without
    elements makes a layer of no units: a few hundred bytes that declare, say, 30,000,000 input
    features and compute nothing. Tensors that no op uses (``position_ids``,
    ``num_batches_tracked``) are not checked.
    """
    users = {t: o for o in graph.ops for t in o.params.values()}
    for name, spec in graph.tensors.items():
        key = spec.source.key
        stored = DTYPE_NAMES[ck.dtype(key)]
        op = users.get(name)
        user = f"{op.kind} op {op.name!r}" if op else "the graph"
        if stored not in FLOAT_DTYPES:
            raise NormtoolError(
                f"tensor {key!r} is stored as {stored}; {user} needs floating-point "
                "weights (F64, F32, F16 or BF16)",
                ck.path,
            )
        if 0 in ck.shape(key):
            raise NormtoolError(
                f"tensor {key!r} has no elements (shape {list(ck.shape(key))}): {user} would "
                "be a layer without units",
                ck.path,
            )


def _check_sources(graph: Graph, ck: Checkpoint) -> None:
    """The graph's view of each stored tensor must fit the file's header.

    For each graph tensor: the key exists, its dtype is the header's (metadata that claims F16
    for F32 bytes would otherwise loosen ``verify``'s tolerances; a non-float one is left to
    ``_require_float``'s clearer refusal), the slice lies inside the stored shape, a transpose
    meets a 2-D tensor, a reshape keeps the element count, and the result has the graph's shape.
    """
    for name, spec in graph.tensors.items():
        src = spec.source
        if src.key not in ck:
            raise NormtoolError(f"graph tensor {name!r} missing from the file")
        stored = DTYPE_NAMES[ck.dtype(src.key)]
        if spec.dtype != stored and stored in FLOAT_DTYPES:
            raise NormtoolError(
                f"graph says tensor {name!r} is {spec.dtype}, the header says {stored}"
            )
        shape = _view_shape(src, list(ck.shape(src.key)))
        if shape is None or tuple(shape) != tuple(spec.shape):
            raise NormtoolError(
                f"stored tensor {src.key!r} {list(ck.shape(src.key))} does not give graph tensor "
                f"{name!r} {list(spec.shape)} (slice {src.slice}, transpose {src.transpose}, "
                f"reshape {src.reshape})"
            )


def _view_shape(src: Source, shape: list[int]) -> list[int] | None:
    """The shape ``read_view`` makes of a stored tensor of ``shape`` (None: it cannot)."""
    if src.slice is not None:
        if len(src.slice) not in (3, 4) or not all(type(v) is int for v in src.slice):
            return None
        axis = src.slice[0]
        size = sliced_size(shape[axis], src.slice) if 0 <= axis < len(shape) else None
        if size is None or (len(src.slice) == 4 and src.transpose):
            return None  # a periodic slice is never transposed (the writer could not undo it)
        shape[axis] = size
    if src.transpose is not False:
        if src.transpose is not True or len(shape) != 2:
            return None
        shape.reverse()
    if src.reshape is not None:
        dims = list(src.reshape)
        if not all(type(d) is int and d >= 0 for d in dims) or math.prod(dims) != math.prod(shape):
            return None
        shape = dims
    return shape


def _history(text: str) -> list[dict]:
    """The history metadata: a JSON list of records (objects), each with an optional list of
    assumption records (objects) that ``inspect`` lists."""
    entries = json.loads(text)
    ok = isinstance(entries, list) and all(
        isinstance(e, dict)
        and isinstance(e.get("assumptions") or [], list)
        and all(isinstance(a, dict) for a in e.get("assumptions") or [])
        for e in entries
    )
    if not ok:
        raise NormtoolError(f"{HISTORY_KEY} is not a list of records")
    return entries


def _check_options(path: str | Path, pn_groups: int | None, eps: float | None) -> None:
    if pn_groups is not None and pn_groups < 1:
        raise NormtoolError(f"--pn-groups {pn_groups}: expected a positive integer", path)
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise NormtoolError(f"--eps {eps}: expected a finite number > 0", path)
