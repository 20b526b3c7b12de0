"""The fold pass: remove norms whose inference map is a per-channel affine (DESIGN §3.1).

Inference maps (``y = s ⊙ x + t`` per channel; ``x`` first group-RMS-scaled for PowerNorm):

* Unified Normalization (``unorm``): ``s = γ/√(running_var + eps)``, ``t = β`` (no mean);
* PowerNorm (``powernorm``): ``s = γ/√(running_phi + eps)``, ``t = β``; the group RMS scaling is
  not affine and stays as a weightless ``group_rmsnorm`` (``rmsnorm`` with one group);
* BatchNorm (``batchnorm``): ``s = γ/√(running_var + eps)``, ``t = β − running_mean ⊙ s``.

Weight Standardization (``ws_conv2d``, selector ``ws``) is baked first: the conv's standardised
weight ``Ŵ`` (its variant's eps placement, ``normtool.nn.ws_conv``) is computed in float64 from
the stored weight and the op becomes a plain ``conv2d``, so a BatchNorm after it then folds
backward like any Conv-BN — ``Ŵ`` and ``diag(s)`` compose in float64 and the result is rounded
once. Without ``ws`` selected, a BatchNorm right after a WS conv is skipped with that reason:
``--only`` names what may change, and its map cannot go into a weight that is re-standardised
(a per-channel scale of ``W`` is divided out again).

How a norm leaves the graph, tried in this order:

1. backward — its input is written by a linear/conv layer that nothing else reads: the layer
   absorbs the map (``W' = diag(s)·W``, ``b' = s⊙b + t``), exact for grouped convs too;
2. forward and re-based — the map becomes part of the representation ``x = D ⊙ u + e`` of the
   values downstream (``normtool.passes.rebase``). Linear readers absorb it (creating biases),
   token selection and average pooling carry it, residual adds re-base it by rescaling the
   branch's last layer (Post-Norm: the skip path too), the final consumer absorbs what is left.

Anything else the map would reach — an activation, attention, a kept norm, a conv that pads
with zeros while a shift is pending, a graph output, a zero in ``D`` at an add — blocks it. The
planner then keeps the norms whose map was blocked, with that reason, and plans again until
the plan goes through; so one refusal never silently breaks the rest, and a kept norm in a
Post-Norm stream keeps the norms upstream of it too (they would have to pass through it).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import torch

from normtool.analysis import norm_placement
from normtool.errors import NormtoolError
from normtool.finite import require_finite
from normtool.graph import Graph, Op, Source, TensorSpec
from normtool.inputs import max_seq, random_inputs
from normtool.io.safetensors_format import DTYPES
from normtool.model import Model
from normtool.nn.ws_conv import standardize_weight, ws_problem
from normtool.opspec import SPECS
from normtool.passes.rebase import (
    F64,
    IDENTITY,
    Rep,
    at_add,
    fold_backward,
    fold_forward_conv,
    through_norm,
)
from normtool.passes.recipes import Ctx, Engine, Recipe
from normtool.passes.rewrite import Rewrite
from normtool.passes.weight_math import fold_forward
from normtool.refusal import refusal
from normtool.runtime.torch_exec import run_graph

#: ``--only`` selector → graph op kind.
SELECTORS: dict[str, str] = {
    "un": "unorm",
    "powernorm": "powernorm",
    "batchnorm": "batchnorm",
    "ws": "ws_conv2d",
}
#: The skip reason of a norm ``--only`` leaves out.
NOT_SELECTED = "not selected by --only"
FP16_MAX = float(torch.finfo(torch.float16).max)
#: Headroom asked of a re-based fp16 stream: the check sees seeded random inputs, not every
#: input, so its peak must stay 4× below the fp16 limit.
FP16_HEADROOM = 4.0


@dataclass
class FoldedNorm:
    name: str
    kind: str
    placement: str
    how: str  # "backward" | "forward" | "re-based"
    into: list[str]
    kept: str | None = None  # what remains of it (PowerNorm: the weightless group RMS)


@dataclass
class SkippedNorm:
    name: str
    kind: str
    reason: str


@dataclass
class BakedConv:
    name: str
    variant: str  # "var" | "std": where eps sits (normtool.nn.ws_conv)
    eps: float


class _Blocked(Exception):
    """A planned map cannot go on: keep ``norms`` (the folded norms it came from)."""

    def __init__(self, norms: Collection[str], reason: str) -> None:
        super().__init__(reason)
        self.norms = frozenset(norms)
        self.reason = reason


# ---- inference maps -------------------------------------------------------------------------
def inference_map(
    op: Op, tensor: Callable[[str], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` in float64 for a UN / PowerNorm / BatchNorm op; NormtoolError with the reason
    when its parameters cannot define one (NaN/Inf, wrong size, non-positive variance)."""
    p = {role: tensor(name).to(F64) for role, name in op.params.items()}
    for role, v in p.items():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise NormtoolError(f"{role} has {bad} NaN/Inf value(s)")
    stat = "running_phi" if op.kind == "powernorm" else "running_var"
    var = p[stat].reshape(-1)
    if var.numel() != p["weight"].numel():
        raise NormtoolError(f"{stat} has {var.numel()} values for {p['weight'].numel()} channels")
    eps = float(op.attrs["eps"])
    if (var + eps <= 0).any():
        raise NormtoolError(f"{stat} + eps ≤ 0 in {int((var + eps <= 0).sum())} channel(s)")
    s = p["weight"] / torch.sqrt(var + eps)
    t = p["bias"] - p["running_mean"] * s if op.kind == "batchnorm" else p["bias"]
    return s, t


