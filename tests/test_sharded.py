"""Sharded normtool outputs: Hugging Face layout, readable through the index, atomic as a whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devkit.factories import make_reference_transformer
from devkit.proc import run_cli
from normtool.errors import NormtoolError
from normtool.io.safetensors_format import read_header
from normtool.io.store import open_checkpoint
from normtool.io.writer import parse_size
from normtool.load import GRAPH_KEY, HISTORY_KEY, load_model
from normtool.save import save_model

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1234", 1234),
        ("1.5kb", 1500),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(NormtoolError, match="max-shard-size"):
        parse_size(text)


def test_sharded_roundtrip(tmp_path, mlp_path):
    m = load_model(mlp_path)
    m.history = [{"transform": "test"}]
    out = tmp_path / "net.safetensors"
    # the MLP's tensors are 1.5 KiB, 2 KiB, 64 B, 320 B, ...: 1 KB shards force several files
    index = save_model(m, out, [mlp_path], max_shard_size=1000)
    assert index == tmp_path / "net.safetensors.index.json"
    assert not out.exists()
    doc = json.loads(index.read_text())
    shards = sorted({f for f in doc["weight_map"].values()})
    n = len(shards)
    assert n > 1
    assert shards == [f"net-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*shards, index.name])
    sizes = {}
    for f in shards:
        entries, meta = read_header(tmp_path / f)
        assert meta[GRAPH_KEY] == doc["metadata"][GRAPH_KEY]  # every shard says what it is
        assert json.loads(meta[HISTORY_KEY]) == [{"transform": "test"}]
        sizes[f] = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        assert sizes[f] <= 1000 or len(entries) == 1  # only a lone big tensor may exceed it
    assert doc["metadata"]["total_size"] == sum(sizes.values())
    back = load_model(index)
    assert back.history == [{"transform": "test"}]
    assert list(back.graph.tensors) == list(m.graph.tensors)
    for name in m.graph.tensors:
        assert torch.equal(back.tensor(name), m.tensor(name))
    assert open_checkpoint(index).metadata[GRAPH_KEY] == doc["metadata"][GRAPH_KEY]


def test_small_model_stays_one_file(tmp_path, mlp_path):
    out = tmp_path / "one.safetensors"
    assert save_model(load_model(mlp_path), out, [mlp_path]) == out
    assert [p.name for p in tmp_path.iterdir()] == ["one.safetensors"]


def test_failure_mid_write_leaves_nothing(tmp_path, mlp_path):
    m = load_model(mlp_path)
    last = list(m.graph.tensors)[-1]

    def broken() -> torch.Tensor:
        raise RuntimeError("disk on fire")

    m.overrides[last] = broken  # the last shard fails after the first ones were written
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_model(m, tmp_path / "net.safetensors", [mlp_path], max_shard_size=1000)
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_shard_or_index(tmp_path, mlp_path):
    m = load_model(mlp_path)
    index = save_model(m, tmp_path / "net.safetensors", [mlp_path], max_shard_size=1000)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(NormtoolError, match="--force"):
        save_model(m, tmp_path / "net.safetensors", [mlp_path], max_shard_size=1000)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert save_model(m, tmp_path / "net.safetensors", [mlp_path], True, None, 1000) == index
    # an output shard may not replace an input shard either
    with pytest.raises(NormtoolError, match="overwrite the input"):
        save_model(
            load_model(index),
            tmp_path / "net.safetensors",
            [index, *tmp_path.glob("net-*")],
            True,
            None,
            1000,
        )


@pytest.mark.parametrize("command", ["fold", "convert-ln-to-rms"])
def test_cli_max_shard_size(tmp_path, command):
    """Transform outputs above ``--max-shard-size`` come out sharded and load through the index."""
    src = FIXTURES / "ref_un_pre.safetensors"
    if command == "convert-ln-to-rms":
        (tmp_path / "in").mkdir()
        src = make_reference_transformer(tmp_path / "in", norm="layernorm")
    out = tmp_path / "o.safetensors"
    r = run_cli(command, src, "-o", out, "--max-shard-size", "20KB", "--json")
    assert r.returncode == 0, r.stderr
    index = tmp_path / "o.safetensors.index.json"
    assert json.loads(r.stdout)["output"] == str(index)
    assert not out.exists() and len(list(tmp_path.glob("o-*-of-*.safetensors"))) > 1
    r2 = run_cli("verify", src, index, "--json")
    assert r2.returncode == 0, r2.stdout + r2.stderr


def test_cli_merge_max_shard_size(tmp_path, mlp_path, mlp_net):
    """merge of normtool checkpoints: sharded above the limit; the result is the average."""
    other = tmp_path / "other.safetensors"
    save_file({k: (v + 0.5).contiguous() for k, v in mlp_net.state_dict().items()}, str(other))
    a = save_model(load_model(mlp_path), tmp_path / "a.safetensors", [mlp_path])
    b = save_model(load_model(other), tmp_path / "b.safetensors", [other])
    out = tmp_path / "m.safetensors"
    r = run_cli(
        "merge", a, b, "--method", "average", "-o", out, "--max-shard-size", "1KB", "--json"
    )
    assert r.returncode == 0, r.stderr
    index = tmp_path / "m.safetensors.index.json"
    assert json.loads(r.stdout)["output"] == str(index) and not out.exists()
    merged = load_model(index)
    ma, mb = load_model(a), load_model(b)
    for name in merged.graph.tensors:  # (A + B) / 2 in fp32, written in fp32: exact up to 1 ulp
        expect = (ma.tensor(name) + mb.tensor(name)) / 2
        assert torch.allclose(merged.tensor(name), expect, rtol=1e-6, atol=0), name
