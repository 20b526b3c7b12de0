"""Pure tensor formulas shared by the weight-rewriting passes (fold, ln→rms).

Each function takes and returns plain tensors, computes in float64 (unless told a ``work``
dtype) and returns the dtype of its main input (pass float64 tensors to compose several steps
without intermediate rounding). No
graph knowledge lives here: the passes decide *which* tensors to rewrite, these say *how*.

Algebra (``W`` is ``(out, in)`` like ``nn.Linear``; ``s``, ``t`` per-channel vectors):

* forward fold — a per-channel affine ``x ↦ x⊙s + t`` feeding a linear layer:
  ``W(x⊙s + t) + b = (W·diag(s))x + (b + W t)``.
* centring — a writer of a stream whose readers only ever see the zero-mean part
  (LayerNorm subtracts the mean) may drop its mean along the stream axis; afterwards every
  value written into the stream has zero mean, so LayerNorm equals RMSNorm on it.
* CRMS reduction — a zero-mean vector of width ``d`` is determined by any ``d−1`` of its
  coordinates (``x_k = −Σ_{i≠k} x_i``), so writers drop row ``k`` and each reader absorbs the
  dropped coordinate: ``W x = W[:, i≠k] x' + W[:, k] x_k = (W[:, i≠k] − W[:, k:k+1]) x'``
  (``k = d−1`` by default: the first ``d−1`` rows are kept).

Every function here is independent across the *other* axes, so callers may apply it to row
blocks of a large tensor (``fold_forward``, ``crms_reader``, ``centre`` with ``axis=-1``).
"""

from __future__ import annotations

import torch

F64 = torch.float64