def _foldable(op: Op) -> bool:
    """A norm fold removes: a per-channel affine map at inference (``ws_conv2d`` is a conv,
    baked, not a norm that leaves the graph)."""
    return SPECS[op.kind].affine_at_inference


def _sole_reader(graph: Graph, value: str, op: Op) -> bool:
    return [c.name for c in graph.consumers(value)] == [op.name]


def _not_foldable_reason(op: Op) -> str:
    if op.kind == "group_rmsnorm":
        return "a weightless group RMS scaling (already folded)"
    also = "; convert-ln-to-rms handles LayerNorm" if op.kind == "layernorm" else ""
    return f"{op.kind} uses each token's own statistics, not a fixed affine map{also}"


def _nothing_foldable(graph: Graph) -> str | None:
    """The one reason fold does not apply when the graph holds nothing of a foldable kind
    (None when it does), naming the norms it has instead: computed from the graph, so it
    never speaks of convolutions or norms the model lacks."""
    if any(_foldable(o) or o.kind == "ws_conv2d" for o in graph.ops):
        return None
    kinds = Counter(o.kind for o in graph.ops if SPECS[o.kind].norm)
    has = ", ".join(f"{k} ×{n}" for k, n in kinds.items()) or "none"
    also = ""
    if "layernorm2d" in kinds:
        also = "; LayerNorm over channels uses each pixel's own statistics, no fixed affine map"
    elif "layernorm" in kinds:
        also = "; convert-ln-to-rms handles LayerNorm"
    return f"no UN, PowerNorm, BatchNorm or WS conv (norms: {has}{also})"


def ws_note(graph: Graph) -> str:
    """Why ``--only ws`` bakes nothing, from what the graph has."""
    convs = sum(1 for o in graph.ops if o.kind == "conv2d")
    plain = f"its {convs} convolutions store plain weights" if convs else "the graph has no conv"
    return f"ws: nothing to bake — no ws_conv2d; {plain}"


def _ordered(notes: list[str], skips: list[SkippedNorm]) -> list[str]:
    """Why nothing folds, most telling first: the answers to an explicit ``--only`` request,
    then the norms that could not fold, then those ``--only`` left out (the user knows why)."""
    chosen = [f"{s.name}: {s.reason}" for s in skips if s.reason != NOT_SELECTED]
    left_out = [f"{s.name}: {s.reason}" for s in skips if s.reason == NOT_SELECTED]
    return [*notes, *chosen, *left_out]


# ---- planning -------------------------------------------------------------------------------
@dataclass
class _Plan:
    actions: list[tuple]
    folded: dict[str, FoldedNorm]
    scales: list[torch.Tensor]


