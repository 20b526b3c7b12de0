"""The rms-gain fold: move every RMSNorm's gain γ into the linears reading its output.

Why: ``rotate`` needs a stream read only through *weightless* RMSNorms — ``‖Qᵀx‖ = ‖x‖`` makes a
weightless RMSNorm commute with an orthogonal ``Q``, a per-channel γ does not. ``y = γ ⊙ x/rms(x)``
read by ``W`` is ``(W·diag(γ)) · x/rms(x)``, so each reader absorbs ``diag(γ)`` (Gemma-style
norms scale by ``offset + γ``, folded as that sum) and the norm keeps only its RMS. Exact in real
arithmetic; recipes in float64, rounded once (fold's ``_Editor``, which also unties a reader
weight shared with another op — a tied LM head).

A norm whose output reaches anything but a linear (a graph output, an activation) keeps its γ,
with that reason; when no norm can fold, the pass refuses with the reasons.
"""

from __future__ import annotations

from dataclasses import dataclass

from normtool.errors import NormtoolError
from normtool.graph import Graph, Op
from normtool.model import Model
from normtool.passes.fold import Fold, _Editor
from normtool.passes.ln_to_rms import norm_readers
from normtool.passes.recipes import F64, Engine
from normtool.passes.rewrite import Rewrite
from normtool.passes.weight_math import fold_forward
from normtool.refusal import refusal

#: The ``fold --only`` selector of this pass.
SELECTOR = "rms-gain"


def _gained(graph: Graph) -> list[Op]:
    return [o for o in graph.ops_of("rmsnorm") if "weight" in o.params]


def _plan(graph: Graph) -> tuple[dict[str, list[Op]], dict[str, str]]:
    """Norm name → the linears its γ folds into; norm name → why it keeps γ."""
    into: dict[str, list[Op]] = {}
    kept: dict[str, str] = {}
    for norm in _gained(graph):
        readers, why = norm_readers(graph, norm)
        if why:
            kept[norm.name] = why[0]
        else:
            into[norm.name] = readers
    return into, kept


def applicability(graph: Graph) -> list[str]:
    """Why the rms-gain fold does not apply (empty: it does, or there is nothing left to fold)."""
    if not any(graph.ops_of("rmsnorm")):
        return ["no RMSNorm in the graph (convert-ln-to-rms makes LayerNorms RMSNorms)"]
    into, kept = _plan(graph)
    return [] if into or not kept else [f"{n}: {why}" for n, why in kept.items()]


def fold_rms_gain(model: Model) -> Rewrite:
    """Plan the fold of every RMSNorm gain that can move into linear readers.

    Every RMSNorm already weightless: an empty rewrite with that note (so a chain such as
    ``convert-ln-to-rms fold:only=rms-gain rotate`` goes through); no RMSNorm at all, or none
    foldable: a refusal naming why."""
    g = model.graph
    where = model.checkpoint.path if model.checkpoint else None
    reasons = applicability(g)
    if reasons:
        raise refusal("nothing to fold for rms-gain", reasons, where)
    into, kept = _plan(g)
    engine = Engine(model)
    ed = _Editor(engine, g.copy())
    new = ed.graph
    lines: list[str] = []
    for name, readers in into.items():
        norm = new.op(name)
        gain = model.tensor(norm.params["weight"]).to(F64) + float(norm.attrs.get("offset", 0.0))
        for lin in readers:
            ed.rewrite(new.op(lin.name), fold_forward, (gain, None), False, None)
        norm.params = {}
        norm.attrs = {"eps": norm.attrs["eps"]}
        lines.append(f"folded {name} (rmsnorm γ) into {', '.join(r.name for r in readers)}")
    if into:
        new.forget_hidden("rms-gain folded RMSNorm gains into their readers")
    new.prune()
    new.validate()
    lines += [f"kept γ of {n}: {why}" for n, why in kept.items()]
    notes = [] if into else ["every RMSNorm is already weightless: nothing to fold"]
    summary = f"folded the gains of {len(into)} RMSNorms, kept {len(kept)}"
    report = {
        "folded": [{"name": n, "into": [r.name for r in rs]} for n, rs in into.items()],
        "skipped": [{"name": n, "reason": why} for n, why in kept.items()],
        "untied": ed.untied,
        "notes": notes,
    }
    return Rewrite(
        "fold", {"only": [SELECTOR]}, new, engine, summary, report, lines + ed.untied + notes
    )


@dataclass(frozen=True)
class RmsGain:
    """The pass (``fold --only rms-gain``)."""

    name: str = "fold"

    def applicability(self, graph: Graph) -> list[str]:
        return applicability(graph)

    def plan(self, model: Model) -> Rewrite:
        return fold_rms_gain(model)


def fold_pass(only: tuple[str, ...] | None) -> Fold | RmsGain:
    """The pass ``fold --only ONLY`` runs: the rms-gain fold when ``only`` is exactly
    ``rms-gain`` (the default fold leaves RMSNorm gains alone, so existing ``fold`` calls keep
    their results), else ``Fold``; rms-gain mixed with other selectors is an error."""
    if only is None or SELECTOR not in only:
        return Fold(only)
    if set(only) != {SELECTOR}:
        raise NormtoolError(
            f"--only: {SELECTOR} is a fold of its own; fold it in a separate step "
            f"(normtool run PATH fold:only=... fold:only={SELECTOR})"
        )
    return RmsGain()
