"""DistilBERT, RoBERTa, DeiT, DINOv2, CLIP's two towers, GPT-NeoX and Phi: each recognised from its
``config.json``, computed by the executor and exported to ONNX equal to ``transformers`` run on
the same tiny random model, and every transform that applies checked against that reference.

Inputs are chosen to exercise what each family does differently: RoBERTa's padding tokens
(positions counted over the others), CLIP's EOS pooling (first EOS, none, the legacy "largest
id" rule), DeiT's distillation token and DINOv2's layer scale (all weights perturbed away from
their init by the factory, so a layer scale of 1 or a missing token would fail), GPT-NeoX's
q, k, v interleaved head by head in one fused tensor, and partial rotary embeddings (half of
each head).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from devkit.factories import load_hf, make_family
from normtool.inputs import complete_inputs
from normtool.load import load_model
from tests.conftest import cli
from tests.test_arch_transformers import output_errors

# case -> (family, transformers class, fp64 bound, convert-ln-to-rms: RMS, CRMS apply).
# fp64 bounds: the text models run entirely in fp64 when asked (agreement to rounding);
# transformers' eager attention for DeiT and CLIP computes the softmax in fp32 even for fp64
# models, which limits agreement to fp32 precision (measured ≤ 9e-7 here, as for ViT).
CASES = {
    "distilbert": ("distilbert", "DistilBertForSequenceClassification", 1e-12, False, False),
    "distilbert_model": ("distilbert", "DistilBertModel", 1e-12, False, False),
    "roberta": ("roberta", "RobertaForSequenceClassification", 1e-12, False, False),
    "roberta_model": ("roberta", "RobertaModel", 1e-12, False, False),
    "deit": ("deit", "DeiTForImageClassification", 2e-6, True, True),
    "deit_teacher": ("deit", "DeiTForImageClassificationWithTeacher", 2e-6, True, True),
    "dinov2": ("dinov2", "Dinov2Model", 1e-12, True, False),
    "clip_vision": ("clip_vision", "CLIPVisionModel", 2e-6, False, False),
    "clip_text": ("clip_text", "CLIPTextModel", 2e-6, True, False),
    "clip_vision_proj": ("clip_vision", "CLIPVisionModelWithProjection", 2e-6, False, False),
    "clip_text_proj": ("clip_text", "CLIPTextModelWithProjection", 2e-6, True, False),
    # transformers computes the rotary tables in fp32 for fp64 models too
    "gpt_neox": ("gpt_neox", "GPTNeoXForCausalLM", 2e-6, True, True),
    "phi": ("phi", "PhiForCausalLM", 2e-6, True, True),
}
EOS, PAD = 7, 1  # the factory's CLIP eos_token_id and RoBERTa's pad_token_id


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache: dict[tuple[str, int], Path] = {}

    def get(case: str, seed: int = 0) -> Path:
        if (case, seed) not in cache:
            family, cls = CASES[case][:2]
            out = tmp_path_factory.mktemp(f"{case}{seed}") / "model"
            cache[case, seed] = make_family(out, family, cls, seed=seed)
        return cache[case, seed]

    return get


def _inputs(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded inputs: pixels, or ids with padding tokens and EOS tokens placed on purpose."""
    g = torch.Generator().manual_seed(0)
    spec = model.graph.inputs[0]
    if spec.kind == "pixels":
        return {"pixel_values": torch.randn((3, *spec.shape[1:]), generator=g, dtype=dtype)}
    ids = torch.randint(8, spec.vocab, (4, spec.max_len), generator=g)
    ids[0, 5], ids[0, 9] = EOS, EOS  # the first EOS is pooled, not the later one
    ids[1, -1] = EOS
    ids[3, 2:6] = PAD  # row 2: no EOS and no padding
    ids[1, -3:-1] = PAD
    return {"input_ids": ids}


@pytest.mark.parametrize("case", CASES)
def test_executor_matches_transformers(case, made):
    path = made(case)
    family, cls, fp64_tol, _, _ = CASES[case]
    model = load_model(path)
    assert (model.graph.family, model.graph.info["variant"]) in ((family, cls), (family, family))
    # the bound: fp32 max-abs 1e-4 on outputs of magnitude ~1-5
    errs = output_errors(model, load_hf(path), _inputs(model, torch.float32), torch.float32)
    assert max(errs.values()) <= 1e-4, errs
    x64 = _inputs(model, torch.float64)
    errs64 = output_errors(model, load_hf(path, torch.float64), x64, torch.float64)
    assert max(errs64.values()) <= fp64_tol, errs64


def test_roberta_positions_skip_padding(made):
    """Positions count the non-padding tokens from pad_token_id + 1: the same tokens after a
    run of padding get other positions than at the start (a plain offset table would not)."""
    model = load_model(made("roberta_model"))
    assert model.graph.op("pos_emb").kind == "id_positions"
    assert model.graph.inputs[0].max_len == 16  # 18 rows, the first two below pad + 1
    ids = torch.tensor([[5, 6, 9, 12], [PAD, PAD, 5, 6]])
    errs = output_errors(model, load_hf(made("roberta_model")), {"input_ids": ids}, torch.float32)
    assert max(errs.values()) <= 1e-4


