"""No silent assumptions (issue 14 item 2): values a checkpoint does not record — PowerNorm's
group count, a timm-style ViT's norm eps, an MLP's activation — are given by flags
(``--pn-groups``, ``--eps``, ``--act``) or stated as assumptions on stderr, in ``--json``, in
``inspect`` and in every output's history.

References are the plain-torch timm-style ViT of ``tests.factories_hf``, built with the group
count / eps the checkpoint was made with. Tolerances: fp64 runs of fp32-stored weights through
the fp64 executor agree with the fp64 reference to float64 rounding (measured ~1e-15 of the logit
scale), so 1e-12; a folded or converted output stored in fp32 carries one fp32 rounding per
rewritten weight (~6e-8 each, ~1e-6 on the logits), so 1e-5. The wrong values these flags fix
move the logits by far more: PowerNorm groups 4 instead of 1 by 0.45 of the scale (top-1
agreement 77% on 64 images), LayerNorm eps 1e-6 instead of 1e-5 by 7e-5.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from devkit.factories import load_timm_vit, make_reference_transformer, make_timm_vit
from normtool.load import load_model
from normtool.runtime.torch_exec import run_graph
from tests.conftest import cli

FP64_REL = 1e-12
STORED_FP32_REL = 1e-5
GROUPS_WHY = "MaskPowerNorm's own default is group_num=1"


def _pixels(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


def _rel_error(path, ref: torch.nn.Module, **load: object) -> float:
    """max |graph − reference| / max |reference| on the logits, both run in fp64."""
    model = load_model(path, **load)
    x = _pixels()
    got = run_graph(model.graph, model.weights(), {"pixel_values": x}, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
    return ((got["logits"] - want).abs().max() / want.abs().max()).item()


@pytest.fixture
def pn1(tmp_path):
    """A timm-style ViT whose PowerNorms were trained with MaskPowerNorm's group_num=1."""
    return make_timm_vit(tmp_path / "pn1", heads=4, norm="powernorm", pn_groups=1)


def _whats(assumptions: list[dict]) -> list[str]:
    return [a["what"] for a in assumptions]


