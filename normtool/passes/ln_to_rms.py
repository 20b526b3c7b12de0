"""Pre-LN → Pre-RMSNorm / Pre-CRMSNorm, exactly (Jiang et al., NeurIPS 2023; DESIGN §3.2).

Why it is exact: LayerNorm only ever sees the residual stream through ``x − mean(x)``. If every
*writer* of the stream (embeddings, CLS token, attention and MLP output projections) is centred
along the stream axis, the stream is zero-mean at every position, the mean subtraction is a
no-op and LayerNorm equals RMSNorm with the same epsilon. LayerNorm's own ``γ, β`` move into the
linear layers that read its output (``W' = W·diag(γ)``, ``b' = b + Wβ``), so the norm becomes
weightless. CRMSNorm goes one step further: a zero-mean vector is fixed by its first ``d−1``
entries, so the stream drops its last coordinate and readers absorb it
(``weight_math.crms_reader``).

The pass works on the graph's spaces only: the stream is found structurally (the values summed
by ``add`` in the ``resid`` space, passed through the ops that carry it — ``OpSpec``'s
``carries_stream``: sums, ``cls_concat``, ``select``), writers are the ops whose outputs are
summed into it (centrable when ``writes_stream``), readers are every other consumer. Tensors are rewritten
lazily: the result holds one thunk per changed tensor, so writing a converted multi-GB checkpoint
holds one tensor (in row blocks for the big ones) at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch

from normtool.errors import NormtoolError
from normtool.finite import require_finite
from normtool.graph import Graph, Op, Source, Space, TensorSpec
from normtool.io.safetensors_format import DTYPES
from normtool.model import Model, Override, RowBlocks
from normtool.opspec import SPECS
from normtool.passes import weight_math as wm
from normtool.refusal import refusal

#: Rows per block when rewriting large row-independent tensors (embeddings, LM heads).
BLOCK_ROWS = 1024


class NothingToConvert(NormtoolError):
    """The model has no LayerNorm: a refusal of its own, reported as "nothing to convert"."""


class NonFinite(NormtoolError):
    """A tensor to be written holds NaN/Inf (``Conversion.check``); ``Conversion.explaining``
    turns it into the refusal naming the source's own NaN/Inf tensor when there is one."""


@dataclass
class Stream:
    """What the conversion acts on, found in the graph."""

    space: str
    writers: list[Op]  # ops whose output is summed into the stream (and cls_concat tokens)
    norms: list[Op]  # the LayerNorms reading the stream, in graph order
    readers: dict[str, list[Op]]  # norm name -> the linear ops that read its output
    # norms whose γ/β cannot move into linears (their output is a graph output, or is read by
    # another op): name -> why; they keep γ/β as an ``affine`` op after the RMSNorm
    kept: dict[str, str] = field(default_factory=dict)
    # writer name -> the scale-only ``affine`` op between it and the stream (DINOv2's layer
    # scale), multiplied into the writer's rows before they are centred
    scaled: dict[str, Op] = field(default_factory=dict)


