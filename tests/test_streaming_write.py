"""How transforms stream their output: row blocks, stored orientation, fused reads, late digest.

These are the mechanisms that keep converting a multi-GB checkpoint near the cost of copying it
(scripts/bench_ln_to_rms.py measures that); here each is checked for *correctness*: whatever
path a tensor takes to disk, the file must hold exactly the tensor the pass computed, and the
history must name the source's true SHA-256 (computed here with hashlib over the file bytes).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from devkit.factories import make_gpt2, make_reference_transformer
from devkit.proc import run_cli
from normtool.io.safetensors_format import read_header, write_stream
from normtool.io.store import Checkpoint
from normtool.load import HISTORY_KEY, load_model
from normtool.passes import ln_to_rms
from tests.conftest import cli


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_write_stream_takes_row_blocks_and_checks_them(tmp_path):
    a = torch.arange(12.0).reshape(4, 3)
    specs = [("a", torch.float32, (4, 3)), ("s", torch.float32, ())]
    parts = {"a": lambda: iter([a[:1], a[1:3], a[3:]]), "s": lambda: torch.tensor(7.0)}
    out = tmp_path / "x.safetensors"
    with out.open("wb") as f:
        write_stream(f, specs, lambda n: parts[n](), {"k": "v"})
    with safe_open(str(out), "pt") as g:
        assert torch.equal(g.get_tensor("a"), a) and float(g.get_tensor("s")) == 7.0
    bad = {
        "too few rows": lambda: iter([a[:3]]),
        "wrong width": lambda: iter([a[:, :2], a[:, :2]]),
        "wrong dtype": lambda: iter([a.double()]),
    }
    for blocks in bad.values():
        with pytest.raises(RuntimeError, match="'a'"):
            write_stream(io.BytesIO(), specs[:1], lambda n, b=blocks: b(), {})


def test_late_metadata_is_written_in_place(tmp_path):
    token = "0123456789abcdef" * 4
    out = tmp_path / "x.safetensors"
    with out.open("wb") as f:
        write_stream(
            f,
            [("a", torch.float32, (2,))],
            lambda n: torch.ones(2),
            {"h": json.dumps([{"sha": token}])},
            late=lambda: {token: "f" * 64},
        )
    _, meta = read_header(out)
    assert json.loads(meta["h"]) == [{"sha": "f" * 64}]
    with pytest.raises(RuntimeError, match="stand-in"):
        write_stream(io.BytesIO(), [], lambda n: None, {"h": "x"}, late=lambda: {"y": "z"})


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_history_records_the_source_sha256(tmp_path, shard):
    """The digest is hashed beside the write and patched into the header (and the index)."""
    (tmp_path / "in").mkdir()
    src = make_reference_transformer(tmp_path / "in", norm="layernorm")
    out = tmp_path / "o.safetensors"
    extra = ["--max-shard-size", shard] if shard else []
    r = run_cli("convert-ln-to-rms", src, "-o", out, "--no-verify", "--json", *extra)
    assert r.returncode == 0, r.stderr
    files = [out] if shard is None else sorted(tmp_path.glob("o-*-of-*.safetensors"))
    assert files and all(f.exists() for f in files)
    want = _sha(src)
    for f in files:
        assert json.loads(read_header(f)[1][HISTORY_KEY])[-1]["source_sha256"] == want
    if shard:
        index = json.loads((tmp_path / "o.safetensors.index.json").read_text())
        assert json.loads(index["metadata"][HISTORY_KEY])[-1]["source_sha256"] == want
    assert load_model(json.loads(r.stdout)["output"]).history[-1]["source_sha256"] == want


def test_transposed_weights_keep_their_stored_orientation(tmp_path):
    """GPT-2 stores Conv1D weights [in, out]; the converted file does too (no transposing copy
    on the way out), says so in its graph, and reads back as exactly the computed tensors."""
    src = make_gpt2(tmp_path / "gpt2")
    model = load_model(src)
    conv = ln_to_rms.convert_ln_to_rms(model).stored()
    out = tmp_path / "g.rms.safetensors"
    r = run_cli("convert-ln-to-rms", src, "-o", out, "--no-verify")
    assert r.returncode == 0, r.stderr
    back = load_model(out)
    fc1 = back.graph.tensors["blocks.0.mlp.fc1.weight"]
    assert fc1.source.transpose
    with safe_open(str(out), "pt") as f:
        assert tuple(f.get_slice(fc1.source.key).get_shape()) == fc1.shape[::-1]
    for name in back.graph.tensors:
        assert torch.equal(back.tensor(name), conv.tensor(name)), name


def test_fused_weight_is_read_once_for_its_views(tmp_path, monkeypatch):
    """q, k and v are views of GPT-2's fused c_attn: reading all three reads it once."""
    model = load_model(make_gpt2(tmp_path / "gpt2"))
    reads: list[str] = []
    real = Checkpoint.get

    def counting(self, key):
        reads.append(key)
        return real(self, key)

    monkeypatch.setattr(Checkpoint, "get", counting)
    views = [model.tensor(f"blocks.0.attn.{p}.weight") for p in "qkv"]
    assert reads.count("transformer.h.0.attn.c_attn.weight") == 1
    assert torch.equal(torch.cat([v.t() for v in views], 1), real(model.checkpoint, reads[0]))


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_direct_io_output_reads_back_exactly(tmp_path, monkeypatch, shard):
    """The whole command with every output written directly (staging blocks of 3 alignment
    units, so tensors straddle blocks and the last one is padded and cut): the file holds the
    computed tensors, and the source digest patched in after the data is the true one."""
    from normtool.io import sink

    monkeypatch.setattr(sink, "BLOCK", 3 * sink.ALIGN)
    monkeypatch.setattr(sink, "DIRECT_MIN_BYTES", 0)
    made, real = [], sink.Appender
    monkeypatch.setattr(sink, "Appender", lambda fd: made.append(fd) or real(fd))
    src = make_gpt2(tmp_path / "gpt2")
    conv = ln_to_rms.convert_ln_to_rms(load_model(src)).stored()
    out = tmp_path / "g.rms.safetensors"
    r = cli("convert-ln-to-rms", src, "-o", out, "--no-verify", "--json",
            *(["--max-shard-size", shard] if shard else []))  # fmt: skip
    assert r.returncode == 0, r.stderr
    if not made:
        pytest.skip("this file system refuses O_DIRECT")  # the ordinary path is tested above
    back = load_model(json.loads(r.stdout)["output"])
    assert back.history[-1]["source_sha256"] == _sha(src / "model.safetensors")
    for name in back.graph.tensors:
        assert torch.equal(back.tensor(name), conv.tensor(name)), name
