"""``normtool fold``: folded models compute what the ORIGINAL computes, per family and placement.

References are independent of the pass: normtool.nn modules (plain torch) for the reference
transformer and the small CNN, transformers' own forward for HF ResNet, the plain-torch
timm-style ViT of devkit.factories, and for hand-made graphs the eval maths written out here.

Tolerances (issue 4): fp64 ≤ 1e-9 relative to the logit scale — the folds are exact algebra, so
only float64 rounding (~1e-16 per op, ~1e-14 accumulated) may remain; fp32 ≤ 1e-4 max-abs on
the logits of the folded tensors as stored (rounded once to fp32), run in fp32 — fp32 rounding
of O(1) logits through a dozen layers stays ~1e-6, so 1e-4 has wide headroom yet catches any
real change (a wrong fold moves logits by O(0.1)).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from devkit.factories import (
    load_timm_vit,
    make_cnn,
    make_reference_transformer,
    make_resnet,
    make_timm_vit,
)
from devkit.fold_cases import (
    FIXTURES,
    FP32_ABS,
    FP64_REL,
    deep_post,
    errors,
    ids,
    module_ref,
    pixels,
)
from devkit.proc import run_cli
from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec, Op, Source, Space, TensorSpec
from normtool.load import load_model
from normtool.model import Model
from normtool.nn.save import load_reference, save_reference
from normtool.passes.fold import fold_norms
from normtool.runtime.torch_exec import run_graph
from tests.conftest import cli


def _check(folded: Model, exact: Model, reference, x: torch.Tensor, name: str) -> None:
    """The folded graph against ``reference`` (the ORIGINAL network as a torch callable)."""
    e = errors(folded, exact, reference, x, name)
    assert e["fp64_rel"] <= FP64_REL and e["fp32_abs"] <= FP32_ABS, e


# ---- reference transformer: every foldable norm, Pre and Post placement ----------------------
@pytest.mark.parametrize("norm", ["un", "powernorm", "batchnorm"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_reference_transformer(tmp_path, norm, placement):
    path = make_reference_transformer(tmp_path, norm=norm, placement=placement, layers=3)
    model = load_model(path)
    r = fold_norms(model)
    _check(r.stored(), r.exact(), module_ref(load_reference(path).eval()), ids(1), "input_ids")
    kinds = [o.kind for o in r.stored().graph.ops]
    if norm != "powernorm":  # every norm vanishes, Post-Norm included
        assert not set(kinds) & {"unorm", "batchnorm", "powernorm"}, kinds
        assert len(r.report["folded"]) == 7 if placement == "pre" else 6
        assert (r.report["scale_range"] is not None) == (placement == "post")
    elif placement == "pre":  # the affine folds; a weightless group RMS (groups = heads) stays
        assert "powernorm" not in kinds and kinds.count("group_rmsnorm") == 7
        assert all(o.attrs["groups"] == 4 for o in r.stored().graph.ops_of("group_rmsnorm"))
    else:  # Post-Norm PowerNorm: only the last norm (read by the head alone) can fold
        assert [f.name for f in r.report["folded"]] == ["blocks.2.norm2"]
        assert all("group RMS must see the exact values" in s.reason for s in r.report["skipped"])


def test_parallel_post_norm_un(tmp_path):
    path = make_reference_transformer(tmp_path, norm="un", placement="post", parallel=True)
    r = fold_norms(load_model(path))
    assert r.stored().graph.norm_kinds() == []
    _check(r.stored(), r.exact(), module_ref(load_reference(path).eval()), ids(2), "input_ids")


@pytest.mark.parametrize("norm", ["un", "batchnorm"])
def test_post_norm_rebase_depth12_negative_gamma(tmp_path, norm):
    path, module = deep_post(tmp_path, norm, seed=3)
    gammas = torch.cat([n.weight for b in module.blocks for n in (b.norm1, b.norm2)])
    assert (gammas < 0).sum() > 50  # the case under test: many negative scales
    r = fold_norms(load_model(path))
    assert (
        r.stored().graph.norm_kinds() == []
        and len(r.report["folded"]) == 24
        and not r.report["skipped"]
    )
    lo, hi = r.report["scale_range"]
    assert 0 < lo < hi  # reported range of |D| over the re-based stream
    _check(r.stored(), r.exact(), module_ref(module), ids(4), "input_ids")


def test_post_norm_zero_gamma_is_refused_and_upstream_kept(tmp_path):
    path, module = deep_post(tmp_path, "un", seed=5)
    with torch.no_grad():
        module.blocks[4].norm1.weight[3] = 0.0
    path = save_reference(module, path, force=True)
    r = fold_norms(load_model(path))
    reasons = {s.name: s.reason for s in r.report["skipped"]}
    assert "zero scale" in reasons["blocks.4.norm1"]
    # the norms upstream would have to pass through the kept norm: kept too, with that reason
    assert all(f"blocks.{i}.norm{j}" in reasons for i in range(4) for j in (1, 2))
    assert "kept norm blocks.4.norm1" in reasons["blocks.3.norm2"]
    assert {f.name for f in r.report["folded"]} == {
        f"blocks.{i}.norm{j}" for i in range(4, 12) for j in (1, 2)
    } - {"blocks.4.norm1"}
    _check(r.stored(), r.exact(), module_ref(module), ids(6), "input_ids")


def _half(tmp_path, path):
    with safe_open(str(path), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, half, meta)
    return half


def test_fp16_weight_overflow_refused(tmp_path):
    # |γ| ≈ 0.01 over 24 Post-Norm layers: |D| ≈ 1e-48, so writers need 1/D: far beyond fp16
    path, _ = deep_post(tmp_path, "un", seed=7, gamma_std=0.01)
    with pytest.raises(NormtoolError, match="overflow torch.float16"):
        fold_norms(load_model(_half(tmp_path, path)))


def test_fp16_stream_overflow_refused(tmp_path):
    # γ = 0.6, unit statistics: |D| falls to 0.6²⁴ ≈ 5e-6; every rescaled weight still fits in
    # fp16, but the re-based stream grows to ~4e4, inside the 4× headroom of fp16's 65504
    path, module = deep_post(tmp_path, "un", seed=0)
    with torch.no_grad():
        for b in module.blocks:
            for n in (b.norm1, b.norm2):
                n.weight.fill_(0.6)
                n.running_var.fill_(1.0)
    path = save_reference(module, path, force=True)
    assert fold_norms(load_model(path)).report["scale_range"][0] < 1e-5  # fp32 is fine
    with pytest.raises(NormtoolError, match="refused for this fp16 checkpoint"):
        fold_norms(load_model(_half(tmp_path, path)))


def test_tied_head_untied_for_pre_norm(tmp_path):
    path = make_reference_transformer(tmp_path, norm="un", tie_embeddings=True)
    r = fold_norms(load_model(path))
    # norm_f folds into the tied head: the embedding must keep its own, unchanged copy
    _check(r.stored(), r.exact(), module_ref(load_reference(path).eval()), ids(8), "input_ids")


# ---- timm-style ViT with UN / PowerNorm ------------------------------------------------------
@pytest.mark.parametrize("norm", ["un", "powernorm"])
def test_timm_vit(tmp_path, norm):
    path = make_timm_vit(tmp_path, heads=4, norm=norm)
    model = load_model(path, heads=4)
    r = fold_norms(model)
    assert not r.report["skipped"]
    assert (
        "unorm" not in r.stored().graph.norm_kinds()
        and "powernorm" not in r.stored().graph.norm_kinds()
    )
    x = pixels((2, *model.graph.inputs[0].shape[1:]), 9)
    ref = load_timm_vit(path, heads=4).eval()
    _check(r.stored(), r.exact(), module_ref(ref), x, model.graph.inputs[0].name)


# ---- BatchNorm convnets ----------------------------------------------------------------------
def test_small_cnn_backward_fold(tmp_path):
    path = make_cnn(tmp_path, conv_bias=True, channels=[6, 10, 12], strides=[1, 2, 2])
    r = fold_norms(load_model(path))
    assert [f.how for f in r.report["folded"]] == [
        "backward"
    ] * 3 and r.stored().graph.norm_kinds() == []
    _check(
        r.stored(),
        r.exact(),
        module_ref(load_reference(path).eval()),
        pixels((4, 3, 16, 16), 0),
        "input",
    )


@pytest.mark.parametrize("layer_type", ["basic", "bottleneck"])
def test_hf_resnet(tmp_path, layer_type):
    from devkit.factories import load_hf

    path = make_resnet(tmp_path, layer_type)
    model = load_model(path)
    r = fold_norms(model)
    assert r.stored().graph.norm_kinds() == [] and not r.report["skipped"]
    hf = load_hf(path)

    def ref(dtype, x):
        with torch.no_grad():
            return hf.to(dtype)(pixel_values=x).logits

    spec = model.graph.inputs[0]
    _check(r.stored(), r.exact(), ref, pixels((2, 3, 32, 32), 1), spec.name)


# ---- hand-made graphs: a norm before a conv, before an activation ----------------------------
def _bn_graph(after: str, padding: int, stats: dict[str, torch.Tensor], groups: int = 1) -> Model:
    """pixels[B,3,8,8] → BatchNorm → (conv3x3 with ``padding``, ``groups`` | relu) → avgpool →
    linear. The conv has 4 output channels, or 6 when grouped (2 per group of 1 input)."""
    c_out = 4 if groups == 1 else 6
    g = torch.Generator().manual_seed(11)
    t = {
        "bn.weight": stats.get("weight", torch.rand(3, generator=g) + 0.5),
        "bn.bias": stats.get("bias", torch.randn(3, generator=g)),
        "bn.running_mean": stats.get("mean", torch.randn(3, generator=g)),
        "bn.running_var": stats.get("var", torch.rand(3, generator=g) + 0.5),
        "conv.weight": torch.randn(c_out, 3 // groups, 3, 3, generator=g),
        "head.weight": torch.randn(2, c_out if after == "conv" else 3, generator=g),
    }
    spaces = {
        "input": Space("input", 3, "input"),
        "c": Space("c", c_out, "channels"),
        "logits": Space("logits", 2, "output"),
    }
    axes = {
        "bn.weight": ("input",),
        "bn.bias": ("input",),
        "bn.running_mean": ("input",),
        "bn.running_var": ("input",),
        "conv.weight": ("c", None if groups > 1 else "input", None, None),
        "head.weight": ("logits", "c" if after == "conv" else "input"),
    }
    bn_p = {r: f"bn.{r}" for r in ("weight", "bias", "running_mean", "running_var")}
    mid = Op(
        "conv",
        "conv2d",
        ("bn",),
        "mid",
        {"weight": "conv.weight"},
        {"padding": padding, "groups": groups},
    )
    if after != "conv":
        mid = Op("relu", "act", ("bn",), "mid", {}, {"fn": "relu"})
        del t["conv.weight"], axes["conv.weight"]
    ops = [
        Op("bn", "batchnorm", ("input",), "bn", bn_p, {"eps": 1e-5}),
        mid,
        Op("pool", "global_avgpool", ("mid",), "pool"),
        Op("logits", "linear", ("pool",), "logits", {"weight": "head.weight"}),
    ]
    tensors = {k: TensorSpec(tuple(v.shape), axes[k], Source(k)) for k, v in t.items()}
    vs = {
        "input": "input",
        "bn": "input",
        "mid": "c" if after == "conv" else "input",
        "pool": "c" if after == "conv" else "input",
        "logits": "logits",
    }
    graph = Graph(
        "hand",
        [InputSpec("input", "pixels", ("batch", 3, 8, 8))],
        ["logits"],
        ops,
        spaces,
        tensors,
        vs,
    )
    graph.validate()
    return Model(graph, None, t)


def _bn_conv_maths(m: Model, padding: int, groups: int = 1):
    """The original network's eval maths, written out."""
    t = m.overrides

    def run(dtype, x):
        p = {k: v.to(dtype) for k, v in t.items()}
        y = (x - p["bn.running_mean"][:, None, None]) / torch.sqrt(
            p["bn.running_var"][:, None, None] + 1e-5
        )
        y = y * p["bn.weight"][:, None, None] + p["bn.bias"][:, None, None]
        y = F.conv2d(y, p["conv.weight"], padding=padding, groups=groups).mean(dim=(2, 3))
        return y @ p["head.weight"].T

    return run


