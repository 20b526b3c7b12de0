"""The hostile battery: every hostile case × every command, through the CLI as a user runs it.

Each run is a fresh ``python -m normtool`` process (``--tree`` picks the checkout, so the same
battery measures an older commit: ``git worktree add /tmp/old <rev>``), in the case's own folder,
with a time limit. Every run is put in exactly one class, worst first:

- ``code executed``: a pickle payload's marker file appeared;
- ``hang``: still running at the time limit;
- ``data written wrongly``: an input's bytes changed, or a run that had to fail exited 0 (a
  tampered file "verified", an output written over a file the run reads);
- ``traceback``: a Python traceback or an exit code outside 0-3 (an abort, a signal);
- ``leaked exception``: "unexpected <Exception>" — a failure no code turned into a message;
- ``temp files left``: a ``.tmp-``/``.old-`` file remains beside the output;
- ``unnamed``: a one-line refusal that names no file;
- ``clean refusal``: exit 1/2/3, one line, naming the file;
- ``accepted``: exit 0 where the case is legitimate for that command.

Everything but clean refusals and accepted runs is a defect; the table in BENCHMARKS.md holds
the counts. ``--quick`` runs two commands per case (the test suite runs it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root

import torch
from safetensors.torch import save_file

from devkit.factories import make_reference_transformer
from devkit.publish import publish

COMMANDS = (
    "inspect",
    "verify",
    "export",
    "bench",
    "convert-ln-to-rms",
    "fold",
    "merge",
    "loki-head",
)
CLASSES = (
    "clean refusal",
    "accepted",
    "unnamed",
    "temp files left",
    "leaked exception",
    "traceback",
    "data written wrongly",
    "hang",
    "code executed",
)
MARKER = "PWNED"


@dataclass
class Case:
    """One hostile situation. ``model`` is the checkpoint the commands read; ``out`` the
    output they write; ``must_fail`` the commands for which exit 0 is a defect."""

    name: str
    model: Path
    out: str = "out.safetensors"
    must_fail: set[str] = field(default_factory=lambda: set(COMMANDS))
    extra: list[str] = field(default_factory=list)  # options for the writing commands
    commands: tuple[str, ...] = COMMANDS
    dir: Path = Path()  # the case's folder: each run gets a copy, runs there, and is watched


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict | str, data: bytes) -> bytes:
    h = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(h)) + h + data


def _edited(src: Path, dst: Path, edit: Callable[[dict], object]) -> Path:
    header, data = _split(src.read_bytes())
    edit(header)
    dst.write_bytes(_join(header, data))
    return dst


def _first(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _graph_edit(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    """Edit the ``normtool.graph`` metadata of a normtool output (JSON inside JSON)."""

    def apply(header: dict) -> None:
        graph = json.loads(header["__metadata__"]["normtool.graph"])
        edit(graph)
        header["__metadata__"]["normtool.graph"] = json.dumps(graph)

    return apply


def _nested_graph(header: dict) -> None:
    """The graph's JSON text with one ops entry nested 100,000 lists deep (json.dumps of such a
    value would itself recurse too deep, so the text is spliced)."""
    text = header["__metadata__"]["normtool.graph"]
    at = text.index('"ops":') + len('"ops":')
    at = text.index("[", at) + 1
    head, sep, rest = text[:at], "", text[at:]
    header["__metadata__"]["normtool.graph"] = (
        head + sep + "[" * 100_000 + "]" * 100_000 + ", " + rest
    )


def _first_op(graph: dict, kind: str) -> dict:
    return next(op for op in graph["ops"] if op.get("kind") == kind)


# ---- the cases ------------------------------------------------------------------------------
def build_cases(base: Path, good: Path, rms: Path) -> list[Case]:
    """Write every hostile file under ``base``; ``good`` a valid Pre-LN model, ``rms`` a
    normtool output (its graph in metadata) for the metadata cases."""
    cases: list[Case] = []

    def folder(name: str) -> Path:
        d = base / name
        d.mkdir(parents=True)
        return d

    def add(name: str, make: Callable[[Path], Path], **kw) -> None:
        d = folder(name)
        cases.append(Case(name, make(d), dir=d, **kw))

    raw = good.read_bytes()
    add("truncated", lambda d: _write(d / "m.safetensors", raw[: len(raw) // 2]))
    add("empty file", lambda d: _write(d / "m.safetensors", b""))
    add("header past end", lambda d: _write(d / "m.safetensors", struct.pack("<Q", 10**9)))
    add("header not JSON", lambda d: _write(d / "m.safetensors", _join("{nope", b"")))
    add("nested header", lambda d: _write(d / "m.safetensors", _join("[" * 50_000, b"")))
    add(
        "bad dtype",
        lambda d: _edited(good, d / "m.safetensors", lambda h: h[_first(h)].update(dtype="X9")),
    )
    described = set(COMMANDS) - {"inspect"}  # inspect may describe what the others refuse
    for dt in ("U8", "I64", "BOOL"):
        add(f"{dt} weights", lambda d, dt=dt: _typed(d / "m.safetensors", dt), must_fail=described)
    add(
        "NaN weights",
        lambda d: _nan(good, d / "m.safetensors"),
        must_fail=described,
    )
    add("huge declared features", lambda d: _zero_huge(d / "m.safetensors"), must_fail=described)
    add(
        "metadata claims F16", lambda d: _claims_f16(rms, d / "m.safetensors"), must_fail={"verify"}
    )
    for what, edit in (
        ("heads 0", lambda g: _first_op(g, "attention")["attrs"].update(heads=0)),
        ("heads -4", lambda g: _first_op(g, "attention")["attrs"].update(heads=-4)),
        ("heads null", lambda g: _first_op(g, "attention")["attrs"].update(heads=None)),
        ("eps -1", lambda g: _norm_op(g)["attrs"].update(eps=-1.0)),
        ("eps NaN", lambda g: _norm_op(g)["attrs"].update(eps=float("nan"))),
        ("shape mismatch", lambda g: _wrong_shape(g)),
        ("unknown op kind", lambda g: g["ops"][0].update(kind="teleport")),
    ):
        add(f"graph: {what}", lambda d, e=edit: _edited(rms, d / "m.safetensors", _graph_edit(e)))
    add("graph: nested JSON", lambda d: _edited(rms, d / "m.safetensors", _nested_graph))
    add("pickle payload", _pickle_payload)
    add("pt int keys", lambda d: _torch_save(d / "m.pt", {0: torch.ones(2), 1: torch.ones(2)}))
    add("pt sparse", lambda d: _torch_save(d / "m.pt", {"w": torch.eye(3).to_sparse()}))
    add("pt meta tensor", lambda d: _torch_save(d / "m.pt", {"w": torch.empty(3, device="meta")}))
    add(
        "folder without config",
        lambda d: _copy(good, _mkdir(d / "model") / "model.safetensors").parent,
    )
    add("nested config", lambda d: _nested_config(good, d))
    add("index escapes folder", lambda d: _bad_index(good, d))
    add("FIFO input", lambda d: _fifo(d / "m.safetensors"))
    add("device input", lambda d: _symlink("/dev/zero", d / "m.safetensors"))
    add(
        "onnx Loop 10^12",
        lambda d: _onnx_loop(d / "m.onnx"),
        commands=("verify", "bench", "export"),
    )
    add(
        "onnx ConstantOfShape 40000^2",
        lambda d: _onnx_const(d / "m.onnx"),
        commands=("verify", "bench", "export"),
    )
    add(
        "onnx foreign inputs",
        lambda d: _onnx_foreign(d / "m.onnx"),
        commands=("verify", "bench", "export"),
    )
    add(
        "onnx external data escapes",
        lambda d: _onnx_escape(d / "m.onnx"),
        commands=("verify", "bench", "export"),
    )
    add("newline in name", lambda d: _copy(good, d / "bad\nname.safetensors"), must_fail=set())
    # outputs that must not be written
    writers = ("export", "convert-ln-to-rms", "merge", "loki-head")
    add("output: FIFO", lambda d: _with_fifo_out(good, d), out="out.fifo", commands=writers)
    add(
        "output: 236-char name",
        lambda d: _copy(good, d / "m.safetensors"),
        out="n" * 224 + ".safetensors",
        must_fail=set(),
        commands=writers,
    )
    add(
        "output: 260-char name",
        lambda d: _copy(good, d / "m.safetensors"),
        out="n" * 248 + ".safetensors",
        commands=writers,
    )
    add("output: empty", lambda d: _copy(good, d / "m.safetensors"), out="", commands=writers)
    add(
        "output: --force onto the input's folder",
        lambda d: _copy(good, d / "m.safetensors"),
        out=".",
        extra=["--force"],
        commands=writers,
    )
    add(
        "output: --force onto a sibling config",
        lambda d: _with_config(good, d),
        out="config.json",
        extra=["--force"],
        commands=writers,
    )
    add(
        "output: --force onto a user's file",
        lambda d: _with_user_file(good, d),
        out="mine.safetensors",
        extra=["--force"],
        commands=writers,
    )
    return cases


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def _symlink(target: str, link: Path) -> Path:
    link.symlink_to(target)
    return link


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _torch_save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def _typed(path: Path, dtype: str) -> Path:
    t = {"U8": torch.uint8, "I64": torch.int64, "BOOL": torch.bool}[dtype]
    save_file({"0.weight": torch.ones(4, 3, dtype=t), "0.bias": torch.ones(4, dtype=t)}, str(path))
    return path


def _nan(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file

    tensors = load_file(str(src))
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    meta = _split(src.read_bytes())[0].get("__metadata__")
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _zero_huge(path: Path) -> Path:
    """A few hundred bytes declaring an MLP with 30,000,000 input features (zero rows)."""
    save_file({"0.weight": torch.zeros(0, 30_000_000), "0.bias": torch.zeros(0)}, str(path))
    return path


def _claims_f16(rms: Path, dst: Path) -> Path:
    """A converted model with one weight off by 0.1% (fp32 verify must fail), whose graph
    metadata claims that tensor is F16 (its header says F32)."""
    from safetensors.torch import load_file

    tensors = load_file(str(rms))
    header = _split(rms.read_bytes())[0]
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    tensors[key] = tensors[key] * 1.001
    graph = json.loads(header["__metadata__"]["normtool.graph"])
    graph["tensors"][key]["dtype"] = "F16"
    meta = {**header["__metadata__"], "normtool.graph": json.dumps(graph)}
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _norm_op(graph: dict) -> dict:
    return next(op for op in graph["ops"] if "eps" in op.get("attrs", {}))


def _wrong_shape(graph: dict) -> None:
    spec = next(iter(graph["tensors"].values()))
    spec["shape"] = [s + 3 for s in spec["shape"]]


def _pickle_payload(d: Path) -> Path:
    marker = d / MARKER
    path = d / "m.pt"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"0.weight": torch.ones(2, 2), "x": Evil()}, path)
    return path


def _mkdir(d: Path) -> Path:
    d.mkdir()
    return d


def _nested_config(good: Path, d: Path) -> Path:
    m = _mkdir(d / "model")
    _copy(good, m / "model.safetensors")
    (m / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return m


def _bad_index(good: Path, d: Path) -> Path:
    m = _mkdir(d / "model")
    _copy(good, d / "outside.safetensors")
    (m / "config.json").write_text("{}")
    wm = {"x": "../outside.safetensors"}
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    return m


def _with_fifo_out(good: Path, d: Path) -> Path:
    os.mkfifo(d / "out.fifo")
    return _copy(good, d / "m.safetensors")


def _with_config(good: Path, d: Path) -> Path:
    (d / "config.json").write_text("{}")
    return _copy(good, d / "m.safetensors")


def _with_user_file(good: Path, d: Path) -> Path:
    save_file({"w": torch.ones(3)}, str(d / "mine.safetensors"))
    return _copy(good, d / "m.safetensors")


def _onnx(path: Path, nodes, inputs, outputs, inits=()) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, "hostile", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _onnx_loop(path: Path) -> Path:
    from onnx import TensorProto, helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c"], ["c_out"]),
            helper.make_node("Identity", ["x"], ["x_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [
        helper.make_node(
            "Constant", [], ["n"], value=helper.make_tensor("n", TensorProto.INT64, [], [10**12])
        ),
        helper.make_node(
            "Constant", [], ["t"], value=helper.make_tensor("t", TensorProto.BOOL, [], [True])
        ),
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Loop", ["n", "t", "f"], ["logits"], body=body),
    ]
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    return _onnx(path, nodes, ins, outs)


def _onnx_const(path: Path) -> Path:
    from onnx import TensorProto, helper

    shape = helper.make_tensor("s", TensorProto.INT64, [2], [40_000, 40_000])
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("ConstantOfShape", ["shape"], ["big"]),
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["big"], ["s1"], keepdims=0),
        helper.make_node("Add", ["f", "s1"], ["logits"]),
    ]
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    return _onnx(path, nodes, ins, outs)


def _onnx_foreign(path: Path) -> Path:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["tokens"], ["out"], to=TensorProto.FLOAT)]
    ins = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["b", "s"])]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s"])]
    return _onnx(path, nodes, ins, outs)


def _onnx_escape(path: Path) -> Path:
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "../../../etc/passwd"), ("offset", "0"), ("length", "4")):
        w.external_data.add(key=k, value=v)
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "w"], ["logits"]),
    ]
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])]
    outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])]
    return _onnx(path, nodes, ins, outs, [w])


# ---- running --------------------------------------------------------------------------------
def argv(case: Case, command: str, good: Path, metric: Path) -> list[str]:
    m, out = str(case.model), case.out
    o = ["-o", out] if command not in ("inspect", "verify", "bench") else []
    args = {
        "inspect": [m],
        "verify": [str(good), m],
        "export": [m, *o],
        "bench": [m, "--batch", "1", "--seq", "8", "--iters", "3", "--warmup", "1"],
        "convert-ln-to-rms": [m, *o],
        "fold": [m, *o],
        "merge": [m, str(good), *o],
        "loki-head": [m, "--metric", str(metric), *o],
    }[command]
    return [command, *args, *(case.extra if o else [])]


def _hashes(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and ".tmp-" not in p.name and p.name != MARKER:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def classify(
    case: Case, command: str, args: list[str], rc: int | None, err: str, before: dict, after: dict
) -> str:
    d = case.dir
    if (d / MARKER).exists():
        return "code executed"
    if rc is None:
        return "hang"
    changed = any(after.get(k) != v for k, v in before.items())
    if changed or (rc == 0 and command in case.must_fail):
        return "data written wrongly"
    lines = err.strip().splitlines()
    names = {Path(a).name for a in args if a} | {"-o", "--", "output"}
    names |= {n.encode("unicode_escape").decode() for n in names}  # escaped control characters
    if "Traceback" in err or rc not in (0, 1, 2, 3):
        return "traceback"
    if "unexpected " in err:
        return "leaked exception"
    if any(".tmp-" in p.name or ".old-" in p.name for p in d.iterdir()):
        return "temp files left"
    if rc == 0:
        return "accepted"
    if len(lines) != 1 or not any(n in lines[0] for n in names):
        return "unnamed"
    return "clean refusal"


def _clone(src: Path, dst: Path) -> None:
    """Copy a case folder as built: FIFOs made anew (never opened), links kept as links."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        q = dst / p.name
        if p.is_symlink():
            q.symlink_to(os.readlink(p))
        elif p.is_dir():
            _clone(p, q)
        elif p.is_file():
            shutil.copy2(p, q)
        else:
            os.mkfifo(q)


