"""Transformer families: the graph built from a checkpoint computes what an independent
reference computes — ``transformers``' own forward (GPT-2, OPT, ViT, BERT), a plain-torch
timm-style ViT (``tests.factories_hf``) and ``normtool.nn``'s ReferenceTransformer.

Inputs are seeded random token ids / pixels; every model has all parameters perturbed away from
their init (see the factories), so ignoring a norm gain or bias fails these tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from devkit.factories import (
    load_hf,
    load_timm_vit,
    make_bert,
    make_gpt2,
    make_opt,
    make_timm_vit,
    make_vit,
    save_as_bin,
)
from normtool.arch.registry import family_names
from normtool.arch.transformer import ORDER, check_layout, layouts
from normtool.cli import main
from normtool.errors import NormtoolError
from normtool.load import load_model
from normtool.runtime.torch_exec import run_graph
from normtool.save import save_model

# fp64 bounds: GPT-2 and BERT run entirely in the requested dtype, so fp64 agrees to rounding.
# transformers' eager attention for OPT and ViT computes the softmax in fp32 even for fp64
# models, which limits agreement to fp32 precision (~1e-7 relative; measured ≤ 4e-7 here).
HF_CASES = {
    "gpt2": (make_gpt2, {}, 1e-12, "pre"),
    "opt_pre": (make_opt, {"pre": True}, 2e-6, "pre"),
    "opt_post": (make_opt, {"pre": False}, 2e-6, "post"),
    "opt_post_proj": (make_opt, {"pre": False, "word_embed_proj_dim": 16}, 2e-6, "post"),
    "opt_pre_proj": (make_opt, {"pre": True, "word_embed_proj_dim": 16}, 2e-6, "pre"),
    "vit": (make_vit, {}, 2e-6, "pre"),
    "bert": (make_bert, {}, 1e-12, "post"),
}
FAMILY = {"gpt2": "gpt2", "vit": "vit", "bert": "bert"}


def cli(capsys, *args: object) -> tuple[int, str, str]:
    """Run the normtool CLI in-process (as ``python -m normtool`` would) and capture it."""
    capsys.readouterr()  # drop what fixtures printed (transformers' progress bars)
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            make, kw, _, _ = HF_CASES[case]
            made[case] = make(tmp_path_factory.mktemp(case) / "model", **kw)
        return made[case]

    return get


def _inputs(model, batch: int, seq: int, dtype: torch.dtype, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    spec = model.graph.inputs[0]
    if spec.kind == "tokens":
        return {"input_ids": torch.randint(0, spec.vocab, (batch, seq), generator=g)}
    return {"pixel_values": torch.randn((batch, *spec.shape[1:]), generator=g, dtype=dtype)}


def _max_err(model, ref, batch: int, seq: int, dtype: torch.dtype, seed: int = 0) -> float:
    x = _inputs(model, batch, seq, dtype, seed)
    got = run_graph(model.graph, model.weights(), x, dtype=dtype)["logits"]
    with torch.no_grad():
        want = ref(**x).logits
    assert got.shape == want.shape and got.dtype == dtype
    return (got - want).abs().max().item()


@pytest.mark.parametrize("case", HF_CASES)
def test_executor_matches_transformers(case, hf_dir):
    path = hf_dir(case)
    _, _, fp64_tol, placement = HF_CASES[case]
    model = load_model(path)
    assert model.graph.family == FAMILY.get(case, "opt")
    assert model.graph.info["placement"] == placement
    ref32 = load_hf(path, torch.float32)
    # the longest sequence (16 = position table) at batch 3, and a short batch-1 sequence
    errs = [
        _max_err(model, ref32, 3, 16, torch.float32),
        _max_err(model, ref32, 1, 5, torch.float32, 1),
    ]
    # the bound: fp32 max-abs 1e-4 on logits of magnitude ~1–5
    assert max(errs) <= 1e-4, errs
    err64 = _max_err(model, load_hf(path, torch.float64), 2, 16, torch.float64)
    assert err64 <= fp64_tol, err64
    print(f"{case}: fp32 max-abs {max(errs):.2e}, fp64 {err64:.2e}")


def test_gpt2_views_of_fused_transposed_and_tied_storage(hf_dir):
    g = load_model(hf_dir("gpt2")).graph
    d = g.info["d_model"]
    for j, role in enumerate("qkv"):
        src = g.tensors[f"blocks.1.attn.{role}.weight"].source
        assert (src.key, src.slice, src.transpose) == (
            "transformer.h.1.attn.c_attn.weight",
            (1, j * d, (j + 1) * d),
            True,
        )
        assert g.tensors[f"blocks.1.attn.{role}.bias"].source.slice == (0, j * d, (j + 1) * d)
    assert g.tensors["head.weight"].source.key == g.tensors["tok_emb.weight"].source.key
    assert g.tensors["head.weight"].axes == ("vocab", "resid")
    assert g.spaces["blocks.0.qk"].heads == 4 and g.spaces["blocks.0.qk"].kind == "heads_qk"
    info = g.info
    assert (info["heads"], info["layers"], info["act"], info["causal"]) == (4, 2, "gelu_tanh", True)
    assert info["layout"] == "gpt2" and info["parallel"] is False


def test_untied_gpt2_uses_its_lm_head(tmp_path):
    path = make_gpt2(tmp_path / "untied", tie_word_embeddings=False)
    model = load_model(path)
    assert model.graph.tensors["head.weight"].source.key == "lm_head.weight"
    assert model.graph.info["tied_head"] is False
    assert _max_err(model, load_hf(path), 2, 16, torch.float32) <= 1e-4


def test_every_layout_is_registered_and_checked():
    assert sorted(layouts()) == sorted(ORDER)
    assert set(ORDER) <= set(family_names())
    bad = {**layouts()["gpt2"], "optinal": ["norm_f"]}
    with pytest.raises(ValueError, match="unknown key optinal"):
        check_layout(bad, "bad.json")
    no_q = {**layouts()["opt"], "block": {**layouts()["opt"]["block"], "q": None}}
    del no_q["block"]["q"]
    with pytest.raises(ValueError, match="block lacks q"):
        check_layout(no_q, "bad.json")


def test_opt_offset_positions_and_projections(hf_dir):
    g = load_model(hf_dir("opt_post_proj")).graph
    assert g.op("pos_emb").attrs["offset"] == 2
    assert g.inputs[0].max_len == 16  # table has 18 rows: 2 offset rows are never read
    assert {"project_in", "project_out"} <= {o.name for o in g.ops}
    assert g.tensors["head.weight"].source.key == "model.decoder.embed_tokens.weight"
    assert "norm_f" not in {o.name for o in g.ops}  # Post-LN OPT has no final LayerNorm


def test_sharded_folder_loads(tmp_path):
    path = make_gpt2(tmp_path / "sharded", save={"max_shard_size": "20KB"})
    assert (path / "model.safetensors.index.json").is_file()
    model = load_model(path)
    assert len(model.checkpoint.files) > 1
    assert _max_err(model, load_hf(path), 2, 16, torch.float32) <= 1e-4


def test_pytorch_bin_folder_loads(tmp_path, hf_dir):
    src = hf_dir("bert")
    path = save_as_bin(src, tmp_path / "bin")
    model = load_model(path)
    assert model.checkpoint.format == "hf-folder" and model.checkpoint.files[0].suffix == ".bin"
    assert _max_err(model, load_hf(src), 2, 16, torch.float32) <= 1e-4


def test_base_model_keys_with_buffers(tmp_path, hf_dir):
    """Hub GPT-2 files hold the base model's keys (``h.0…``, no ``transformer.``, no lm_head)
    and the old causal-mask buffers; they load like transformers loads them."""
    src = hf_dir("gpt2")
    out = tmp_path / "hub_gpt2"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    sd = {
        k.removeprefix("transformer."): v
        for k, v in load_file(str(src / "model.safetensors")).items()
    }
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    save_file(sd, str(out / "model.safetensors"))
    model = load_model(out)
    assert model.graph.tensors["blocks.0.attn.q.weight"].source.key == "h.0.attn.c_attn.weight"
    assert _max_err(model, load_hf(src), 2, 16, torch.float32) <= 1e-4


def test_arch_override(tmp_path, hf_dir, capsys):
    src = hf_dir("gpt2")
    path = tmp_path / "renamed"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["MysteryLM"], model_type="mystery")
    (path / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli(capsys, "inspect", path)
    assert code == 2 and "unknown architecture" in err and "gpt2" in err and "timm_vit" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "inspect", path, "--arch", "bert")
    assert code == 2 and "bert" in err and str(path) in err  # a wrong family names what is missing
    model = load_model(path, arch="gpt2")
    assert model.graph.family == "gpt2"
    assert _max_err(model, load_hf(src), 2, 16, torch.float32) <= 1e-4


@pytest.mark.parametrize(
    "case,norms",
    [
        ("gpt2", {"layernorm/pre": 4, "layernorm/final": 1}),
        ("opt_pre", {"layernorm/pre": 4, "layernorm/final": 1}),
        # Post-LN: the last block's second norm feeds only the head, so it counts as final
        ("opt_post", {"layernorm/post": 3, "layernorm/final": 1}),
        ("vit", {"layernorm/pre": 4, "layernorm/final": 1}),
        # the embedding LayerNorm feeds the first residual add: post too
        ("bert", {"layernorm/post": 4, "layernorm/final": 1}),
    ],
)
def test_inspect_reports_family_and_placement(case, norms, hf_dir, capsys):
    code, out, err = cli(capsys, "inspect", hf_dir(case), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["family"] == FAMILY.get(case, "opt")
    assert d["norm_summary"] == norms
    assert d["info"]["placement"] in ("pre", "post")
    code, out, _ = cli(capsys, "inspect", hf_dir(case))
    assert code == 0 and f"placement={d['info']['placement']}" in out


# ---- timm-style ViT ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm,kind", [("layernorm", "layernorm"), ("un", "unorm"), ("powernorm", "powernorm")]
)
def test_timm_vit_matches_plain_torch(tmp_path, norm, kind):
    path = make_timm_vit(tmp_path, heads=4, norm=norm)
    model = load_model(path, heads=4)
    g = model.graph
    assert g.family == "timm_vit" and g.norm_kinds() == [kind]
    assert g.tensors["pos_emb.weight"].shape == (17, 32)  # stored [1, 17, 32], read as [P, d]
    if kind == "powernorm":
        assert g.op("blocks.0.norm1").attrs == {"eps": 1e-5, "groups": 4, "gs_eps": 1e-5}
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dtype, rel in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        ref = load_timm_vit(path, 4, dtype)
        got = run_graph(g, model.weights(), {"pixel_values": x}, dtype=dtype)["logits"]
        with torch.no_grad():
            want = ref(x.to(dtype))
        # UN does not normalise per token, so logits reach ~50: bound the error relative to
        # the output scale (fp32 eps 1.2e-7 × a few dozen roundings per path)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= rel * max(1.0, scale)


def test_timm_vit_needs_heads(tmp_path, capsys):
    path = make_timm_vit(tmp_path)
    with pytest.raises(NormtoolError, match="--heads"):
        load_model(path)
    code, _, err = cli(capsys, "inspect", path)
    assert code == 2 and "--heads N" in err and str(path) in err
    code, out, _ = cli(capsys, "inspect", path, "--heads", "4")
    assert code == 0 and "timm_vit" in out


def test_timm_vit_with_timm_config_json(tmp_path):
    """timm's own config.json names no Hugging Face architecture: recognised by tensor names."""
    path = make_timm_vit(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"architecture": "vit_tiny", "num_classes": 5})
    )
    assert load_model(path, heads=4).graph.family == "timm_vit"


