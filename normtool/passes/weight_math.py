"""Pure tensor formulas shared by the weight-rewriting passes (fold, ln→rms).

Each function takes and returns plain tensors, computes in float64 and returns the dtype of its
main input (pass float64 tensors to compose several steps without intermediate rounding). No
graph knowledge lives here: the passes decide *which* tensors to rewrite, these say *how*.

Algebra (``W`` is ``(out, in)`` like ``nn.Linear``; ``s``, ``t`` per-channel vectors):

* forward fold — a per-channel affine ``x ↦ x⊙s + t`` feeding a linear layer:
  ``W(x⊙s + t) + b = (W·diag(s))x + (b + W t)``.
* centring — a writer of a stream whose readers only ever see the zero-mean part
  (LayerNorm subtracts the mean) may drop its mean along the stream axis; afterwards every
  value written into the stream has zero mean, so LayerNorm equals RMSNorm on it.
* CRMS reduction — a zero-mean vector of width ``d`` is determined by its first ``d−1``
  coordinates (``x_d = −Σ_{i<d} x_i``), so writers keep ``d−1`` rows and each reader absorbs
  the dropped coordinate: ``W x = W[:, :d−1] x' + W[:, d−1] x_d = (W[:, :d−1] − W[:, d−1:]) x'``.

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


def centre(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Subtract the mean along ``axis`` (the stream axis of a writer's output).

    Any shape; e.g. an embedding [V, d] with ``axis=1``, an output projection [d, I] or its
    bias [d] with ``axis=0``, a patch-embedding conv weight [d, C, p, p] with ``axis=0``.
    """
    x = t.to(F64)
    return (x - x.mean(dim=axis, keepdim=True)).to(t.dtype)


def crms_writer(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Keep the first ``d−1`` entries along the stream axis of a (centred) writer tensor.

    Shape ``[..., d, ...]`` → ``[..., d−1, ...]`` at ``axis``; exact (a slice, no arithmetic).
    """
    return t.narrow(axis, 0, t.shape[axis] - 1)


def crms_reader(weight: torch.Tensor) -> torch.Tensor:
    """Absorb the dropped last stream coordinate into a reader: ``W[:, :d−1] − W[:, d−1:]``.

    ``weight`` [O, d] → [O, d−1]. Valid only when the input is zero-mean across its ``d``
    entries; biases are unchanged.
    """
    w = weight.to(F64)
    d = w.shape[1]
    return (w[:, : d - 1] - w[:, d - 1 :]).to(weight.dtype)
