"""A Model: a Graph plus where its tensors come from (a checkpoint, or values computed by a pass).

Why this split: passes change a few tensors and the graph; everything else should still be read
lazily from the source file when the output is written, so transforms of large checkpoints hold
only what one step needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from normtool.analysis import parameter_count
from normtool.arch.family import Assumption
from normtool.graph import Graph, Source
from normtool.io.store import Checkpoint


def sliced(t: torch.Tensor, sl: tuple[int, ...]) -> torch.Tensor:
    """A view of ``t`` holding a ``Source`` slice ``(axis, start, stop[, period])`` — one a
    writer can copy into. With a period the sliced axis is split in two, ``[blocks,
    stop − start]``; flattening those gives the graph tensor (a copy: the view is strided)."""
    axis, start, stop, *period = sl
    if not period:
        return t.narrow(axis, start, stop - start)
    return t.unflatten(axis, (-1, period[0])).narrow(axis + 1, start, stop - start)


def read_view(
    ck: Checkpoint, src: Source, cache: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Read one graph tensor from the checkpoint: stored tensor → slice → transpose → reshape."""
    if cache is not None and src.key in cache:
        t = cache[src.key]
    else:
        t = ck.get(src.key)
        if cache is not None:
            cache[src.key] = t
    if src.slice is not None:
        t = sliced(t, src.slice)
        if len(src.slice) == 4:
            t = t.flatten(src.slice[0], src.slice[0] + 1)
    if src.transpose:
        t = t.t()
    if src.reshape is not None:
        t = t.reshape(src.reshape)
    return t


@dataclass(frozen=True)
class RowBlocks:
    """A computed tensor that can also be produced in consecutive blocks of rows (first axis).

    Why: an embedding or LM head rewritten row by row need never exist whole — the writer
    streams each block to disk as it is made, so converting a checkpoint holds one block of
    its largest tensor, not the tensor. Calling it gives the whole tensor (executor, checks).
    """

    whole: Callable[[], torch.Tensor]
    blocks: Callable[[], Iterable[torch.Tensor]]

    def __call__(self) -> torch.Tensor:
        return self.whole()


#: A tensor computed by a pass: the value itself, or a thunk that computes it when asked.
#: Thunks let a pass over a large checkpoint describe its result without holding it: the writer
#: and the executor pull one tensor at a time.
Override = torch.Tensor | Callable[[], torch.Tensor] | RowBlocks


@dataclass
class Model:
    graph: Graph
    checkpoint: Checkpoint | None = None
    overrides: dict[str, Override] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: What building the graph assumed rather than read (``BuildOptions.assumed``); a derived
    #: model rests on the same values. Empty for normtool outputs: their graph records the
    #: values as data and their history keeps these records.
    assumptions: list[Assumption] = field(default_factory=list)
    #: The last stored tensor read for a sliced view, kept for its sibling views: fused
    #: weights (GPT-2's ``c_attn`` holds q, k and v) are then read once, not once per view.
    _fused: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.overrides:
            t = self.overrides[name]
            return t() if callable(t) else t
        if self.checkpoint is None:
            raise KeyError(name)
        src = self.graph.tensors[name].source
        if src.slice is None:
            return read_view(self.checkpoint, src)
        if src.key not in self._fused:
            self._fused.clear()
        return read_view(self.checkpoint, src, self._fused)

    def row_blocks(self, name: str) -> Iterable[torch.Tensor]:
        """Tensor ``name`` as consecutive row blocks: a pass's ``RowBlocks``, else whole."""
        t = self.overrides.get(name)
        return t.blocks() if isinstance(t, RowBlocks) else (self.tensor(name),)

    def weights(self) -> Mapping[str, torch.Tensor]:
        """All graph tensors as a lazy mapping (each read when looked up)."""
        return _LazyWeights(self)

    def derive(
        self, graph: Graph, overrides: Mapping[str, Override], entry: dict[str, Any]
    ) -> Model:
        """A new model sharing this one's checkpoint, with changed tensors and one more history entry.

        Tensors of ``graph`` not in ``overrides`` must keep this model's sources.
        """
        merged = {k: v for k, v in self.overrides.items() if k in graph.tensors}
        merged.update(overrides)
        return Model(graph, self.checkpoint, merged, [*self.history, entry], self.assumptions)

    def param_count(self) -> int:
        """Trained parameter elements, each stored tensor once (``analysis.parameter_count``)."""
        return parameter_count(self.graph)


class _LazyWeights(Mapping[str, torch.Tensor]):
    def __init__(self, model: Model) -> None:
        self._m = model

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._m.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._m.graph.tensors)

    def __len__(self) -> int:
        return len(self._m.graph.tensors)