def test_unexplained_tensor_is_refused(tmp_path):
    """A variant with parts the layout does not know (here timm's fc_norm) must not load with
    those parts silently dropped."""
    path = make_timm_vit(tmp_path)
    sd = load_file(str(path))
    sd["fc_norm.weight"] = torch.ones(32)
    save_file(sd, str(path))
    with pytest.raises(NormtoolError, match="fc_norm.weight"):
        load_model(path, heads=4)


def test_normtool_output_round_trip(tmp_path, hf_dir):
    """Views (slices, transposes, reshapes) are materialised by the writer; the written file
    alone reproduces the same outputs."""
    model = load_model(hf_dir("vit"))
    out = save_model(model, tmp_path / "vit.safetensors")
    again = load_model(out)
    x = _inputs(model, 2, 0, torch.float32, 3)
    a = run_graph(model.graph, model.weights(), x)["logits"]
    b = run_graph(again.graph, again.weights(), x)["logits"]
    assert torch.equal(a, b)


# ---- normtool's reference transformer ------------------------------------------------------


REF_VARIANTS = [
    {"placement": "pre", "norm": "layernorm"},
    {"placement": "post", "norm": "layernorm"},
    {"placement": "pre", "parallel": True, "norm": "rmsnorm"},
    {"placement": "post", "parallel": True, "norm": "layernorm"},
    {"placement": "pre", "norm": "crmsnorm", "causal": False, "num_classes": 3},
    {"placement": "pre", "norm": "powernorm"},
    {"placement": "post", "norm": "un"},
    {"placement": "pre", "norm": "batchnorm", "tie_embeddings": True, "bias": False},
]