def run_one(tree: Path, case: Case, command: str, good: Path, metric: Path, limit: float) -> dict:
    """Run ``command`` on a fresh copy of the case's folder (runs never see each other's
    outputs, and may run in parallel), classify it, remove the copy."""
    d = case.dir.with_name(f"{case.dir.name}.{command}")
    _clone(case.dir, d)
    case = replace(case, dir=d, model=d / case.model.relative_to(case.dir))
    before = _hashes(d)
    env = {**os.environ, "PYTHONPATH": str(tree), "CI": "1"}
    args = argv(case, command, good, metric)
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "normtool", *args],
            capture_output=True, text=True, timeout=limit, cwd=d, env=env,
        )  # fmt: skip
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = (
            None,
            (e.stderr or b"").decode(errors="replace")
            if isinstance(e.stderr, bytes)
            else (e.stderr or ""),
        )
    after = _hashes(d)
    cls = classify(case, command, args, rc, err, before, after)
    shutil.rmtree(d, ignore_errors=True)
    return {
        "case": case.name,
        "command": command,
        "rc": rc,
        "class": cls,
        "seconds": round(time.monotonic() - t0, 2),
        "stderr": err.strip().splitlines()[-1][:300] if err.strip() else "",
    }


def battery(
    tree: Path, quick: bool, limit: float, workers: int, only: list[str] | None = None
) -> list[dict]:
    """Build every case in a temporary folder and run it through ``tree``'s CLI; ``only``:
    substrings of the case names to keep."""
    with tempfile.TemporaryDirectory(prefix="normtool-battery-") as tmp:
        base = Path(tmp)
        good = make_reference_transformer(base, "good", seed=0, trained=False)
        rms = base / "rms.safetensors"
        env = {**os.environ, "PYTHONPATH": str(tree), "CI": "1"}
        subprocess.run(
            [sys.executable, "-m", "normtool", "convert-ln-to-rms", str(good), "-o", str(rms)],
            check=True, capture_output=True, env=env,
        )  # fmt: skip
        metric = base / "tree.tsv"
        metric.write_text("child\tparent\n" + "".join(f"c{i}\troot\n" for i in range(48)))
        cases = [
            c
            for c in build_cases(base / "cases", good, rms)
            if not only or any(o in c.name for o in only)
        ]
        jobs = [(c, cmd) for c in cases for cmd in (c.commands[:2] if quick else c.commands)]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda j: run_one(tree, j[0], j[1], good, metric, limit), jobs))


