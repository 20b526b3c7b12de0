"""The op-kind table (``normtool.opspec``): every kind complete, and the rotary embedding added
through it checked against references written out here."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

import normtool.graph
from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec, Op, Source, Space, TensorSpec
from normtool.inputs import random_inputs
from normtool.merge.groups import permutation_groups
from normtool.opspec import SPECS, implementations, kinds
from normtool.runtime.onnx_emit import EMITTERS, EmitOptions, emit_onnx
from normtool.runtime.ort import create_session
from normtool.runtime.torch_exec import OPS, run_graph
from tests.test_export import rope_graph

TRAIT_VALUES = {
    "commutes_affine": {"", "always", "positive"},
    "pins": {"", "groups", "grouped_map", "input"},
}


# ---- completeness ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(SPECS))
def test_every_kind_is_complete(kind):
    """Params, input count, output rank, torch function, ONNX emitter, every trait a value of
    its declared set, and a row in the graph module's op table."""
    spec = SPECS[kind]
    assert spec.kind == kind and spec.inputs >= 1
    assert not set(spec.required) & set(spec.optional)
    assert isinstance(spec.rank([3] * spec.inputs), int)
    assert callable(OPS[kind]) and callable(EMITTERS[kind])
    for trait, allowed in TRAIT_VALUES.items():
        assert getattr(spec, trait) in allowed
    assert f"\n{kind} " in normtool.graph.__doc__


def test_a_kind_without_implementation_fails_at_import():
    """The runtime modules bind their functions with ``implementations``: a kind missing one is
    named at import time, not when a graph that uses it first runs."""
    namespace = {f"_{k}": print for k in SPECS if k != "rope"}
    with pytest.raises(RuntimeError, match="'rope'"):
        implementations(namespace, "torch function")


def test_traits_are_coherent():
    """Traits the passes combine: removable and token-statistics norms are norms; position tables
    (shape-only) write the stream; nothing both carries and writes the stream."""
    norms = kinds("norm")
    assert kinds("token_stats") <= norms and kinds("affine_at_inference") <= norms
    assert kinds("shape_only") <= kinds("writes_stream")
    assert not kinds("carries_stream") & kinds("writes_stream")
    assert kinds("skip_fusable") <= kinds("token_stats")


