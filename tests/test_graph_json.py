"""The graph's JSON (stored in every normtool checkpoint) round-trips, field for field.

Why: ``Graph.to_json`` serialises dataclasses by their ``vars`` (no deep copy) for speed; this
checks it says exactly what ``dataclasses.asdict`` says, and that ``from_json`` rebuilds an
equal graph, for graphs of every kind the project builds (ops with nested attributes, sliced,
transposed and reshaped sources, image and token inputs).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from devkit.factories import (
    make_cnn,
    make_gpt2,
    make_reference_transformer,
    make_resnet,
    make_timm_vit,
    make_vit,
)
from normtool.graph import Graph
from normtool.load import load_model

MAKERS = {
    "reference": lambda d: make_reference_transformer(d, "r", norm="layernorm", parallel=True),
    "cnn": lambda d: make_cnn(d),
    "resnet": lambda d: make_resnet(d),
    "gpt2": lambda d: make_gpt2(d / "gpt2"),
    "vit": lambda d: make_vit(d / "vit"),
    "timm_vit": lambda d: make_timm_vit(d, heads=4),
}
HEADS = {"timm_vit": 4}  # a timm state dict has no config


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_graph_json_round_trip(tmp_path, kind):
    g = load_model(MAKERS[kind](tmp_path), heads=HEADS.get(kind)).graph
    text = g.to_json()
    assert json.loads(text) == json.loads(json.dumps(asdict(g)))
    back = Graph.from_json(text)
    assert back == g and back.to_json() == text


def test_non_json_attributes_are_refused(tmp_path):
    """Only dataclasses are unpacked: a tensor left in an op's attributes is an error, not ``{}``."""
    g = load_model(MAKERS["cnn"](tmp_path)).graph
    g.ops[0].attrs["oops"] = torch.zeros(2)
    with pytest.raises(TypeError, match="Tensor"):
        g.to_json()
