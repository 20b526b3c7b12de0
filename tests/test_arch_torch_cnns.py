"""CNNs as timm and torchvision store them: ResNet, MobileNetV2, ConvNeXt state dicts.

Reference: ``devkit.torch_cnns``' plain-torch forwards of the same state dicts (timm and
torchvision do not import here), written the way the original modules compute — ConvNeXt's MLP
as ``Linear`` on channels-last maps, BatchNorm through ``F.batch_norm`` — so they share no code
with normtool's executor, emitter or graph. Every command is run through the CLI.

Tolerances: fp32 max-abs 1e-4 on logits of scale 0.5–15: the same convolutions in another
order (BN as scale/shift, MLP as 1×1 conv) differ by ~1e-6 (measured ≤ 1.5e-5 at 224×224
through MobileNetV2's 52 convs), while a wrong op moves logits by O(0.1). fp64 1e-12: rounding
only.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from devkit import torch_cnns as tc
from devkit.fold_cases import FP32_ABS, FP64_REL, errors, pixels
from normtool.load import load_model
from normtool.passes.fold import fold_norms
from normtool.runtime.torch_exec import run_graph
from tests.conftest import cli

FP32 = 1e-4
CASES = {
    "resnet_basic": ("timm_resnet", {"block": "basic"}),
    "resnet_bottleneck": ("timm_resnet", {"block": "bottleneck"}),
    "resnext": ("timm_resnet", {"block": "bottleneck", "groups": 4}),
    "mobilenet_v2": ("tv_mobilenet_v2", {}),
    "convnext": ("timm_convnext", {}),
    "convnext_conv_mlp": (
        "timm_convnext",
        {"conv_mlp": True, "head_norm_first": True, "layer_scale": False},
    ),
}
#: cases saved as timm hub folders (config.json with a 32×32 input size: quick self-checks);
#: the others as bare .safetensors state dicts (verify and the self-checks then use 224×224)
FOLDERS = {"resnet_bottleneck": "resnet50", "convnext": "convnext_atto"}
BN_CASES = ("resnet_basic", "resnet_bottleneck", "resnext", "mobilenet_v2")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """``case(name) -> (path, state dict, reference forward)``, each saved once."""
    root = tmp_path_factory.mktemp("torch_cnns")
    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            family, kw = CASES[name]
            maker, forward = tc.FAMILIES[family]
            sd = maker(**kw)
            if name in FOLDERS:
                path = tc.save_timm_folder(sd, root / name, FOLDERS[name], 32)
            else:
                path = tc.save(sd, root / f"{name}.safetensors")
            made[name] = (path, sd, forward)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_executor_matches_reference(case, name):
    path, sd, forward = case(name)
    model = load_model(path)
    assert model.graph.family == CASES[name][0]
    x = pixels((2, 3, 32, 32), 0)
    got = run_graph(model.graph, model.weights(), {"pixel_values": x})["logits"]
    want = forward(sd, x)
    assert want.abs().max() > 0.1  # not two near-zero outputs
    assert (got - want).abs().max().item() <= FP32
    x64 = x.double()
    got64 = run_graph(model.graph, model.weights(), {"pixel_values": x64}, dtype=torch.float64)
    assert (got64["logits"] - forward(sd, x64)).abs().max().item() <= 1e-12


@pytest.mark.parametrize("name", list(CASES))
def test_export_takes_any_image_size_and_verifies(case, name, tmp_path):
    path, sd, forward = case(name)
    onnx_path = tmp_path / "m.onnx"
    r = cli("export", path, "-o", onnx_path, "--quiet")
    assert r.returncode == 0, r.stderr
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for shape in ((2, 3, 32, 32), (1, 3, 40, 56)):
        x = pixels(shape, 1)
        (got,) = sess.run(None, {"pixel_values": x.numpy()})
        assert np.abs(got - forward(sd, x).numpy()).max() <= FP32, shape
    r = cli("verify", path, onnx_path, "--quiet", "--samples", "2")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", BN_CASES)
def test_fold_batchnorm_matches_reference(case, name):
    path, sd, forward = case(name)
    model = load_model(path)
    r = fold_norms(model)
    assert r.stored().graph.norm_kinds() == [] and not r.report["skipped"]
    assert {f.how for f in r.report["folded"]} == {"backward"}  # every BN into the conv before it
    e = errors(r.stored(), r.exact(), lambda dtype, x: forward(sd, x), pixels((2, 3, 32, 32), 2),
               "pixel_values")  # fmt: skip
    assert e["fp64_rel"] <= FP64_REL and e["fp32_abs"] <= FP32_ABS, e


def test_fold_cli_output_computes_the_original(case, tmp_path):
    path, sd, forward = case("resnet_bottleneck")
    out = tmp_path / "folded.safetensors"
    r = cli("fold", path, "-o", out, "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == []
    folded = load_model(out)
    x = pixels((2, 3, 32, 32), 3)
    got = run_graph(folded.graph, folded.weights(), {"pixel_values": x})["logits"]
    assert (got - forward(sd, x)).abs().max().item() <= FP32


def test_fold_refuses_convnext_with_the_reason(case):
    r = cli("fold", case("convnext")[0])
    assert r.returncode == 2
    assert "LayerNorm over channels uses each pixel's own statistics" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["resnet_bottleneck", "mobilenet_v2"])
def test_merge_recomputes_batchnorm_from_calib(name, tmp_path):
    family, kw = CASES[name]
    maker, forward = tc.FAMILIES[family]
    sd = maker(**kw)
    path = tc.save(sd, tmp_path / "a.safetensors")
    other = tc.save(maker(**kw, seed=1), tmp_path / "b.safetensors")
    calib = pixels((8, 3, 32, 32), 4)  # smaller than the 224 signature: these take any size
    tc.save({"inputs": calib}, tmp_path / "calib.safetensors")
    out = tmp_path / "merged.safetensors"
    r = cli("merge", path, other, "-o", out, "--calib", tmp_path / "calib.safetensors", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["batchnorm"] == "recomputed"
    merged = load_file(str(out))
    assert set(merged) == set(sd)  # same names: timm / torchvision load it as they saved it
    seen: dict[str, torch.Tensor] = {}
    forward(merged, calib.double(), seen=seen)  # the statistics' true values: fp64
    assert len(seen) == sum(k.endswith(".running_var") for k in sd)
    for key, x in seen.items():
        flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
        for stat, want in (("running_mean", flat.mean(1)), ("running_var", flat.var(1))):
            got = merged[f"{key}.{stat}"].double()
            # normtool measures them in fp32 through up to 52 convs, each BN after the ones
            # before it are recomputed: measured ≤ 7e-5 of their scale at MobileNetV2's last
            # BN; a statistic left stale or taken at another BN is off by O(1) of its scale
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= 3e-4 * scale, (key, stat)


def test_merge_convnext_with_itself_is_the_original(tmp_path):
    """Merging a ConvNeXt with itself must give itself (layer scale, depthwise convs and
    LayerNorm over channels all follow their spaces' permutations)."""
    sd = tc.convnext_state_dict()
    path, forward = tc.save(sd, tmp_path / "cx.safetensors"), tc.convnext_forward
    out = tmp_path / "merged.safetensors"
    r = cli("merge", path, path, "-o", out, "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    x = pixels((2, 3, 32, 32), 5)
    got = forward(load_file(str(out)), x)
    assert (got - forward(sd, x)).abs().max().item() <= FP32


# ---- recognition ---------------------------------------------------------------------------


def test_pth_with_module_prefix(tmp_path):
    sd = tc.resnet_state_dict("bottleneck", seed=3)
    path = tc.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "r.pth")
    model = load_model(path)
    assert model.graph.family == "timm_resnet"
    x = pixels((2, 3, 32, 32), 6)
    got = run_graph(model.graph, model.weights(), {"pixel_values": x})["logits"]
    assert (got - tc.resnet_forward(sd, x)).abs().max().item() <= FP32


def test_timm_hub_folder_gives_the_input_size(tmp_path):
    folder = tc.save_timm_folder(tc.convnext_state_dict(), tmp_path / "cx", "convnext_atto", 64)
    r = cli("inspect", folder, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["family"] == "timm_convnext"
    assert info["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    assert [a["what"] for a in info["assumptions"]] == ["LayerNorm eps"]


def test_timm_config_of_another_architecture_is_not_guessed(tmp_path):
    folder = tc.save_timm_folder(tc.resnet_state_dict(), tmp_path / "r", "vit_small", 32)
    r = cli("inspect", folder)
    assert r.returncode == 2 and "unknown architecture" in r.stderr


def test_eps_flag_replaces_the_assumption(case):
    path, sd, forward = case("resnet_basic")
    r = cli("inspect", path, "--json", "--eps", "1e-3")
    assert r.returncode == 0 and json.loads(r.stdout)["assumptions"] == []
    model = load_model(path, eps=1e-3)
    x = pixels((2, 3, 32, 32), 7)
    got = run_graph(model.graph, model.weights(), {"pixel_values": x})["logits"]
    assert (got - forward(sd, x, eps=1e-3)).abs().max().item() <= FP32
    assert (got - forward(sd, x)).abs().max().item() > 1e-3  # eps matters: the check can fail


# ---- refusals ------------------------------------------------------------------------------


def _refused(tmp_path, sd: dict, words: str) -> None:
    path = tc.save(sd, tmp_path / "bad.safetensors")
    r = cli("inspect", path)
    assert r.returncode == 2, r.stdout
    assert words in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_extra_tensors_are_refused(tmp_path):
    """A squeeze-excitation ResNet has every plain ResNet tensor: computing it without its SE
    modules would be another function, so the unread tensors are named."""
    sd = tc.resnet_state_dict()
    sd["layer1.0.se.fc1.weight"] = torch.ones(2, 8, 1, 1)
    _refused(tmp_path, sd, "'layer1.0.se.fc1.weight'")


def test_convnext_v2_grn_is_refused(tmp_path):
    sd = tc.convnext_state_dict()
    sd["stages.0.blocks.0.mlp.grn.weight"] = torch.ones(32)
    _refused(tmp_path, sd, "mlp.grn.weight")


def test_mobilenet_v2_of_another_block_count_is_refused(tmp_path):
    sd = tc.mobilenet_v2_state_dict()
    # drop block 17 and renumber the last conv: 16 blocks, whose strides torchvision's
    # setting does not give
    sd = {k: v for k, v in sd.items() if not k.startswith("features.17.")}
    sd = {k.replace("features.18.", "features.17."): v for k, v in sd.items()}
    _refused(tmp_path, sd, "16 inverted residual blocks")


def test_resnet_deep_stem_is_refused(tmp_path):
    sd = tc.resnet_state_dict()
    sd["conv1.0.weight"] = sd.pop("conv1.weight")
    _refused(tmp_path, sd, "deep stem")
