"""convert-ln-to-rms: the converted checkpoint (run by normtool, and exported to ONNX) computes
what the *original* model computes in its own independent implementation — transformers'
forward, the timm-style module, or normtool.nn.ReferenceTransformer — and refusals are clean.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from devkit.factories import make_bert, make_opt, make_reference_transformer
from devkit.ln_to_rms_cases import (
    FAMILIES,
    HALF,
    as_half,
    half_truth,
    make_family,
    reference_forward,
    sq_error,
)
from devkit.proc import run_cli
from normtool.cli import app, main
from normtool.graph import Op
from normtool.inputs import complete_inputs, random_inputs
from normtool.load import load_model
from normtool.nn.save import load_reference
from normtool.passes import ln_to_rms
from normtool.runtime.onnx_emit import emit_onnx
from normtool.runtime.torch_exec import run_graph

# fp32 bar of the issue: the converted model (rewritten in fp64, rounded once to fp32, run in
# fp32 by normtool or ORT) against the original's own fp32 forward. The two differ only by fp32
# rounding of re-associated sums (~1e-6 on these tiny d=32 models); a wrong fold/centring moves
# logits by O(0.1), so 1e-4 has both headroom and power.
FP32_TOL = 1e-4


def _feed(model, seed: int = 0):
    """One seeded input batch from the model's signature (batch 2, the longest sequence)."""
    spec = model.graph.inputs[0]
    x = random_inputs(model.graph, 2, spec.max_len or 16, seed)[spec.name]
    return spec.name, x


def _convert(src: Path, out: Path, *flags: str) -> dict:
    r = CliRunner().invoke(app, ["convert-ln-to-rms", str(src), "-o", str(out), "--json", *flags])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)  # stderr may state assumptions (timm's default eps)


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("orig")
    return {k: make_family(k, root / k) for k in FAMILIES}