def summary(runs: list[dict]) -> dict[str, int]:
    counts = Counter(r["class"] for r in runs)
    return {c: counts.get(c, 0) for c in CLASSES}


def section(label_runs: list[tuple[str, list[dict]]]) -> str:
    head = "| tree | runs | " + " | ".join(CLASSES) + " |"
    rows = [head, "|" + "---|" * (len(CLASSES) + 2)]
    for label, runs in label_runs:
        s = summary(runs)
        rows.append(f"| {label} | {len(runs)} | " + " | ".join(str(s[c]) for c in CLASSES) + " |")
    cases = sorted({r["case"] for _, runs in label_runs for r in runs})
    body = "\n".join(rows)
    return (
        "<!-- hostile_battery:start -->\n## Hostile battery (`scripts/hostile_battery.py`)\n\n"
        f"{len(cases)} hostile cases × the commands each applies to, every run a fresh "
        "`python -m normtool` process with a time limit. Every class but *clean refusal* and "
        "*accepted* is a defect.\n\n" + body + "\n<!-- hostile_battery:end -->"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tree", type=Path, action="append", help="checkout(s) to test (default: this one)"
    )
    ap.add_argument("--label", action="append", help="label per --tree for the table")
    ap.add_argument("--quick", action="store_true", help="two commands per case")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds before a run is a hang")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", action="append", help="run the cases whose name contains this")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "hostile_battery.json")
    ap.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    a = ap.parse_args()
    trees = a.tree or [ROOT]
    labels = a.label or [str(t) for t in trees]
    results = [
        (lbl, battery(t.resolve(), a.quick, a.limit, a.workers, a.only))
        for lbl, t in zip(labels, trees, strict=True)
    ]
    payload = {lbl: {"summary": summary(runs), "runs": runs} for lbl, runs in results}
    publish(a.json, payload, section(results), None if a.no_md else ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
