"""Re-basing a stream of activations through per-channel affine maps (DESIGN §3.1).

Why a module of its own: folding a norm whose inference map is affine (UN, BatchNorm, the
affine part of PowerNorm) is one idea applied three ways, and this module holds the algebra of
that idea, free of graph plumbing.

Representation. After a fold, a value ``x`` of the original network is no longer computed; the
new network computes ``u`` with ``x = D ⊙ u + e`` per channel (``D``, ``e`` vectors over the
channel axis). A :class:`Rep` is that pair, plus the names of the folded norms it came from
(so a refusal can name the norms to keep).

* a folded norm ``y = s ⊙ x + t`` on ``x = D ⊙ u + e`` gives ``y = (s⊙D) ⊙ u + (s⊙e + t)``: the
  norm disappears and its map joins the representation (:func:`through_norm`);
* a linear reader absorbs it: ``W x + b = (W·diag(D)) u + (b + W e)`` (``weight_math.fold_forward``;
  :func:`fold_forward_conv` for convolutions, grouped ones included);
* a residual add ``x_a + x_b`` with ``x_a = D_a ⊙ u_a + e_a`` (the skip) and ``x_b = D_b ⊙ u_b + e_b``
  (a branch whose last layer is linear) is ``D_a ⊙ (u_a + (D_b/D_a) ⊙ u_b) + (e_a + e_b)``: the
  branch's last layer is rescaled by ``r = D_b/D_a`` (``W' = diag(r)·W``, ``b' = r⊙b``,
  :func:`fold_backward` without shift) and the stream keeps the skip's ``D``. With ``D_b = 1``
  and ``e_b = 0`` this is DESIGN's Post-Norm recursion: writers ``W' = diag(1/D_l)·W``, ``b' = b/D_l``;
* a layer followed by an affine norm absorbs it backward: ``s ⊙ (W x + b) + t =
  (diag(s)·W) x + (s⊙b + t)`` (:func:`fold_backward`, any layer whose output channel is axis 0
  of its weight: linear and conv, grouped or not).

All maths here is float64; callers keep float64 working copies while composing several folds
on one tensor and round once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass(frozen=True)
class Rep:
    """``x = scale ⊙ u + shift`` per channel. ``scale``/``shift`` ``None``: ones/zeros (also the
    value used when only the structure is planned, without tensors). ``norms``: the folded
    norms this map came from; empty means the identity."""

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    norms: frozenset[str] = frozenset()

    @property
    def identity(self) -> bool:
        return not self.norms


IDENTITY = Rep()


def through_norm(rep: Rep, name: str, s: torch.Tensor | None, t: torch.Tensor | None) -> Rep:
    """The representation of ``y = s ⊙ x + t`` given ``x``'s: ``(s⊙D, s⊙e + t)``."""
    if s is None:  # structure only
        return Rep(None, None, rep.norms | {name})
    scale = s if rep.scale is None else s * rep.scale
    shift = t if rep.shift is None else s * rep.shift + (0 if t is None else t)
    return Rep(scale, shift, rep.norms | {name})


def at_add(skip: Rep, branch: Rep) -> tuple[Rep, torch.Tensor | None]:
    """The representation of ``x_skip + x_branch`` and the rescale ``D_b/D_a`` of the branch's
    last layer (``None``: nothing to rescale, or structure only). ``D_a`` must have no zeros."""
    norms = skip.norms | branch.norms
    if skip.scale is None and branch.scale is None:
        ratio = None
    else:
        d_a = torch.ones_like(branch.scale) if skip.scale is None else skip.scale
        d_b = torch.ones_like(d_a) if branch.scale is None else branch.scale
        ratio = d_b / d_a
    if skip.shift is None:
        shift = branch.shift
    else:
        shift = skip.shift if branch.shift is None else skip.shift + branch.shift
    return Rep(skip.scale, shift, norms), ratio


def fold_backward(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absorb ``y ↦ scale ⊙ y + shift`` on a layer's *output* into the layer.

    ``weight`` [O, ...] (linear [O, I], conv [O, I/g, kh, kw]), ``bias`` [O] or None, ``scale``
    [O], ``shift`` [O] or None → (``diag(scale)·weight``, ``scale⊙bias + shift``) in float64; the
    bias stays None only when both ``bias`` and ``shift`` are None.
    """
    s = scale.to(F64)
    w = weight.to(F64) * s.reshape(-1, *([1] * (weight.dim() - 1)))
    b = None if bias is None else bias.to(F64) * s
    if shift is not None:
        b = shift.to(F64) if b is None else b + shift.to(F64)
    return w, b


def fold_forward_conv(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absorb ``x ↦ scale ⊙ x + shift`` on a conv's *input* channels into the conv.

    ``weight`` [O, I/g, kh, kw], ``bias`` [O] or None, ``scale``/``shift`` [I] → float64
    (``W'[o, j] = W[o, j]·scale[c]``, ``b'[o] = b[o] + Σ_{j,kh,kw} W[o, j]·shift[c]`` with
    ``c = group(o)·I/g + j``). Exact only where the conv reads no zero padding, or where
    ``shift`` is None (zeros scale to zeros): the caller checks that.
    """
    w = weight.to(F64)
    out_ch, per_group = w.shape[0], w.shape[1]

    def per_out(v: torch.Tensor) -> torch.Tensor:  # [I] → [O, I/g, 1, 1]
        rows = v.to(F64).reshape(groups, per_group).repeat_interleave(out_ch // groups, dim=0)
        return rows[:, :, None, None]

    new_w = w * per_out(scale)
    b = None if bias is None else bias.to(F64)
    if shift is not None:
        extra = (w * per_out(shift)).sum(dim=(1, 2, 3))
        b = extra if b is None else b + extra
    return new_w, b
