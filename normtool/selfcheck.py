"""The self-check every exact rewrite (convert-ln-to-rms, fold) runs before it writes.

Bars (issues 3 and 4): float64 error relative to the logit scale ≤ 1e-9 for the *unrounded*
rewritten tensors — the algebra must be exact up to rounding — and, for the tensors as they
will be stored, float32 max-abs ≤ 1e-4 on the logits. A checkpoint stored in fp16/bf16 cannot
meet a float32 bar once rewritten weights are rounded to 11 (fp16) or 8 (bf16) bits, so there
the stored-dtype bar replaces it: run in that dtype, the rewritten model's error against the
float64 original may be at most ``HALF_RATIO`` times the original's own error in that dtype.
"""

from __future__ import annotations

import math

from normtool.graph import Graph
from normtool.inputs import max_seq, random_inputs
from normtool.model import Model
from normtool.verify import TorchRunner, batch_plan, compare_models

FP64_MAX_REL = 1e-9
FP32_MAX_ABS = 1e-4
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


def self_check(source: Model, exact: Model, stored: Model) -> tuple[dict[str, float], list[str]]:
    """Errors of the rewrite against ``source`` on seeded random inputs, and the failed bars
    (empty: passed). ``exact``: the unrounded rewritten tensors; ``stored``: as written."""
    plan = check_plan(source.graph)
    r64 = compare_models(source, exact, "fp64", plan=plan, together=True)
    errors = {"fp64_max_rel": r64.max_rel, "fp64_max_abs": r64.max_abs}
    bad = []
    if not r64.max_rel <= FP64_MAX_REL:
        bad.append(f"fp64 relative error {r64.max_rel:.3g} > {FP64_MAX_REL:g}")
    half = sorted({_HALF[s.dtype] for s in source.graph.tensors.values() if s.dtype in _HALF})
    if not half:
        r32 = compare_models(source, stored, "fp32", plan=plan, together=True)
        errors.update(fp32_max_abs=r32.max_abs, fp32_max_rel=r32.max_rel)
        if not r32.max_abs <= FP32_MAX_ABS:
            bad.append(f"fp32 max-abs error {r32.max_abs:.3g} > {FP32_MAX_ABS:g}")
    for dt in half:
        own, new, worst = half_errors(source, stored, dt)
        errors.update({f"{dt}_rms": new, f"{dt}_original_rms": own, f"{dt}_max_abs": worst})
        if not new <= HALF_RATIO * own:
            bad.append(f"{dt} RMS error {new:.3g} > {HALF_RATIO}x the original's {own:.3g}")
    return errors, bad


def summary(errors: dict[str, float]) -> str:
    """One line of the achieved errors, whichever bars applied."""
    return ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
