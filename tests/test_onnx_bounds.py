"""Bounded ONNX runs: files that loop or allocate without end, and foreign input names.

Each hostile file is built here with ``onnx.helper`` (a few nodes, no weights to speak of) and
handed to ``verify`` (against the conftest MLP checkpoint, whose one input is ``input``
[batch, 12] and whose output is ``logits``) or ``bench``. Every refusal must be exit 2 with one
stderr line naming the file and the numbers, no traceback, and no ONNX Runtime log line before
it; it must come in seconds, not when the loop ends or the allocation is made. Cases that set
``--memory-limit`` or ``--time-limit``, or read ONNX Runtime's own stderr, run in a subprocess:
the memory limit is fixed once per process (ORT's environment allocator) and ORT writes its
log lines to file descriptor 2, which the in-process runner does not capture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import cli

BIG = 10**12  # Loop trip count of the file
F = TensorProto.FLOAT


def _save(path: Path, nodes: list, inits: list, inputs: list | None = None, rank: int = 2) -> Path:
    """A model with ``input`` [batch, 12] (unless ``inputs``) and ``logits``, opset 17."""
    inputs = inputs or [helper.make_tensor_value_info("input", F, ["batch", 12])]
    out = [helper.make_tensor_value_info("logits", F, [f"d{k}" for k in range(rank)])]
    g = helper.make_graph(nodes, "hostile", inputs, out, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # what this onnxruntime reads
    onnx.checker.check_model(m)
    path.write_bytes(m.SerializeToString())
    return path


def _loop(path: Path, trips: str, cond: str, extra: list, inits: list) -> Path:
    """``logits = input + trips`` by a Loop adding 1 per iteration; the body hands its
    condition on unchanged (Identity)."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", F, ["batch", 12]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", F, ["batch", 12]),
        ],
        [helper.make_tensor("one", F, [], [1.0])],
    )
    loop = helper.make_node("Loop", [trips, cond, "input"], ["logits"], body=body)
    return _save(path, [*extra, loop], inits)


def _int64(name: str, values: list[int]) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)


def _scalar(name: str, value: int | bool, kind: int = TensorProto.INT64) -> TensorProto:
    return helper.make_tensor(name, kind, [], [value])


