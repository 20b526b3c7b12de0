"""The one lazy tensor-rewriting engine every weight-rewriting pass plans on.

A pass does not compute the tensors it changes: it describes each as a ``Recipe`` (a function
of the tensors it reads) and the engine computes it when the self-check or the writer asks —
one tensor at a time, and for a large tensor whose rows depend only on the same rows of one
input (an embedding, an LM head), one block of ``BLOCK_ROWS`` rows at a time, read straight
from the checkpoint file when that input is stored as is. So a multi-GB model is rewritten
holding one block of its largest tensor, whichever pass (or chain of passes) rewrites it.

Why one engine: convert-ln-to-rms and fold each had their own (``_Recipe``/``_Rewriter`` and
``_lazy``/``_Editor``), with their own block sizes, precisions and read paths; rotate and the
rms-gain fold would have added more. Here the four questions every rewrite answers are asked
once: which rows to read (``Ctx.get``), in which precision to compute (``Recipe.precision``),
how to round (``Recipe.centre``: half-precision writers keep their sums), and whether it can
stream (``Recipe.rows_from``).

Names and versions: a recipe reads tensors by name, and a plain name always means the source
model's tensor (so a recipe may read the tensor it replaces). A pass may rewrite one tensor
several times (fold: a layer rescaled at one add and absorbing a map at the next):
``Engine.current`` gives the key under which the tensor's value *so far* is read — the source's
name, or an internal key holding the earlier recipe — and the new recipe reads that key, so
versions compose unrounded, in the work precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch

from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.io.safetensors_format import DTYPES
from normtool.model import Model, Override, RowBlocks
from normtool.passes import weight_math as wm

F64 = torch.float64
#: Rows per block when a row-separable rewrite of a large tensor is computed and streamed.
BLOCK_ROWS = 1024


class NonFinite(NormtoolError):
    """A rewritten tensor holds NaN/Inf (``Engine.finite``)."""


@dataclass
class Ctx:
    """What a recipe's function sees while computing one block of rows (or the whole tensor).

    ``rows``: the block (None: whole); ``work``: the dtype of the arithmetic; ``get(name)``
    the rows of an input aligned with the output's, ``get(name, part=False)`` an input whole
    (read once per tensor, e.g. γ and β, and kept across its blocks); ``memo``: results a
    recipe shares with another (fold's ``W·β`` for the bias computed beside its weight).
    """

    engine: Engine
    rows: slice | None
    work: torch.dtype
    whole: dict[str, torch.Tensor]

    def get(self, name: str, part: bool = True) -> torch.Tensor:
        if part and self.rows is not None and self.engine.by_rows(name):
            return self.engine.read(name, self.rows, self.work)
        if name not in self.whole:
            self.whole[name] = self.engine.read(name, None, self.work)
        t = self.whole[name]
        return t if not part or self.rows is None else t[self.rows]

    @property
    def memo(self) -> dict[Any, Any]:
        return self.engine.memo

    @property
    def start(self) -> int:
        return 0 if self.rows is None else self.rows.start


@dataclass
class Recipe:
    """How one tensor is computed.

    ``fn(ctx)`` gives the tensor (or ``ctx.rows`` of it) in ``ctx.work`` precision or any
    dtype it likes (the engine rounds). ``rows_from``: the input whose rows the result's rows
    follow one for one — set only when every input read with ``part=True`` is row-aligned and
    the others are read whole; None: not row-separable (a stream axis on rows, grouped convs).
    ``precision``: ``stored`` computes float32 tensors in float32 (a quarter of float64's
    memory traffic; the pass must argue the rounding is negligible) and everything else in
    float64; ``f64`` always in float64, rounded once. ``centre``: the axis along which a
    half-precision result is rounded keeping its sums (centred stream writers).
    """

    shape: tuple[int, ...]
    dtype: str
    fn: Callable[[Ctx], torch.Tensor]
    rows_from: str | None = None
    precision: Literal["stored", "f64"] = "stored"
    centre: int | None = None


@dataclass
class Engine:
    """The recipes of one pass over ``source``, computed on demand (see the module docstring)."""

    source: Model
    recipes: dict[str, Recipe] = field(default_factory=dict)
    memo: dict[Any, Any] = field(default_factory=dict)
    #: earlier versions of rewritten tensors, by the keys ``current`` gave out
    earlier: dict[str, Recipe] = field(default_factory=dict)

    # ---- planning ------------------------------------------------------------------------
    def current(self, name: str) -> str:
        """The key to read ``name``'s value so far from: a new recipe put for ``name`` (or for
        an untied copy of it) reads this key, which keeps the earlier one."""
        if name not in self.recipes:
            return name
        key = f"{name}@{len(self.earlier) + 1}"
        self.earlier[key] = self.recipes[name]
        return key

    def put(self, name: str, recipe: Recipe) -> None:
        self.recipes[name] = recipe

    # ---- reading ---------------------------------------------------------------------------
    def by_rows(self, name: str) -> bool:
        """Whether rows of ``name`` can be read on their own: a rewritten separable tensor, or
        a source tensor stored as is (no slice, transpose or reshape view), read from the file."""
        r = self.earlier.get(name)
        if r is not None:
            return r.rows_from is not None
        src = self.source.graph.tensors[name].source
        plain = src.slice is None and not src.transpose and src.reshape is None
        return plain and name not in self.source.overrides and self.source.checkpoint is not None

    def read(self, name: str, rows: slice | None, work: torch.dtype) -> torch.Tensor:
        """Rows ``rows`` (None: all) of ``name``: an earlier version's value unrounded in
        ``work`` (a key from ``current``), or else the source's tensor as stored — a recipe
        reading its own output's name reads the source's."""
        r = self.earlier.get(name)
        if r is not None:
            if rows is not None and r.rows_from is not None:
                return r.fn(Ctx(self, rows, work, {}))
            t = r.fn(Ctx(self, None, work, {}))
            return t if rows is None else t[rows]
        if rows is not None and self.by_rows(name):
            key = self.source.graph.tensors[name].source.key
            return self.source.checkpoint.get_rows(key, rows.start, rows.stop)
        t = self.source.tensor(name)
        return t if rows is None else t[rows]

    # ---- computing -------------------------------------------------------------------------
    @staticmethod
    def dtypes(r: Recipe, exact: bool) -> tuple[torch.dtype, torch.dtype]:
        """(result dtype, arithmetic dtype): float64 when ``exact``, else the stored dtype."""
        dtype = F64 if exact else DTYPES[r.dtype]
        fp32 = dtype == torch.float32 and r.precision == "stored"
        return dtype, torch.float32 if fp32 else F64

    @staticmethod
    def round(r: Recipe, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if r.centre is not None and dtype in (torch.float16, torch.bfloat16):
            return wm.round_keeping_sums(t, dtype, r.centre)
        return t.to(dtype)

    def blockwise(self, r: Recipe) -> bool:
        """A large row-separable tensor whose rows can be read on their own: computed (and
        written) ``BLOCK_ROWS`` rows at a time. Not when its rows must come from a view (GPT-2's
        transposed Conv1D weights): computed whole on the view, the result keeps the stored
        memory layout and is written back without a transposing copy."""
        large = bool(r.shape) and r.shape[0] > BLOCK_ROWS
        return r.rows_from is not None and large and self.by_rows(r.rows_from)

    def blocks(self, name: str, exact: bool) -> Iterator[torch.Tensor]:
        """The rows of a ``blockwise`` tensor, block by block, each computed and rounded on its
        own (inputs read whole are read once, for all blocks)."""
        r = self.recipes[name]
        dtype, work = self.dtypes(r, exact)
        whole: dict[str, torch.Tensor] = {}
        for i in range(0, r.shape[0], BLOCK_ROWS):
            yield self.round(r, r.fn(Ctx(self, slice(i, i + BLOCK_ROWS), work, whole)), dtype)

    def tensor(self, name: str, exact: bool) -> torch.Tensor:
        """Tensor ``name`` whole: float64 when ``exact``, else its stored dtype."""
        r = self.recipes[name]
        dtype, work = self.dtypes(r, exact)
        if not self.blockwise(r):
            return self.round(r, r.fn(Ctx(self, None, work, {})), dtype)
        t = torch.empty(r.shape, dtype=dtype)
        i = 0
        for block in self.blocks(name, exact):
            t[i : i + len(block)] = block
            i += len(block)
        return t

    def finite(self, name: str, t: torch.Tensor) -> None:
        """NonFinite naming ``t`` if it holds NaN/Inf: one ``aminmax`` on data in hand, run by
        the writer's thread as each tensor (or block) is written, beside the computing of the
        next — instead of a separate scan of the file."""
        if t.is_floating_point() and t.numel():
            # reduce in memory order: over a transposed view aminmax runs ~10x slower
            lo, hi = torch.aminmax(t.t() if t.dim() == 2 and t.stride(0) < t.stride(1) else t)
            if not (lo.isfinite() and hi.isfinite()):
                raise NonFinite(
                    f"tensor {name!r} overflows {t.dtype} when rewritten: refusing to write "
                    "non-finite weights",
                    self.source.checkpoint.path if self.source.checkpoint else None,
                )

    def overrides(self, graph: Graph, exact: bool) -> dict[str, Override]:
        """The rewritten tensors of ``graph`` as lazy overrides (streamable where blockwise)."""
        out: dict[str, Override] = {}
        for name in graph.tensors:
            r = self.recipes.get(name)
            if r is None:
                continue
            whole = partial(self.tensor, name, exact)
            out[name] = (
                RowBlocks(whole, partial(self.blocks, name, exact)) if self.blockwise(r) else whole
            )
        return out

    def model(self, graph: Graph, exact: bool) -> Model:
        """``source`` with ``graph`` and the rewritten tensors (no history entry: the runner
        writes it, once the result is checked)."""
        kept = {k: v for k, v in self.source.overrides.items() if k in graph.tensors}
        return Model(
            graph,
            self.source.checkpoint,
            {**kept, **self.overrides(graph, exact)},
            list(self.source.history),
            self.source.assumptions,
        )
