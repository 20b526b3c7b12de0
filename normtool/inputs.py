"""Seeded random inputs that match a graph's input signature.

Token ids are drawn inside the vocabulary, pixels and features from a standard normal: the
inputs verify and every self-check use, so "equivalent" is always tested on valid inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def random_inputs(sig: Signature, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in _specs(sig):
        shape = input_shape(spec, batch, seq)
        if spec.kind == "tokens":
            out[spec.name] = torch.randint(0, spec.vocab, shape, generator=g, dtype=torch.int64)
        else:
            out[spec.name] = torch.randn(shape, generator=g, dtype=torch.float64)
    return out


def max_seq(sig: Signature, default: int = 16) -> int:
    """The longest sequence the graph accepts (its position table), or ``default`` without one."""
    lens = [s.max_len for s in _specs(sig) if s.kind == "tokens" and s.max_len]
    return min(lens) if lens else default
