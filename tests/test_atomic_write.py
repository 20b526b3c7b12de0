"""Outputs are atomic and never replace inputs: refused targets, and a writer killed mid-write
leaves nothing under the final name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from normtool.errors import NormtoolError
from normtool.load import load_model
from normtool.runtime.torch_exec import run_graph
from normtool.save import save_model


def test_roundtrip_keeps_function_and_dtype(tmp_path, mlp_path):
    m = load_model(mlp_path)
    out = save_model(m, tmp_path / "copy.safetensors", [mlp_path])
    m2 = load_model(out)
    assert m2.graph.family == "mlp"
    x = torch.randn(4, 12)
    a = run_graph(m.graph, m.weights(), {"input": x})["logits"]
    b = run_graph(m2.graph, m2.weights(), {"input": x})["logits"]
    assert torch.equal(a, b)  # same tensors, same ops: bit-identical


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_preserved(tmp_path, mlp_net, dtype):
    from safetensors.torch import save_file

    p = tmp_path / "half.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in mlp_net.state_dict().items()}, str(p))
    out = save_model(load_model(p), tmp_path / "out.safetensors", [p])
    m2 = load_model(out)
    assert all(m2.tensor(n).dtype == dtype for n in m2.graph.tensors)


def test_refuses_input_as_output(mlp_path):
    with pytest.raises(NormtoolError, match="overwrite the input"):
        save_model(load_model(mlp_path), mlp_path, [mlp_path], force=True)


def test_refuses_existing_without_force_and_symlinks(tmp_path, mlp_path):
    m = load_model(mlp_path)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(NormtoolError, match="--force"):
        save_model(m, out, [mlp_path])
    assert out.read_bytes() == b"keep"
    link = tmp_path / "link.safetensors"
    link.symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(NormtoolError, match="symlink"):
        save_model(m, link, [mlp_path], force=True)
    assert not (tmp_path / "elsewhere.safetensors").exists()


def test_unwritable_folder(tmp_path, mlp_path):
    target = Path("/proc/normtool-test.safetensors")  # not writable, even for root
    with pytest.raises(NormtoolError):
        save_model(load_model(mlp_path), target, [mlp_path])


KILL_SCRIPT = """
import sys, time
from normtool.load import load_model
from normtool.save import save_model
m = load_model(sys.argv[1])
def slow(name):
    print("wrote", name, flush=True)
    time.sleep(30)
save_model(m, __import__("pathlib").Path(sys.argv[2]), [], on_tensor=slow,
           max_shard_size=int(sys.argv[3]))
"""


@pytest.mark.parametrize("shard", [10**12, 1], ids=["one file", "a shard per tensor"])
def test_kill_during_write_leaves_nothing_under_final_name(tmp_path, mlp_path, shard):
    out = tmp_path / "killed.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(mlp_path), str(out), str(shard)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("wrote")  # mid-write: one tensor written
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists()
    # only a temporary (a file, or the sharded writer's folder) — no shard, no index
    leftovers = [p.name for p in tmp_path.iterdir()]
    prefix = ".killed.safetensors.tmp-" if shard > 1 else ".killed.safetensors.index.json.tmp-"
    assert len(leftovers) == 1 and leftovers[0].startswith(prefix), leftovers
