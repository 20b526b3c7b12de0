"""Load any supported checkpoint as a Model: open lazily, recognise, build the graph."""

from __future__ import annotations

import json
import math
from pathlib import Path

from normtool.arch.family import BuildOptions
from normtool.arch.registry import build_graph
from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.io.store import open_checkpoint
from normtool.model import Model

GRAPH_KEY = "normtool.graph"
HISTORY_KEY = "normtool.history"


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
            history = json.loads(ck.metadata.get(HISTORY_KEY, "[]"))
        except (ValueError, KeyError, TypeError) as e:
            raise NormtoolError(f"corrupt normtool graph metadata ({e})", path) from e
        except NormtoolError as e:
            raise NormtoolError(f"corrupt normtool graph metadata: {e.message}", path) from e
        for name, spec in graph.tensors.items():
            key = spec.source.key
            if key not in ck:
                raise NormtoolError(f"graph tensor {name!r} missing from the file", path)
            if (
                spec.source.slice is None
                and not spec.source.transpose
                and spec.source.reshape is None
                and tuple(ck.shape(key)) != tuple(spec.shape)
            ):
                raise NormtoolError(
                    f"tensor {key!r} has shape {ck.shape(key)}, graph says {spec.shape}", path
                )
        return Model(graph, ck, {}, history)
    opts = BuildOptions(heads=heads, act=act, pn_groups=pn_groups, eps=eps)
    graph = build_graph(ck, arch, opts)
    return Model(graph, ck, {}, [], list(opts.assumed))


def _check_options(path: str | Path, pn_groups: int | None, eps: float | None) -> None:
    if pn_groups is not None and pn_groups < 1:
        raise NormtoolError(f"--pn-groups {pn_groups}: expected a positive integer", path)
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise NormtoolError(f"--eps {eps}: expected a finite number > 0", path)