def _describe(op: Op, folding: set[str]) -> str:
    if SPECS[op.kind].norm and op.name not in folding:
        return f"the kept norm {op.name} ({op.kind}), which must see the exact values"
    if op.kind == "act":
        return f"{op.name} (activation {op.attrs.get('fn')}), which is not linear"
    if op.kind == "ws_conv2d":
        return f"{op.name} (ws_conv2d), which re-standardises its weight (select ws to bake it)"
    return f"{op.name} ({op.kind}), which is not a linear layer"


def _walk(
    graph: Graph,
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
    folding: set[str],
) -> _Plan:
    """One pass over the ops, following every folded map downstream; raises _Blocked."""
    reps: dict[str, Rep] = {}
    writer: dict[str, Op] = {}  # value → the linear/conv that now writes it
    actions: list[tuple] = []
    folded: dict[str, FoldedNorm] = {}
    scales: list[torch.Tensor] = []

    def rep(v: str) -> Rep:
        return reps.get(v, IDENTITY)

    def absorbed(r: Rep, into: str) -> None:
        for n in r.norms:
            folded[n].into.append(into)

    for op in graph.ops:
        if SPECS[op.kind].absorbs_affine:
            writer[op.output] = op
        ins = [rep(v) for v in op.inputs]
        if op.name in folding:
            s, t = maps[op.name]
            src = op.inputs[0]
            prod = writer.get(src)
            info = FoldedNorm(op.name, op.kind, norm_placement(graph, op), "forward", [])
            folded[op.name] = info
            if op.kind != "powernorm" and prod is not None and _sole_reader(graph, src, op):
                info.how, info.into = "backward", [prod.name]
                actions.append(("backward", prod, op, s, t))
                writer[op.output] = prod
                continue
            if op.kind == "powernorm":
                if not ins[0].identity:
                    raise _Blocked(
                        ins[0].norms,
                        f"its affine map would reach {op.name} "
                        "(PowerNorm), whose group RMS must see the exact values",
                    )
                groups = int(op.attrs["groups"])
                info.kept = "rmsnorm" if groups == 1 else f"group_rmsnorm(groups={groups})"
                actions.append(("group_rms", op))
                reps[op.output] = through_norm(IDENTITY, op.name, s, t)
            else:
                actions.append(("remove", op))
                reps[op.output] = through_norm(ins[0], op.name, s, t)
            continue
        if all(r.identity for r in ins):
            continue
        r = ins[0]
        if op.kind == "linear":
            actions.append(("absorb", op, r))
            absorbed(r, op.name)
        elif op.kind == "conv2d":
            pad = op.attrs.get("padding", 0)
            if pad not in (0, [0, 0], (0, 0)) and r.shift is not None and bool(r.shift.any()):
                raise _Blocked(
                    r.norms,
                    f"its shift would reach {op.name}, a conv with zero "
                    f"padding {pad}: inexact at the borders",
                )
            actions.append(("absorb_conv", op, r))
            absorbed(r, op.name)
        elif (commutes := SPECS[op.kind].commutes_affine) == "always" or (
            commutes == "positive" and (r.scale is None or bool((r.scale > 0).all()))
        ):  # per-channel maps commute with picking a token, averaging, max of positive scales
            reps[op.output] = r
        elif op.kind == "add":
            n_actions = len(actions)
            reps[op.output] = _plan_add(graph, op, ins, writer, maps, actions, scales)
            rescaled = [f"{a[1].name} (rescaled)" for a in actions[n_actions:]]
            for n in reps[op.output].norms:
                folded[n].how = "re-based"
                folded[n].into.extend(rescaled)
        else:
            bad = frozenset().union(*(x.norms for x in ins))
            raise _Blocked(bad, f"its affine map would reach {_describe(op, folding)}")
    for out in graph.outputs:
        if not rep(out).identity:
            raise _Blocked(
                rep(out).norms,
                f"its affine map would reach the graph output {out!r} "
                "with no linear layer to absorb it",
            )
    return _Plan(actions, folded, scales)