# ---- rope: torch function against an independent reference --------------------------------
def _rotary_reference(x: torch.Tensor, heads: int, fraction: float, base: float) -> torch.Tensor:
    """Rotary embedding as complex multiplication: per head, channel pairs (i, i + r/2) of the
    first r = int(D·fraction) dims are the complex number x_i + j·x_{i+r/2}, multiplied by
    exp(j·t·base^(−2i/r)) at position t (the GPT-NeoX/Llama "rotate half" layout)."""
    b, t, c = x.shape
    d = c // heads
    r = int(d * fraction)
    xh = x.reshape(b, t, heads, d).double()
    z = torch.complex(xh[..., : r // 2], xh[..., r // 2 : r])
    theta = base ** (-2.0 * torch.arange(r // 2, dtype=torch.float64) / r)
    angle = torch.arange(t, dtype=torch.float64)[:, None] * theta[None, :]
    w = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    out = torch.cat([w.real, w.imag, xh[..., r:]], dim=-1)
    return out.reshape(b, t, c)


@pytest.mark.parametrize(("heads", "fraction", "base"), [(2, 1.0, 10000.0), (4, 0.5, 100.0)])
def test_rope_matches_complex_rotation(heads, fraction, base):
    """float64: both compute the same angles in float64, so they agree to rounding (1e-12 on
    values of order 1); a wrong pairing, sign or frequency is off by order 1."""
    x = torch.randn(3, 11, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    attrs = {"heads": heads, "fraction": fraction, "base": base}
    got = OPS["rope"](Op("r", "rope", ("x",), "y", {}, attrs), [x], {})
    want = _rotary_reference(x, heads, fraction, base)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert not torch.allclose(got, x)  # it rotates something
    assert torch.equal(got[:, 0], x[:, 0])  # position 0: angle 0


# ---- rope: ONNX export against the executor ------------------------------------------------
@pytest.mark.parametrize("opset", [17, 23])
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_rope_onnx_matches_executor(opset, fraction):
    """fp32, batch 3 × 9 positions: the same angles (fp32 products of the same fp32
    frequencies), so only cos/sin and the summation orders differ — bound 1e-5 of the logits'
    scale (tens, random weights; observed under 1e-6), where a wrong rotation is off by a
    tenth of it or more. Opset 23 writes one ``RotaryEmbedding`` node, below it the rotation
    written out."""
    graph, weights = rope_graph(fraction)
    proto = emit_onnx(graph, weights, EmitOptions(opset=opset))
    onnx.checker.check_model(proto, full_check=True)
    node_types = {n.op_type for n in proto.graph.node}
    assert ("RotaryEmbedding" in node_types) == (opset >= 23)
    x = random_inputs(graph, 3, 9, seed=1)
    want = run_graph(graph, weights, x)["head"].numpy()
    got = create_session(proto.SerializeToString(), "cpu").run({k: v.numpy() for k, v in x.items()})
    assert np.abs(got["logits"] - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(
    ("attrs", "problem"),
    [
        ({"heads": 3}, "heads 3"),
        ({"heads": 2, "fraction": 0.375}, "3 rotary dims"),
        ({"heads": 2, "fraction": 1.5}, "fraction 1.5"),
        ({"heads": 2, "base": -1.0}, "base -1.0"),
        ({"heads": 2, "base": math.inf}, "base inf"),
    ],
)
def test_rope_attributes_are_validated(attrs, problem):
    """Graph metadata that would make the rotation undefined is refused on load, naming it."""
    graph, _ = rope_graph()
    graph.op("rope_q").attrs = attrs
    with pytest.raises(NormtoolError, match=problem):
        graph.validate()


def test_rope_pins_its_space_for_merge():
    """Under rotary embeddings a q/k dim has its own frequency: merge must not permute it."""
    graph, _ = rope_graph()
    groups, skipped = permutation_groups(graph)
    assert "(rope)" in skipped["w16"]
    assert all("w16" not in g.spaces for g in groups)


@pytest.mark.parametrize(
    ("kind", "inputs", "attrs", "problem"),
    [
        ("id_positions", ("h",), {"pad": 1}, "not a graph input of token ids"),
        ("id_positions", ("ids",), {"pad": -2}, "pad -2 is not an integer"),
        ("pick_token", ("h", "h"), {"eos": 7}, "not a graph input of token ids"),
        ("pick_token", ("h", "ids"), {"eos": "7"}, "eos '7' is not a token id"),
        ("pick_token", ("h", "ids"), {"eos": -3}, "eos -3 is not a token id"),
    ],
)
def test_token_id_ops_are_validated(kind, inputs, attrs, problem):
    """RoBERTa's positions and CLIP's EOS pooling index by token ids: a graph (say, tampered
    metadata) feeding them anything else is refused, not run into a torch error."""
    g = Graph(
        "t",
        [InputSpec("ids", "tokens", ("batch", "seq"), vocab=8, max_len=4)],
        ["out"],
        [
            Op("emb", "embed", ("ids",), "h", {"weight": "tab"}),
            Op(
                "out",
                kind,
                inputs,
                "out",
                {"weight": "pos"} if kind == "id_positions" else {},
                attrs,
            ),
        ],
        {"tokens": Space("tokens", 8, "input"), "resid": Space("resid", 4, "resid")},
        {
            "tab": TensorSpec((8, 4), (None, "resid"), Source("tab")),
            "pos": TensorSpec((8, 4), (None, "resid"), Source("pos")),
        },
        {"ids": "tokens", "h": "resid", "out": "resid"},
    )
    with pytest.raises(NormtoolError, match=problem):
        g.validate()