def test_norm_before_unpadded_conv_folds_forward():
    m = _bn_graph("conv", 0, {})
    r = fold_norms(m)
    assert r.report["folded"][0].how == "forward" and r.report["folded"][0].into == ["conv"]
    _check(r.stored(), r.exact(), _bn_conv_maths(m, 0), pixels((2, 3, 8, 8), 3), "input")


def test_norm_before_grouped_conv_folds_forward():
    m = _bn_graph("conv", 0, {}, groups=3)
    r = fold_norms(m)
    assert r.report["folded"][0].into == ["conv"]
    _check(r.stored(), r.exact(), _bn_conv_maths(m, 0, groups=3), pixels((2, 3, 8, 8), 5), "input")


def test_norm_before_padded_conv_refused():
    with pytest.raises(NormtoolError, match="padding 1: inexact at the borders"):
        fold_norms(_bn_graph("conv", 1, {}))


def test_pure_scale_before_padded_conv_is_exact():
    # β = running_mean = 0: no shift, zero padding stays zero after scaling, so the fold is exact
    m = _bn_graph("conv", 1, {"bias": torch.zeros(3), "mean": torch.zeros(3)})
    r = fold_norms(m)
    _check(r.stored(), r.exact(), _bn_conv_maths(m, 1), pixels((2, 3, 8, 8), 4), "input")