def test_gpt_neox_serial_blocks(tmp_path):
    """use_parallel_residual false: attention, then the MLP on the updated stream."""
    path = make_family(tmp_path / "m", "gpt_neox", use_parallel_residual=False)
    model = load_model(path)
    assert model.graph.info["parallel"] is False
    x = _inputs(model, torch.float32)
    assert max(output_errors(model, load_hf(path), x, torch.float32).values()) <= 1e-4


def test_clip_text_legacy_eos_pools_the_largest_id(tmp_path):
    """eos_token_id 2 (configs before transformers PR #24773): the largest id is pooled."""
    path = make_family(tmp_path / "m", "clip_text", eos_token_id=2)
    model = load_model(path)
    assert model.graph.op("pool").attrs["eos"] == -1
    x = _inputs(model, torch.float32)
    assert max(output_errors(model, load_hf(path), x, torch.float32).values()) <= 1e-4


@pytest.mark.parametrize("case", ["roberta_model", "clip_text"])
def test_onnx_positions_and_pooling_match_transformers(case, made, tmp_path):
    """The exported graph (CumSum positions, ArgMax/GatherND pooling) on the crafted ids."""
    path = made(case)
    onnx_path = tmp_path / "m.onnx"
    assert cli("export", path, "-o", onnx_path).returncode == 0
    model = load_model(path)
    x = _inputs(model, torch.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    # attention_mask (and token types) as transformers fills them when left out: unpadded
    feeds = complete_inputs(model.graph, {"input_ids": x["input_ids"]})
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
    with torch.no_grad():
        want = load_hf(path)(**x)
    for out, value in zip(sess.get_outputs(), got, strict=True):
        assert np.abs(value - want[out.name].numpy()).max() <= 1e-4, out.name


@pytest.mark.parametrize("case", CASES)
def test_export_verify_and_merge(case, made, tmp_path):
    """export + verify (checkpoint against its ONNX file), and merge of two seeds: its output
    folder loads in transformers and computes what normtool computes from it."""
    a, b = made(case), made(case, seed=1)
    onnx_path = tmp_path / "a.onnx"
    assert cli("export", a, "-o", onnx_path).returncode == 0
    r = cli("verify", a, onnx_path, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["equivalent"], r.stderr
    merged = tmp_path / "merged"
    r = cli("merge", a, b, "-o", merged)
    assert r.returncode == 0, r.stderr
    model = load_model(merged)
    errs = output_errors(model, load_hf(merged), _inputs(model, torch.float32), torch.float32)
    assert max(errs.values()) <= 1e-4, errs


@pytest.mark.parametrize("case", CASES)
def test_convert_ln_to_rms_or_its_reason(case, made, tmp_path):
    """Where it applies, the converted model computes what transformers computes from the
    original; where it does not, one line says why (exit 2)."""
    path = made(case)
    _, _, _, rms, crms = CASES[case]
    for compressed, applies in ((False, rms), (True, crms)):
        out = tmp_path / f"c{compressed}.safetensors"
        flags = ["--compressed"] if compressed else []
        r = cli("convert-ln-to-rms", path, "-o", out, *flags, "--json")
        if not applies:
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
            assert "cannot convert" in r.stderr and not out.exists()
            continue
        assert r.returncode == 0, r.stderr
        if case == "dinov2":  # the layer scale moved into the rows of the writer it scales
            notes = json.loads(r.stdout)["notes"]
            assert "layer scale blocks.0.attn.scale folded into blocks.0.attn.o" in notes
        conv = load_model(out)
        kinds = {o.kind for o in conv.graph.ops}
        assert not any(o.name.endswith(".scale") for o in conv.graph.ops)
        assert "layernorm" not in kinds and ("crmsnorm" if compressed else "rmsnorm") in kinds
        x = _inputs(conv, torch.float32)
        errs = output_errors(conv, load_hf(path), x, torch.float32)
        assert max(errs.values()) <= 1e-4, errs


def test_refusal_reasons_name_the_cause(made):
    """What blocks the conversion is named: Post-LN, CLIP's image stream as an output and its
    pre_layrnorm, a final norm whose output is the model's (CRMS only)."""

    def reasons(case: str) -> str:
        r = cli("inspect", made(case), "--json")
        return json.dumps(json.loads(r.stdout)["transforms"]["convert-ln-to-rms"])

    assert "Post-LN" in reasons("distilbert") and "Post-LN" in reasons("roberta")
    clip = reasons("clip_vision")
    assert "graph output 'last_hidden_state'" in clip and "emb_norm" in clip
    r = cli("convert-ln-to-rms", made("dinov2"), "--compressed")
    assert r.returncode == 2 and "norm_f" in r.stderr and "without --compressed" in r.stderr


def test_clip_model_is_refused_with_the_reason(tmp_path):
    """CLIPModel (both towers, logits across the batch) is recognised and refused by name."""
    from transformers import CLIPConfig, CLIPModel

    tower = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    cfg = CLIPConfig(
        text_config={**tower, "vocab_size": 64, "max_position_embeddings": 16},
        vision_config={**tower, "image_size": 16, "patch_size": 4},
        projection_dim=24,
    )
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    for command in ("inspect", "export"):
        r = cli(command, tmp_path / "clip")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
        assert "CLIPModel" in r.stderr and "logits_per_image" in r.stderr