def _plan_add(
    graph: Graph,
    op: Op,
    ins: list[Rep],
    writer: dict[str, Op | None],
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
    actions: list[tuple],
    scales: list[torch.Tensor],
) -> Rep:
    """Re-base a residual add: the branch whose last layer only feeds this add is rescaled."""

    def rescalable(i: int) -> bool:
        v = op.inputs[i]
        return writer.get(v) is not None and _sole_reader(graph, v, op)

    # prefer rescaling an identity branch (Post-Norm: the sublayer's output projection)
    order = sorted((i for i in (1, 0) if rescalable(i)), key=lambda i: not ins[i].identity)
    if not order:
        raise _Blocked(
            ins[0].norms | ins[1].norms,
            f"its affine map would reach the add {op.name}, and neither of its inputs is written "
            "by a layer that could be rescaled",
        )
    b = order[0]
    skip, branch = ins[1 - b], ins[b]
    if skip.scale is not None and not bool(skip.scale.all()):
        zero = ~skip.scale.to(torch.bool)
        culprits = [n for n in skip.norms if not bool(maps[n][0][zero].all())]
        n_zero = int(zero.sum())
        reason = (
            f"zero scale (γ = 0 in {n_zero} channel(s)): re-basing the residual stream at "
            f"{op.name} divides by it"
            if culprits
            else f"the accumulated residual scale underflows to 0 at {op.name}"
        )
        raise _Blocked(culprits or skip.norms, reason)
    out, ratio = at_add(skip, branch)
    if ratio is not None:
        actions.append(("rescale", writer[op.inputs[b]], ratio))
    if out.scale is not None:
        scales.append(out.scale.abs())
    return out


def plan(
    graph: Graph, maps: dict[str, tuple[torch.Tensor, torch.Tensor]], candidates: set[str]
) -> tuple[_Plan, dict[str, str]]:
    """Plan the largest exact fold: drop blocked norms (with their reason) until it goes through."""
    folding, kept = set(candidates), {}
    while True:
        try:
            return _walk(graph, maps, folding), kept
        except _Blocked as b:
            hit = b.norms & folding
            if not hit:  # an op kind this planner does not know blocks nothing folded: a bug
                raise RuntimeError(f"fold planner blocked without culprits: {b.reason}") from b
            for n in hit:
                kept[n] = b.reason
            folding -= hit


# ---- applying the plan ----------------------------------------------------------------------
#: A formula of the weight math: (weight, bias, *vectors) → (new weight, new bias), in float64.
Formula = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _affine(
    fn: Formula,
    w: str,
    b: str | None,
    vecs: tuple[torch.Tensor | None, ...],
    per_row: bool,
    pick: int,
    ctx: Ctx,
) -> torch.Tensor:
    """Recipe function: output ``pick`` (0 weight, 1 bias) of ``fn(weight, bias, *vecs)`` for the
    rows in ``ctx`` (``per_row``: the vectors run along the output rows and are cut with them)."""
    rows = ctx.rows
    vs = [v[rows] if per_row and rows is not None and v is not None else v for v in vecs]
    bias = None if b is None else ctx.get(b).to(F64)
    return fn(ctx.get(w).to(F64), bias, *vs)[pick]