def _summed(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``node`` (output ``big``), then ``logits = input + sum(big)``: a small output."""
    return [
        node,
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Cast", ["total"], ["total_f"], to=F),
        helper.make_node("Add", ["input", "total_f"], ["logits"]),
    ]


def _run(tmp: Path, *args: object) -> tuple[subprocess.CompletedProcess, int]:
    """``python -m normtool ARGS`` in a fresh process: its result and its peak RSS in bytes
    (``wait4`` reports the rusage of that one child; killed after 120 s)."""
    env = {"CI": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    argv = [sys.executable, "-m", "normtool", *map(str, args)]
    with open(tmp / "stdout", "w+") as out, open(tmp / "stderr", "w+") as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        killer = threading.Timer(120, p.kill)
        killer.start()
        _, status, usage = os.wait4(p.pid, 0)
        killer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        result = subprocess.CompletedProcess(argv, p.returncode, out.read(), err.read())
    return result, usage.ru_maxrss * 1024


def _one_line(code: int, err: str, path: Path, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    line = lines[0]
    assert line.startswith("normtool: error: ") and path.name in line, line
    for f in fragments:
        assert f in line, line
    return line


# ---- refused before a session exists: the file's own constants declare it ------------------
def _loop_no_condition(path: Path) -> Path:
    return _loop(path, "trips", "", [], [_scalar("trips", BIG)])


def _loop_condition_always_true(path: Path) -> Path:
    inits = [_scalar("trips", BIG), _scalar("go", True, TensorProto.BOOL)]
    return _loop(path, "trips", "go", [], inits)


@pytest.mark.parametrize("build", [_loop_no_condition, _loop_condition_always_true])
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_loop_with_fixed_huge_count_refused(tmp_path, mlp_path, build, command):
    """A Loop that certainly runs 10^12 times is refused from its constants, at once: at
    ≥ 1 µs per iteration it would take 10^6 s, over the default 600 s time limit."""
    bad = build(tmp_path / "loop.onnx")
    argv = [command, bad, "--iters", "1", "--warmup", "0"] if command == "bench" else []
    argv = argv or [command, mlp_path, bad, "--provider", "cpu", "--act", "relu"]
    start = time.monotonic()
    r = cli(*argv)
    assert time.monotonic() - start < 30
    _one_line(r.returncode, r.stderr, bad, "1,000,000,000,000 iterations", "600 s time limit")


def test_loop_that_a_condition_may_stop_is_not_refused_statically(tmp_path, mlp_path):
    """A constant count with a condition computed per iteration is how exporters write while
    loops (count = INT64_MAX): only the time limit bounds it; here it stops after 3 rounds."""
    body = helper.make_graph(
        [
            helper.make_node("Less", ["i", "three"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", F, ["batch", 12]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", F, ["batch", 12]),
        ],
        [helper.make_tensor("one", F, [], [1.0]), _scalar("three", 2)],
    )
    loop = helper.make_node("Loop", ["trips", "go", "input"], ["logits"], body=body)
    inits = [_scalar("trips", 2**63 - 1), _scalar("go", True, TensorProto.BOOL)]
    ok = _save(tmp_path / "while.onnx", [loop], inits)
    r = cli("bench", ok, "--iters", "1", "--warmup", "0", "--provider", "cpu", "--json")
    assert r.returncode == 0, r.stderr


def _constant_of_shape(path: Path) -> tuple[Path, str]:
    node = helper.make_node(
        "ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", F, [1], [1.0])
    )
    return _save(path, _summed(node), [_int64("shape", [40000, 40000])]), "6.4 GB"


def _expand(path: Path) -> tuple[Path, str]:
    node = helper.make_node("Expand", ["x1"], ["big"])
    node.input.append("shape")
    inits = [helper.make_tensor("x1", F, [1], [1.0]), _int64("shape", [50000, 50000])]
    return _save(path, _summed(node), inits), "10 GB"


def _tile(path: Path) -> tuple[Path, str]:
    node = helper.make_node("Tile", ["x2", "reps"], ["big"])
    inits = [helper.make_tensor("x2", F, [2], [1.0, 2.0]), _int64("reps", [10**9])]
    return _save(path, _summed(node), inits), "8 GB"


def _range(path: Path) -> tuple[Path, str]:
    node = helper.make_node("Range", ["lo", "hi", "step"], ["big"])
    inits = [_scalar("lo", 0), _scalar("hi", 10**10), _scalar("step", 1)]
    return _save(path, _summed(node), inits), "80 GB"


def _constant_node_shape(path: Path) -> tuple[Path, str]:
    """The shape from a Constant node instead of an initializer."""
    shape = helper.make_node("Constant", [], ["shape"], value=_int64("s", [40000, 40000]))
    node = helper.make_node(
        "ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", F, [1], [1.0])
    )
    return _save(path, [shape, *_summed(node)], []), "6.4 GB"


def _huge_input(path: Path) -> tuple[Path, str]:
    inputs = [helper.make_tensor_value_info("input", F, ["batch", 2_000_000_000])]
    return _save(path, [helper.make_node("Identity", ["input"], ["logits"])], [], inputs), "8 GB"


@pytest.mark.parametrize(
    "build", [_constant_of_shape, _expand, _tile, _range, _constant_node_shape, _huge_input]
)
def test_declared_huge_allocation_refused_with_numbers(tmp_path, mlp_path, build):
    """Sizes the file declares (40,000² floats = 6.4 GB, ...) are over the default 4 GB
    memory limit: refused with both numbers before ONNX Runtime folds or allocates them."""
    bad, size = build(tmp_path / "big.onnx")
    start = time.monotonic()
    r = cli("verify", mlp_path, bad, "--provider", "cpu", "--act", "relu")
    assert time.monotonic() - start < 30
    _one_line(r.returncode, r.stderr, bad, size, "4 GB memory limit", "--memory-limit")


# ---- stopped while running: sizes and counts computed at run time ---------------------------
def _runtime_loop(path: Path) -> Path:
    """Loop count = batch × 10^12, computed from the input's shape: no constant declares it."""
    extra = [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("ReduceMax", ["shape"], ["n"], keepdims=0),
        helper.make_node("Mul", ["n", "per"], ["trips"]),
    ]
    inits = [_scalar("per", BIG), _scalar("go", True, TensorProto.BOOL)]
    return _loop(path, "trips", "go", extra, inits)


def test_runtime_loop_stopped_by_time_limit(tmp_path, mlp_path):
    """ORT's RunOptions.terminate, set by the watchdog, interrupts a Loop on the CPU provider."""
    bad = _runtime_loop(tmp_path / "spin.onnx")
    start = time.monotonic()
    r, _ = _run(
        tmp_path,
        "verify",
        mlp_path,
        bad,
        "--provider",
        "cpu",
        "--act",
        "relu",
        "--time-limit",
        "1.5",
    )
    took = time.monotonic() - start
    _one_line(r.returncode, r.stderr, bad, "ran longer than 1.5 s", "--time-limit")
    assert took < 60, took


def test_runtime_shape_refused_by_memory_limit_without_allocating(tmp_path, mlp_path):
    """ConstantOfShape of shape(input) × [40000, 834] = [40000·batch, 10008] floats, 1.6 GB
    at batch 1, computed at run time: ORT's capped arena fails the request instead of making
    it, so the process never holds the gigabytes."""
    extra = [
        helper.make_node("Shape", ["input"], ["s"]),
        helper.make_node("Mul", ["s", "k"], ["shape"]),
    ]
    node = helper.make_node(
        "ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("v", F, [1], [1.0])
    )
    bad = _save(tmp_path / "grow.onnx", [*extra, *_summed(node)], [_int64("k", [40000, 834])])
    r, rss = _run(
        tmp_path,
        "verify",
        mlp_path,
        bad,
        "--provider",
        "cpu",
        "--act",
        "relu",
        "--memory-limit",
        "1GB",
    )
    _one_line(r.returncode, r.stderr, bad, "1 GB memory limit", "--memory-limit", "1.6 GB")
    assert rss < 1.0e9, f"peak RSS {rss / 1e9:.2f} GB: the allocation was made"


def test_run_time_failure_is_one_line_without_onnx_runtime_logs(tmp_path, mlp_path):
    """A model that fails inside ONNX Runtime (Reshape of 12 values to rows of 7): ORT's own
    log line ("[E:onnxruntime:...] Non-zero status code ...", written to fd 2) must not precede
    normtool's one line."""
    node = helper.make_node("Reshape", ["input", "rows"], ["logits"])
    bad = _save(tmp_path / "reshape.onnx", [node], [_int64("rows", [-1, 7])])
    r, _ = _run(tmp_path, "verify", mlp_path, bad, "--provider", "cpu", "--act", "relu")
    _one_line(r.returncode, r.stderr, bad, "ONNX Runtime failed running the model", "Reshape")


# ---- foreign input names and types --------------------------------------------------------
def _foreign_mlp(path: Path, net, names: list[str], extra_type: int | None = None) -> Path:
    """The conftest MLP written out by hand (MatMul, Add, Relu) under other input names."""
    nodes, inits, x = [], [], names[0]
    linears = [m for m in net if hasattr(m, "weight")]
    for k, lin in enumerate(linears):
        w = numpy_helper.from_array(lin.weight.detach().numpy().T.copy(), f"w{k}")
        b = numpy_helper.from_array(lin.bias.detach().numpy(), f"b{k}")
        inits += [w, b]
        out = "logits" if k == len(linears) - 1 else f"h{k}"
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"]))
        nodes.append(
            helper.make_node("Add", [f"m{k}", f"b{k}"], [out if out == "logits" else f"a{k}"])
        )
        if out != "logits":
            nodes.append(helper.make_node("Relu", [f"a{k}"], [out]))
        x = out
    inputs = [helper.make_tensor_value_info(names[0], F, ["N", 12])]
    for name in names[1:]:
        inputs.append(helper.make_tensor_value_info(name, extra_type or F, ["N"]))
    return _save(path, nodes, inits, inputs)


def test_foreign_single_input_name_is_mapped(tmp_path, mlp_path, mlp_net):
    """Another exporter's one input ``data`` stands for the checkpoint's ``input``: the hand-
    written MatMul chain computes the torch MLP, so verify finds them equivalent (fp32
    tolerances: ORT's and torch's fp32 sums differ by rounding only)."""
    foreign = _foreign_mlp(tmp_path / "foreign.onnx", mlp_net, ["data"])
    r = cli("verify", mlp_path, foreign, "--provider", "cpu", "--act", "relu")
    assert r.returncode == 0, r.stderr
    assert "equivalent" in r.stdout


def test_foreign_input_names_that_cannot_be_mapped(tmp_path, mlp_path, mlp_net):
    foreign = _foreign_mlp(tmp_path / "two.onnx", mlp_net, ["data", "mask"])
    r = cli("verify", mlp_path, foreign, "--provider", "cpu", "--act", "relu")
    _one_line(r.returncode, r.stderr, foreign, "['data', 'mask']", "['input']")


def test_foreign_input_type_normtool_cannot_feed(tmp_path, mlp_net):
    foreign = _foreign_mlp(tmp_path / "bool.onnx", mlp_net, ["data", "mask"], TensorProto.BOOL)
    r = cli("bench", foreign, "--iters", "1", "--warmup", "0", "--provider", "cpu")
    _one_line(r.returncode, r.stderr, foreign, "'mask'", "tensor(bool)")


def test_foreign_input_wrong_rank_is_not_mapped(tmp_path, mlp_path):
    """A single input of another rank is not the checkpoint's input under another name."""
    inputs = [helper.make_tensor_value_info("pixels", F, ["N", 3, 4])]
    bad = _save(
        tmp_path / "rank.onnx",
        [helper.make_node("Identity", ["pixels"], ["logits"])],
        [],
        inputs,
        rank=3,
    )
    r = cli("verify", mlp_path, bad, "--provider", "cpu", "--act", "relu")
    _one_line(r.returncode, r.stderr, bad, "['pixels']", "['input']")


# ---- the options themselves ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [("--time-limit", "0", "positive"), ("--memory-limit", "lots", "size like 4GB")],
)
def test_limit_options_refuse_nonsense(tmp_path, mlp_path, mlp_net, flag, value, says):
    model = _foreign_mlp(tmp_path / "m.onnx", mlp_net, ["input"])
    r = cli("verify", mlp_path, model, "--provider", "cpu", "--act", "relu", flag, value)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and flag in lines[0] and says in lines[0], r.stderr


def test_watchdog_leaves_calls_under_the_limit_alone():
    """Thousands of short calls under a 0.2 s limit all finish: the limit is per call, not a
    budget that runs out across a benchmark."""
    from normtool.runtime import ort  # noqa: PLC0415

    nodes = [helper.make_node("Relu", ["input"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input", F, ["batch", 12])]
    out = [helper.make_tensor_value_info("logits", F, None)]
    g = helper.make_graph(nodes, "relu", inputs, out)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    sess = ort.create_session(m.SerializeToString(), "cpu")
    sess = ort.Session(sess.session, "cpu", "cpu", limits=ort.Limits(0.2, 10**9))
    x = np.ones((1, 12), np.float32)
    start = time.monotonic()
    while time.monotonic() - start < 0.6:
        assert sess.run({"input": x})["logits"].shape == (1, 12)
