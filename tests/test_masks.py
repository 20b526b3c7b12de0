"""Padded batches, hidden-state outputs and sentence embeddings, against ``transformers``.

Reference: each model run by ``transformers`` itself with the same ``attention_mask`` (and
``position_ids`` / ``token_type_ids`` where the family takes them). Batches are padded as
``normtool.inputs.random_inputs`` pads them: row 0 full, the others of random length, padded
left or right at random, so both paddings occur in every batch of 6.

What is compared: every position for the encoders (BERT, RoBERTa, DistilBERT: bidirectional: a padded query still sees the kept
keys, so its value is defined and transformers computes it the same way); for the causal
models (GPT-2, OPT, GPT-NeoX, Phi, Llama, Mistral, Gemma 2) only the positions the mask keeps — under left padding a padded query has
every key hidden, and transformers gives such rows values of its own choosing (OPT's eager
attention even NaN in fp64), which nothing downstream may read.

Tolerances: the executor runs in fp64. GPT-2 and BERT run by transformers in fp64 agree to
rounding (1e-12, as in test_arch_transformers); RoBERTa and DistilBERT too. OPT's eager
attention computes its softmax in fp32 whatever the model dtype, and the rotary models (GPT-NeoX,
Phi, Llama, Mistral, Gemma 2) compute their rotary frequencies in fp32, so these run in fp32 and are held to 1e-5 of the logits' scale
(~100 u; measured ≤ 4e-7 for OPT). ONNX Runtime in fp32 against transformers: 1e-4 absolute, the
bound test_export holds every export to (measured ≤ 3e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from devkit import factories as fh
from normtool.export import export_model
from normtool.graph import Op
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.model import Model
from normtool.outputs import select_outputs
from normtool.runtime.ort import create_session
from normtool.runtime.torch_exec import run_graph
from tests.conftest import cli

EXACT = 1e-12
OPT_REL = 1e-5
ONNX_ATOL = 1e-4

CASES = {
    "gpt2": (lambda d: fh.make_gpt2(d / "gpt2"), torch.float64, EXACT),
    "opt_pre": (lambda d: fh.make_opt(d / "opt_pre", pre=True), torch.float32, OPT_REL),
    "opt_post": (lambda d: fh.make_opt(d / "opt_post", pre=False), torch.float32, OPT_REL),
    "bert": (lambda d: fh.make_bert(d / "bert"), torch.float64, EXACT),
    "roberta": (lambda d: fh.make_family(d / "roberta", "roberta"), torch.float64, EXACT),
    "distilbert": (lambda d: fh.make_family(d / "distilbert", "distilbert"), torch.float64, EXACT),
    # partial rotary, parallel blocks
    "gpt_neox": (lambda d: fh.make_family(d / "neox", "gpt_neox"), torch.float32, OPT_REL),
    "phi": (lambda d: fh.make_family(d / "phi", "phi"), torch.float32, OPT_REL),
    # grouped-query attention (4 query heads on 2 kv heads), and with a sliding window
    "llama": (lambda d: fh.make_decoder(d / "llama"), torch.float32, OPT_REL),
    "mistral": (
        lambda d: fh.make_decoder(d / "mistral", "MistralForCausalLM", sliding_window=5),
        torch.float32,
        OPT_REL,
    ),
    # soft-capped scores, sliding and full layers
    "gemma2": (
        lambda d: fh.make_decoder(
            d / "gemma2",
            "Gemma2ForCausalLM",
            head_dim=8,
            num_hidden_layers=3,
            sliding_window=5,
            attn_logit_softcapping=2.0,
        ),
        torch.float32,
        OPT_REL,
    ),
}
INPUTS = {
    "gpt2": ["input_ids", "attention_mask", "position_ids"],
    "opt_pre": ["input_ids", "attention_mask"],
    "opt_post": ["input_ids", "attention_mask"],
    "bert": ["input_ids", "attention_mask", "token_type_ids"],
    "roberta": ["input_ids", "attention_mask", "token_type_ids"],
    "distilbert": ["input_ids", "attention_mask"],
    "gpt_neox": ["input_ids", "attention_mask"],
    "phi": ["input_ids", "attention_mask"],
    "llama": ["input_ids", "attention_mask"],
    "mistral": ["input_ids", "attention_mask"],
    "gemma2": ["input_ids", "attention_mask"],
}
#: bidirectional encoders: every position compared (see the module docstring)
ENCODERS = ("bert", "roberta", "distilbert")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("masks")
    cache: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in cache:
            cache[case] = CASES[case][0](root)
        return cache[case]

    return get


def _padded(model: Model, seed: int = 3) -> dict[str, torch.Tensor]:
    x = random_inputs(model.graph, 6, 12, seed)
    mask = x["attention_mask"]
    assert (mask[1:] == 0).any(), "the batch must be padded"
    return x


def _where(case: str, x: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The positions compared (see the module docstring)."""
    if case in ENCODERS:
        return torch.ones(like.shape[:2], dtype=torch.bool)
    return x["attention_mask"].bool()