def test_non_linear_consumer_refused():
    with pytest.raises(NormtoolError, match="activation relu"):
        fold_norms(_bn_graph("relu", 0, {}))


def test_nan_statistics_refused():
    var = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(NormtoolError, match="bn .batchnorm.: running_var has 1 NaN"):
        fold_norms(_bn_graph("conv", 0, {"var": var}))


# ---- the command -----------------------------------------------------------------------------
def test_cli_fold_writes_verified_output(tmp_path):
    path = make_reference_transformer(tmp_path, norm="un", placement="post")
    r = run_cli("fold", path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "ref_un_post.folded.safetensors"
    assert "folded 4 norms, skipped 0" in r.stdout and "re-based residual stream" in r.stdout
    folded = load_model(out)
    assert folded.graph.norm_kinds() == []
    assert folded.history[-1]["transform"] == "fold"
    assert folded.history[-1]["errors"]["fp64_max_rel"] <= FP64_REL
    x = ids(12)
    want = load_reference(path).eval()(x)
    got = run_graph(folded.graph, folded.weights(), {"input_ids": x})["logits"]
    assert (got - want).abs().max().item() <= FP32_ABS
    forced = cli("fold", path, "--force", "--json")
    assert forced.returncode == 0 and json.loads(forced.stdout)["verified"] is True


def test_cli_reports_skips_and_refusals(tmp_path):
    path = make_reference_transformer(tmp_path, norm="powernorm", placement="post")
    r = cli("fold", path, "--json", "-o", tmp_path / "o.safetensors")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [f["name"] for f in d["folded"]] == ["blocks.1.norm2"]
    assert len(d["skipped"]) == 3 and all(s["reason"] for s in d["skipped"])
    nothing = cli("fold", path, "--only", "un,ws")
    assert nothing.returncode == 2 and "nothing to fold" in nothing.stderr
    # the answer to the explicit ws first, then the 4 PowerNorms --only left out, counted
    assert "ws: nothing to bake" in nothing.stderr and "(+4 more)" in nothing.stderr
    with pytest.raises(NormtoolError, match="unknown kind"):
        fold_norms(load_model(path), ["layernorm"])


def test_cli_missing_statistics(tmp_path):
    path = make_reference_transformer(tmp_path, norm="un")
    with safe_open(str(path), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del sd["blocks.1.norm2.running_var"]
    broken = tmp_path / "broken.safetensors"
    save_file(sd, broken, meta)
    r = cli("fold", broken)
    assert r.returncode == 2 and "blocks.1.norm2.running_var" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- trained fixtures: realistic running statistics (scripts/make_fixtures.py) ---------------
@pytest.mark.parametrize(
    "name", ["ref_un_pre", "ref_un_post", "ref_powernorm_pre", "ref_powernorm_post", "cnn_bn"]
)
def test_trained_fixtures(name):
    path = FIXTURES / f"{name}.safetensors"
    model = load_model(path)
    r = fold_norms(model)
    spec = model.graph.inputs[0]
    if spec.kind == "tokens":
        x = ids(13, vocab=spec.vocab, shape=(2, min(12, spec.max_len)))
    else:
        x = pixels((2, *spec.shape[1:]), 13)
    _check(r.stored(), r.exact(), module_ref(load_reference(path).eval()), x, spec.name)


def test_fp16_checkpoint_folds_under_the_half_precision_bar(tmp_path):
    """An fp16 checkpoint cannot meet the fp32 bar once its rewritten weights are rounded to fp16;
    the stored-dtype bar (RMS error ≤ 1.5× the original's own fp16 error against fp64) applies."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = make_reference_transformer(tmp_path, name="un16", norm="un", placement="pre")
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {
            k: (t.half() if t.is_floating_point() else t)
            for k in f.keys()  # noqa: SIM118 - safe_open is not a dict
            for t in [f.get_tensor(k)]
        }
    half = tmp_path / "un16_fp16.safetensors"
    save_file(tensors, str(half), metadata=meta)
    r = cli("fold", half, "--json")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)["errors"]
    assert e["fp64_max_rel"] <= 1e-9
    assert 0 < e["fp16_rms"] <= 1.5 * e["fp16_original_rms"]
    assert "fp32_max_abs" not in e  # the fp32 bar does not apply to a half checkpoint
