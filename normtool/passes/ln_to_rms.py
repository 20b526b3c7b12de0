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
summed into it (centrable when ``writes_stream``), readers are every other consumer. Tensors are
planned as recipes on the shared engine (``normtool.passes.recipes``), so writing a converted
multi-GB checkpoint holds one tensor (in row blocks for the big ones) at a time.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from normtool.errors import NormtoolError
from normtool.graph import Graph, Op, Source, Space, TensorSpec
from normtool.model import Model
from normtool.opspec import SPECS
from normtool.passes import weight_math as wm
from normtool.passes.recipes import BLOCK_ROWS, F64, Ctx, Engine, Recipe
from normtool.passes.rewrite import Rewrite
from normtool.refusal import refusal


class NothingToConvert(NormtoolError):
    """The model has no LayerNorm: a refusal of its own, reported as "nothing to convert"."""


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
        found, why = norm_readers(graph, o)
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


def norm_readers(graph: Graph, norm: Op) -> tuple[list[Op], list[str]]:
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
#
# Precision (``Recipe.precision = "stored"``): the exact tensors (the fp64 self-check) are
# computed in float64. Stored float32 tensors are computed in float32, at a quarter of float64's
# memory traffic: the fold ``W·γ`` is one product, whose float32 rounding equals the float64
# product's (24+24 bits fit in 53); centring, the CRMS difference and the shift ``W·β`` add a few
# ulps (~1e-7 relative), the order of the original's own float32 arithmetic and far below the
# fp32 bar the self-check measures. fp16/bf16/fp64 tensors are computed in float64 and rounded
# once (centred half-precision writers keeping their sums). The shift ``W·β`` is computed in the
# same pass as its weight and kept (``Ctx.memo``) for the bias.


@dataclass
class _Plan:
    """How one output tensor is computed from the source's tensors.

    ``fold``: (weight, γ or None, β or None) of a reader linear; for a bias ``base`` may be None
    (created). ``centre``/``narrow``: the stream axis to centre / cut to ``d−1``; ``scale``:
    a per-channel tensor multiplied in along the stream axis first (a writer's layer scale);
    ``crms_in``: a reader absorbing the dropped coordinate.
    """

    base: str | None
    fold: tuple[str, str | None, str | None] | None = None
    is_bias: bool = False
    centre: int | None = None
    scale: str | None = None
    crms_in: bool = False
    narrow: int | None = None

    def rows_from(self) -> str | None:
        """The input whose rows the result's follow (None: not row-separable)."""
        if self.is_bias or self.centre not in (None, 1) or self.narrow not in (None, 1):
            return None
        if self.scale is not None:
            return None
        return self.fold[0] if self.fold is not None else self.base


