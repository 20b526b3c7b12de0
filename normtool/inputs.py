"""Seeded random inputs that match a graph's input signature, and the values of optional inputs
left out.

Token ids are drawn inside the vocabulary, pixels and features from a standard normal: the
inputs verify and every self-check use, so "equivalent" is always tested on valid inputs.

Padded batches: where a signature has an ``attention_mask`` (kind ``mask``), every row but the
first gets its own random length and its padding on a random side (right as encoders are fed,
left as decoders are batched for generation), so masks are exercised both ways in one batch;
the first row keeps the full length, so the longest sequence is always run. ``position_ids``
(kind ``positions``) then count the unpadded tokens as ``transformers``' generation does
(``cumsum(mask) − 1``, padded positions 1); ``token_type_ids`` (kind ``types``) are random
below their vocabulary. Padded positions hold random token ids: their outputs are whatever the
model computes for them, compared like any other (both sides get the same feeds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from normtool.graph import Graph, InputSpec

#: What the functions here read: a graph, or just its input signature (an ONNX file's, say).
Signature = Graph | Sequence[InputSpec]


def _specs(sig: Signature) -> Sequence[InputSpec]:
    return sig.inputs if isinstance(sig, Graph) else sig


def input_shape(spec: InputSpec, batch: int, seq: int) -> tuple[int, ...]:
    """Concrete shape for ``spec`` with the dynamic dims set (``seq`` capped at ``max_len``)."""
    dims = []
    for d in spec.shape:
        if d == "batch":
            dims.append(batch)
        elif d == "seq":
            dims.append(min(seq, spec.max_len) if spec.max_len else seq)
        else:
            dims.append(int(d))
    return tuple(dims)


def padding_mask(batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """int64 ``[batch, seq]``: row 0 all ones, each other row ``L`` ones (``L`` random in
    ``1..seq``) padded with zeros on a random side."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for row in range(1, batch):
        length = int(torch.randint(1, seq + 1, (), generator=g))
        if bool(torch.randint(0, 2, (), generator=g)):  # left padding
            mask[row, : seq - length] = 0
        else:
            mask[row, length:] = 0
    return mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``position_ids`` as ``transformers`` makes them for a padded batch in generation:
    the unpadded tokens counted from 0, padded positions 1."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def unpadded(feeds: Mapping[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """``y``'s values at the positions the feeds' ``attention_mask`` keeps (rows flattened),
    or ``y`` whole when it has no sequence axis of the mask's shape (pooled, logits per row).

    Why compare only these: a padded query's value is no function anyone defines. Under left
    padding and a causal mask it has every key hidden, and implementations legitimately differ
    there (ONNX Runtime's fused kernel spreads it over all keys, transformers picks its own);
    no kept position ever reads it (hidden keys get weight exactly 0)."""
    mask = feeds.get("attention_mask")
    if mask is None or y.dim() < 2 or tuple(y.shape[:2]) != tuple(mask.shape):
        return y
    return y[mask.to(y.device) != 0]


def random_inputs(sig: Signature, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    specs = _specs(sig)
    out: dict[str, torch.Tensor] = {}
    mask = None
    for spec in specs:
        shape = input_shape(spec, batch, seq)
        if spec.kind in ("tokens", "types"):
            out[spec.name] = torch.randint(0, spec.vocab, shape, generator=g, dtype=torch.int64)
        elif spec.kind == "mask":
            mask = out[spec.name] = padding_mask(shape[0], shape[1], g)
        elif spec.kind != "positions":
            out[spec.name] = torch.randn(shape, generator=g, dtype=torch.float64)
    for spec in specs:
        if spec.kind == "positions":
            shape = input_shape(spec, batch, seq)
            ones = torch.ones(shape, dtype=torch.int64)
            out[spec.name] = positions_from_mask(mask if mask is not None else ones)
    return out


def _seq_shape(given: Mapping[str, torch.Tensor], specs: Sequence[InputSpec]) -> tuple[int, int]:
    """``(batch, seq)`` of the token inputs given."""
    for s in specs:
        if s.kind in ("tokens", "mask", "types", "positions") and s.name in given:
            b, t = given[s.name].shape[:2]
            return int(b), int(t)
    raise KeyError("no token input given")


#: What an optional input holds when it is not given: no padding, positions 0..T−1, token
#: type 0 — what ``transformers`` assumes for each left out.
DEFAULTS: dict[str, Callable[[int, int], torch.Tensor]] = {
    "mask": lambda b, t: torch.ones(b, t, dtype=torch.int64),
    "positions": lambda b, t: torch.arange(t, dtype=torch.int64).expand(b, t),
    "types": lambda b, t: torch.zeros(b, t, dtype=torch.int64),
}


def complete_inputs(sig: Signature, given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``given`` with every optional input it lacks filled by ``DEFAULTS``.

    Why: a checkpoint built before masks were inputs, a caller feeding only ``input_ids`` and a
    model that takes a mask must still run on the same data (an unpadded batch)."""
    specs = _specs(sig)
    missing = [s for s in specs if s.name not in given and s.kind in DEFAULTS]
    if not missing:
        return dict(given)
    b, t = _seq_shape(given, specs)
    return {**given, **{s.name: DEFAULTS[s.kind](b, t) for s in missing}}


def optional(spec: InputSpec) -> bool:
    """Whether ``spec`` may be left out (``complete_inputs`` fills it)."""
    return spec.kind in DEFAULTS


def max_seq(sig: Signature, default: int = 16) -> int:
    """The longest sequence the graph accepts (its position table), or ``default`` without one."""
    lens = [s.max_len for s in _specs(sig) if s.kind == "tokens" and s.max_len]
    return min(lens) if lens else default
