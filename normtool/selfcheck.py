"""The self-check every exact rewrite (convert-ln-to-rms, fold) runs before it writes.

Bars (issues 3, 4 and 14): float64 error relative to the logit scale ≤ 1e-9 for the *unrounded*
rewritten tensors — the algebra must be exact up to rounding. For the tensors as they will be
stored, run in float32: the rewritten model's max-abs logit error against the float64 original
at most ``fp32_bar`` — 1e-4, or ``FP32_RATIO`` times the original's own float32 error when that
is larger (a model with logits in the hundreds, or stored in fp64, cannot be computed to 1e-4 in
float32 by anyone, its own code included). A checkpoint stored in fp16/bf16 cannot meet a float32
bar once rewritten weights are rounded to 11 (fp16) or 8 (bf16) bits, so there the stored-dtype
bar replaces it: run in that dtype, the rewritten model's error against the float64 original may
be at most ``HALF_RATIO`` times the original's own error in that dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from normtool.graph import Graph
from normtool.inputs import max_seq, random_inputs
from normtool.model import Model
from normtool.verify import Report, TorchRunner, batch_plan, compare

FP64_MAX_REL = 1e-9
#: The float32 bar's floor: today's absolute bar, so a small-logit model is held to no less.
FP32_MAX_ABS = 1e-4
#: ... raised to this many times the original's own float32 error (max-abs against its float64
#: run, same inputs). Measured ratio of an exact rewrite's error to the original's (seed-0
#: inputs of the check, max-abs): 0.2-2.2 on every family of tests/ln_to_rms_cases.py (RMS and
#: CRMS) and tests/fold_cases.py; over 60 seeds of timm-style ViT/UN folds, LN→RMS/CRMS at
#: d=32 and 128 and Post-UN folds, 95% below 2.0 and the largest 2.8 (a maximum over 25 logits
#: is noisy); CRMS at d=1024 up to 2.4, and on models with sharp attention (q, k ×32) up to
#: 3.4, since the implied coordinate carries every stored coordinate's rounding. 4 leaves that
#: noise room yet stops a rewrite that loses more than a factor 4 of fp32 accuracy (one seed
#: of 60 ViT/UN folds did: 9.6x, its RMS error 5.8x — refused today too).
FP32_RATIO = 4.0
HALF_RATIO = 1.5
#: Input batches of the half-precision comparison, and the error measured: the root-mean-square
#: error over every logit of every batch. Why not the max-abs: over a few hundred values the
#: largest error is one outlier — measured on tiny models, the per-batch max-abs ratio of two
#: equally accurate models spread from 0.4 to 2.4, while the RMS ratio over 8 batches moved by
#: a few percent.
HALF_SAMPLES = 8
#: ... but no more batches once this many logits were measured (a language model's vocabulary
#: gives that in a few tokens; a large model in half precision runs slowly on a CPU).
HALF_ENOUGH_LOGITS = 2**20
_HALF = {"F16": "fp16", "BF16": "bf16"}


def check_plan(graph: Graph) -> list[tuple[int, int | None]]:
    """The input shapes of the fp64 and fp32 checks: every position once (batch 1 at the longest
    sequence) and a batch of 4 short sequences (batching, padding-free short inputs).

    Why not ``verify``'s default plan: the self-check runs before every write, and at
    GPT-2-medium size its 5,136 tokens took 208 s in float64 (and 7 GB); these 1,088 tokens
    still reach every position-table row and every weight.
    """
    has_seq = any(s.kind == "tokens" for s in graph.inputs)
    if not has_seq:
        return [(1, None), (4, None)]
    seq = max_seq(graph)
    return [(1, seq), (4, max(1, seq // 16))]


def half_errors(source: Model, rewritten: Model, dtype: str) -> tuple[float, float, float]:
    """RMS error of the original and of the rewritten model, both run in ``dtype``, against the
    original in float64 over ``HALF_SAMPLES`` seeded batches (fewer once ``HALF_ENOUGH_LOGITS``
    were measured); and the rewritten max-abs error."""
    truth = TorchRunner(source, "fp64", "original fp64")
    runs = [TorchRunner(source, dtype, "original"), TorchRunner(rewritten, dtype, "rewritten")]
    seq = max_seq(source.graph)
    sq, n, worst = [0.0, 0.0], 0, 0.0
    for k, (batch, length) in enumerate(batch_plan(HALF_SAMPLES, seq, 0)):
        if n >= HALF_ENOUGH_LOGITS:
            break
        feeds = random_inputs(source.graph, batch, length or 1, k)
        want = truth.run(feeds)
        outs = [r.run(feeds) for r in runs]
        for name, y in want.items():
            if not y.is_floating_point():
                continue
            errs = [o[name].double() - y for o in outs]
            sq = [a + float(e.pow(2).sum()) for a, e in zip(sq, errs, strict=True)]
            worst = max(worst, float(errs[1].abs().max()))
            n += y.numel()
    own, new = (math.sqrt(a / max(n, 1)) for a in sq)
    return own, new, worst


class _Remembered(TorchRunner):
    """A TorchRunner that keeps its outputs for the inputs it last ran: the float64 original is
    the reference of three comparisons on the same inputs (the fp64 rewrite, the fp32 original,
    the fp32 rewrite), and its run — the costliest of the check's — then happens once."""

    _last: tuple[list[Mapping[str, torch.Tensor]], list[dict[str, torch.Tensor]]] | None = None

    def run_all(self, batches: list[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        if self._last is None or not _same_feeds(self._last[0], batches):
            self._last = (list(batches), super().run_all(batches))
        return self._last[1]


def _same_feeds(a: list[Mapping[str, torch.Tensor]], b: list[Mapping[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def fp32_bar(own: float) -> float:
    """The float32 bar for a rewrite of a model whose own float32 max-abs error is ``own``.

    Never below ``FP32_MAX_ABS``; a non-finite ``own`` (the original overflows in float32)
    says nothing about what float32 can do, so the floor applies alone."""
    return max(FP32_MAX_ABS, FP32_RATIO * own) if math.isfinite(own) else FP32_MAX_ABS


def self_check(source: Model, exact: Model, stored: Model) -> tuple[dict[str, float], list[str]]:
    """Errors of the rewrite against ``source`` on seeded random inputs, and the failed bars
    (empty: passed). ``exact``: the unrounded rewritten tensors; ``stored``: as written.

    Every error is against the original run in float64. The float32 keys: ``fp32_max_abs`` and
    ``fp32_max_rel`` (the stored rewrite run in fp32; its max-abs against the fp64 original is
    what ``fp32_bar`` bounds), ``fp32_original_max_abs`` (the original run in fp32: what fp32
    can do on this model and these inputs) and ``fp32_bar``."""
    plan = check_plan(source.graph)
    truth = _Remembered(source, "fp64", "original fp64")

    def against_truth(model: Model, dtype: str, label: str) -> Report:
        return compare(truth, TorchRunner(model, dtype, label), dtype, plan=plan, together=True)

    r64 = against_truth(exact, "fp64", "rewritten fp64")
    errors = {"fp64_max_rel": r64.max_rel, "fp64_max_abs": r64.max_abs}
    bad = []
    if not r64.max_rel <= FP64_MAX_REL:
        bad.append(f"fp64 relative error {r64.max_rel:.3g} > {FP64_MAX_REL:g}")
    half = sorted({_HALF[s.dtype] for s in source.graph.tensors.values() if s.dtype in _HALF})
    if not half:
        own = against_truth(source, "fp32", "original fp32").max_abs
        r32 = against_truth(stored, "fp32", "rewritten fp32")
        bar = fp32_bar(own)
        errors.update(
            fp32_max_abs=r32.max_abs,
            fp32_max_rel=r32.max_rel,
            fp32_original_max_abs=own,
            fp32_bar=bar,
        )
        if not r32.max_abs <= bar:
            bad.append(
                f"fp32 max-abs error {r32.max_abs:.3g} > {bar:.3g} (the larger of "
                f"{FP32_MAX_ABS:g} and {FP32_RATIO:g}x the original's own fp32 error {own:.3g})"
            )
    for dt in half:
        own, new, worst = half_errors(source, stored, dt)
        errors.update({f"{dt}_rms": new, f"{dt}_original_rms": own, f"{dt}_max_abs": worst})
        if not new <= HALF_RATIO * own:
            bad.append(f"{dt} RMS error {new:.3g} > {HALF_RATIO}x the original's {own:.3g}")
    return errors, bad


def summary(errors: dict[str, float]) -> str:
    """One line of the achieved errors, whichever bars applied."""
    return ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
