"""``normtool verify`` and ``compare_models``: exit codes, the numbers reported, the JSON schema.

The reported errors are checked against an independent computation: the same inputs run through
the plain-torch modules the checkpoints were saved from, differences taken here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.verify import TOLERANCES, compare_models
from tests.conftest import run_cli

DELTA = 1e-3  # the single-weight perturbation verify must catch at default tolerances


def _save(net: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _perturbed(net: torch.nn.Sequential, key: str, index: tuple[int, ...]) -> torch.nn.Sequential:
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.state_dict()[key][index] += DELTA
    return twin.eval()


@pytest.fixture(scope="module")
def mlp_pair(tmp_path_factory, mlp_net):
    """The shared MLP and a twin whose first-layer weight [0, 0] is moved by DELTA."""
    d = tmp_path_factory.mktemp("verify")
    twin = _perturbed(mlp_net, "0.weight", (0, 0))
    return _save(mlp_net, d / "a.safetensors"), _save(twin, d / "b.safetensors"), twin


def test_self_is_equivalent_exit_0(mlp_path):
    r = run_cli("verify", mlp_path, mlp_path)
    assert r.returncode == 0, r.stderr
    assert "equivalent" in r.stdout and "FAIL" not in r.stdout


@pytest.mark.parametrize("dtype", ["fp64", "fp32"])
def test_one_weight_moved_by_1e3_is_caught(mlp_pair, dtype):
    a, b, _ = mlp_pair
    r = run_cli("verify", a, b, "--dtype", dtype)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not equivalent" in r.stderr and str(b) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_reported_numbers_match_plain_torch(mlp_pair, mlp_net):
    """max_abs, scale and top-1 agreement recomputed from the torch modules on the same inputs."""
    a, b, twin = mlp_pair
    rep = compare_models(load_model(a), load_model(b), "fp64", samples=5, seed=3)
    graph = load_model(a).graph
    want_abs, want_scale, agree, rows = 0.0, 0.0, 0, 0
    net, twin = copy.deepcopy(mlp_net).double(), copy.deepcopy(twin).double()
    with torch.no_grad():
        for k, (batch, seq) in enumerate(rep.batches):
            x = random_inputs(graph, batch, seq or 1, 3 + k)["input"]
            ya, yb = net(x), twin(x)
            want_abs = max(want_abs, float((ya - yb).abs().max()))
            want_scale = max(want_scale, float(ya.abs().max()))
            agree += int((ya.argmax(-1) == yb.argmax(-1)).sum())
            rows += batch
    (out,) = rep.outputs
    # both sides are fp64 runs of the same maths: agreement to ~1e-15 relative
    assert out.max_abs == pytest.approx(want_abs, rel=1e-9)
    assert out.scale == pytest.approx(want_scale, rel=1e-12)
    assert out.agreement == agree / rows
    assert [bs for bs, _ in rep.batches][:4] == [1, 2, 8, 16]  # batch 1 is always included
    assert want_abs > 10 * out.limit  # the perturbation is far outside the fp64 tolerance
    assert not rep.ok


def test_tolerance_overrides(mlp_pair):
    a, b, _ = mlp_pair
    assert run_cli("verify", a, b, "--atol", "1e-2").returncode == 0
    assert run_cli("verify", a, b, "--atol", "0", "--rtol", "1e-2").returncode == 0
    assert run_cli("verify", a, b, "--atol", "0", "--rtol", "1e-6").returncode == 1


def test_json_schema(mlp_pair):
    a, b, _ = mlp_pair
    r = run_cli("verify", a, b, "--json", "--samples", "6", "--seed", "7", "--dtype", "fp64")
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert d["a"] == str(a) and d["b"] == str(b)
    assert d["equivalent"] is False and d["dtype"] == "fp64" and d["seed"] == 7
    assert (d["atol"], d["rtol"]) == (TOLERANCES["fp64"].atol, TOLERANCES["fp64"].rtol)
    assert len(d["batches"]) == 6 and d["batches"][0] == {"batch": 1, "seq": None}
    (o,) = d["outputs"]
    assert set(o) == {"name", "dtype", "max_abs", "scale", "max_rel", "limit", "agreement", "ok"}
    assert o["name"] == "logits" and o["ok"] is False
    assert o["max_rel"] == pytest.approx(o["max_abs"] / o["scale"])
    assert d["max_abs"] == o["max_abs"] and d["max_rel"] == o["max_rel"]


def _mlp(widths: list[int], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers += [torch.nn.Linear(n_in, n_out)] + (
            [torch.nn.ReLU()] if i < len(widths) - 2 else []
        )
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize(
    ("widths", "needle"),
    [
        ([10, 32, 16, 5], "input 'input' differs"),  # 10 features instead of 12
        ([12, 32, 16, 7], "output 'logits' shapes differ"),  # 7 classes instead of 5
    ],
)
def test_mismatched_models_exit_2(tmp_path, mlp_path, widths, needle):
    other = _save(_mlp(widths, 1), tmp_path / "other.safetensors")
    r = run_cli("verify", mlp_path, other)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and str(other) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_nan_output_fails(tmp_path, mlp_net):
    bad = _perturbed(mlp_net, "4.bias", (0,))
    with torch.no_grad():
        bad[4].bias[0] = float("nan")
    a = _save(mlp_net, tmp_path / "a.safetensors")
    b = _save(bad, tmp_path / "nan.safetensors")
    r = run_cli("verify", a, b, "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["outputs"][0]["max_abs"] == "nan"


def test_bad_arguments_exit_2(mlp_path, tmp_path):
    assert run_cli("verify", mlp_path, mlp_path, "--dtype", "fp8").returncode == 2
    assert run_cli("verify", mlp_path, mlp_path, "--samples", "0").returncode == 2
    r = run_cli("verify", mlp_path, tmp_path / "missing.safetensors")
    assert r.returncode == 2 and "missing.safetensors" in r.stderr