@pytest.mark.parametrize("cfg", REF_VARIANTS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_normtool_transformer_matches_reference(tmp_path, cfg):
    from devkit.factories import make_reference_transformer
    from normtool.nn.save import load_reference

    path = make_reference_transformer(tmp_path, **cfg)
    model = load_model(path)
    g = model.graph
    assert g.family == "normtool_transformer"
    assert (g.info["placement"], g.info["parallel"]) == (
        cfg["placement"],
        cfg.get("parallel", False),
    )
    ref = load_reference(path)
    ids = torch.randint(0, 48, (3, 16), generator=torch.Generator().manual_seed(0))
    for dtype, rel in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        got = run_graph(g, model.weights(), {"input_ids": ids}, dtype=dtype)["logits"]
        with torch.no_grad():
            want = ref.to(dtype)(ids)
        # same maths in another op order: rounding only, relative to the logits' scale
        assert (got - want).abs().max().item() <= rel * max(1.0, want.abs().max().item())


# ---- model classes of one family: computed as themselves, or refused ----------------------

#: (factory kwargs, variant, outputs). Base models output what transformers names
#: ``last_hidden_state`` (and ``pooler_output``); heads output ``logits``.
VARIANTS = {
    "bert_mlm": (make_bert, {"model": "BertForMaskedLM"}, "BertForMaskedLM", ["logits"]),
    "bert_mlm_untied": (
        make_bert,
        {"model": "BertForMaskedLM", "tie_word_embeddings": False},
        "BertForMaskedLM",
        ["logits"],
    ),
    "bert_model": (
        make_bert,
        {"model": "BertModel"},
        "BertModel",
        ["last_hidden_state", "pooler_output"],
    ),
    "bert_model_no_pooler": (
        make_bert,
        {"model": "BertModel", "pooler": False},
        "BertModel",
        ["last_hidden_state"],
    ),
    "gpt2_model": (make_gpt2, {"model": "GPT2Model"}, "GPT2Model", ["last_hidden_state"]),
}


@pytest.fixture(scope="module")
def variant_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            make, kw, _, _ = VARIANTS[case]
            made[case] = make(tmp_path_factory.mktemp(case) / "model", **kw)
        return made[case]

    return get


def _variant_errors(model, ref, dtype: torch.dtype) -> dict[str, float]:
    """``output_errors`` on seeded token ids (3 × 16)."""
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    return output_errors(model, ref, {"input_ids": ids}, dtype)


def output_errors(model, ref, x: dict, dtype: torch.dtype) -> dict[str, float]:
    """Max-abs error of every graph output on inputs ``x`` against the transformers output of
    the same name."""
    got = run_graph(model.graph, model.weights(), x, dtype=dtype)
    with torch.no_grad():
        want = ref(**x)
    errs = {}
    for value, name in model.graph.output_names().items():
        assert got[value].shape == want[name].shape, name
        assert want[name].abs().max() > 0.1  # not a comparison of two near-zero tensors
        errs[name] = (got[value] - want[name]).abs().max().item()
    return errs


@pytest.mark.parametrize("case", VARIANTS)
def test_model_class_is_computed_as_itself(case, variant_dir):
    """Detected from config.json and with ``--arch``: the graph computes that class's outputs."""
    path = variant_dir(case)
    _, _, variant, outputs = VARIANTS[case]
    for arch in (None, "bert" if case.startswith("bert") else "gpt2"):
        model = load_model(path, arch=arch)
        assert model.graph.info["variant"] == variant
        assert list(model.graph.output_names().values()) == outputs
    if case == "gpt2_model":  # no head invented: nothing reads the tied embedding twice
        assert "head.weight" not in model.graph.tensors
    ref = load_hf(path, torch.float32)
    if case == "bert_model_no_pooler":
        ref.pooler = None  # transformers initialises the missing pooler at random
    # fp32 bound as for the heads above (1e-4 max-abs on outputs of magnitude ~1-5); BERT and
    # GPT-2 run entirely in fp64 when asked, so fp64 agrees to rounding
    assert max(_variant_errors(model, ref, torch.float32).values()) <= 1e-4
    ref64 = load_hf(path, torch.float64)
    if case == "bert_model_no_pooler":
        ref64.pooler = None
    assert max(_variant_errors(model, ref64, torch.float64).values()) <= 1e-12


def test_gpt2_model_without_config_is_the_base_model(variant_dir, tmp_path):
    """No config: unprefixed keys and no lm_head are a GPT2Model's, computed as one."""
    path = tmp_path / "bare.safetensors"
    shutil.copy(variant_dir("gpt2_model") / "model.safetensors", path)
    model = load_model(path, arch="gpt2", heads=4)
    assert model.graph.info["variant"] == "GPT2Model"
    errs = _variant_errors(model, load_hf(variant_dir("gpt2_model")), torch.float32)
    assert errs["last_hidden_state"] <= 1e-4


def test_head_class_with_a_missing_tensor_names_it(hf_dir, tmp_path, capsys):
    """BertForSequenceClassification without its pooler: one line naming it (was a KeyError)."""
    path = tmp_path / "nopool"
    shutil.copytree(hf_dir("bert"), path)
    sd = load_file(str(path / "model.safetensors"))
    del sd["bert.pooler.dense.weight"], sd["bert.pooler.dense.bias"]
    save_file(sd, str(path / "model.safetensors"))
    code, _, err = cli(capsys, "inspect", path, "--arch", "bert")
    assert code == 2 and "'bert.pooler.dense'" in err and "KeyError" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("make", "cls", "arch"),
    [
        # a classifier but no pooler: not the sequence classifier
        (make_bert, "BertForTokenClassification", "bert"),
        # a score head on the last token, not the tied LM head
        (make_gpt2, "GPT2ForSequenceClassification", "gpt2"),
    ],
)
def test_unsupported_class_of_the_family_is_refused(make, cls, arch, tmp_path, capsys):
    path = make(tmp_path / "m", model=cls)
    for args in ((), ("--arch", arch)):
        code, _, err = cli(capsys, "inspect", path, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1
    assert cls in err and "computes only" in err


def test_base_model_transforms_refuse_with_reasons(variant_dir, capsys, tmp_path):
    """GPT2Model's output is its final norm's: RMS keeps that norm's γ/β after it (computing
    what transformers computes), CRMS cannot give the output's d coordinates and says so."""
    path = variant_dir("gpt2_model")
    code, out, _ = cli(capsys, "inspect", path, "--json")
    transforms = json.loads(out)["transforms"]
    assert code == 0 and transforms["convert-ln-to-rms"]["applies"]
    assert "logits" in json.dumps(transforms["loki-head"])
    code, _, err = cli(capsys, "convert-ln-to-rms", path, "--compressed")
    assert code == 2 and "norm_f" in err and "graph output" in err
    out_path = tmp_path / "rms.safetensors"
    code, _, err = cli(capsys, "convert-ln-to-rms", path, "-o", out_path)
    assert code == 0, err
    errs = _variant_errors(load_model(out_path), load_hf(path), torch.float32)
    assert errs["last_hidden_state"] <= 1e-4  # the bound of the heads above


def test_barrier_refuses_a_base_model(variant_dir, tmp_path, capsys):
    """A loss over hidden states would be a number without meaning: refused by name."""
    import numpy as np

    data = tmp_path / "d.npz"
    np.savez(data, inputs=np.zeros((4, 8), np.int64), labels=np.zeros((4, 8), np.int64))
    path = variant_dir("gpt2_model")
    code, _, err = cli(capsys, "barrier", path, path, "--data", data, "--steps", 2)
    assert code == 2 and "logits" in err and "last_hidden_state" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("case", "key"),
    [
        ("gpt2", "transformer.h.1.ln_2.weight"),
        ("bert", "bert.encoder.layer.0.output.LayerNorm.bias"),
        ("opt_pre", "model.decoder.final_layer_norm.bias"),
        ("vit", "vit.layernorm.weight"),
    ],
)
def test_missing_norm_parameter_is_named(case, key, hf_dir, tmp_path, capsys):
    """Hugging Face LayerNorms always store γ and β: a missing one is refused by name, never
    read as 1 or 0 (which computes another model)."""
    path = tmp_path / case
    shutil.copytree(hf_dir(case), path)
    sd = load_file(str(path / "model.safetensors"))
    del sd[key]
    save_file(sd, str(path / "model.safetensors"))
    code, _, err = cli(capsys, "inspect", path)
    assert code == 2 and repr(key) in err and len(err.strip().splitlines()) == 1