@dataclass
class _Converter:
    """Recipe functions of the conversion; ``drop`` is the CRMS coordinate dropped (None: the
    last), settled after planning (fp16/bf16: from the readers' weights)."""

    drop: int | None = None

    def compute(self, r: _Plan, ctx: Ctx) -> torch.Tensor:
        """The tensor ``r`` describes (``ctx.rows`` of it), in ``ctx.work`` precision."""
        work = ctx.work
        if r.fold is not None:
            w_name, g_name, b_name = r.fold
            w = ctx.get(w_name)
            parts = ctx.memo.setdefault((w_name, work), {})
            if b_name is not None and ctx.start not in parts:  # W·β for the bias, rows in hand
                parts[ctx.start] = w.to(work) @ ctx.get(b_name, False).to(work)
            t = w.to(work)  # keeps the source's memory layout (a transposed view stays one)
            if g_name is not None:
                gamma = ctx.get(g_name, False).to(work)
                t = t * gamma if t is w else t.mul_(gamma)  # never scale the source in place
        else:
            assert r.base is not None
            t = ctx.get(r.base).to(work)
        if r.scale is not None:
            assert r.centre is not None and ctx.rows is None  # never row-blocked (rows_from)
            shape = [-1 if i == r.centre else 1 for i in range(t.dim())]
            t = t * ctx.get(r.scale, False).to(work).reshape(shape)
        if r.centre is not None:
            t = wm.centre(t, r.centre, work)
        if r.crms_in:
            t = wm.crms_reader(t, work, self.drop)
        if r.narrow is not None:
            t = wm.crms_writer(t, r.narrow, self.drop)
        return t

    def bias(self, r: _Plan, rows: int, ctx: Ctx) -> torch.Tensor:
        """A reader's new bias ``b + W·β`` (float64), with ``W·β`` in the precision its weight is
        computed in — taken from the weight's own computation when that ran (the common case:
        the writer asks for the weight first), else computed here."""
        w_name, _, b_name = r.fold
        t = ctx.get(r.base, False).to(torch.float64) if r.base else None
        if b_name is not None:
            parts = ctx.memo.get((w_name, ctx.work), {})
            if sum(len(v) for v in parts.values()) != rows:
                w, beta = ctx.get(w_name, False), ctx.get(b_name, False)
                parts = {0: w.to(ctx.work) @ beta.to(ctx.work)}
            shift = torch.cat([parts[k] for k in sorted(parts)]).to(torch.float64)
            t = shift if t is None else t + shift
        if t is None:  # no shift and no bias: a zero bias (only created when β exists)
            t = torch.zeros(rows, dtype=torch.float64)
        if r.centre is not None:
            t = wm.centre(t, r.centre)
        if r.narrow is not None:
            t = wm.crms_writer(t, r.narrow, self.drop)
        return t