def fold_forward(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an affine ``x⊙scale + shift`` on a linear layer's *input* into the layer.

    ``weight`` [O, I], ``bias`` [O] or None, ``scale`` [I], ``shift`` [I] or None
    → (``weight·diag(scale)`` [O, I], ``bias + weight·shift`` [O]). A bias is created when
    ``shift`` is given and ``bias`` is None; with neither, the bias stays None.
    """
    w = weight.to(F64)
    new_w = w * scale.to(F64)
    new_b = None if bias is None else bias.to(F64)
    if shift is not None:
        wt = w @ shift.to(F64)
        new_b = wt if new_b is None else new_b + wt
    out_b = None
    if new_b is not None:
        out_b = new_b.to(bias.dtype if bias is not None else weight.dtype)
    return new_w.to(weight.dtype), out_b


def centre(t: torch.Tensor, axis: int, work: torch.dtype = F64) -> torch.Tensor:
    """Subtract the mean along ``axis`` (the stream axis of a writer's output).

    Any shape; e.g. an embedding [V, d] with ``axis=1``, an output projection [d, I] or its
    bias [d] with ``axis=0``, a patch-embedding conv weight [d, C, p, p] with ``axis=0``.
    ``work``: the dtype of the arithmetic; float32 costs a few float32 ulps against the exact
    value and a quarter of float64's memory traffic.
    """
    x = t.to(work)
    return (x - x.mean(dim=axis, keepdim=True)).to(t.dtype)


def crms_writer(t: torch.Tensor, axis: int, drop: int | None = None) -> torch.Tensor:
    """Drop stream coordinate ``drop`` (default: the last) along the stream axis of a (centred)
    writer tensor.

    Shape ``[..., d, ...]`` → ``[..., d−1, ...]`` at ``axis``; exact (a slice, no arithmetic).
    """
    d = t.shape[axis]
    k = d - 1 if drop is None else drop
    if k == d - 1:
        return t.narrow(axis, 0, d - 1)
    return torch.cat([t.narrow(axis, 0, k), t.narrow(axis, k + 1, d - 1 - k)], dim=axis)


def crms_reader(
    weight: torch.Tensor, work: torch.dtype = F64, drop: int | None = None
) -> torch.Tensor:
    """Absorb the dropped stream coordinate ``k`` (default: the last) into a reader:
    ``W[:, i≠k] − W[:, k:k+1]``.

    ``weight`` [O, d] → [O, d−1]. Valid only when the input is zero-mean across its ``d``
    entries; biases are unchanged. ``work``: the dtype of the subtraction.
    """
    w = weight.to(work)
    k = w.shape[1] - 1 if drop is None else drop
    return (crms_writer(w, 1, k) - w[:, k : k + 1]).to(weight.dtype)


def crms_column_energy(weight: torch.Tensor) -> torch.Tensor:
    """Per stream coordinate ``k``, ``Σ_rows (W[r, k] − mean_i W[r, i])²`` of a reader ``W``
    [O, d] (its LayerNorm's γ folded in), in float64; additive over row blocks.

    Why: under CRMS the reader computes ``W' x'`` with ``W'_r = W[r, i≠k] − W[r, k]``, and in
    fp16/bf16 its input ``x'`` (stream, norm output) carries independent rounding errors in its
    ``d−1`` stored coordinates — the implied one, ``x_k = −Σx'``, carries their sum. The output
    error grows with ``‖W'‖² = S + d·energy[k]``, where ``S = energy.sum()`` (the row-centred
    norm²) is what the same reader pays on the full zero-mean RMS stream. So
    ``1 + d·energy[k]/S`` is how much CRMS amplifies that reader's rounding error when ``k`` is
    dropped: about 2 on average, up to ~4 measured on a 3-class head (see ``crms_drop_index``).
    """
    w = weight.to(F64)
    return (w - w.mean(1, keepdim=True)).pow(2).sum(0)


def crms_drop_index(energies: list[torch.Tensor]) -> int:
    """The stream coordinate CRMS should drop: the one minimising the largest rounding-error
    amplification ``1 + d·energy[k]/S`` over the readers (``crms_column_energy`` of each).

    Why the worst reader: the stream is shared, so one coordinate is dropped for every reader,
    and one badly amplifying reader (a classifier head of a few rows, whose column ``k`` sits
    far from its row means) is enough to double the logits' error — measured: fp16 CRMS error
    ratios (20 seeds × 6 families) up to 2.4x the original's with the last coordinate dropped,
    at most 1.45x with this choice (1.57x on a 3-class head of width 16, whose RMS run reaches 1.4x).
    """
    rel = torch.stack([e / e.sum().clamp_min(torch.finfo(F64).tiny) for e in energies])
    return int(rel.max(0).values.argmin())


def round_keeping_sums(x: torch.Tensor, dtype: torch.dtype, axis: int) -> torch.Tensor:
    """Round ``x`` to ``dtype`` so that its sums along ``axis`` stay as exact as rounding allows.

    Why: a centred writer of a CRMS stream keeps ``d−1`` rows, and the dropped coordinate is
    *implied* as minus their sum. Rounded to nearest, the ``d−1`` rounding errors add up in that
    implied coordinate (√d times one entry's error), which doubled the fp16/bf16 error of CRMS
    models. Here every entry is rounded to nearest except, per slice along ``axis``, the fewest
    entries closest to a rounding tie, which are rounded the other way (still within one unit in
    the last place of the exact value) until the slice's rounding errors sum to less than half
    a spacing; for RMS the same keeps the rounded writer zero-mean. Exact in real arithmetic:
    only the choice between the two nearest representable values changes.
    """
    xm = x.to(F64).movedim(axis, -1)
    near = xm.to(dtype)
    err = near.to(F64) - xm
    total = err.sum(-1, keepdim=True)
    other = torch.nextafter(near, torch.where(err > 0, -torch.inf, torch.inf).to(dtype))
    step = (other.to(F64) - near.to(F64)).abs()
    # flipping an entry whose error has the sign of the total moves the total by its step
    can = (err * total > 0) & other.isfinite()
    closeness = torch.where(can, err.abs() / step, -1.0)  # 0.5: a tie, flipping costs nothing
    order = closeness.argsort(dim=-1, descending=True, stable=True)
    steps = torch.where(can, step, 0.0).gather(-1, order)
    fits = (steps.cumsum(-1) - steps / 2 <= total.abs()).cumprod(-1).bool()
    flip = torch.zeros_like(can).scatter(-1, order, fits & can.gather(-1, order))
    return torch.where(flip, other, near).movedim(-1, axis)