class _Editor:
    """Puts the recipes of rewritten tensors on the engine; unties shared tensors on write.

    Every recipe is computed in float64 and rounded once (``precision="f64"``): a fold composes
    several maps (a rescale at one add, an absorbed map at the next, a baked standardisation),
    each reading the previous version of the tensor unrounded (``Engine.current``).
    """

    def __init__(self, engine: Engine, graph: Graph) -> None:
        self.engine, self.graph = engine, graph
        self.untied: list[str] = []

    def _users(self, name: str) -> list[tuple[Op, str]]:
        return [(o, r) for o in self.graph.ops for r, t in o.params.items() if t == name]

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.graph.tensors:
            name, i = f"{base}.{i}", i + 1
        return name

    def target(self, op: Op, role: str) -> str:
        """The tensor a new value of ``op``'s ``role`` goes to: its own, a created bias (in the
        output space of the weight), or an untied copy when another op shares it."""
        name = op.params.get(role)
        if name is None:
            w = self.graph.tensors[op.params["weight"]]
            name = self._fresh(f"{op.name}.{role}")
            self.graph.tensors[name] = TensorSpec(
                (w.shape[0],), (w.axes[0],), Source(name), w.dtype
            )
        elif len(self._users(name)) > 1:
            new = self._fresh(f"{op.name}.{role}")
            self.graph.tensors[new] = replace(self.graph.tensors[name], source=Source(new))
            self.untied.append(f"{name} (shared) untied: {op.name} now has its own copy {new}")
            name = new
        op.params[role] = name
        return name

    def put(self, name: str, fn: Callable[[Ctx], torch.Tensor], rows_from: str | None) -> None:
        spec = self.graph.tensors[name]
        self.engine.put(name, Recipe(spec.shape, spec.dtype, fn, rows_from, precision="f64"))

    def rewrite(
        self,
        op: Op,
        fn: Formula,
        vecs: tuple[torch.Tensor | None, ...],
        per_row: bool | None,
        shift: torch.Tensor | None,
    ) -> None:
        """Replace the op's weight (and bias) by ``fn``'s results; a bias appears when
        ``shift`` is given. ``per_row`` False: the result's rows depend only on the same rows of
        weight and bias (forward fold: ``vecs`` run along the input axis); True: also on the same
        rows of ``vecs`` (backward fold and rescale); None: not row-separable (grouped convs)."""
        w = self.engine.current(op.params["weight"])
        b = op.params.get("bias")
        b = None if b is None else self.engine.current(b)
        rows_from = None if per_row is None else w
        weight = functools.partial(_affine, fn, w, b, vecs, bool(per_row), 0)
        self.put(self.target(op, "weight"), weight, rows_from)
        if b is not None or shift is not None:
            bias = functools.partial(_affine, fn, w, b, vecs, bool(per_row), 1)
            self.put(self.target(op, "bias"), bias, rows_from)

    def bake(self, op: Op, variant: str, eps: float) -> None:
        """The WS conv's weight as its standardised ``Ŵ`` (float64, rounded once when written)."""
        w = self.engine.current(op.params["weight"])
        self.put(self.target(op, "weight"), functools.partial(_standardized, w, variant, eps), None)


def _standardized(w: str, variant: str, eps: float, ctx: Ctx) -> torch.Tensor:
    return standardize_weight(ctx.get(w).to(F64), variant, eps)


def _apply(ed: _Editor, p: _Plan) -> None:
    """Edit ``ed.graph`` and put the rewritten tensors' recipes as the plan says."""
    g = ed.graph
    if p.actions:
        g.forget_hidden("fold moved norm affines into the layers around them")
    for action in p.actions:
        kind, op = action[0], g.op(action[1].name)
        if kind == "absorb":
            r: Rep = action[2]
            cols = g.tensors[op.params["weight"]].shape[1]
            scale = torch.ones(cols, dtype=F64) if r.scale is None else r.scale
            ed.rewrite(op, fold_forward, (scale, r.shift), False, r.shift)
        elif kind == "absorb_conv":
            r = action[2]
            groups = int(op.attrs.get("groups", 1))
            channels = g.tensors[op.params["weight"]].shape[1] * groups
            scale = torch.ones(channels, dtype=F64) if r.scale is None else r.scale
            conv = functools.partial(fold_forward_conv, groups=groups)
            ed.rewrite(op, conv, (scale, r.shift), None, r.shift)
        elif kind in ("backward", "rescale"):
            s, t = (action[3], action[4]) if kind == "backward" else (action[2], None)
            ed.rewrite(op, fold_backward, (s, t), True, t)
            if kind == "backward":  # the layer now writes the norm's value
                g.remove_op(action[2].name, keep="output")
        elif kind == "remove":
            g.remove_op(op.name)
        elif kind == "group_rms":
            groups = int(op.attrs["groups"])
            eps = float(op.attrs["gs_eps"])
            op.kind = "rmsnorm" if groups == 1 else "group_rmsnorm"
            op.attrs = {"eps": eps} if groups == 1 else {"groups": groups, "eps": eps}
            op.params = {}
    g.prune()
    g.validate()


def bake_ws(model: Model, ed: _Editor) -> list[BakedConv]:
    """Every ``ws_conv2d`` of ``ed.graph`` as a plain ``conv2d`` holding its standardised weight
    (a float64 recipe, so later folds compose with it unrounded). NormtoolError for attrs that
    define no ``Ŵ``."""
    baked: list[BakedConv] = []
    for op in list(ed.graph.ops_of("ws_conv2d")):
        variant, eps = op.attrs.pop("variant"), op.attrs.pop("eps")
        fan_in = math.prod(ed.graph.tensors[op.params["weight"]].shape[1:])
        problem = ws_problem(variant, eps, fan_in)
        if problem:
            where = model.checkpoint.path if model.checkpoint else None
            raise NormtoolError(f"{op.name}: {problem}", where)
        ed.bake(op, variant, float(eps))
        op.kind = "conv2d"
        baked.append(BakedConv(op.name, variant, float(eps)))
    return baked


