"""MLP chains: recognised from a state dict, run by the executor equal to the torch module."""

from __future__ import annotations

import torch

from devkit.proc import run_cli
from normtool.load import load_model
from normtool.runtime.torch_exec import run_graph


def test_mlp_executor_matches_torch_module(mlp_path, mlp_net):
    model = load_model(mlp_path)
    assert model.graph.family == "mlp"
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(1))
    got = run_graph(model.graph, model.weights(), {"input": x})["logits"]
    want = mlp_net(x)
    # identical float32 ops in the same order: only summation-order noise is allowed
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def test_mlp_executor_fp64_and_pt(tmp_path, mlp_net):
    p = tmp_path / "mlp.pt"
    torch.save(mlp_net.state_dict(), p)
    model = load_model(p, act="relu")
    x = torch.randn(3, 12, dtype=torch.float64)
    got = run_graph(model.graph, model.weights(), {"input": x}, dtype=torch.float64)["logits"]
    want = mlp_net.double()(x)
    mlp_net.float()
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_inspect_cli(mlp_path):
    r = run_cli("inspect", mlp_path)
    assert r.returncode == 0, r.stderr
    # 12·32+32 + 32·16+16 + 16·5+5 = 1029
    assert "mlp" in r.stdout and "parameters: 1,029" in r.stdout
