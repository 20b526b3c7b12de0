"""The self-check that convert-ln-to-rms and fold run before writing: what it feeds, and that it
stops a wrong rewrite (exit 1, nothing written) rather than only reporting numbers."""

from __future__ import annotations

import json

import torch

from normtool.load import load_model
from normtool.passes import weight_math
from normtool.selfcheck import check_plan
from tests.conftest import cli
from tests.factories_hf import make_gpt2
from tests.factories_ref import make_reference_transformer


def test_plan_reaches_every_position_and_a_batch(tmp_path):
    model = load_model(make_gpt2(tmp_path / "g"))
    longest = model.graph.inputs[0].max_len
    plan = check_plan(model.graph)
    assert (1, longest) in plan  # every row of the position table is used once
    assert any(b > 1 for b, _ in plan)  # and a batch of several sequences


def test_wrong_rewrite_is_caught_and_nothing_written(tmp_path, monkeypatch):
    """Centring that misses by 1e-3 (an off-by-a-little bug) must fail the fp64 bar of 1e-9."""
    (tmp_path / "in").mkdir()
    src = make_reference_transformer(tmp_path / "in", norm="layernorm")
    real = weight_math.centre
    monkeypatch.setattr(weight_math, "centre", lambda t, axis, work=None: real(t, axis) + 1e-3)
    out = tmp_path / "o.safetensors"
    r = cli("convert-ln-to-rms", src, "-o", out)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "self-verification failed" in r.stderr and not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "in"]  # no temporary left behind either


def test_errors_are_reported_and_stored(tmp_path):
    (tmp_path / "in").mkdir()
    src = make_reference_transformer(tmp_path / "in", norm="layernorm")
    out = tmp_path / "o.safetensors"
    r = cli("convert-ln-to-rms", src, "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    errors = json.loads(r.stdout)["errors"]
    assert errors["fp64_max_rel"] <= 1e-9 and errors["fp32_max_abs"] <= 1e-4
    assert load_model(out).history[-1]["errors"] == errors


def test_batches_run_together_equal_batches_run_alone(tmp_path):
    """``run_graph_batches`` (the self-check's one pass for all batches) gives each batch
    exactly what a run of that batch alone gives: same ops, same weights, same order."""
    from normtool.inputs import random_inputs
    from normtool.runtime.torch_exec import run_graph, run_graph_batches

    model = load_model(make_gpt2(tmp_path / "g"))
    feeds = [random_inputs(model.graph, b, s, k) for k, (b, s) in enumerate([(1, 9), (3, 2)])]
    weights = model.weights()
    together = run_graph_batches(model.graph, weights, feeds, torch.float64)
    for f, t in zip(feeds, together, strict=True):
        alone = run_graph(model.graph, weights, f, torch.float64)
        assert alone.keys() == t.keys()
        assert all(torch.equal(alone[k], t[k]) for k in alone)