def _check_rounded(model: Model, engine: Engine, graph: Graph) -> None:
    """Refuse a rewritten tensor that overflows its stored dtype — each computed once here, one
    at a time, so an overflow is refused with its cause before the self-check."""
    for name in graph.tensors:
        if name not in engine.recipes:
            continue
        dtype = DTYPES[graph.tensors[name].dtype]
        if not bool(torch.isfinite(engine.tensor(name, exact=False)).all()):
            raise NormtoolError(
                f"refused: folding makes {name} overflow {dtype} (the re-based scales are too "
                "extreme for it); a float32 copy of the checkpoint keeps the stream in range",
                model.checkpoint.path if model.checkpoint else None,
            )


def peak_activation(graph: Graph, weights, inputs: dict[str, torch.Tensor]) -> float:
    """Largest |value| of any float activation of ``graph`` on ``inputs``, run in float32."""
    g = graph.copy()
    g.outputs = [o.output for o in g.ops]
    vals = run_graph(g, weights, inputs, dtype=torch.float32)
    return max(float(v.abs().max()) for v in vals.values() if v.is_floating_point() and v.numel())


# ---- the pass -------------------------------------------------------------------------------
def _selected(only: Collection[str]) -> set[str]:
    bad = sorted(set(only) - set(SELECTORS))
    if bad:
        raise NormtoolError(f"--only: unknown kind(s) {bad}; choose from {', '.join(SELECTORS)}")
    return {SELECTORS[k] for k in only}


def _after_ws(graph: Graph, op: Op) -> str | None:
    """Why a BatchNorm right after an unbaked WS conv stays (None: it does not follow one)."""
    prod = graph.producer(op.inputs[0])
    if prod is None or prod.kind != "ws_conv2d":
        return None
    # short (a refusal shows the first reason in one line): the conv re-standardises its weight,
    # so a BatchNorm's scale folded into it would be divided out again
    return f"after WS conv {prod.name}: add ws to --only"


def fold_norms(model: Model, only: Collection[str] | None = None) -> Rewrite:
    """Plan: bake every selected WS conv, then fold every selected UN / PowerNorm / BatchNorm
    that can be folded exactly. ``only``: the ``SELECTORS`` keys to act on (None: all of them;
    an explicit ``ws`` without a WS conv gets a note saying so).

    The Rewrite reports what was baked, folded or skipped, with reasons (``report``).
    NormtoolError when nothing can be baked or folded.
    """
    where = model.checkpoint.path if model.checkpoint else None
    kinds = _selected(SELECTORS if only is None else only)
    has_ws = any(model.graph.ops_of("ws_conv2d"))
    engine = Engine(model)
    ed = _Editor(engine, model.graph.copy())
    baked = bake_ws(model, ed) if "ws_conv2d" in kinds and has_ws else []
    g = ed.graph
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    skipped: dict[str, str] = {}
    for op in g.ops:
        if not SPECS[op.kind].norm:
            continue
        if not _foldable(op):
            skipped[op.name] = _not_foldable_reason(op)
        elif op.kind not in kinds:
            skipped[op.name] = NOT_SELECTED
        elif reason := _after_ws(g, op):
            skipped[op.name] = reason
        else:
            try:
                maps[op.name] = inference_map(op, model.tensor)
            except NormtoolError as e:  # broken statistics break the model, not just the fold
                raise NormtoolError(f"{op.name} ({op.kind}): {e.message}", where) from e
    require_finite(model)
    p, kept = plan(g, maps, set(maps))
    skipped.update(kept)
    kind_of = {o.name: o.kind for o in g.ops}
    skips = [SkippedNorm(o.name, o.kind, skipped[o.name]) for o in g.ops if o.name in skipped]
    notes = [ws_note(g)] if only is not None and "ws" in only and not has_ws else []
    if not p.folded and not baked:
        why = _nothing_foldable(g)
        reasons = [why] if why else _ordered(notes, skips)
        # inspect lists what stops the default fold, not what an --only selection left out
        raise refusal("nothing to fold", reasons, where, listed=only is None)
    _apply(ed, p)
    _check_rounded(model, engine, g)
    scale_range = None
    if p.scales:
        all_d = torch.cat(p.scales)
        scale_range = (float(all_d.min()), float(all_d.max()))
    if any(s.dtype == "F16" for s in g.tensors.values()) and scale_range is not None:
        x = random_inputs(g, 2, max_seq(g), seed=0)
        before = peak_activation(model.graph, model.weights(), x)
        after = peak_activation(g, engine.model(g, exact=False).weights(), x)
        if after * FP16_HEADROOM > FP16_MAX and after > before:
            raise NormtoolError(
                f"refused for this fp16 checkpoint: the re-based residual stream reaches "
                f"|x| = {after:.3g} (|D| in [{scale_range[0]:.3g}, {scale_range[1]:.3g}]), "
                f"within {FP16_HEADROOM:g}× of fp16's {FP16_MAX:.0f}; a float32 copy of the "
                "checkpoint keeps the stream in range",
                where,
            )
    folded = [p.folded[n] for n in kind_of if n in p.folded]
    ws = f"baked {len(baked)} weight-standardised convs, " if baked else ""
    summary = f"{ws}folded {len(folded)} norms, skipped {len(skips)}"
    report = {
        "baked": baked,
        "folded": folded,
        "skipped": skips,
        "untied": ed.untied,
        "notes": notes,
        "scale_range": scale_range,
    }
    params = {"only": list(SELECTORS) if only is None else list(only)}
    lines = _lines(baked, folded, skips, ed.untied, notes, scale_range)
    return Rewrite("fold", params, g, engine, summary, report, lines)


