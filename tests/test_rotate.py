"""rms-gain fold and ``rotate``: the chain ``convert-ln-to-rms fold:only=rms-gain rotate`` (and
``fold:only=rms-gain rotate`` on a Llama) computes what the original computes in its own
implementation (``transformers``), and the stream really is rotated; refusals are clean.

Tolerances: fp64 ≤ 1e-9 relative to the logit scale (exact algebra, only float64 rounding
remains: measured ~1e-15); fp32 ≤ 1e-4 max-abs on O(1) logits (fp32 rounding of re-associated
sums, measured ~3e-6; a wrong rotation or fold moves logits by O(0.1)).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from devkit.factories import load_hf, make_decoder, make_gpt2
from devkit.ln_to_rms_cases import make_family, reference_forward
from normtool import runner, steps
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.passes import orthogonal
from normtool.runtime.torch_exec import run_graph
from tests.conftest import cli

FP64_REL, FP32_ABS, REF64_REL = 1e-9, 1e-4, 1e-6
CHAINS = {
    "gpt2": ["convert-ln-to-rms", "fold:only=rms-gain", "rotate:kind=hadamard"],
    "opt": ["convert-ln-to-rms", "fold:only=rms-gain", "rotate:kind=hadamard:seed=1"],
    "vit": ["convert-ln-to-rms", "fold:only=rms-gain", "rotate:kind=random"],
    "llama": ["fold:only=rms-gain", "rotate:kind=hadamard"],
}


def _src(kind: str, root):
    if kind == "llama":
        return make_decoder(root / "llama", tie_word_embeddings=True)
    return make_family(kind, root)[0]


def _forward(kind: str, src, dtype):
    if kind == "llama":
        m = load_hf(src, dtype)
        return lambda x: m(input_ids=x)[0]
    return reference_forward(kind, src, dtype)


def _stream_table(model) -> torch.Tensor:
    """The tensor writing the stream first (token embedding / patch projection), logical
    layout, the stream axis last."""
    g = model.graph
    first = next(o for o in g.ops if o.params and "resid" in g.tensors[o.params["weight"]].axes)
    spec = g.tensors[first.params["weight"]]
    return model.tensor(first.params["weight"]).double().movedim(spec.axes.index("resid"), -1)


@pytest.mark.parametrize("kind", list(CHAINS))
def test_chain_matches_the_original(kind, tmp_path):
    src = _src(kind, tmp_path)
    out = tmp_path / "out.safetensors"
    r = cli("run", src, *CHAINS[kind], "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [s["transform"] for s in rep["steps"]][-1] == "rotate"
    assert rep["errors"]["fp64_max_rel"] <= FP64_REL

    orig = load_model(src)
    spec = orig.graph.inputs[0]
    x = random_inputs(orig.graph, 2, spec.max_len or 8, seed=1)[spec.name]
    # fp32: the written file run by normtool against the original's own fp32 forward
    got = load_model(out)
    with torch.no_grad():
        want = _forward(kind, src, torch.float32)(x)
        want64 = _forward(kind, src, torch.float64)(x.double() if x.is_floating_point() else x)
    y = run_graph(got.graph, got.weights(), {spec.name: x})["logits"]
    assert (y.double() - want.double()).abs().max().item() <= FP32_ABS
    # fp64: the chain planned in float64 against the original's own float64 forward
    passes = [(st := steps.parse(w)).kind.make(st.options, orig) for w in CHAINS[kind]]
    planned = runner.plan(orig, passes)
    x64 = x.double() if x.is_floating_point() else x
    y64 = run_graph(planned.exact.graph, planned.exact.weights(), {spec.name: x64}, torch.float64)
    y0 = run_graph(orig.graph, orig.weights(), {spec.name: x64}, torch.float64)["logits"]
    scale = want64.abs().max()
    # the original as normtool runs it is the reference's float64 forward (transformers' OPT
    # keeps ~1e-7 of float32 in its float64 forward), and the chain is that original to 1e-9
    assert ((y0 - want64).abs().max() / scale).item() <= REF64_REL
    assert ((y64["logits"] - y0).abs().max() / scale).item() <= FP64_REL
    # the stream was rotated: the first writer's vectors keep their norms (as the
    # chain left them before rotate), not their entries
    before, after = _stream_table(runner.plan(orig, passes[:-1]).exact), _stream_table(got)
    assert torch.allclose(before.norm(dim=-1), after.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert (before - after).abs().max() > 0.05


def test_pca_rotation_concentrates_energy(tmp_path):
    src = make_decoder(tmp_path / "llama")
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, inputs=rng.integers(0, 64, (4, 16)))
    out = tmp_path / "pca.safetensors"
    r = cli("run", src, "fold:only=rms-gain", f"rotate:kind=pca:calib={data}", "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["errors"]["fp64_max_rel"] <= FP64_REL
    # PCA basis: the leading coordinate of the stream's first writer carries the most energy
    table = _stream_table(load_model(out))
    energy = table.pow(2).sum(0)
    assert energy[0] >= energy[-1]


@pytest.mark.parametrize(("d", "m"), [(32, 1), (24, 12), (40, 20), (48, 12)])
def test_hadamard_sizes_are_orthogonal(d, m):
    assert orthogonal.hadamard_factor(d) == m
    q = orthogonal.hadamard(d, seed=3)
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q.abs(), torch.full((d, d), d**-0.5, dtype=torch.float64))


def test_random_orthogonal_is_seeded():
    a, b = orthogonal.random_orthogonal(16, 5), orthogonal.random_orthogonal(16, 5)
    assert torch.equal(a, b) and not torch.equal(a, orthogonal.random_orthogonal(16, 6))
    assert torch.allclose(a @ a.T, torch.eye(16, dtype=torch.float64), atol=1e-12)


def test_refusals(tmp_path):
    gpt2 = make_gpt2(tmp_path / "gpt2")
    r = cli("rotate", gpt2, "-o", tmp_path / "a.safetensors")
    assert r.returncode == 2 and "run convert-ln-to-rms first" in r.stderr
    assert "Traceback" not in r.stderr
    llama = make_decoder(
        tmp_path / "llama", hidden_size=36, num_attention_heads=2, num_key_value_heads=2
    )
    r = cli("rotate", llama, "-o", tmp_path / "b.safetensors")
    assert r.returncode == 2 and "run fold --only rms-gain first" in r.stderr
    r = cli("run", llama, "fold:only=rms-gain", "rotate", "-o", tmp_path / "c.safetensors")
    assert r.returncode == 2 and "size 36" in r.stderr
    r = cli("fold", llama, "--only", "rms-gain,un", "-o", tmp_path / "d.safetensors")
    assert r.returncode == 2 and "fold of its own" in r.stderr
    r = cli("fold", gpt2, "--only", "rms-gain", "-o", tmp_path / "e.safetensors")
    assert r.returncode == 2 and "no RMSNorm" in r.stderr
    assert not any(tmp_path.glob("*.safetensors"))
