"""Load any supported checkpoint as a Model: open lazily, recognise, build the graph."""

from __future__ import annotations

import json
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
    path: str | Path, arch: str | None = None, heads: int | None = None, act: str | None = None
) -> Model:
    """Open ``path`` and describe it as a Model. normtool outputs carry their own graph."""
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
    graph = build_graph(ck, arch, BuildOptions(heads=heads, act=act))
    return Model(graph, ck, {}, [])