@dataclass
class Conversion:
    """The converted graph and its changed tensors (lazy thunks), with what changed.

    ``model(entry)`` gives the result in the stored dtypes; ``exact()`` the same function with
    the changed tensors in float64, unrounded — what the float64 self-check compares, so that
    it measures the maths rather than the storage rounding. ``model()``'s tensors are not
    vetted as they are computed: ``check(name, tensor)`` raises NonFinite for a NaN/Inf (pass it
    as ``save_model``'s ``check``, within ``explaining()``); ``scan()`` vets all of them at
    once, to explain a failed self-check.
    """

    source: Model
    graph: Graph
    tensors: dict[str, Override]
    exact_tensors: dict[str, Callable[[], torch.Tensor]]
    compressed: bool
    norms: list[str]
    writers: list[str]
    readers: list[str]
    created_biases: list[str]
    untied: list[tuple[str, str]]
    check: Callable[[str, torch.Tensor], None]
    dropped: int | None = None  # CRMS: the stream coordinate dropped (implied as −Σ of the rest)
    notes: list[str] = field(default_factory=list)

    def model(self, entry: dict[str, Any]) -> Model:
        return self.source.derive(self.graph, self.tensors, entry)

    def exact(self) -> Model:
        return self.source.derive(self.graph, self.exact_tensors, {"transform": "exact"})

    @contextmanager
    def explaining(self) -> Iterator[None]:
        """A NonFinite raised within becomes the refusal naming the source's first tensor with
        NaN/Inf when there is one (else it stands: an overflow of the rewrite). Why here, not in
        ``check``: the check runs in the writer's thread, beside the main thread's reading of
        the same model; the source is scanned in the caller's thread, after the writer stopped.
        """
        try:
            yield
        except NonFinite:
            require_finite(self.source)
            raise

    def scan(self) -> None:
        """NormtoolError when a tensor to be written holds NaN/Inf, one tensor at a time."""
        model = self.model({})
        with self.explaining():
            for name in self.graph.tensors:
                self.check(name, model.tensor(name))

    def summary(self) -> str:
        kind = "CRMSNorm" if self.compressed else "RMSNorm"
        s = (
            f"{len(self.norms)} LayerNorms -> {kind}; folded into {len(self.readers)} reader "
            f"linears ({len(self.created_biases)} biases created); centred "
            f"{len(self.writers)} stream writers"
        )
        if self.dropped is not None:
            s += f"; stream coordinate {self.dropped} dropped"
        for a, b in self.untied:
            s += f"; untied {a} from {b}"
        return s


# ---- finding the stream ---------------------------------------------------------------------


def _resid_space(graph: Graph) -> str | None:
    spaces = [s.name for s in graph.spaces.values() if s.kind == "resid"]
    return spaces[0] if len(spaces) == 1 else None


def find_stream(graph: Graph) -> tuple[Stream | None, list[str]]:
    """The residual stream's writers, norms and readers, or the reasons it cannot be converted.

    Raises NothingToConvert when the graph holds no LayerNorm at all.
    """
    if not any(o.kind == "layernorm" for o in graph.ops):
        raise NothingToConvert(
            "nothing to convert: the model has no LayerNorm"
            + (f" (norms: {', '.join(graph.norm_kinds())})" if graph.norm_kinds() else "")
        )
    space = _resid_space(graph)
    if space is None:
        return None, ["no single residual stream space in the graph"]
    # the stream: resid-space values of stream ops, closed backwards and forwards through them
    stream = {
        o.output for o in graph.ops if o.kind == "add" and graph.value_spaces[o.output] == space
    }
    todo = list(stream)
    while todo:
        v = todo.pop()
        p = graph.producer(v)
        ins = p.inputs if p is not None and _carries(p) else ()
        nxt = [u for u in ins if (w := graph.producer(u)) is not None and _carries(w)]
        nxt += [c.output for c in graph.consumers(v) if _carries(c)]
        for u in nxt:
            if u not in stream:
                stream.add(u)
                todo.append(u)
    # its head: a writer's output that a norm reads as well as a sum (the token embedding of a
    # model without position table, GPT-NeoX, Phi) is the stream's first value
    heads = {
        u
        for v in stream
        if (p := graph.producer(v)).kind == "add"
        for u in p.inputs
        if u not in stream
        and (w := graph.producer(u)) is not None
        and SPECS[w.kind].writes_stream
        and any(SPECS[c.kind].token_stats for c in graph.consumers(u))
    }
    stream |= heads

    reasons: list[str] = []
    writers: list[Op] = []
    scaled: dict[str, Op] = {}
    order = {o.name: i for i, o in enumerate(graph.ops)}
    for v in sorted(stream, key=lambda v: order[graph.producer(v).name]):
        p = graph.producer(v)
        if v in heads:
            writers.append(p)
            continue
        if p.kind == "cls_concat":
            writers.append(p)  # its token is written into the stream
        for u in p.inputs:
            if u in stream:
                continue
            w = graph.producer(u)
            if w is None:
                reasons.append(f"graph input {u!r} is added into the residual stream directly")
            elif SPECS[w.kind].token_stats and w.inputs[0] in stream:
                reasons.append(f"Post-LN: norm {w.name!r} normalises the stream (Pre-LN only)")
            elif SPECS[w.kind].token_stats:
                reasons.append(f"norm {w.name!r} sits after a branch, writing into the stream")
            elif (lin := _scaled_writer(graph, w)) is not None:
                writers.append(lin)
                scaled[lin.name] = w
            elif not SPECS[w.kind].writes_stream:
                reasons.append(
                    f"op {w.name!r} ({w.kind}) writes into the residual stream without weights "
                    "that could be centred"
                )
            else:
                others = [c.name for c in graph.consumers(u) if not _carries(c)]
                if others:
                    reasons.append(
                        f"output of {w.name!r} is read by {others[0]!r} besides the stream"
                    )
                elif w not in writers:
                    writers.append(w)
    for out in graph.outputs:
        if out in stream:
            reasons.append(f"the residual stream is the graph output {out!r}")

    norms: list[Op] = []
    readers: dict[str, list[Op]] = {}
    kept: dict[str, str] = {}
    for o in graph.ops:
        spec = SPECS[o.kind]
        if spec.carries_stream or spec.shape_only or not any(v in stream for v in o.inputs):
            continue
        if o.kind != "layernorm":
            reasons.append(
                f"op {o.name!r} ({o.kind}) reads the residual stream; only LayerNorms may"
            )
            continue
        norms.append(o)
        found, why = _norm_readers(graph, o)
        readers[o.name] = [] if why else found
        if why and "weight" not in o.params and "bias" in o.params:
            reasons.append(f"norm {o.name!r} has a bias but no weight, and {why[0]}")
        elif why:
            kept[o.name] = why[0]
    if not reasons and not norms:
        reasons.append("no LayerNorm reads the residual stream")
    if reasons:
        return None, reasons
    return Stream(space, writers, norms, readers, kept, scaled), []


