"""Convolutional families: the executor's output equals the independent references.

References: normtool's SmallCNN module (plain torch) for ``normtool_cnn``, and transformers' own
``ResNetForImageClassification`` forward for ``resnet`` (random small configs, save_pretrained).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from devkit.factories import make_cnn, make_resnet
from normtool.errors import NormtoolError
from normtool.load import load_model
from normtool.nn.save import load_reference
from normtool.runtime.torch_exec import run_graph


def _pixels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_cnn_executor_matches_module(tmp_path):
    path = make_cnn(tmp_path, conv_bias=True, channels=[6, 10, 12], strides=[1, 2, 2])
    model = load_model(path)
    assert model.graph.family == "normtool_cnn"
    assert model.graph.norm_kinds() == ["batchnorm"]
    ref = load_reference(path)
    x = _pixels((4, 3, 16, 16), 0)
    got = run_graph(model.graph, model.weights(), {"input": x})["logits"]
    want = ref(x)
    # same fp32 convolutions; BN is applied as a per-channel scale/shift instead of torch's
    # fused batch_norm, which reorders a few roundings: allow 1e-5 on O(1) logits
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err
    # fp64 run of the same graph against the module in fp64: rounding noise only
    got64 = run_graph(model.graph, model.weights(), {"input": x.double()}, dtype=torch.float64)
    want64 = ref.double()(x.double())
    assert (got64["logits"] - want64).abs().max().item() <= 1e-12


def test_cnn_spaces_chain(tmp_path):
    g = load_model(make_cnn(tmp_path)).graph
    # each conv output is its own channel space, and the next conv reads it
    assert g.tensors["blocks.0.conv.weight"].axes == ("blocks.0.conv", "input", None, None)
    assert g.tensors["blocks.1.conv.weight"].axes == ("blocks.1.conv", "blocks.0.conv", None, None)
    assert g.tensors["blocks.1.bn.running_var"].axes == ("blocks.1.conv",)
    assert g.tensors["head.weight"].axes == ("logits", "blocks.1.conv")
    assert g.spaces["blocks.0.conv"].kind == "channels"


@pytest.mark.parametrize(
    ("layer_type", "config"),
    [
        ("basic", {}),
        (
            "basic",
            {"downsample_in_first_stage": True, "embedding_size": 8, "hidden_sizes": [8, 16]},
        ),
        ("bottleneck", {}),
        ("bottleneck", {"downsample_in_bottleneck": True, "downsample_in_first_stage": True}),
    ],
)
def test_resnet_matches_transformers(tmp_path, layer_type, config):
    from transformers import ResNetForImageClassification

    folder = make_resnet(tmp_path, layer_type, **config)
    model = load_model(folder)
    assert model.graph.family == "resnet"
    hf = ResNetForImageClassification.from_pretrained(folder).eval()
    x = _pixels((3, 3, 40, 40), 1)
    got = run_graph(model.graph, model.weights(), {"pixel_values": x})["logits"]
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    # the bound for every Hugging Face family: max-abs 1e-4 in fp32
    err = (got - want).abs().max().item()
    assert err <= 1e-4, err
    assert want.abs().max().item() > 1e-2  # the comparison is not between two near-zero outputs


def test_resnet_residual_spaces_shared(tmp_path):
    g = load_model(make_resnet(tmp_path, "bottleneck")).graph
    # stage 1: layer 0's shortcut and the last conv of both layers write one residual space
    resid = g.tensors["stages.1.layers.0.shortcut.conv.weight"].axes[0]
    assert g.tensors["stages.1.layers.0.conv2.weight"].axes[0] == resid
    assert g.tensors["stages.1.layers.1.conv2.weight"].axes[0] == resid
    assert g.tensors["stages.1.layers.1.conv0.weight"].axes[1] == resid
    assert g.tensors["head.weight"].axes[1] == resid
    assert g.tensors["head.weight"].source.key == "classifier.1.weight"


def test_resnet_missing_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = make_resnet(tmp_path, "basic")
    f = folder / "model.safetensors"
    sd = load_file(str(f))
    del sd["resnet.encoder.stages.1.layers.0.layer.1.normalization.running_var"]
    save_file(sd, str(f))
    with pytest.raises(NormtoolError, match="layer.1.normalization.running_var"):
        load_model(folder)


def test_trained_cnn_fixture_matches_module():
    path = Path(__file__).resolve().parent.parent / "fixtures" / "cnn_bn.safetensors"
    model = load_model(path)
    ref = load_reference(path)
    x = _pixels((5, 3, 16, 16), 2)
    got = run_graph(model.graph, model.weights(), {"input": x})["logits"]
    # fp32, same ops except BN as scale/shift: a few roundings on O(10) logits
    assert (got - ref(x)).abs().max().item() <= 1e-4