def convert_ln_to_rms(model: Model, compressed: bool = False) -> Rewrite:
    """Plan Pre-LN → Pre-RMSNorm (or Pre-CRMSNorm when ``compressed``) of ``model``.

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
    conv = _Converter()
    engine = Engine(model)
    plans: dict[str, _Plan] = {}

    def plan(name: str) -> _Plan:
        return plans.setdefault(name, _Plan(name))

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
            plan(w).fold = (w, gamma, beta)
            b = lin.params.get("bias")
            if b is None and beta is not None:
                b = f"{lin.name}.bias"
                wspec = g.tensors[w]
                new.tensors[b] = TensorSpec(
                    (wspec.shape[0],), (wspec.axes[0],), Source(b), wspec.dtype
                )
                new.op(lin.name).params["bias"] = b
                plans[b] = _Plan(None)
                created.append(b)
            if b is not None:
                plan(b).fold = (w, gamma, beta)
                plans[b].is_bias = True
        new_norm = new.op(norm.name)
        new_norm.kind = "crmsnorm" if compressed else "rmsnorm"
        new_norm.params = {}
        new_norm.attrs = {"eps": norm.attrs["eps"]}

    # 2. centre every writer along the stream axis (weights and biases)
    for w_op in stream.writers:
        for t in w_op.params.values():
            axes = g.tensors[t].axes
            if space in axes:
                plan(t).centre = axes.index(space)
                if w_op.name in stream.scaled:
                    plan(t).scale = stream.scaled[w_op.name].params["scale"]
        if w_op.name in stream.scaled:  # the layer scale now lives in the writer's rows
            new.remove_op(stream.scaled[w_op.name].name, keep="output")

    # 3. CRMS: the stream loses its last coordinate
    if compressed:
        for name, r in plans.items():
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
        for op in (g.op(n), *norm_readers(g, g.op(n))[0])
        for t in op.params.values()
    }
    for name, spec in new.tensors.items():
        if space in spec.axes and name not in plans and name not in kept:
            raise NormtoolError(
                f"cannot convert to RMSNorm: tensor {name!r} lies in the residual stream but "
                "belongs to no writer or reader the conversion knows"
            )
    new.validate()
    for name, r in plans.items():
        spec = new.tensors[name]  # the output shape (d−1 wide under CRMS)
        if r.fold is not None and r.is_bias:
            fn = partial(conv.bias, r, spec.shape[0])
        else:
            fn = partial(conv.compute, r)
        engine.put(name, Recipe(spec.shape, spec.dtype, fn, r.rows_from(), centre=r.centre))

    half = any(s.dtype in ("F16", "BF16") for s in g.tensors.values())
    if compressed:
        conv.drop = _dropped_coordinate(engine, stream) if half else d - 1
    untied = _untied(g, plans)
    kind = "CRMSNorm" if compressed else "RMSNorm"
    summary = (
        f"{len(stream.norms)} LayerNorms -> {kind}; folded into {len(readers)} reader "
        f"linears ({len(created)} biases created); centred {len(stream.writers)} stream writers"
    )
    if conv.drop is not None:
        summary += f"; stream coordinate {conv.drop} dropped"
    for a, b in untied:
        summary += f"; untied {a} from {b}"
    report = {
        "norm": "crmsnorm" if compressed else "rmsnorm",
        "dropped_coordinate": conv.drop,
        "norms": [n.name for n in stream.norms],
        "readers": readers,
        "writers": [w.name for w in stream.writers],
        "created_biases": created,
        "untied": [{"tensor": a, "was_tied_to": b} for a, b in untied],
    }
    notes = [f"{n} keeps its γ/β after the RMSNorm ({why})" for n, why in stream.kept.items()]
    notes += [f"layer scale {a.name} folded into {w}" for w, a in stream.scaled.items()]
    report["notes"] = notes

    def explain(bad: list[str]) -> list[str]:
        if compressed and any(" RMS error " in b for b in bad):
            return [
                "CRMS in fp16/bf16 carries the rounding of every stored stream coordinate "
                "into the implied one; plain RMSNorm (without --compressed) does not"
            ]
        return []

    return Rewrite(
        "convert-ln-to-rms",
        {"compressed": compressed},
        new,
        engine,
        summary,
        report,
        [f"untied {a} from {b}: each is now its own tensor" for a, b in untied] + notes,
        explain=explain,
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


def _dropped_coordinate(engine: Engine, stream: Stream) -> int:
    """The stream coordinate CRMS drops in an fp16/bf16 checkpoint: ``wm.crms_drop_index`` over
    every reader's weight with its norm's γ folded in (read in row blocks where stored plainly).

    Why only there: in fp32 the rounding the choice reduces is far below the fp32 bar, and the
    last coordinate (DESIGN §3.2's default) costs no extra read of the readers.
    """
    energies = []
    for norm in stream.norms:
        g_name = norm.params.get("weight")
        gamma = engine.read(g_name, None, F64).to(F64) if g_name else None
        for lin in stream.readers[norm.name]:
            w_name = lin.params["weight"]
            whole = None if engine.by_rows(w_name) else engine.source.tensor(w_name)
            n = engine.source.graph.tensors[w_name].shape[0]
            e = torch.zeros(())
            for i in range(0, n, BLOCK_ROWS):
                rows = slice(i, i + BLOCK_ROWS)
                w = (engine.read(w_name, rows, F64) if whole is None else whole[rows]).to(F64)
                e = e + wm.crms_column_energy(w if gamma is None else w * gamma)
            energies.append(e)
    return wm.crms_drop_index(energies)


def _untied(g: Graph, changed: Collection[str]) -> list[tuple[str, str]]:
    """Pairs (changed tensor, tensor it shared storage with): each now gets its own tensor."""
    by_source: dict[Source, list[str]] = {}
    for name, spec in g.tensors.items():
        by_source.setdefault(spec.source, []).append(name)
    pairs = []
    for names in by_source.values():
        if len(names) > 1 and any(n in changed for n in names):
            first = names[0]
            pairs += [(n, first) for n in names[1:]]
    return pairs


@dataclass(frozen=True)
class ConvertLnToRms:
    """The pass: ``compressed`` gives Pre-CRMSNorm."""

    compressed: bool = False
    name: str = "convert-ln-to-rms"

    def applicability(self, graph: Graph) -> list[str]:
        return check(graph)

    def plan(self, model: Model) -> Rewrite:
        return convert_ln_to_rms(model, self.compressed)