def _scaled_writer(graph: Graph, op: Op) -> Op | None:
    """The writer under a scale-only ``affine`` op ``op`` (a layer scale ``λ ⊙ (W h + b)``),
    when that writer's output goes to ``op`` alone: centring ``diag(λ) W`` and ``λ ⊙ b`` then
    centres what ``op`` writes."""
    if op.kind != "affine" or set(op.params) != {"scale"}:
        return None
    w = graph.producer(op.inputs[0])
    if w is None or not SPECS[w.kind].writes_stream or graph.consumers(w.output) != [op]:
        return None
    if not all(_carries(c) for c in graph.consumers(op.output)):
        return None
    return w


def _carries(op: Op) -> bool:
    return SPECS[op.kind].carries_stream


def _norm_readers(graph: Graph, norm: Op) -> tuple[list[Op], list[str]]:
    """The linears reading ``norm``'s output (through token picks such as ``select``), or why
    its γ/β cannot move into them (the conversion then keeps them after the RMSNorm)."""
    found, reasons, todo = [], [], [norm.output]
    if norm.output in graph.outputs:
        reasons.append(f"norm {norm.name!r} output is a graph output: no layer to fold it into")
    while todo:
        v = todo.pop()
        for c in graph.consumers(v):
            if SPECS[c.kind].picks_tokens:
                if c.output in graph.outputs:
                    reasons.append(f"norm {norm.name!r} reaches the graph output via {c.name!r}")
                todo.append(c.output)
            elif c.kind == "linear":
                found.append(c)
            else:
                reasons.append(
                    f"norm {norm.name!r} output is read by {c.name!r} ({c.kind}), not a linear "
                    "layer, so its γ/β cannot be folded"
                )
    return found, reasons


def check(graph: Graph) -> list[str]:
    """Applicability for ``inspect``: the reasons convert-ln-to-rms does not apply (empty: it does)."""
    try:
        return find_stream(graph)[1]
    except NothingToConvert as e:
        return [str(e)]


# ---- the conversion -------------------------------------------------------------------------


