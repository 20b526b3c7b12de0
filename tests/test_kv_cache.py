"""``export --kv-cache``: a prefill then one-token steps through the exported file give the
logits ``transformers`` gives with its own cache, and greedy generation from the file equals
``transformers``' ``generate`` token for token.

The decode steps run past the sliding windows (3) and soft caps bend the scores, so a causal or
window mask not offset by the past length, a cache missing the rotary embedding, or keys and
values stored in the wrong layout fail here.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import DynamicCache

import devkit.factories as fh
from normtool.load import load_model
from normtool.runtime.generate import greedy, step
from normtool.runtime.onnx_emit import EmitOptions, emit_onnx
from tests.conftest import cli

WINDOWED = {"sliding_window": 3, "head_dim": 8, "num_hidden_layers": 3}
#: case → factory of a tiny causal LM in a folder
CASES = {
    "gpt2": lambda d: fh.make_gpt2(d, n_positions=32),
    "llama": lambda d: fh.make_decoder(d),
    "mistral_window": lambda d: fh.make_decoder(d, "MistralForCausalLM", sliding_window=3),
    "gemma2": lambda d: fh.make_decoder(
        d,
        "Gemma2ForCausalLM",
        **WINDOWED,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gpt_neox": lambda d: fh.make_family(d, "gpt_neox"),
    "phi": lambda d: fh.make_family(d, "phi"),
}
#: fp32 max-abs logits (magnitude ~1-5): the file and transformers do the same fp32 arithmetic
#: up to summation order and the rotary frequencies (normtool rounds them once from fp64):
#: measured ≤ 3e-6 on every case; 1e-4 is the export tests' bar.
TOL = 1e-4


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache = {}

    def get(case: str):
        if case not in cache:
            path = CASES[case](tmp_path_factory.mktemp(case) / "model")
            cache[case] = path, fh.load_hf(path)
        return cache[case]

    return get


def _session(path, opts: EmitOptions) -> ort.InferenceSession:
    model = load_model(path)
    proto = emit_onnx(model.graph, model.weights(), opts)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _ids(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("case", "opts"),
    [
        *((c, EmitOptions(kv_cache=True)) for c in CASES),
        ("llama", EmitOptions(opset=17, kv_cache=True)),  # rotary written out, not the op
        ("gemma2", EmitOptions(opset=17, target="portable", kv_cache=True)),
    ],
)
def test_prefill_then_decode_matches_transformers_cache(case, opts, made):
    path, hf = made(case)
    session = _session(path, opts)
    ids = _ids(2, 9)
    past = {
        i.name: np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    cache = DynamicCache(config=hf.config)
    # a prefill of 5 tokens, then 4 single-token steps (past 5..8: beyond the windows of 3)
    for chunk in (ids[:, :5], *(ids[:, t : t + 1] for t in range(5, 9))):
        with torch.no_grad():
            want = hf(input_ids=chunk, past_key_values=cache, use_cache=True).logits.numpy()
        got, past = step(session, chunk.numpy(), past)
        assert np.abs(got - want).max() <= TOL
    # the file keeps every past token; a sliding-window layer of transformers only its window
    for part, kept in (("key", cache.layers[0].keys), ("value", cache.layers[0].values)):
        ours = past[f"past_key_values.0.{part}"]
        assert ours.shape[2] == 9
        assert np.abs(ours[:, :, -kept.shape[2] :] - kept.numpy()).max() <= TOL


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_greedy_generation_equals_transformers(case, made):
    path, hf = made(case)
    ids = _ids(1, 4)
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    got = greedy(_session(path, EmitOptions(kv_cache=True)), ids.numpy(), 20)
    assert got.shape == (1, 24)
    assert np.array_equal(got, want.numpy())


def test_cli_names_inputs_and_outputs_as_optimum(made, tmp_path):
    path, _ = made("llama")
    r = cli("export", path, "-o", tmp_path / "m.onnx", "--kv-cache", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    past = [f"past_key_values.{n}.{p}" for n in range(2) for p in ("key", "value")]
    assert res["inputs"] == ["input_ids", "attention_mask", "position_ids", *past]
    assert res["outputs"] == ["logits", *(p.replace("past_key_values", "present") for p in past)]
    dims = {i.name: i.shape for i in ort.InferenceSession(str(tmp_path / "m.onnx")).get_inputs()}
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence_length", 8]


def test_non_causal_model_is_refused(tmp_path):
    path = fh.make_bert(tmp_path / "bert")
    r = cli("export", path, "-o", tmp_path / "b.onnx", "--kv-cache")
    assert r.returncode == 2 and "causal" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "b.onnx").exists()
