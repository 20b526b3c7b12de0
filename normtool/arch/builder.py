"""GraphBuilder: the small API adapters use to describe a checkpoint as a Graph.

Shapes are read from the checkpoint header (never guessed), so a builder that names a missing
tensor or a wrong shape fails with the tensor's name instead of producing a broken graph.
"""

from __future__ import annotations

import math
from typing import Any

from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec, Op, Source, Space, TensorSpec, sliced_size
from normtool.io.safetensors_format import DTYPE_NAMES
from normtool.io.store import Checkpoint


class GraphBuilder:
    def __init__(self, family: str, ck: Checkpoint) -> None:
        self.ck = ck
        self.family = family
        self.spaces: dict[str, Space] = {}
        self.tensors: dict[str, TensorSpec] = {}
        self.ops: list[Op] = []
        self.inputs: list[InputSpec] = []
        self.value_spaces: dict[str, str] = {}
        self.info: dict[str, Any] = {}

    def has(self, key: str) -> bool:
        return key in self.ck

    def space(self, name: str, size: int, kind: str, heads: int = 0) -> str:
        old = self.spaces.get(name)
        if old is not None and old.size != size:
            raise NormtoolError(
                f"inconsistent sizes for {name}: {old.size} and {size}", self.ck.path
            )
        self.spaces[name] = Space(name, size, kind, heads)
        return name

    def tensor(
        self,
        name: str,
        key: str,
        axes: tuple[str | None, ...],
        slice: tuple[int, ...] | None = None,
        transpose: bool = False,
        squeeze: bool = False,
        reshape: tuple[int, ...] | None = None,
    ) -> str:
        """Declare graph tensor ``name`` as a view of checkpoint tensor ``key``; ``squeeze``
        drops size-1 axes (stored ``[1, P, d]`` tables and ``[1, C, 1, 1]`` statistics);
        ``reshape`` reads it in another shape of the same size (a ``Linear`` weight ``[O, I]``
        as the 1×1 conv ``[O, I, 1, 1]`` it computes on image maps)."""
        if key not in self.ck:
            raise NormtoolError(f"expected tensor {key!r} is missing", self.ck.path)
        shape = list(self.ck.shape(key))
        if slice is not None:
            size = sliced_size(shape[slice[0]], slice)
            if size is None:
                raise NormtoolError(
                    f"tensor {key!r} has shape {tuple(shape)}, too small", self.ck.path
                )
            shape[slice[0]] = size
        if transpose:
            if len(shape) != 2:
                raise NormtoolError(f"tensor {key!r} should be 2-D", self.ck.path)
            shape.reverse()
        if reshape is not None:
            if math.prod(reshape) != math.prod(shape):
                raise NormtoolError(
                    f"tensor {key!r} has shape {tuple(shape)}: expected {math.prod(reshape)} "
                    f"values (read as {reshape})",
                    self.ck.path,
                )
            shape = list(reshape)
        if squeeze and 1 in shape:
            shape = [s for s in shape if s != 1]
            reshape = tuple(shape)
        if len(axes) != len(shape):
            raise NormtoolError(
                f"tensor {key!r} has shape {tuple(shape)}, expected {len(axes)} dimensions",
                self.ck.path,
            )
        for ax, s in enumerate(axes):
            if s is not None and self.spaces[s].size != shape[ax]:
                raise NormtoolError(
                    f"tensor {key!r} has shape {tuple(self.ck.shape(key))}: axis {ax} should be "
                    f"{self.spaces[s].size} ({s})",
                    self.ck.path,
                )
        dtype = DTYPE_NAMES[self.ck.dtype(key)]
        self.tensors[name] = TensorSpec(
            tuple(shape), axes, Source(key, slice, transpose, reshape), dtype
        )
        return name

    def input(self, spec: InputSpec, space: str) -> str:
        self.inputs.append(spec)
        self.value_spaces[spec.name] = space
        return spec.name

    def op(
        self,
        kind: str,
        name: str,
        inputs: tuple[str, ...] | list[str],
        space: str,
        params: dict[str, str] | None = None,
        **attrs: Any,
    ) -> str:
        """Append an op; its output value is named ``name`` and lives in ``space``."""
        self.ops.append(Op(name, kind, tuple(inputs), name, dict(params or {}), attrs))
        self.value_spaces[name] = space
        return name

    def build(self, outputs: list[str]) -> Graph:
        g = Graph(
            self.family,
            self.inputs,
            outputs,
            self.ops,
            self.spaces,
            self.tensors,
            self.value_spaces,
            self.info,
        )
        g.validate()
        return g