@dataclass
class _Recipe:
    """How one output tensor is computed from the original model's tensors (see ``_Rewriter``).

    ``fold``: (weight, γ or None, β or None) of a reader linear; for a bias ``base`` may be None
    (created). ``centre``/``narrow``: the stream axis to centre / cut to ``d−1``; ``scale``:
    a per-channel tensor multiplied in along the stream axis first (a writer's layer scale).
    """

    base: str | None
    dtype: str
    shape: tuple[int, ...]
    fold: tuple[str, str | None, str | None] | None = None
    is_bias: bool = False
    centre: int | None = None
    scale: str | None = None
    crms_in: bool = False
    narrow: int | None = None

    def row_independent(self) -> bool:
        return self.centre in (None, 1) and self.narrow in (None, 1)


class _Rewriter:
    """Computes the converted tensors from the source model, one tensor at a time.

    Reads: a graph tensor whole, or rows ``a:b`` straight from the checkpoint file when it is
    stored as is (no slice, transpose or reshape view), so a row-blocked rewrite never holds
    its input whole. Precision: the exact tensors (the fp64 self-check) are computed in float64.
    Stored float32 tensors are computed in float32, at a quarter of float64's memory traffic:
    the fold ``W·γ`` is one product, whose float32 rounding equals the float64 product's
    (24+24 bits fit in 53); centring, the CRMS difference and the shift ``W·β`` add a few ulps
    (~1e-7 relative), the order of the original's own float32 arithmetic and far below the
    fp32 bar the self-check measures. fp16/bf16/fp64 tensors are computed in float64 and
    rounded once (centred half-precision writers with ``round_keeping_sums``). The shift is
    computed in the same pass as its weight and kept for the bias. ``finite`` checks a result
    for NaN/Inf — one ``aminmax`` on data in hand, run by the writer's thread as each tensor is
    written (beside the computing of the next), instead of a separate scan of the file.
    """

    def __init__(self, model: Model, drop: int | None = None) -> None:
        self.model = model
        self.drop = drop  # CRMS: the dropped stream coordinate (None: the last)
        # (reader weight, work dtype) -> {first row of a block: W·β for its rows}
        self.shifts: dict[tuple[str, torch.dtype], dict[int, torch.Tensor]] = {}

    def by_rows(self, name: str) -> bool:
        src = self.model.graph.tensors[name].source
        plain = src.slice is None and not src.transpose and src.reshape is None
        return plain and name not in self.model.overrides and self.model.checkpoint is not None

    def read(self, name: str, rows: slice | None) -> torch.Tensor:
        if rows is not None and self.by_rows(name):
            key = self.model.graph.tensors[name].source.key
            return self.model.checkpoint.get_rows(key, rows.start, rows.stop)
        t = self.model.tensor(name)
        return t if rows is None else t[rows]

    def finite(self, name: str, t: torch.Tensor) -> None:
        """NonFinite naming ``t`` if it holds NaN/Inf (``Conversion.explaining`` names the
        input's cause)."""
        if t.is_floating_point() and t.numel():
            # reduce in memory order: over a transposed view aminmax runs ~10x slower
            lo, hi = torch.aminmax(t.t() if t.dim() == 2 and t.stride(0) < t.stride(1) else t)
            if not (lo.isfinite() and hi.isfinite()):
                raise NonFinite(
                    f"tensor {name!r} overflows {t.dtype} when converted: refusing to write "
                    "non-finite weights",
                    self.model.checkpoint.path if self.model.checkpoint else None,
                )

    def blockwise(self, r: _Recipe) -> bool:
        """Whether ``r`` is computed in row blocks: a large tensor whose rows depend only on the
        same rows of a tensor stored as is (an embedding, an LM head), so no block needs more."""
        source = r.fold[0] if r.fold is not None else r.base
        if (r.fold is not None and r.is_bias) or source is None or not r.row_independent():
            return False
        return bool(r.shape) and r.shape[0] > BLOCK_ROWS and self.by_rows(source)

    @staticmethod
    def dtypes(r: _Recipe, exact: bool) -> tuple[torch.dtype, torch.dtype]:
        """(result dtype, arithmetic dtype): float64 when ``exact``, else the stored dtype."""
        dtype = torch.float64 if exact else DTYPES[r.dtype]
        return dtype, torch.float32 if dtype == torch.float32 else torch.float64

    def blocks(self, r: _Recipe, exact: bool) -> Iterator[torch.Tensor]:
        """The rows of a ``blockwise`` tensor, ``BLOCK_ROWS`` at a time, each read, rewritten
        and rounded on its own (γ and β are read once, into ``whole``)."""
        dtype, work = self.dtypes(r, exact)
        whole: dict[str, torch.Tensor] = {}
        for i in range(0, r.shape[0], BLOCK_ROWS):
            yield self.round(r, self.compute(r, slice(i, i + BLOCK_ROWS), work, whole), dtype)

    def tensor(self, r: _Recipe, exact: bool) -> torch.Tensor:
        """The whole tensor ``r`` describes: float64 when ``exact``, else its stored dtype.
        Computed on the source's own view, so a transposed stored weight yields a result in the
        same memory layout (the writer stores it back without a transposing copy)."""
        dtype, work = self.dtypes(r, exact)
        if self.blockwise(r):
            t = torch.empty(r.shape, dtype=dtype)
            i = 0
            for block in self.blocks(r, exact):
                t[i : i + len(block)] = block
                i += len(block)
            return t
        if r.fold is not None and r.is_bias:
            return self.round(r, self.bias(r, work), dtype)
        return self.round(r, self.compute(r, None, work, {}), dtype)

    @staticmethod
    def round(r: _Recipe, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if r.centre is not None and dtype in (torch.float16, torch.bfloat16):
            return wm.round_keeping_sums(t, dtype, r.centre)
        return t.to(dtype)

    def compute(
        self, r: _Recipe, rows: slice | None, work: torch.dtype, whole: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Rows ``rows`` (``None``: all) of the tensor ``r`` describes, in ``work`` precision
        (γ, β and tensors that cannot be read by rows are read once into ``whole``)."""

        def get(name: str, part: bool) -> torch.Tensor:
            if part and rows is not None and self.by_rows(name):
                return self.read(name, rows)
            if name not in whole:
                whole[name] = self.read(name, None)
            return whole[name] if not part or rows is None else whole[name][rows]

        if r.fold is not None:
            w_name, g_name, b_name = r.fold
            w = get(w_name, True)
            parts = self.shifts.setdefault((w_name, work), {})
            start = rows.start if rows is not None else 0
            if b_name is not None and start not in parts:  # W·β for the bias, from rows in hand
                parts[start] = w.to(work) @ get(b_name, False).to(work)
            t = w.to(work)  # keeps the source's memory layout (a transposed view stays one)
            if g_name is not None:
                gamma = get(g_name, False).to(work)
                t = t * gamma if t is w else t.mul_(gamma)  # never scale the source in place
        else:
            assert r.base is not None
            t = get(r.base, True).to(work)
        if r.scale is not None:
            assert r.centre is not None and rows is None  # writers are never row-blocked
            shape = [-1 if i == r.centre else 1 for i in range(t.dim())]
            t = t * get(r.scale, False).to(work).reshape(shape)
        if r.centre is not None:
            t = wm.centre(t, r.centre, work)
        if r.crms_in:
            t = wm.crms_reader(t, work, self.drop)
        if r.narrow is not None:
            t = wm.crms_writer(t, r.narrow, self.drop)
        return t

    def bias(self, r: _Recipe, work: torch.dtype) -> torch.Tensor:
        """A reader's new bias ``b + W·β`` (float64), with ``W·β`` in the precision its weight is
        computed in — taken from the weight's own pass when that ran (the common case: the
        writer asks for the weight first), else computed here."""
        w_name, _, b_name = r.fold
        t = self.read(r.base, None).to(torch.float64) if r.base else None
        if b_name is not None:
            parts = self.shifts.get((w_name, work), {})
            if sum(len(v) for v in parts.values()) != r.shape[0]:
                w, beta = self.read(w_name, None), self.read(b_name, None)
                parts = {0: w.to(work) @ beta.to(work)}
            shift = torch.cat([parts[k] for k in sorted(parts)]).to(torch.float64)
            t = shift if t is None else t + shift
        if t is None:  # no shift and no bias: a zero bias (only created when β exists)
            t = torch.zeros(r.shape[0], dtype=torch.float64)
        if r.centre is not None:
            t = wm.centre(t, r.centre)
        if r.narrow is not None:
            t = wm.crms_writer(t, r.narrow, self.drop)
        return t


def convert_ln_to_rms(model: Model, compressed: bool = False) -> Conversion:
    """Rewrite a Pre-LN model to Pre-RMSNorm (or Pre-CRMSNorm when ``compressed``).

    Raises NothingToConvert without LayerNorms and NormtoolError with the reasons (each naming
    the offending layer) when the model cannot be converted.
    """
    g = model.graph
    stream, reasons = find_stream(g)
    if stream is not None and compressed:
        reasons = [
            f"{why}, so it keeps its γ/β after the norm, which needs all {g.spaces[stream.space].size}"
            " stream coordinates (CRMSNorm keeps one fewer: convert without --compressed)"
            for why in stream.kept.values()
        ]
    if stream is None or reasons:
        where = model.checkpoint.path if model.checkpoint else None
        raise refusal("cannot convert to RMSNorm", reasons, where)
    new = g.copy()
    new.forget_hidden("convert-ln-to-rms folded the final norm's γ/β into the head")
    space = stream.space
    d = g.spaces[space].size
    recipes: dict[str, _Recipe] = {}

    def recipe(name: str) -> _Recipe:
        if name not in recipes:
            spec = g.tensors[name]
            recipes[name] = _Recipe(name, spec.dtype, spec.shape)
        return recipes[name]

    # 1. fold each LayerNorm's γ/β into the linears reading it; the norm becomes weightless
    created: list[str] = []
    readers: list[str] = []
    for norm in stream.norms:
        gamma, beta = norm.params.get("weight"), norm.params.get("bias")
        if norm.name in stream.kept and gamma is not None:
            _keep_affine(new, norm.name, gamma, beta)
        for lin in stream.readers[norm.name]:
            readers.append(lin.name)
            w = lin.params["weight"]
            recipe(w).fold = (w, gamma, beta)
            b = lin.params.get("bias")
            if b is None and beta is not None:
                b = f"{lin.name}.bias"
                wspec = g.tensors[w]
                new.tensors[b] = TensorSpec(
                    (wspec.shape[0],), (wspec.axes[0],), Source(b), wspec.dtype
                )
                new.op(lin.name).params["bias"] = b
                recipes[b] = _Recipe(None, wspec.dtype, (wspec.shape[0],))
                created.append(b)
            if b is not None:
                recipe(b).fold = (w, gamma, beta)
                recipes[b].is_bias = True
        new_norm = new.op(norm.name)
        new_norm.kind = "crmsnorm" if compressed else "rmsnorm"
        new_norm.params = {}
        new_norm.attrs = {"eps": norm.attrs["eps"]}

    # 2. centre every writer along the stream axis (weights and biases)
    for w_op in stream.writers:
        for t in w_op.params.values():
            axes = g.tensors[t].axes
            if space in axes:
                recipe(t).centre = axes.index(space)
                if w_op.name in stream.scaled:
                    recipe(t).scale = stream.scaled[w_op.name].params["scale"]
        if w_op.name in stream.scaled:  # the layer scale now lives in the writer's rows
            new.remove_op(stream.scaled[w_op.name].name, keep="output")

    # 3. CRMS: the stream loses its last coordinate
    if compressed:
        for name, r in recipes.items():
            axes = g.tensors[name].axes if name in g.tensors else ()
            r.narrow = r.centre
            r.crms_in = r.fold is not None and not r.is_bias and axes[1] == space
        new.spaces[space] = Space(space, d - 1, g.spaces[space].kind, g.spaces[space].heads)
        for name, spec in new.tensors.items():
            if space in spec.axes:
                shape = tuple(
                    d - 1 if a == space else s for a, s in zip(spec.axes, spec.shape, strict=True)
                )
                new.tensors[name] = replace(spec, shape=shape)

    # drop the norms' parameters; check that every tensor in the stream space is accounted for
    new.prune()
    # a kept norm's γ/β and the linears reading its output (the same values as before) stay
    kept = {
        t
        for n in stream.kept
        for op in (g.op(n), *_norm_readers(g, g.op(n))[0])
        for t in op.params.values()
    }
    for name, spec in new.tensors.items():
        if space in spec.axes and name not in recipes and name not in kept:
            raise NormtoolError(
                f"cannot convert to RMSNorm: tensor {name!r} lies in the residual stream but "
                "belongs to no writer or reader the conversion knows"
            )
        if name in recipes:
            recipes[name].shape = spec.shape  # the output shape (d−1 wide under CRMS)
    new.validate()

    untied = _untied(g, recipes)
    rw = _Rewriter(model)
    half = any(s.dtype in ("F16", "BF16") for s in g.tensors.values())
    if compressed:
        rw.drop = _dropped_coordinate(rw, stream) if half else d - 1
    lazy: dict[str, Override] = {
        n: RowBlocks(partial(rw.tensor, r, False), partial(rw.blocks, r, False))
        if rw.blockwise(r)
        else partial(rw.tensor, r, False)
        for n, r in recipes.items()
    }
    exact = {n: partial(rw.tensor, r, True) for n, r in recipes.items()}
    return Conversion(
        source=model,
        graph=new,
        tensors=lazy,
        exact_tensors=exact,
        compressed=compressed,
        norms=[n.name for n in stream.norms],
        writers=[w.name for w in stream.writers],
        readers=readers,
        created_biases=created,
        untied=untied,
        check=rw.finite,
        dropped=rw.drop,
        notes=[f"{n} keeps its γ/β after the RMSNorm ({why})" for n, why in stream.kept.items()]
        + [f"layer scale {a.name} folded into {w}" for w, a in stream.scaled.items()],
    )


def _keep_affine(graph: Graph, norm: str, gamma: str, beta: str | None) -> None:
    """Put ``norm``'s γ (and β) in an ``affine`` op after it, which takes over its output."""
    op = graph.op(norm)
    value = f"{norm}.normed"
    graph.value_spaces[value] = graph.value_spaces[op.output]
    params = {"scale": gamma} | ({"shift": beta} if beta is not None else {})
    affine = Op(f"{norm}.affine", "affine", (value,), op.output, params)
    op.output = value
    graph.ops.insert(graph.ops.index(op) + 1, affine)
    graph.reindex()


def _dropped_coordinate(rw: _Rewriter, stream: Stream) -> int:
    """The stream coordinate CRMS drops in an fp16/bf16 checkpoint: ``wm.crms_drop_index`` over
    every reader's weight with its norm's γ folded in (read in row blocks where stored plainly).

    Why only there: in fp32 the rounding the choice reduces is far below the fp32 bar, and the
    last coordinate (DESIGN §3.2's default) costs no extra read of the readers.
    """
    energies = []
    for norm in stream.norms:
        g_name = norm.params.get("weight")
        gamma = rw.read(g_name, None).to(torch.float64) if g_name else None
        for lin in stream.readers[norm.name]:
            w_name = lin.params["weight"]
            whole = None if rw.by_rows(w_name) else rw.read(w_name, None)
            n = rw.model.graph.tensors[w_name].shape[0]
            e = torch.zeros(())
            for i in range(0, n, BLOCK_ROWS):
                rows = slice(i, i + BLOCK_ROWS)
                w = (rw.read(w_name, rows) if whole is None else whole[rows]).to(torch.float64)
                e = e + wm.crms_column_energy(w if gamma is None else w * gamma)
            energies.append(e)
    return wm.crms_drop_index(energies)


def _untied(g: Graph, recipes: dict[str, _Recipe]) -> list[tuple[str, str]]:
    """Pairs (changed tensor, tensor it shared storage with): each now gets its own tensor."""
    by_source: dict[Source, list[str]] = {}
    for name, spec in g.tensors.items():
        by_source.setdefault(spec.source, []).append(name)
    pairs = []
    for names in by_source.values():
        if len(names) > 1 and any(n in recipes for n in names):
            first = names[0]
            pairs += [(n, first) for n in names[1:]]
    return pairs
