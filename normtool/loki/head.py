"""The Loki head pass: append ``prediction = argmin_y Σ_i p_i d(y, λ_i)²`` after a classifier's
logits (Roberts et al., NeurIPS 2023; DESIGN §3.4).

Algebra: with ``p = softmax(logits)`` over the K observed classes and ``D²[i, y] = d(λ_i, y)²``
for the N candidate labels, the Fréchet risk of every candidate is one matrix product
``r = p · D²`` (shape [B, N]) and the prediction is ``argmin r = argmax(−r)``: Softmax → MatMul
→ ArgMax, which the torch executor and every ONNX runtime run as plain kernels.

Ties (integer tree distances make them common) go to the LOWEST label index: torch.argmax and
ONNX ArgMax (``select_last_index=0``) both return the first maximum. One kind of tie is exact
whatever ``p`` is: two labels whose columns of D² are identical (e.g. unobserved sibling leaves
of a tree). A GEMM need not give identical columns bit-identical results, so such a later
duplicate column is replaced by ``2·max(D²) + 1``: its risk then exceeds every real risk (Σp = 1)
and the earlier label wins on every backend, which is exactly the lowest-index rule. (An fp16
export needs ``2·max(D²) + 1 ≤ 65504``; ``info["loki"]["max_d2"]`` records the largest value.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from normtool.errors import CheckFailed, NormtoolError
from normtool.finite import require_finite
from normtool.graph import Graph, Op, Source, Space, TensorSpec
from normtool.inputs import max_seq, random_inputs
from normtool.loki.labels import LabelSpace
from normtool.model import Model
from normtool.opspec import SPECS
from normtool.passes.recipes import Engine
from normtool.passes.rewrite import Rewrite
from normtool.runtime.torch_exec import run_graph

OP_NAME = "loki"
D2_TENSOR = "loki.d2"
LABEL_SPACE = "loki.labels"
OUTPUT = "prediction"
_BLOCK_ELEMENTS = 1 << 22  # rows × labels computed per step when building D²


def _ranks(graph: Graph) -> dict[str, int]:
    """Rank of every value, propagated through the op table (``OpSpec.rank``) without running
    anything."""
    rank = {i.name: len(i.shape) for i in graph.inputs}
    for op in graph.ops:
        rank[op.output] = SPECS[op.kind].rank([rank.get(v, 0) for v in op.inputs])
    return rank


def check(graph: Graph) -> list[str]:
    """Why a Loki head cannot be added to ``graph`` (empty: it can)."""
    if "logits" not in graph.outputs:
        return ["no output named 'logits'"]
    if any(o.kind == "loki" for o in graph.ops):
        return ["the model already has a Loki head"]
    r = _ranks(graph).get("logits")
    if r != 2:
        return [
            f"logits have rank {r}, not [batch, classes]: Loki needs one distribution per input"
        ]
    return []


def squared_distances(space: LabelSpace) -> torch.Tensor:
    """D² as float32 [K, N]: row i = squared distances from output i's label to every label.

    Computed in float64 blocks of rows and stored in float32 (integer hop distances stay exact
    below 2²⁴); never more than ``_BLOCK_ELEMENTS`` float64 values at once besides the result.
    """
    rows = space.points[space.observed]
    out = np.empty((space.k, space.n), dtype=np.float32)
    step = max(1, _BLOCK_ELEMENTS // max(1, space.n))
    for start in range(0, space.k, step):
        out[start : start + step] = space.metric.block(rows[start : start + step], space.points)
    return torch.from_numpy(out)


def duplicate_columns(d2: np.ndarray) -> np.ndarray:
    """Boolean [N]: column j equals an earlier column exactly.

    An exact integer hash of each column's bits (wrapping uint64 arithmetic, the same for equal
    columns on any machine) groups candidates; equality is then confirmed element by element.
    """
    k, n = d2.shape
    bits = d2.view(np.uint32)
    mult = np.random.default_rng(0).integers(1, 2**63, size=k, dtype=np.uint64) | np.uint64(1)
    h = np.zeros(n, dtype=np.uint64)
    step = max(1, _BLOCK_ELEMENTS // max(1, n))
    for start in range(0, k, step):
        chunk = bits[start : start + step].astype(np.uint64) * mult[start : start + step, None]
        h += chunk.sum(axis=0, dtype=np.uint64)
    order = np.argsort(h, kind="stable")  # equal hashes keep ascending label order
    dup = np.zeros(n, dtype=bool)
    starts = np.flatnonzero(np.diff(h[order]) != 0) + 1
    for run in np.split(order, starts):
        while run.size > 1:  # each pass: the lowest remaining index and its exact copies
            block = d2[:, run]
            same = (block == block[:, :1]).all(axis=0)
            dup[run[1:][same[1:]]] = True
            run = run[~same]
    return dup


def mask_duplicates(d2: torch.Tensor) -> int:
    """Set later duplicate columns of ``d2`` (in place) to ``2·max + 1``; returns how many."""
    dup = duplicate_columns(d2.numpy())
    if dup.any():
        d2[:, torch.from_numpy(dup)] = 2 * float(d2.max()) + 1
    return int(dup.sum())


def plan_loki_head(model: Model, space: LabelSpace, params: dict[str, Any]) -> Rewrite:
    """Plan a copy of ``model`` whose graph also outputs ``prediction`` (int64 index into the N
    labels); ``logits`` and every other tensor are untouched. Its own check (``verify_head``)
    replaces the equivalence self-check, since it adds an output. Non-finite weights are refused
    like every transform does: a NaN logit makes every risk NaN and ``argmin`` a meaningless
    label, and a check that compares against the same NaN logits cannot see it."""
    reasons = check(model.graph)
    if reasons:
        raise NormtoolError("cannot add a Loki head: " + "; ".join(reasons))
    require_finite(model)
    g = model.graph.copy()
    logits_space = g.value_spaces["logits"]
    k = g.spaces[logits_space].size
    if k != space.k:
        raise NormtoolError(f"the model has {k} outputs but the label map has {space.k}")
    d2 = squared_distances(space)
    masked = mask_duplicates(d2)
    g.spaces[LABEL_SPACE] = Space(LABEL_SPACE, space.n, "output")
    g.tensors[D2_TENSOR] = TensorSpec((k, space.n), (logits_space, LABEL_SPACE), Source(D2_TENSOR))
    g.ops.append(Op(OP_NAME, "loki", ("logits",), OUTPUT, {"d2": D2_TENSOR}))
    g.value_spaces[OUTPUT] = LABEL_SPACE
    g.outputs.append(OUTPUT)
    g.info["loki"] = {
        "metric": space.metric.kind,
        "labels": space.n,
        "observed": space.k,
        "ties": "lowest label index",
        "duplicate_labels_masked": masked,
        "max_d2": float(d2.max()),
    }
    g.validate()
    full = {**params, "labels": space.names, "observed": [space.names[j] for j in space.observed]}
    summary = f"Loki head over {space.n} labels ({space.metric.kind}), {k} observed"
    return Rewrite(
        "loki-head",
        full,
        g,
        Engine(model),
        summary,
        values={D2_TENSOR: d2},
        equivalent=False,
        verify=verify_head,
    )


@dataclass(frozen=True)
class LokiHead:
    """The pass: a Loki head over ``space`` (``params``: what the history records of where the
    metric came from)."""

    space: LabelSpace
    params: dict[str, Any] = field(default_factory=dict, hash=False)
    name: str = "loki-head"

    def applicability(self, graph: Graph) -> list[str]:
        return check(graph)

    def plan(self, model: Model) -> Rewrite:
        return plan_loki_head(model, self.space, self.params)


def reference_predictions(logits: torch.Tensor, d2: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 risk minimisers and the minimal risks, in blocks of labels (bounded memory)."""
    p = torch.softmax(logits.double(), dim=-1)
    best = torch.full((p.shape[0],), float("inf"), dtype=torch.float64)
    arg = torch.zeros(p.shape[0], dtype=torch.int64)
    step = max(1, _BLOCK_ELEMENTS // max(1, d2.shape[0]))
    for start in range(0, d2.shape[1], step):
        r = p @ d2[:, start : start + step].double()
        m, i = r.min(dim=-1)  # first minimum within the block; earlier blocks win ties
        better = m < best
        best = torch.where(better, m, best)
        arg = torch.where(better, i + start, arg)
    return arg.numpy(), best.numpy()


def verify_head(model: Model, batches: int = 2, batch: int = 8) -> dict[str, float]:
    """Run the new graph on seeded random inputs; ``prediction`` must minimise the float64 risk.

    A different index is accepted only where its float64 risk is within float32 rounding of the
    minimum (``1e-5`` relative to the largest D²): then the two labels tie to working precision
    and either is the lowest-index minimiser of the risks that fp32 actually computes.
    """
    d2 = model.tensor(D2_TENSOR)
    scale = max(1.0, float(d2.max()))
    worst, mismatches = 0.0, 0
    for seed in range(batches):
        x = random_inputs(model.graph, batch, min(8, max_seq(model.graph)), seed)
        out = run_graph(model.graph, model.weights(), x)
        logits, pred = out["logits"], out[OUTPUT]
        if logits.dim() != 2 or pred.shape != (logits.shape[0],):
            raise CheckFailed(f"logits have shape {tuple(logits.shape)}, expected [batch, classes]")
        want, best = reference_predictions(logits, d2)
        p = torch.softmax(logits.double(), dim=-1)
        got_risk = (p * d2[:, pred].double().T).sum(-1).numpy()
        worst = max(worst, float((got_risk - best).max()) / scale)
        mismatches += int((pred.numpy() != want).sum())
    if worst > 1e-5:
        raise CheckFailed(
            f"Loki head self-check failed: prediction risk exceeds the minimum by {worst:.3g}·max D²"
        )
    return {"prediction_mismatches": float(mismatches), "max_relative_risk_excess": worst}
