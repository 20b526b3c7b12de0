"""``normtool run``: passes chained in one run, checked once against the original.

References are independent of normtool: the WS CNN's forward written out in
``tests/test_fold_ws.py`` (torch's own ``var``/``std``, ``F.conv2d``, BatchNorm's eval maths),
and ``transformers``' ViT. Tolerances as in the single-pass tests: fp64 ≤ 1e-9 relative to the
logit scale (exact algebra: only float64 rounding remains), fp32 ≤ 1e-4 max-abs on O(1) logits.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors import safe_open

from devkit.factories import load_hf, make_vit, make_ws_cnn
from normtool import runner
from normtool.load import load_model
from normtool.nn.save import read_config
from normtool.passes.fold import Fold
from normtool.runtime.torch_exec import run_graph
from tests.conftest import cli
from tests.test_fold_ws import pixels, reference, tensors

FP64_REL, FP32_ABS = 1e-9, 1e-4


def _history(path) -> list[dict]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["normtool.history"])


def test_chain_bakes_then_folds_against_the_reference(tmp_path):
    """Two passes that rewrite the same tensors: ``fold:only=ws`` bakes Ŵ into each conv, then
    ``fold:only=batchnorm`` folds each BatchNorm into that baked weight. The file written
    computes the original WS CNN (its own reference), both history entries name the chain and
    carry the one check's errors."""
    src = make_ws_cnn(tmp_path, "var")
    out = tmp_path / "out.safetensors"
    r = cli("run", src, "fold:only=ws", "fold:only=batchnorm", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert [s["transform"] for s in j["steps"]] == ["fold", "fold"]
    assert len(j["steps"][0]["baked"]) == len(j["steps"][1]["folded"]) == 2  # two blocks
    assert j["errors"]["fp64_max_rel"] <= FP64_REL and j["errors"]["fp32_max_abs"] <= FP32_ABS
    cfg = read_config(src)
    x = pixels(cfg)
    want = reference(tensors(src), cfg, x)
    m = load_model(out)
    assert m.graph.norm_kinds() == [] and not list(m.graph.ops_of("ws_conv2d"))
    got = run_graph(m.graph, m.weights(), {m.graph.inputs[0].name: x.float()})["logits"]
    assert (got.double() - want).abs().max().item() <= FP32_ABS
    entries = _history(out)
    assert [e["chain"] for e in entries] == [["fold", "fold"]] * 2
    assert entries[0]["errors"] == entries[1]["errors"] == j["errors"]


def test_the_float64_chain_composes_unrounded(tmp_path):
    """The second pass of the float64 chain is planned on the first's float64 result: folding
    BatchNorm into the *stored* (fp32-rounded) Ŵ would carry fp32 rounding (~1e-7 relative) into
    the fp64 check, 100x over its bar."""
    src = make_ws_cnn(tmp_path, "std")
    planned = runner.plan(load_model(src), [Fold(("ws",)), Fold(("batchnorm",))])
    cfg = read_config(src)
    x = pixels(cfg)
    want = reference(tensors(src), cfg, x)
    name = planned.exact.graph.inputs[0].name
    got = run_graph(planned.exact.graph, planned.exact.weights(), {name: x}, torch.float64)
    assert ((got["logits"] - want).abs().max() / want.abs().max()).item() <= FP64_REL
    assert planned.rewrites[1].source is not planned.rewrites[0].source


def test_convert_then_loki_head_on_vit(tmp_path):
    """Pre-LN → Pre-RMSNorm, then a Loki head, in one run: logits equal transformers' ViT, and
    ``prediction`` is the Fréchet mean of the reference's own softmax under the metric."""
    src = make_vit(tmp_path / "vit")
    d = 1.0 - np.eye(5)
    d[0, 1] = d[1, 0] = 0.1  # labels 0 and 1 are close
    metric = tmp_path / "m.npy"
    np.save(metric, d)
    out = tmp_path / "vit.out.safetensors"
    r = cli("run", src, "convert-ln-to-rms", f"loki-head:metric={metric}", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    j = json.loads(r.stdout)
    assert j["errors"]["fp64_max_rel"] <= FP64_REL
    hist = _history(out)
    assert [e["transform"] for e in hist] == ["convert-ln-to-rms", "loki-head"]
    assert hist[1]["errors"]["max_relative_risk_excess"] <= 1e-5
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_hf(src)(pixel_values=x).logits.double()
    m = load_model(out)
    got = run_graph(m.graph, m.weights(), {m.graph.inputs[0].name: x})
    assert (got["logits"].double() - want).abs().max().item() <= FP32_ABS
    risk = torch.softmax(want, -1) @ torch.from_numpy(d**2)
    assert got["prediction"].tolist() == risk.argmin(-1).tolist()


def test_a_step_that_cannot_follow_names_the_step_before(tmp_path):
    src = make_vit(tmp_path / "vit")
    out = tmp_path / "o.safetensors"
    r = cli("run", src, "convert-ln-to-rms", "fold", "-o", out)
    assert r.returncode == 2 and "after convert-ln-to-rms: nothing to fold" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_step_syntax_is_checked_before_any_work(tmp_path):
    src = make_vit(tmp_path / "vit")
    for words, said in (
        (["rotate-everything"], "unknown step 'rotate-everything'"),
        (["fold:onyl=un"], "unknown option 'onyl'"),
        (["convert-ln-to-rms:compressed=maybe"], "expected true or false"),
        ([], "Missing argument"),
    ):
        r = cli("run", src, *words)
        assert r.returncode == 2 and said in r.stderr, (words, r.stderr)


def test_default_output_names_the_steps(tmp_path):
    src = make_vit(tmp_path / "vit")
    r = cli("run", src, "convert-ln-to-rms:compressed", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] == str(tmp_path / "vit.crms.safetensors")