@pytest.mark.parametrize("compressed", [False, True], ids=["rms", "crms"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_converted_matches_original_forward(kind, compressed, originals, tmp_path):
    src, flags = originals[kind]
    out = tmp_path / "conv.safetensors"
    rep = _convert(src, out, *flags, *(["--compressed"] if compressed else []))
    # the self-check ran and its errors are printed and stored in the output's history
    assert rep["verified"] and rep["errors"]["fp64_max_rel"] <= 1e-9
    conv = load_model(out)
    assert conv.history[-1]["errors"] == rep["errors"]
    norm = "crmsnorm" if compressed else "rmsnorm"
    assert conv.graph.norm_kinds() == [norm]
    d = load_model(src, heads=4 if flags else None).graph.spaces["resid"].size
    assert conv.graph.spaces["resid"].size == (d - 1 if compressed else d)

    name, x = _feed(conv)
    with torch.no_grad():
        want = reference_forward(kind, src)(x)
    got = run_graph(conv.graph, conv.weights(), {name: x})["logits"]
    assert (got - want).abs().max() <= FP32_TOL

    onnx_model = emit_onnx(conv.graph, conv.weights())
    ops = {n.op_type for n in onnx_model.graph.node}
    assert "LayerNormalization" not in ops
    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = x.numpy() if name != "pixel_values" and x.dtype == torch.int64 else x.float().numpy()
    # the optional inputs (attention_mask, position_ids) as transformers fills them: unpadded
    feeds = {k: v.numpy() for k, v in complete_inputs(conv.graph, {name: x}).items()}
    (y,) = sess.run(["logits"], {**feeds, name: feed})
    assert np.abs(y - want.numpy()).max() <= FP32_TOL


# ---- fp16 / bf16 ---------------------------------------------------------------------------

#: The issue's half-precision bar: the converted model's error against the float64 original is
#: at most this multiple of the original model's own error in that dtype.
HALF_RATIO = 1.5


@pytest.fixture(scope="module")
def half_originals(originals, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("half")
    return {
        (kind, dt): as_half(originals[kind][0], HALF[dt], root / f"{kind}_{dt}")
        for kind in FAMILIES
        for dt in HALF
    }


@pytest.fixture(scope="module")
def half_truths(half_originals) -> dict:
    """``half_truth`` per (family, dtype), computed once for RMS and CRMS."""
    cache: dict = {}

    def get(kind: str, dt: str):
        if (kind, dt) not in cache:
            cache[(kind, dt)] = half_truth(kind, half_originals[(kind, dt)], dt)
        return cache[(kind, dt)]

    return get


@pytest.mark.parametrize("dt", list(HALF))
@pytest.mark.parametrize("compressed", [False, True], ids=["rms", "crms"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_half_precision_error_no_worse_than_original(kind, compressed, dt, half_truths):
    """Converting an fp16/bf16 checkpoint: in that dtype, the converted model's error against
    the float64 original is at most 1.5x the original's own error in that dtype.

    Metric: RMS error over all logits of 4 batches (>= 1024 logits). Why not the max-abs of one batch: it is one
    outlier among a few hundred values — measured over seeds, two equally accurate models gave
    per-batch max-abs ratios from 0.4 to 2.4, while the RMS ratio was stable to a few percent
    (RMS conversions ~1.0x; CRMS 1.1-1.4x, the implied last coordinate adding rounding).
    A real fault (a missed fold or centring) moves logits by O(0.1), thousands of times the
    half-precision error, so the bar keeps its power.
    """
    orig, name, xs, want, own = half_truths(kind, dt)
    conv = ln_to_rms.convert_ln_to_rms(orig, compressed).stored()
    assert {s.dtype for s in conv.graph.tensors.values()} == {"F16" if dt == "fp16" else "BF16"}
    new = sq_error(conv, name, xs, want, HALF[dt])
    # squared errors summed over the same logits: the ratio of RMS errors is the square root
    assert own > 0 and (new / own) ** 0.5 <= HALF_RATIO, (new / own) ** 0.5


@pytest.mark.parametrize("dt", list(HALF))
def test_half_precision_crms_parallel_blocks_over_seeds(dt, tmp_path):
    """CRMS of fp16/bf16 parallel-block reference transformers (tied LM head) over five seeds,
    each within the bar, against the reference module's own float64 forward.

    Why several seeds: the implied coordinate's rounding is amplified by how far the readers'
    column of the dropped coordinate sits from their row means, which varies by model. Dropping
    the last coordinate always, seed 1 measured 1.60x (fp16) / 1.68x (bf16); with the coordinate
    chosen (weight_math.crms_drop_index), 20 seeds measured 1.07-1.31x.
    """
    for seed in range(5):
        src = make_reference_transformer(
            tmp_path, f"par{seed}", seed=seed, parallel=True, tie_embeddings=True
        )
        half = as_half(src, HALF[dt], tmp_path / f"{seed}_{dt}")
        orig = load_model(half)
        spec = orig.graph.inputs[0]
        truth = reference_forward("ref", half, torch.float64)
        # 4 batches x 4 sequences x 16 tokens x 48 vocab: 12288 logits
        xs = [random_inputs(orig.graph, 4, spec.max_len, 100 + k)[spec.name] for k in range(4)]
        with torch.no_grad():
            want = [truth(x) for x in xs]
        own = sq_error(orig, spec.name, xs, want, HALF[dt])
        conv = ln_to_rms.convert_ln_to_rms(orig, compressed=True).stored()
        new = sq_error(conv, spec.name, xs, want, HALF[dt])
        assert own > 0 and (new / own) ** 0.5 <= HALF_RATIO, (seed, (new / own) ** 0.5)


def test_half_precision_self_check_reports_rms_errors(half_originals, tmp_path):
    """The CLI's self-check of a half-precision checkpoint measures the same bar and stores it."""
    rep = _convert(half_originals[("gpt2", "fp16")], tmp_path / "c.safetensors", "--compressed")
    e = rep["errors"]
    assert e["fp64_max_rel"] <= 1e-9 and "fp32_max_abs" not in e
    assert 0 < e["fp16_rms"] <= HALF_RATIO * e["fp16_original_rms"]


def test_half_precision_writers_keep_their_sums(half_originals):
    """Centred writers rounded to fp16 keep their column sums (the implied CRMS coordinate):
    written out here against nearest rounding of the exact float64 values."""
    orig = load_model(half_originals[("ref", "fp16")])
    conv = ln_to_rms.convert_ln_to_rms(orig, compressed=True)
    exact = conv.exact().tensor("blocks.0.mlp.fc2.weight")  # [d-1, I], stream axis 0
    stored = conv.stored().tensor("blocks.0.mlp.fc2.weight").double()
    nearest = exact.half().double()
    spacing = torch.nextafter(exact.half(), torch.tensor(torch.inf).half()).double() - nearest
    assert ((stored - exact).abs() <= spacing.abs()).all()  # every entry within one spacing
    drift = (stored - exact).sum(0).abs()
    assert drift.max() <= 0.5 * (nearest - exact).sum(0).abs().max()


def test_tied_unembedding_is_untied(originals, tmp_path):
    src, _ = originals["gpt2"]
    out = tmp_path / "g.rms.safetensors"
    rep = _convert(src, out)
    assert {"tensor": "head.weight", "was_tied_to": "tok_emb.weight"} in rep["untied"]
    conv = load_model(out)
    assert (
        conv.graph.tensors["head.weight"].source.key
        != conv.graph.tensors["tok_emb.weight"].source.key
    )
    # head = wte·diag(γ_f): no longer equal to the centred embedding
    assert not torch.allclose(conv.tensor("head.weight"), conv.tensor("tok_emb.weight"))


def _cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI entry point in-process (same error handling and exit codes, no interpreter start)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_default_output_name_and_force(tmp_path, capsys):
    src = make_reference_transformer(tmp_path, name="m")
    r = run_cli("convert-ln-to-rms", src, "--compressed")  # once as a real process
    assert r.returncode == 0, r.stderr
    assert "untied" not in r.stdout
    out = tmp_path / "m.crms.safetensors"
    assert out.is_file()
    code, _, err = _cli(capsys, "convert-ln-to-rms", src, "--compressed")
    assert code == 2 and "exists" in err
    code, stdout, _ = _cli(
        capsys, "convert-ln-to-rms", src, "--compressed", "--force", "--no-verify", "--json"
    )
    assert code == 0 and json.loads(stdout)["verified"] is False
    # the output stands alone: inspect reads it and shows its history
    code, stdout, _ = _cli(capsys, "inspect", out)
    assert code == 0 and "convert-ln-to-rms" in stdout


def test_refuses_post_ln_and_models_without_layernorm(tmp_path, mlp_path, capsys):
    cases = [
        (make_bert(tmp_path / "bert"), ("Post-LN", "norm '")),  # the first norm met is named
        (make_opt(tmp_path / "opt_post", pre=False), ("Post-LN", "blocks.0")),
        (mlp_path, ("nothing to convert",)),
    ]
    capsys.readouterr()  # drop what the factories printed
    for i, (src, needles) in enumerate(cases):
        out = tmp_path / f"out{i}.safetensors"
        code, _, err = _cli(capsys, "convert-ln-to-rms", src, "-o", out)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and str(src) in err
        for n in needles:
            assert n in err, err
        assert not out.exists()


def test_refuses_non_layernorm_reader_and_norm_after_branch(tmp_path):
    """Graph-level refusals, each naming the layer: a reader that is not a LayerNorm, and a
    norm placed after a branch (NormFormer-style)."""
    g = load_model(make_reference_transformer(tmp_path)).graph
    bad = g.copy()
    bad.op("blocks.1.norm2").kind = "rmsnorm"
    bad.op("blocks.1.norm2").params.pop("bias")
    assert any("blocks.1.norm2" in r and "only LayerNorms" in r for r in ln_to_rms.check(bad))

    post = g.copy()
    fc2 = post.op("blocks.0.mlp.fc2")
    add = next(o for o in post.ops if fc2.output in o.inputs)
    norm = Op(
        "blocks.0.post_norm", "layernorm", (fc2.output,), "blocks.0.post_norm", {}, {"eps": 1e-5}
    )
    post.ops.insert(post.ops.index(add), norm)
    post.value_spaces[norm.output] = "resid"
    add.inputs = tuple(norm.output if v == fc2.output else v for v in add.inputs)
    assert any("blocks.0.post_norm" in r and "after a branch" in r for r in ln_to_rms.check(post))


def test_row_blocks_match_whole_tensor(tmp_path, monkeypatch):
    """Large tensors are rewritten in row blocks; force tiny blocks and compare with the whole."""
    model = load_model(make_reference_transformer(tmp_path, tie_embeddings=True))
    whole = ln_to_rms.convert_ln_to_rms(model, compressed=True).stored()
    monkeypatch.setattr(ln_to_rms, "BLOCK_ROWS", 5)
    blocked = ln_to_rms.convert_ln_to_rms(model, compressed=True).stored()
    for name in ("tok_emb.weight", "head.weight", "head.bias", "pos_emb.weight"):
        # fp64 inside, one rounding to fp32 either way: equal to the last bit or one ulp
        assert torch.allclose(blocked.tensor(name), whole.tensor(name), atol=1e-6, rtol=0)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    heads=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([2, 3, 8]),
    layers=st.integers(1, 3),
    bias=st.booleans(),
    tied=st.booleans(),
    parallel=st.booleans(),
    compressed=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_random_pre_ln_transformers(
    tmp_path_factory, heads, head_dim, layers, bias, tied, parallel, compressed, seed
):
    """Over random small Pre-LN reference transformers the exact (fp64) conversion equals the
    plain-torch forward of the original to 1e-9 of the logit scale (fp64 rounding is ~1e-15)."""
    d = heads * head_dim
    path = make_reference_transformer(
        tmp_path_factory.mktemp("prop"),
        seed=seed,
        d_model=d,
        heads=heads,
        layers=layers,
        d_ff=2 * d + 1,
        bias=bias,
        tie_embeddings=tied,
        parallel=parallel,
    )
    conv = ln_to_rms.convert_ln_to_rms(load_model(path), compressed)
    exact = conv.exact()
    name, x = _feed(exact, seed)
    with torch.no_grad():
        want = load_reference(path).double()(x)
    got = run_graph(exact.graph, exact.weights(), {name: x}, torch.float64)["logits"]
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()