# ---- PowerNorm groups ------------------------------------------------------------------------
def test_fold_with_pn_groups_is_exact_against_the_group_num_1_reference(pn1, tmp_path):
    out = tmp_path / "folded.safetensors"
    r = cli("fold", pn1, "--heads", "4", "--pn-groups", "1", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert "powernorm groups" not in _whats(json.loads(r.stdout)["assumptions"])
    assert "assuming powernorm groups" not in r.stderr
    ref = load_timm_vit(pn1, 4, torch.float64, pn_groups=1)
    assert _rel_error(out, ref) <= STORED_FP32_REL
    assert load_model(out).history[-1]["params"]["pn_groups"] == 1


def test_fold_without_pn_groups_states_the_assumption(pn1, tmp_path):
    out = tmp_path / "folded.safetensors"
    r = cli("fold", pn1, "--heads", "4", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "powernorm groups" in ln]
    assert len(lines) == 1 and lines[0].startswith("normtool: assuming powernorm groups = 4 ")
    assert GROUPS_WHY in lines[0] and "--pn-groups" in lines[0] and str(pn1) in lines[0]
    stated = {a["what"]: a for a in json.loads(r.stdout)["assumptions"]}
    assert stated["powernorm groups"]["value"] == 4 and stated["powernorm eps"]["value"] == 1e-5
    # the output stores the value as data (not re-assumed) and keeps the record in its history
    folded = load_model(out)
    assert folded.assumptions == []
    assert _whats(folded.history[-1]["assumptions"]) == ["powernorm eps", "powernorm groups"]
    r = cli("inspect", out, "--json")
    assert r.returncode == 0 and "assuming" not in r.stderr
    earlier = json.loads(r.stdout)["assumed_earlier"]
    assert [(a["transform"], a["what"], a["value"]) for a in earlier] == [
        ("fold", "powernorm eps", 1e-5),
        ("fold", "powernorm groups", 4),
    ]
    # what the assumption costs on this model: the silent error
    ref = load_timm_vit(pn1, 4, torch.float64, pn_groups=1)
    assert _rel_error(out, ref) > 0.1


def test_inspect_lists_assumptions_eps_and_groups(pn1):
    r = cli("inspect", pn1, "--heads", "4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert _whats(d["assumptions"]) == ["powernorm eps", "powernorm groups"]
    assert d["norm_eps"] == {"powernorm": [1e-5]} and d["norm_groups"] == {"powernorm": [4]}
    r = cli("inspect", pn1, "--heads", "4", "--pn-groups", "1", "--eps", "1e-5")
    assert r.returncode == 0 and "assumed:" not in r.stdout and r.stderr == ""
    assert "norm eps: powernorm 1e-05" in r.stdout and "norm groups: powernorm 1" in r.stdout
    r = cli("inspect", pn1, "--heads", "4")
    assert "  assumed: powernorm groups = 4 (the head count" in r.stdout


def test_verify_and_export_state_assumptions(pn1, tmp_path):
    folded = tmp_path / "folded.safetensors"
    assert cli("fold", pn1, "--heads", "4", "--pn-groups", "1", "-o", folded).returncode == 0
    r = cli("verify", pn1, folded, "--heads", "4", "--pn-groups", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert [(a["file"], a["what"]) for a in json.loads(r.stdout)["assumptions"]] == [
        (str(pn1), "powernorm eps")
    ]
    assert r.stderr.count("normtool: assuming ") == 1
    # an ONNX export writes no transform entry of its own, but must still record the guesses
    onnx_path = tmp_path / "m.onnx"
    r = cli("export", pn1, "--heads", "4", "-o", onnx_path, "--json")
    assert r.returncode == 0, r.stderr
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    last = json.loads(meta["normtool.history"])[-1]
    assert last["transform"] == "export"
    assert _whats(last["assumptions"]) == ["powernorm eps", "powernorm groups"]


# ---- timm-style ViT LayerNorm eps --------------------------------------------------------------
def test_timm_vit_eps_flag_matches_the_reference(tmp_path):
    path = make_timm_vit(tmp_path, heads=4, eps=1e-5)
    ref = load_timm_vit(path, 4, torch.float64, eps=1e-5)
    assert _rel_error(path, ref, heads=4, eps=1e-5) <= FP64_REL
    assert _rel_error(path, ref, heads=4) > 1e-6  # the default 1e-6 reads this model wrongly
    out = tmp_path / "rms.safetensors"
    r = cli("convert-ln-to-rms", path, "--heads", "4", "--eps", "1e-5", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["assumptions"] == [] and "assuming" not in r.stderr
    assert _rel_error(out, ref) <= STORED_FP32_REL


def test_timm_vit_default_eps_is_stated(tmp_path):
    path = make_timm_vit(tmp_path, heads=4)
    out = tmp_path / "rms.safetensors"
    r = cli("convert-ln-to-rms", path, "--heads", "4", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    (a,) = json.loads(r.stdout)["assumptions"]
    assert (a["what"], a["value"]) == ("layernorm eps", 1e-6) and "--eps" in a["why"]
    assert "normtool: assuming layernorm eps = 1e-06 (timm's ViT default" in r.stderr
    assert _whats(load_model(out).history[-1]["assumptions"]) == ["layernorm eps"]
    r = cli("inspect", path, "--heads", "4")
    assert "norm eps: layernorm 1e-06" in r.stdout and "assumed: layernorm eps" in r.stdout


# ---- recorded values are facts; bad values are refused ---------------------------------------
def test_recorded_values_are_not_assumed_and_not_overridden(tmp_path):
    """normtool's own transformer records eps in its config and fixes PowerNorm's groups to its
    head count in code: nothing is assumed, and a flag may repeat a value but not change it."""
    path = make_reference_transformer(tmp_path, norm="powernorm")
    r = cli("inspect", path, "--json", "--eps", "1e-5", "--pn-groups", "4")
    assert r.returncode == 0 and json.loads(r.stdout)["assumptions"] == []
    for flag, value, what in (
        ("--eps", "1e-6", "powernorm eps"),
        ("--pn-groups", "2", "powernorm groups"),
    ):
        r = cli("inspect", path, flag, value)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
        assert f"{flag} {float(value):g} contradicts the {what} " in r.stderr


def test_mlp_activation_is_stated(mlp_path):
    r = cli("inspect", mlp_path, "--json")
    assert _whats(json.loads(r.stdout)["assumptions"]) == ["mlp activation"]
    assert "normtool: assuming mlp activation = relu" in r.stderr
    r = cli("inspect", mlp_path, "--act", "relu", "--json")
    assert json.loads(r.stdout)["assumptions"] == [] and r.stderr == ""


@pytest.mark.parametrize(
    "flag,value,problem",
    [
        ("--pn-groups", "0", "expected a positive integer"),
        ("--pn-groups", "-2", "expected a positive integer"),
        ("--pn-groups", "3", "do not divide the width 32"),
        ("--eps", "0", "expected a finite number > 0"),
        ("--eps", "-1e-5", "expected a finite number > 0"),
        ("--eps", "nan", "expected a finite number > 0"),
        ("--eps", "inf", "expected a finite number > 0"),
    ],
)
def test_bad_values_exit_2_in_one_line(pn1, tmp_path, flag, value, problem):
    out = tmp_path / "folded.safetensors"
    r = cli("fold", pn1, "--heads", "4", flag, value, "-o", out)
    assert r.returncode == 2 and not out.exists()
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"normtool: error: {pn1}: ") and problem in line