def _err(ref: torch.Tensor, got: torch.Tensor, where: torch.Tensor) -> tuple[float, float]:
    """(max |ref − got| over the compared positions, max |ref| there)."""
    r, g = ref.double()[where], torch.as_tensor(got).double()[where]
    return float((r - g).abs().max()), float(r.abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_matches_transformers(case, made, tmp_path):
    path = made(case)
    _, ref_dtype, tol = CASES[case]
    model = load_model(path)
    assert [i.name for i in model.graph.inputs] == INPUTS[case]
    x = _padded(model)
    with torch.no_grad():
        want = fh.load_hf(path, ref_dtype)(**x).logits
    where = _where(case, x, want) if want.dim() == 3 else torch.ones(want.shape[0], dtype=bool)
    got = run_graph(model.graph, model.weights(), x, dtype=torch.float64)["logits"]
    err, scale = _err(want, got, where)
    assert err <= tol * max(scale, 1.0), (case, err, scale)
    # the same padded batch through ONNX Runtime, fused (ort) and standard-op exports
    for target in ("ort", "portable"):
        out = tmp_path / f"{target}.onnx"
        export_model(model, out, target=target)
        sess = create_session(out, "cpu")
        assert [i.name for i in sess.session.get_inputs()] == INPUTS[case]
        err, _ = _err(want, sess.run(x)["logits"], where)
        assert err <= ONNX_ATOL, (case, target, err)


def test_padding_changes_the_result(made):
    """The mask is really read: the kept positions of a padded row differ from the same
    tokens run with every key visible (otherwise the tests above could not fail)."""
    model = load_model(made("bert"))
    x = _padded(model)
    full = {**x, "attention_mask": torch.ones_like(x["attention_mask"])}
    a = run_graph(model.graph, model.weights(), x, dtype=torch.float64)["logits"]
    b = run_graph(model.graph, model.weights(), full, dtype=torch.float64)["logits"]
    padded_rows = (x["attention_mask"] == 0).any(1)
    assert float((a - b)[padded_rows].abs().max()) > 1e-3


def test_image_models_take_no_mask(tmp_path):
    model = load_model(fh.make_vit(tmp_path / "vit"))
    assert [i.name for i in model.graph.inputs] == ["pixel_values"]


def _base_reference(case: str, path: Path):
    """transformers' base model inside the head model (what ``--outputs hidden`` exports)."""
    hf = fh.load_hf(path, CASES[case][1])
    return {"gpt2": lambda: hf.transformer, "bert": lambda: hf.bert}.get(
        case, lambda: hf.model.decoder
    )()


@pytest.mark.parametrize("case", ["gpt2", "opt_post", "bert"])
def test_hidden_outputs_match_the_base_model(case, made, tmp_path):
    path = made(case)
    model = select_outputs(load_model(path), "hidden")
    names = list(model.graph.output_names().values())
    assert names == (["last_hidden_state", "pooler_output"] if case == "bert" else names[:1])
    assert names[0] == "last_hidden_state"
    x = _padded(model)
    with torch.no_grad():
        want = _base_reference(case, path)(**x)
    out = tmp_path / "hidden.onnx"
    export_model(model, out)
    got = create_session(out, "cpu").run(x)
    where = _where(case, x, want.last_hidden_state)
    err, _ = _err(want.last_hidden_state, got["last_hidden_state"], where)
    assert err <= ONNX_ATOL, (case, err)
    if case == "bert":
        err = float(np.abs(want.pooler_output.numpy() - got["pooler_output"]).max())
        assert err <= ONNX_ATOL


def _mean_pooling(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' documented mean pooling (the model card's ``mean_pooling``)."""
    m = mask.unsqueeze(-1).expand(hidden.size()).to(hidden.dtype)
    return torch.sum(hidden * m, 1) / torch.clamp(m.sum(1), min=1e-9)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_embedding_matches_reference(pooling, made, tmp_path):
    path = made("bert")
    out = tmp_path / "emb.onnx"
    r = cli("export", path, "-o", out, "--pooling", pooling, "--normalize", "--json")
    assert r.returncode == 0, r.stderr
    sess = create_session(out, "cpu")
    assert sess.output_names == ["last_hidden_state", "sentence_embedding"]
    x = _padded(load_model(path))
    with torch.no_grad():
        hidden = fh.load_hf(path, torch.float64).bert(**x).last_hidden_state
    pooled = _mean_pooling(hidden, x["attention_mask"]) if pooling == "mean" else hidden[:, 0]
    want = torch.nn.functional.normalize(pooled, p=2, dim=1)
    err = float(np.abs(want.numpy() - sess.run(x)["sentence_embedding"]).max())
    assert err <= ONNX_ATOL, err


def test_output_flags_refused(made, tmp_path):
    path = made("bert")
    for args in (["--outputs", "logits"], ["--pooling", "max"], ["--normalize"]):
        r = cli("export", path, "-o", tmp_path / "x.onnx", *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert not (tmp_path / "x.onnx").exists()


def test_converted_model_keeps_inputs_and_verifies_padded(made, tmp_path):
    """convert-ln-to-rms keeps the mask and position inputs; verify runs padded batches on the
    original checkpoint and the converted model's ONNX export; the converted model's internal
    values are not the original's hidden states, so exporting them is refused with the reason."""
    path = made("gpt2")
    rms = tmp_path / "gpt2.rms.safetensors"
    assert cli("convert-ln-to-rms", path, "-o", rms).returncode == 0
    onnx_path = tmp_path / "gpt2.rms.onnx"
    r = cli("export", rms, "-o", onnx_path, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inputs"] == INPUTS["gpt2"]
    r = cli("verify", path, onnx_path, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli("export", rms, "-o", tmp_path / "h.onnx", "--outputs", "hidden")
    assert r.returncode == 2 and "convert-ln-to-rms folded" in r.stderr, r.stderr


def test_verify_detects_a_mask_ignored(made, tmp_path):
    """An export whose attention ignores the mask differs from the checkpoint on the padded
    batches verify feeds: verify exits 1."""
    path = made("bert")
    model = load_model(path)
    g = model.graph.copy()
    for op in g.ops_of("attention"):
        op.inputs = op.inputs[:3]
    broken = Model(g, model.checkpoint)
    out = tmp_path / "nomask.onnx"
    export_model(broken, out)
    assert cli("verify", path, out).returncode == 1


def legacy_graph(model: Model):
    """``model``'s graph as normtool wrote graphs before masks were inputs: ``input_ids``
    only, token type 0 as a ``row`` of the table, attention without a mask."""
    g = model.graph.copy()
    g.inputs = g.inputs[:1]
    for i, op in enumerate(g.ops):
        if op.kind == "attention":
            op.inputs = op.inputs[:3]
        elif op.name == "type_emb":
            g.ops[i] = Op(op.name, "row", ("input_ids",), op.output, dict(op.params), {"index": 0})
    g.reindex()
    g.validate()
    return g


def test_legacy_graph_still_runs_and_verifies(made, tmp_path):
    """A graph without mask inputs (an older normtool output) runs, exports, and verifies
    against the checkpoint that takes them (fed unpadded, the defaults filling the rest)."""
    path = made("bert")
    model = load_model(path)
    old = Model(legacy_graph(model), model.checkpoint)
    out = tmp_path / "legacy.onnx"
    export_model(old, out)
    r = cli("verify", path, out, "--json")
    assert r.returncode == 0, r.stdout + r.stderr


def test_converted_base_model_keeps_its_hidden_states(tmp_path):
    """A base model's hidden states are its outputs, which convert-ln-to-rms keeps exact: its
    converted model still exports them pooled, and verifies against the original."""
    path = fh.make_gpt2(tmp_path / "base", model="GPT2Model")
    rms = tmp_path / "base.rms.safetensors"
    r = cli("convert-ln-to-rms", path, "-o", rms)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "pooled.onnx"
    assert cli("export", rms, "-o", out, "--pooling", "mean").returncode == 0
    r = cli("verify", path, out, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [o["name"] for o in json.loads(r.stdout)["outputs"]] == ["last_hidden_state"]
