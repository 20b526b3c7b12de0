"""``rotate``: multiply the residual stream by an orthogonal ``Q`` (QuaRot / SliceGPT's
computational invariance), exactly.

Why it is exact: if every op reading the stream is a linear map per token (a linear layer, a
sum, a token pick, a pooling) or a *weightless* RMSNorm (``rms(Qᵀx) = rms(x)`` since ``Q`` is
orthogonal, so ``RMSNorm(Qᵀx) = Qᵀ·RMSNorm(x)``), the model computes the same function on the
rotated stream ``x' = Qᵀx`` when every writer writes ``Qᵀ·(what it wrote)`` and every reader
reads through ``Q``. In the graph's terms the rule is one: every tensor with an axis in the
stream space is contracted with ``Q`` along that axis — writers ``W' = QᵀW`` and their biases,
embeddings and position tables ``E' = E·Q``, readers and the LM head ``W' = W·Q``.

Why the preconditions: a gain γ (``diag(γ)`` does not commute with ``Q``: fold it first with
``fold --only rms-gain``), a LayerNorm's mean (``convert-ln-to-rms`` first), CRMSNorm (relies on
the stream's zero mean, which ``Q`` does not keep), or any other op reading the stream are
refused with that reason. Recipes are float64, rounded once; a reader's rows stream in blocks
(``W·Q`` row by row), a writer's (``QᵀW``) are computed whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.merge.data import load_data
from normtool.model import Model
from normtool.opspec import SPECS
from normtool.passes import orthogonal
from normtool.passes.recipes import F64, Ctx, Engine, Recipe
from normtool.passes.rewrite import Rewrite
from normtool.refusal import refusal
from normtool.runtime.torch_exec import run_graph

KINDS = ("hadamard", "random", "pca")
#: Ops that read the stream per token and linearly, so commute with any ``Q``.
_LINEAR_READERS = frozenset({"add", "cls_concat", "global_avgpool", "masked_mean"})


def stream_space(graph: Graph) -> str | None:
    spaces = [s.name for s in graph.spaces.values() if s.kind == "resid"]
    return spaces[0] if len(spaces) == 1 else None


def applicability(graph: Graph) -> list[str]:
    """Why the stream cannot be rotated exactly (empty: it can), each naming the op."""
    space = stream_space(graph)
    if space is None:
        return ["no single residual stream space in the graph"]
    reasons: list[str] = []
    for o in graph.ops:
        if not any(graph.value_spaces.get(v) == space for v in o.inputs):
            continue
        spec = SPECS[o.kind]
        if o.kind == "rmsnorm" and "weight" in o.params:
            reasons.append(f"run fold --only rms-gain first: norm {o.name!r} has a gain")
        elif o.kind == "layernorm":
            reasons.append(f"run convert-ln-to-rms first: norm {o.name!r} is a LayerNorm")
        elif o.kind == "crmsnorm":
            reasons.append(f"norm {o.name!r} is a CRMSNorm, which needs the stream's zero mean")
        elif o.kind == "linear":
            if space not in graph.tensors[o.params["weight"]].axes:
                reasons.append(f"linear {o.name!r} reads the stream without a stream axis")
        elif not (
            o.kind == "rmsnorm" or o.kind in _LINEAR_READERS or spec.picks_tokens or spec.shape_only
        ):
            reasons.append(
                f"op {o.name!r} ({o.kind}) reads the residual stream; only weightless RMSNorms "
                "and linear maps may"
            )
    for out in graph.outputs:
        if graph.value_spaces.get(out) == space:
            reasons.append(f"the residual stream is the graph output {out!r}")
    return reasons


def _rotated(name: str, axes: tuple[int, ...], q: torch.Tensor, ctx: Ctx) -> torch.Tensor:
    """``name`` contracted with ``q`` along each of ``axes`` (float64)."""
    t = ctx.get(name).to(F64)
    for k in axes:
        t = (t.movedim(k, -1) @ q).movedim(-1, k)
    return t


@dataclass(frozen=True)
class Rotate:
    """The pass: ``kind`` of ``Q`` (``KINDS``), its ``seed``; ``calib``: the data file PCA reads
    (inputs as ``barrier --data`` reads them)."""

    kind: str = "hadamard"
    seed: int = 0
    calib: Path | None = None
    name: str = "rotate"

    def applicability(self, graph: Graph) -> list[str]:
        return applicability(graph)

    def matrix(self, model: Model, space: str) -> torch.Tensor:
        d = model.graph.spaces[space].size
        if self.kind == "hadamard":
            return orthogonal.hadamard(d, self.seed)
        if self.kind == "random":
            return orthogonal.random_orthogonal(d, self.seed)
        if self.kind == "pca":
            return orthogonal.pca(stream_activations(model, space, self.calib))
        raise NormtoolError(f"--kind {self.kind!r}: choose from {', '.join(KINDS)}")

    def plan(self, model: Model) -> Rewrite:
        g = model.graph
        where = model.checkpoint.path if model.checkpoint else None
        if self.kind not in KINDS:
            raise NormtoolError(f"--kind {self.kind!r}: choose from {', '.join(KINDS)}")
        reasons = applicability(g)
        if reasons:
            raise refusal("cannot rotate the residual stream", reasons, where)
        space = stream_space(g)
        assert space is not None
        try:
            q = self.matrix(model, space)
        except NormtoolError as e:
            raise NormtoolError(e.message, e.path or where) from e
        new = g.copy()
        new.forget_hidden("rotate changed the residual stream's basis")
        engine = Engine(model)
        rotated = []
        for name, spec in g.tensors.items():
            axes = tuple(i for i, a in enumerate(spec.axes) if a == space)
            if not axes:
                continue
            key = engine.current(name)
            rows = key if spec.axes and 0 not in axes and len(spec.shape) > 1 else None
            fn = partial(_rotated, key, axes, q)
            engine.put(name, Recipe(spec.shape, spec.dtype, fn, rows, precision="f64"))
            rotated.append(name)
        d = q.shape[0]
        summary = f"rotated the {d}-wide residual stream ({self.kind}): {len(rotated)} tensors"
        report = {"kind": self.kind, "seed": self.seed, "size": d, "tensors": rotated}
        if self.kind == "hadamard":
            report["hadamard_factor"] = orthogonal.hadamard_factor(d)
        params = {"kind": self.kind, "seed": self.seed}
        if self.calib is not None:
            params["calib"] = str(self.calib)
        lines = (
            [f"Q = H_{report['hadamard_factor']} ⊗ H_2^k, signs from seed {self.seed}"]
            if self.kind == "hadamard"
            else []
        )
        return Rewrite("rotate", params, new, engine, summary, report, lines)


def stream_activations(model: Model, space: str, calib: Path | None) -> torch.Tensor:
    """The stream vectors every RMSNorm reads, over the tokens of ``calib``'s inputs (float64)."""
    if calib is None:
        raise NormtoolError("--kind pca needs --calib DATA (inputs as barrier --data reads them)")
    x, _ = load_data(calib, model.graph, False)
    g = model.graph.copy()
    read = [o.inputs[0] for o in g.ops_of("rmsnorm")]
    if not read:
        raise NormtoolError("--kind pca: no RMSNorm reads the stream to measure")
    g.outputs = list(dict.fromkeys(read))
    vals = run_graph(g, model.weights(), {g.inputs[0].name: x}, dtype=F64)
    return torch.cat([vals[v].reshape(-1, vals[v].shape[-1]) for v in g.outputs])
