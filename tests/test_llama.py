"""Llama-class decoders (Llama, Mistral, Qwen2): the graph, its ONNX export and merge's
permutations compute what ``transformers`` computes.

The models are tiny (d=32, 2 layers) with every parameter perturbed (``devkit.factories``), and
grouped-query by default (4 query heads on 2 key/value heads), so ignoring a norm gain, a bias,
the rotary embedding, the kv grouping, the sliding window or the rope scaling fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from devkit.factories import load_hf, make_decoder
from normtool.inputs import complete_inputs
from normtool.load import load_model
from normtool.merge.groups import permutation_groups
from normtool.merge.matching import weight_matching
from normtool.merge.permute import invert, permute_weights, random_perms
from normtool.runtime.onnx_emit import EmitOptions, emit_onnx
from normtool.runtime.torch_exec import run_graph
from tests.conftest import cli

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
GEMMA3 = {
    "head_dim": 8,
    "num_hidden_layers": 3,
    "sliding_window": 5,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    },
}
#: case → (model class, config overrides, expected family)
CASES = {
    "llama": ("LlamaForCausalLM", {}, "llama"),
    "llama_base": ("LlamaModel", {}, "llama"),
    "llama_tied_mha": (
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "num_key_value_heads": 4},
        "llama",
    ),
    "llama3_scaled": (
        "LlamaForCausalLM",
        {"rope_scaling": {**LLAMA3}, "rope_theta": 500.0},
        "llama",
    ),
    "linear_head_dim": (
        "LlamaForCausalLM",
        {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "head_dim": 16},
        "llama",
    ),
    "mistral_window": ("MistralForCausalLM", {"sliding_window": 5}, "mistral"),
    "qwen2": ("Qwen2ForCausalLM", {}, "qwen2"),
    # 3 layers: sliding, full, sliding; soft caps low enough to bend the scores and logits
    "gemma2": (
        "Gemma2ForCausalLM",
        {
            "head_dim": 8,
            "num_hidden_layers": 3,
            "sliding_window": 5,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 3.0,
        },
        "gemma2",
    ),
    "gemma2_base": ("Gemma2Model", {"head_dim": 8, "sliding_window": 5}, "gemma2"),
    # q/k head norms; sliding layers rotate with their own base, the full layer linearly scaled
    "gemma3": ("Gemma3ForCausalLM", {**GEMMA3, "final_logit_softcapping": 3.0}, "gemma3_text"),
    "gemma3_base": ("Gemma3TextModel", GEMMA3, "gemma3_text"),
}
#: fp32 bound on max-abs logits (magnitude ~3-5): the executor and transformers do the same
#: fp32 arithmetic up to summation order and the rotary frequencies (transformers computes
#: them in fp32, normtool rounds them once from fp64): measured ≤ 2e-6; 1e-4 is the issue's bar.
TOL = 1e-4


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in made:
            model, cfg, _ = CASES[case]
            made[case] = make_decoder(tmp_path_factory.mktemp(case) / "model", model, **cfg)
        return made[case]

    return get


def _run(*args: object) -> tuple[int, str, str]:
    r = cli(*args)
    return r.returncode, r.stdout, r.stderr


def _ids(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _reference(path: Path, ids: torch.Tensor) -> tuple[str, torch.Tensor]:
    with torch.no_grad():
        out = load_hf(path)(input_ids=ids)
    name = "logits" if hasattr(out, "logits") and out.logits is not None else "last_hidden_state"
    return name, getattr(out, name)


@pytest.mark.parametrize("case", CASES)
def test_executor_matches_transformers(case, decoder):
    path = decoder(case)
    model = load_model(path)
    assert model.graph.family == CASES[case][2]
    ids = _ids(0)  # 12 tokens: past the sliding window (5) and the llama3 context (8)
    name, want = _reference(path, ids)
    got = run_graph(model.graph, model.weights(), {"input_ids": ids})
    assert list(got) == [name]
    err = (got[name] - want).abs().max().item()
    assert err <= TOL, err


@pytest.mark.parametrize(
    ("case", "opts"),
    [
        ("llama", EmitOptions(opset=17)),
        ("llama", EmitOptions(opset=23, target="portable")),
        ("mistral_window", EmitOptions(opset=23, attention="op")),
        ("mistral_window", EmitOptions(opset=17, target="portable")),
        ("qwen2", EmitOptions(opset=23)),
        ("llama3_scaled", EmitOptions(opset=23)),
        ("llama_tied_mha", EmitOptions(opset=17)),
        ("gemma2", EmitOptions(opset=17)),
        ("gemma2", EmitOptions(opset=23, attention="op")),
        ("gemma2_base", EmitOptions(opset=23)),
        ("gemma3", EmitOptions(opset=17)),
        ("gemma3_base", EmitOptions(opset=23, attention="op")),
    ],
    ids=lambda v: v if isinstance(v, str) else f"{v.opset}-{v.target}-{v.attention}",
)
def test_onnx_export_matches_transformers(case, opts, decoder):
    """ONNX Runtime on the export against transformers (same fp32 bound as the executor)."""
    path = decoder(case)
    model = load_model(path)
    onx = emit_onnx(model.graph, model.weights(), opts)
    session = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = _ids(1, batch=3, seq=11)
    _, want = _reference(path, ids)
    # attention_mask as transformers fills it when left out: unpadded
    feeds = complete_inputs(model.graph, {"input_ids": ids})
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    err = float(np.abs(got - want.numpy()).max())
    assert err <= TOL, err


def test_hub_style_rope_config_reads_as_the_new_one(decoder, tmp_path):
    """transformers 4's ``rope_theta`` + ``rope_scaling`` (most Hub configs) give the graph that
    transformers 5's ``rope_parameters`` gives; an unsupported scaling is refused by name."""
    src = decoder("llama3_scaled")
    new = json.loads((src / "config.json").read_text())
    params = new.pop("rope_parameters")
    old_style = tmp_path / "old"
    old_style.mkdir()
    (old_style / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    theta, kind = params.pop("rope_theta"), params.pop("rope_type")
    cfg = {**new, "rope_theta": theta, "rope_scaling": {**params, "type": kind}}
    (old_style / "config.json").write_text(json.dumps(cfg))
    assert load_model(old_style).graph.to_json() == load_model(src).graph.to_json()
    scaling = load_model(src).graph.info["rope"]["scaling"]
    assert scaling == {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}

    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    (old_style / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run("inspect", old_style)
    assert code == 2 and "'yarn' is not supported" in err and len(err.strip().splitlines()) == 1


def test_gemma2_config_without_layer_types_slides_on_even_layers(decoder, tmp_path):
    """Hub configs from transformers 4 have no ``layer_types``: Gemma 2 then slides on even
    layers, as the config's ``layer_types`` written by transformers 5 says explicitly."""
    src = decoder("gemma2")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg.pop("layer_types") == ["sliding_attention", "full_attention", "sliding_attention"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (old / "config.json").write_text(json.dumps(cfg))
    graph = load_model(old).graph
    assert graph.to_json() == load_model(src).graph.to_json()
    assert [o.attrs.get("window") for o in graph.ops_of("attention")] == [5, None, 5]


def test_gemma3_hub_config_reads_as_the_new_one(decoder, tmp_path):
    """A transformers 4 Gemma 3 config (``sliding_window_pattern``, ``rope_local_base_freq``
    beside ``rope_theta`` / ``rope_scaling``, no ``layer_types``) gives the same graph."""
    src = decoder("gemma3")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["layer_types"], cfg["rope_parameters"]
    cfg.update(
        sliding_window_pattern=2,  # layers 0 and 2 slide, layer 1 attends fully
        rope_theta=10000.0,
        rope_scaling={"type": "linear", "factor": 4.0},
        rope_local_base_freq=100.0,
    )
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (old / "config.json").write_text(json.dumps(cfg))
    assert load_model(old).graph.to_json() == load_model(src).graph.to_json()


@pytest.mark.parametrize(
    ("case", "change", "reason"),
    [
        ("qwen2", {"use_sliding_window": True}, "use_sliding_window=True is not supported"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
            "'dynamic' is not supported",
        ),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ],
)
def test_what_is_not_computed_is_refused_by_name(case, change, reason, decoder, tmp_path):
    src = decoder(case)
    cfg = {**json.loads((src / "config.json").read_text()), **change}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = _run("export", bad, "-o", tmp_path / "m.onnx")
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_sharded_folder_loads(tmp_path):
    path = make_decoder(tmp_path / "sharded", "Qwen2ForCausalLM", save={"max_shard_size": "20KB"})
    assert len(list(path.glob("*.safetensors"))) > 1
    model = load_model(path)
    ids = _ids(2)
    _, want = _reference(path, ids)
    got = run_graph(model.graph, model.weights(), {"input_ids": ids})["logits"]
    assert (got - want).abs().max().item() <= TOL


def test_cli_inspect_export_verify_bench_and_refusals(decoder, tmp_path):
    path = decoder("mistral_window")
    code, out, _ = _run("inspect", path)
    assert code == 0 and out.startswith(f"{path}: mistral") and "kv_heads=2" in out
    onnx_path = tmp_path / "m.onnx"
    code, _, err = _run("export", path, "-o", onnx_path, "--opset", "17")
    assert code == 0, err
    code, out, err = _run("verify", path, onnx_path)
    assert code == 0 and "equivalent" in out, err
    bench = ["--batch", "1", "--seq", "8", "--warmup", "1", "--iters", "3", "--sessions", "2"]
    code, out, err = _run("bench", path, onnx_path, *bench)
    assert code == 0 and "baseline" in out, err
    code, _, err = _run("convert-ln-to-rms", path, "-o", path.parent / "c")
    assert code == 2 and "no LayerNorm (norms: rmsnorm)" in err
    code, _, err = _run("fold", path, "-o", path.parent / "f")
    assert code == 2 and "nothing to fold" in err


# ---- merge -----------------------------------------------------------------------------------


def _logits(model, weights, ids) -> torch.Tensor:
    return run_graph(model.graph, weights, {"input_ids": ids}, dtype=torch.float64)["logits"]


@pytest.mark.parametrize("case", ["llama", "llama_tied_mha", "gemma3"])
def test_permutation_groups_keep_rotary_pairs_and_kv_groups(case, decoder):
    model = load_model(decoder(case))
    g = model.graph
    groups, skipped = permutation_groups(g)
    attn = [gr for gr in groups if gr.heads]
    assert len(attn) == g.info["layers"] and all(gr.rotary for gr in attn) and not skipped
    perms = random_perms(g, groups, torch.Generator().manual_seed(4))
    w = {k: model.tensor(k).double() for k in g.tensors}
    pw = permute_weights(g, w, perms)
    for gr in attn:
        q = perms[gr.spaces[0]].reshape(gr.heads, -1)
        dim = q.shape[1]
        assert torch.equal(q % dim, torch.arange(dim).expand_as(q)), "a q/k dim moved in its head"
        if gr.kv_heads:  # each query head stays in its kv group
            k = perms[gr.spaces[1]].reshape(gr.kv_heads, -1)[:, 0] // dim
            r = gr.heads // gr.kv_heads
            assert torch.equal(q[:, 0] // dim // r, k.repeat_interleave(r))
    ids = _ids(3)
    # fp64: a permutation only reorders sums
    ref = _logits(model, w, ids)
    assert (ref - _logits(model, pw, ids)).abs().max().item() <= 1e-10
    # negative control: swapping two q/k dims inside every head breaks the rotary pairs
    bad = dict(perms)
    for gr in attn:
        for s in {gr.spaces[0], gr.spaces[1]}:
            d = g.spaces[s].size // (g.spaces[s].heads)
            swap = torch.arange(d)
            swap[[0, 1]] = swap[[1, 0]]
            bad[s] = (perms[s].reshape(-1, d)[:, swap]).reshape(-1)
    assert (ref - _logits(model, permute_weights(g, w, bad), ids)).abs().max().item() > 1e-3


def test_weight_matching_recovers_a_grouped_query_permutation(decoder):
    model = load_model(decoder("llama"))
    g = model.graph
    groups, _ = permutation_groups(g)
    wa = {k: model.tensor(k).float() for k in g.tensors}
    known = random_perms(g, groups, torch.Generator().manual_seed(11))
    wb = permute_weights(g, wa, known)
    r = weight_matching(g, groups, wa, wb, seed=0)
    undo = invert(known)
    assert all(torch.equal(p, undo[s]) for s, p in r.perms.items())


def test_merge_of_two_llamas_loads_in_transformers(decoder, tmp_path):
    a = decoder("llama")
    b = make_decoder(tmp_path / "b", "LlamaForCausalLM", seed=1)
    code, out, err = _run("merge", a, b, "--weights", "0,1", "-o", tmp_path / "pb")
    assert code == 0, err
    assert "skipped" not in out
    ids = _ids(5)
    _, want = _reference(b, ids)
    _, have = _reference(tmp_path / "pb", ids)
    # B permuted into A's basis computes B's function in transformers: fp32 rounding only
    assert float((want - have).abs().max() / want.abs().max()) <= 1e-5
    code, out, err = _run("merge", a, b, "-o", tmp_path / "mid")
    assert code == 0, err
    assert load_hf(tmp_path / "mid") is not None