def _lines(
    baked: list[BakedConv],
    folded: list[FoldedNorm],
    skips: list[SkippedNorm],
    untied: list[str],
    notes: list[str],
    scale_range: tuple[float, float] | None,
) -> list[str]:
    """What the fold did, one line each, for the command's human output."""
    lines = [
        f"baked {b.name} (ws_conv2d, variant {b.variant}, eps {b.eps:g}): standardised weight "
        "stored, now conv2d"
        for b in baked
    ]
    for f in folded:
        kept = f", kept {f.kept}" if f.kept else ""
        into = ", ".join(f.into[:6]) + (f" (+{len(f.into) - 6})" if len(f.into) > 6 else "")
        lines.append(f"folded {f.name} ({f.kind}, {f.placement}): {f.how} into {into}{kept}")
    lines += [f"skipped {s.name} ({s.kind}): {s.reason}" for s in skips]
    lines += untied + notes
    if scale_range is not None:
        lo, hi = scale_range
        lines.append(f"re-based residual stream: accumulated scale |D| in [{lo:.3g}, {hi:.3g}]")
    return lines


def applicability(graph: Graph) -> list[str]:
    """Why ``fold`` does not apply (empty: a WS conv bakes or a norm folds), from the structure:
    the reasons a refusal of ``normtool fold`` names first, all of them."""
    if any(graph.ops_of("ws_conv2d")):
        return []
    if why := _nothing_foldable(graph):
        return [why]
    maps = {}
    for op in graph.ops:
        if _foldable(op):
            c = graph.tensors[op.params["weight"]].shape[0]
            maps[op.name] = (torch.ones(c, dtype=F64), torch.ones(c, dtype=F64))
    p, kept = plan(graph, maps, set(maps))
    if p.folded:
        return []
    skips = [
        SkippedNorm(o.name, o.kind, kept.get(o.name) or _not_foldable_reason(o))
        for o in graph.ops
        if SPECS[o.kind].norm and (o.name in kept or not _foldable(o))
    ]
    return _ordered([], skips)


@dataclass(frozen=True)
class Fold:
    """The pass: ``only`` the ``SELECTORS`` keys to act on (None: all)."""

    only: tuple[str, ...] | None = None
    name: str = "fold"

    def applicability(self, graph: Graph) -> list[str]:
        return applicability(graph)

    def plan(self, model: Model) -> Rewrite:
        return fold_norms(model, self.only)
