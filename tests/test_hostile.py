"""Hostile input through the CLI, for every command that reads a checkpoint and writes one.

Each case must end with exit 2 and one stderr line naming the file and the problem, no
traceback, nothing under the output's final name (nor a leftover temporary), and every input
byte-for-byte unchanged (SHA-256 before and after). Commands run in-process: the same ``main``
``python -m normtool`` runs, without paying a new interpreter per case.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

from devkit.factories import make_reference_transformer
from normtool.cli import main

WRITERS = ("convert-ln-to-rms", "fold", "merge", "export")
COMMANDS = ("inspect", *WRITERS)


# ---- models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Pre-LN transformer (convert, merge, export, inspect) and a Pre-UN one (fold)."""
    d = tmp_path_factory.mktemp("models")
    return {
        "ln": make_reference_transformer(d, "ln", seed=0, norm="layernorm"),
        "ln2": make_reference_transformer(d, "ln2", seed=1, norm="layernorm"),
        "un": make_reference_transformer(d, "un", seed=0, norm="un"),
    }


def _source(command: str, models: dict[str, Path]) -> Path:
    return models["un" if command == "fold" else "ln"]


# ---- corruptions of a valid safetensors file -----------------------------------------------
def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _by_offset(header: dict) -> list[str]:
    return sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )


def _overlap(raw: bytes) -> bytes:
    h, data = _split(raw)
    a, b = _by_offset(h)[-2:]
    size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    start = h[a]["data_offsets"][0]
    h[b]["data_offsets"] = [start, start + size]  # b now shares bytes with a
    return _join(h, data)


def _out_of_range(raw: bytes) -> bytes:
    h, data = _split(raw)
    last = _by_offset(h)[-1]
    lo, hi = h[last]["data_offsets"]
    h[last]["data_offsets"] = [lo + 64, hi + 64]
    return _join(h, data)


def _edit_entry(key: str, value: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        h, data = _split(raw)
        name = _by_offset(h)[0]
        h[name][key] = value(h[name])
        return _join(h, data)

    return edit


def _header_bytes(fill: Callable[[int], bytes]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        (n,) = struct.unpack("<Q", raw[:8])
        return raw[:8] + fill(n) + raw[8 + n :]

    return edit


#: name → (bytes → corrupted bytes, words the one-line error must contain)
CORRUPT: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (lambda raw: raw[: len(raw) - 100], "outside the file"),
    "header_beyond_file": (lambda raw: struct.pack("<Q", 2**40) + raw[8:], "header length"),
    "overlapping_offsets": (_overlap, "overlap"),
    "offsets_out_of_range": (_out_of_range, "outside the file"),
    "non_utf8_header": (_header_bytes(lambda n: b"\xff" * n), "not UTF-8 JSON"),
    "non_json_header": (_header_bytes(lambda n: b"{" * n), "not UTF-8 JSON"),
    "size_mismatch": (
        _edit_entry("shape", lambda e: [e["shape"][0] + 1, *e["shape"][1:]]),
        "needs",
    ),
    "unknown_dtype": (_edit_entry("dtype", lambda e: "Q7"), "unknown dtype"),
}


def _nonfinite(value: float) -> Callable[[Path, Path], str]:
    """Put ``value`` into one element of an attention weight; returns the tensor's name."""

    def make(src: Path, dst: Path) -> str:
        from safetensors import safe_open  # noqa: PLC0415 - only this helper keeps the metadata

        with safe_open(str(src), "pt") as f:
            meta = f.metadata()
        tensors = load_file(src)
        tensors["blocks.1.attn.q.weight"][2, 3] = value
        save_file(tensors, str(dst), metadata=meta)
        return "blocks.1.attn.q.weight"

    return make


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ---- running and checking ------------------------------------------------------------------
def _sha(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


def cli(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def _argv(command: str, bad: Path, models: dict[str, Path], out: Path) -> list[object]:
    if command == "inspect":
        return [command, bad]
    if command == "merge":
        return [
            command,
            models["ln2"],
            bad,
            "-o",
            out,
        ]  # the bad model second: read after a good one
    return [command, bad, "-o", out]


def _check_refused(capsys, argv: list[object], bad: Path, words: str, outdir: Path) -> None:
    inputs = {p.parent for p in argv if isinstance(p, Path) and p.parent != outdir}
    before = {d: _sha(d) for d in inputs}
    code, _, err = cli(capsys, *argv)
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert bad.name in lines[0] and words.lower() in lines[0].lower(), lines[0]
    assert {d: _sha(d) for d in inputs} == before  # inputs unchanged (and nothing written there)
    assert list(outdir.iterdir()) == []  # no output and no temporary left


def _dirs(tmp_path: Path) -> tuple[Path, Path]:
    bad_dir, outdir = tmp_path / "in", tmp_path / "out"
    bad_dir.mkdir()
    outdir.mkdir()
    return bad_dir, outdir


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_safetensors(tmp_path, capsys, models, command, case):
    corrupt, words = CORRUPT[case]
    bad_dir, outdir = _dirs(tmp_path)
    bad = bad_dir / f"{case}.safetensors"
    bad.write_bytes(corrupt(_source(command, models).read_bytes()))
    argv = _argv(command, bad, models, outdir / "o.safetensors")
    _check_refused(capsys, argv, bad, words, outdir)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights(tmp_path, capsys, models, command, value):
    bad_dir, outdir = _dirs(tmp_path)
    bad = bad_dir / "nonfinite.safetensors"
    name = _nonfinite(value)(_source(command, models), bad)
    argv = _argv(command, bad, models, outdir / ("o.onnx" if command == "export" else "o.s"))
    if command == "inspect":  # reported, not refused
        code, out, err = cli(capsys, *argv)
        assert code == 0, err
        assert f"non-finite: {name} (1 NaN/Inf)" in out
        code, out, _ = cli(capsys, *argv, "--json")
        assert json.loads(out)["non_finite"] == {name: 1}
        return
    _check_refused(capsys, argv, bad, f"{name!r} holds NaN or Inf", outdir)


@pytest.mark.parametrize("command", COMMANDS)
def test_malicious_pickle_never_runs(tmp_path, capsys, models, command):
    bad_dir, outdir = _dirs(tmp_path)
    marker = tmp_path / "PWNED"
    bad = bad_dir / "evil.pt"
    state = load_file(_source(command, models))
    torch.save({**state, "extra": _Evil(marker)}, bad)
    assert not marker.exists()
    _check_refused(capsys, _argv(command, bad, models, outdir / "o.x"), bad, "refused", outdir)
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("case", ["output_is_input", "symlink", "unwritable"])
def test_bad_output_path(tmp_path, capsys, models, command, case):
    src_dir, outdir = _dirs(tmp_path)
    src = src_dir / "model.safetensors"
    src.write_bytes(_source(command, models).read_bytes())
    extra: list[object] = []
    if case == "output_is_input":
        out, words, extra = src, "overwrite the input", ["--force"]
    elif case == "symlink":
        out, words = outdir / "link.safetensors", "symlink"
        out.symlink_to(tmp_path / "elsewhere.safetensors")
    else:
        out, words = Path("/proc/normtool-hostile.safetensors"), "not writable"
    argv = _argv(command, src, models, out) + extra
    before = _sha(src_dir)
    code, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert out.name in lines[0] and words in lines[0], lines[0]
    assert _sha(src_dir) == before
    assert not (tmp_path / "elsewhere.safetensors").exists()
    assert [p.name for p in outdir.iterdir()] == (["link.safetensors"] if case == "symlink" else [])


# ---- ONNX whose external data leaves its folder --------------------------------------------
def _onnx_with_external(path: Path, location: str) -> Path:
    """A valid one-op model (y = x + w) whose weight ``w`` claims to live at ``location``."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [4], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    g = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())
    return path


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink_out"])
@pytest.mark.parametrize("command", ["verify", "bench"])
def test_onnx_external_data_outside_folder(tmp_path, capsys, models, where, command):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16)
    d = tmp_path / "model"
    d.mkdir()
    location = {"absolute": str(secret), "dotdot": "../secret.bin", "symlink_out": "w.bin"}[where]
    if where == "symlink_out":
        (d / "w.bin").symlink_to(secret)
    bad = _onnx_with_external(d / "m.onnx", location)
    before = _sha(d) | _sha(tmp_path)
    argv = (
        [command, bad, "--iters", "1", "--warmup", "0"]
        if command == "bench"
        else [command, models["ln"], bad]
    )
    code, _, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert bad.name in lines[0] and "outside the model's folder" in lines[0], lines[0]
    assert _sha(d) | _sha(tmp_path) == before


def test_onnx_external_data_beside_model_is_accepted(tmp_path):
    """The guard refuses escapes only: external data in the model's folder is read normally."""
    from normtool.io.onnx_guard import check_external_data  # noqa: PLC0415
    from normtool.runtime.ort import create_session  # noqa: PLC0415

    (tmp_path / "w.bin").write_bytes(struct.pack("<4f", 1, 2, 3, 4))
    path = _onnx_with_external(tmp_path / "m.onnx", "w.bin")
    check_external_data(path)
    out = create_session(path, "cpu").run({"x": torch.zeros(1, 4).numpy()})["logits"]
    assert out.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    onnx.checker.check_model(str(path))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_refused_by_the_writer_without_verify(tmp_path, capsys, models, value):
    """Without the self-check, the writer's thread vets each tensor as it writes it: the same
    one-line refusal naming the input tensor, and no output or temporary left behind."""
    bad_dir, outdir = _dirs(tmp_path)
    bad = bad_dir / "nonfinite.safetensors"
    name = _nonfinite(value)(models["ln"], bad)
    argv = ["convert-ln-to-rms", bad, "-o", outdir / "o.safetensors", "--no-verify"]
    _check_refused(capsys, argv, bad, f"{name!r} holds NaN or Inf", outdir)


# ---- trust: metadata, dtypes and sizes are checked, never believed (issue 19 items 3-6) -----
TRUST_COMMANDS = ("inspect", "verify", "export", "convert-ln-to-rms", "fold", "merge", "loki-head")


@pytest.fixture(scope="module")
def trusted(tmp_path_factory, models) -> dict[str, Path]:
    """A normtool output (the ln model converted to RMSNorm: it carries graph metadata), a
    second one to merge it with, a 5-class MLP (for loki-head) and a 5-leaf label tree."""
    from tests.conftest import cli as run  # noqa: PLC0415 - in-process, no capsys here

    d = tmp_path_factory.mktemp("trusted")
    out = {"metric": d / "tree.tsv"}
    out["metric"].write_text("".join(f"{c}\troot\n" for c in "abcde"))
    for name in ("ln", "ln2"):
        out[f"{name}.rms"] = d / f"{name}.rms.safetensors"
        r = run("convert-ln-to-rms", models[name], "-o", out[f"{name}.rms"])
        assert r.returncode == 0, r.stderr
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    out["mlp"] = d / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(out["mlp"]))
    return out


def _trust_argv(command: str, bad: Path, good: Path, out: Path, metric: Path) -> list[object]:
    """``command`` run on ``bad`` (the second model where it takes two, after ``good``)."""
    if command == "inspect":
        return [command, bad]
    if command == "verify":
        return [command, good, bad]
    if command == "merge":
        return [command, good, bad, "-o", out]
    if command == "loki-head":
        return [command, bad, "--metric", metric, "-o", out]
    return [command, bad, "-o", out]


def _edit_graph(edit: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    """Bytes → the same file with ``edit`` applied to its ``normtool.graph`` metadata."""

    def tamper(raw: bytes) -> bytes:
        h, data = _split(raw)
        g = json.loads(h["__metadata__"]["normtool.graph"])
        edit(g)
        h["__metadata__"]["normtool.graph"] = json.dumps(g)
        return _join(h, data)

    return tamper


def _op(kind: str) -> Callable[[dict], dict]:
    return lambda g: next(o for o in g["ops"] if o["kind"] == kind)


def _set(get: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], None]:
    return lambda g: get(g).__setitem__(key, value)


def _attrs(kind: str) -> Callable[[dict], dict]:
    return lambda g: _op(kind)(g)["attrs"]


def _tensor(name: str) -> Callable[[dict], dict]:
    return lambda g: g["tensors"][name]


def _history(raw: bytes) -> bytes:
    h, data = _split(raw)
    h["__metadata__"]["normtool.history"] = '{"transform": "fold"}'
    return _join(h, data)


#: name → (bytes of the rms output → tampered bytes, words the one-line error must contain).
#: Before these were checked, eps NaN/−1 made NaN models that export wrote with exit 0, a head
#: count or table offset that does not fit ended in an "unexpected" error, a forged dtype
#: loosened verify's tolerances.
TAMPERED: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "eps_nan": (_edit_graph(_set(_attrs("rmsnorm"), "eps", float("nan"))), "eps nan"),
    "eps_negative": (_edit_graph(_set(_attrs("rmsnorm"), "eps", -1e-5)), "eps -1e-05"),
    "eps_zero": (_edit_graph(_set(_attrs("rmsnorm"), "eps", 0)), "eps 0"),
    "heads_not_dividing": (_edit_graph(_set(_attrs("attention"), "heads", 3)), "heads 3"),
    "heads_zero": (_edit_graph(_set(_attrs("attention"), "heads", 0)), "heads 0"),
    "heads_text": (_edit_graph(_set(_attrs("attention"), "heads", "4")), "heads '4'"),
    "unknown_kind": (_edit_graph(_set(_op("rmsnorm"), "kind", "fancynorm")), "unknown kind"),
    "unknown_act": (_edit_graph(_set(_attrs("act"), "fn", "exp")), "unknown activation"),
    "positions_offset": (_edit_graph(_set(_attrs("positions"), "offset", 8)), "16-row table"),
    "vocab_beyond_table": (
        _edit_graph(lambda g: g["inputs"][0].__setitem__("vocab", 4096)),
        "token ids read rows 0..4095",
    ),
    "dtype_claim": (_edit_graph(_set(_tensor("head.weight"), "dtype", "F16")), "header says F32"),
    "slice_out_of_bounds": (
        _edit_graph(_set(lambda g: _tensor("head.weight")(g)["source"], "slice", [0, 0, 999])),
        "does not give graph tensor 'head.weight'",
    ),
    "reshape_wrong_size": (
        _edit_graph(_set(lambda g: _tensor("head.weight")(g)["source"], "reshape", [7, 7])),
        "does not give graph tensor 'head.weight'",
    ),
    "space_size_lie": (
        _edit_graph(lambda g: g["spaces"]["resid"].__setitem__("size", 17)),
        "space 'resid' has size 17",
    ),
    "ops_not_a_list": (_edit_graph(lambda g: g.__setitem__("ops", 5)), "not iterable"),
    "history_not_a_list": (_history, "normtool.history is not a list of records"),
}


@pytest.mark.parametrize("command", TRUST_COMMANDS)
@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_graph_metadata(tmp_path, capsys, trusted, command, case):
    tamper, words = TAMPERED[case]
    bad_dir, outdir = _dirs(tmp_path)
    bad = bad_dir / f"{case}.safetensors"
    bad.write_bytes(tamper(trusted["ln.rms"].read_bytes()))
    out = outdir / ("o.onnx" if command == "export" else "o.safetensors")
    argv = _trust_argv(command, bad, trusted["ln2.rms"], out, trusted["metric"])
    _check_refused(capsys, argv, bad, "corrupt normtool graph metadata", outdir)
    _, _, err = cli(capsys, *argv)
    assert words.lower() in err.lower(), err


@pytest.mark.parametrize("command", TRUST_COMMANDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int64, torch.bool])
def test_non_float_weights_refused_by_name(tmp_path, capsys, models, trusted, command, dtype):
    """An integer or boolean weight is refused at load, naming it and the op that uses it:
    before, inspect and export accepted it (an ONNX file ORT cannot load) and the others ended
    in "unexpected RuntimeError"."""
    bad_dir, outdir = _dirs(tmp_path)
    src, key, op, extra = {
        "fold": (models["un"], "blocks.1.attn.q.weight", "linear op 'blocks.1.attn.q'", []),
        "loki-head": (trusted["mlp"], "2.weight", "linear op 'logits'", ["--act", "relu"]),
    }.get(command, (models["ln"], "blocks.1.attn.q.weight", "linear op 'blocks.1.attn.q'", []))
    tensors = load_file(src)
    tensors[key] = (tensors[key] * 4).to(dtype)
    bad = bad_dir / f"int_{str(dtype).removeprefix('torch.')}.safetensors"
    save_file(tensors, str(bad), metadata=_metadata(src))
    out = outdir / ("o.onnx" if command == "export" else "o.safetensors")
    argv = _trust_argv(command, bad, models["ln2"], out, trusted["metric"]) + extra
    stored = {torch.uint8: "U8", torch.int8: "I8", torch.int64: "I64", torch.bool: "BOOL"}[dtype]
    words = f"tensor {key!r} is stored as {stored}; {op} needs floating-point weights"
    _check_refused(capsys, argv, bad, words, outdir)


def _metadata(src: Path) -> dict[str, str]:
    from safetensors import safe_open  # noqa: PLC0415 - only these helpers keep the metadata

    with safe_open(str(src), "pt") as f:
        return f.metadata() or {}


def test_unused_integer_tensors_are_still_accepted(tmp_path, capsys):
    """Integer buffers no op reads (BatchNorm's num_batches_tracked) are not weights: kept."""
    from devkit.factories import make_cnn  # noqa: PLC0415

    cnn = make_cnn(tmp_path)
    assert any(t.dtype == torch.int64 for t in load_file(cnn).values())
    for argv in (["inspect", cnn], ["export", cnn, "-o", tmp_path / "cnn.onnx"]):
        code, _, err = cli(capsys, *argv)
        assert code == 0, err


#: name → (state dict of the MLP → a hostile variant, words of the one-line error)
ODD_TORCH: dict[str, tuple[Callable[[dict], dict], str]] = {
    "int_key": (lambda sd: {0: sd.pop("0.weight"), **sd}, "key 0 (int) is not a tensor name"),
    "sparse": (lambda sd: {**sd, "0.weight": sd["0.weight"].to_sparse()}, "is sparse_coo"),
    "sparse_csr": (
        lambda sd: {**sd, "0.weight": sd["0.weight"].to_sparse_csr()},
        "is sparse_csr",
    ),
    "meta": (
        lambda sd: {**sd, "0.weight": torch.empty(sd["0.weight"].shape, device="meta")},
        "'0.weight' is a meta tensor",
    ),
}


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("command", ["inspect", "verify", "export", "merge", "loki-head"])
@pytest.mark.parametrize("case", sorted(ODD_TORCH))
def test_odd_torch_state_dicts(tmp_path, capsys, trusted, command, case):
    make, words = ODD_TORCH[case]
    bad_dir, outdir = _dirs(tmp_path)
    bad = bad_dir / f"{case}.pt"
    torch.save(make(load_file(trusted["mlp"])), bad)
    out = outdir / ("o.onnx" if command == "export" else "o.pt")
    argv = _trust_argv(command, bad, trusted["mlp"], out, trusted["metric"]) + ["--act", "relu"]
    _check_refused(capsys, argv, bad, words, outdir)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_loki_head_refuses_nonfinite_weights(tmp_path, capsys, trusted, value):
    """Like every other writer: before, a NaN bias was written and called "verified"."""
    bad_dir, outdir = _dirs(tmp_path)
    tensors = load_file(trusted["mlp"])
    tensors["2.bias"][1] = value
    bad = bad_dir / "nonfinite.safetensors"
    save_file(tensors, str(bad))
    out = outdir / "o.safetensors"
    argv = ["loki-head", bad, "--metric", trusted["metric"], "-o", out, "--act", "relu"]
    _check_refused(capsys, argv, bad, "'1.bias' (stored as '2.bias') holds NaN or Inf", outdir)


def _wide(path: Path, features: int, rows: int = 0) -> Path:
    """An MLP ``features`` → ``rows`` → 5 in fp16; ``rows`` 0: zero-element tensors only."""
    save_file(
        {
            "0.weight": torch.zeros(rows, features, dtype=torch.float16),
            "0.bias": torch.zeros(rows, dtype=torch.float16),
            "2.weight": torch.zeros(5, rows, dtype=torch.float16),
            "2.bias": torch.zeros(5, dtype=torch.float16),
        },
        str(path),
    )
    return path


@pytest.mark.parametrize("command", TRUST_COMMANDS)
def test_zero_element_weights_declaring_30m_features(tmp_path, capsys, trusted, command):
    """The issue's few hundred bytes: zero-element tensors declaring 30,000,000 input features
    (a layer of no units). Before, verify made 6.5 GB of inputs and died in the allocator,
    export and bench accepted it; now it is refused at load, naming the tensor."""
    bad_dir, outdir = _dirs(tmp_path)
    bad = _wide(bad_dir / "wide.safetensors", 30_000_000)
    assert bad.stat().st_size < 400
    out = outdir / ("o.onnx" if command == "export" else "o.safetensors")
    act = [] if command in ("fold", "convert-ln-to-rms") else ["--act", "relu"]  # no --act there
    argv = _trust_argv(command, bad, bad, out, trusted["metric"]) + act
    words = "tensor '0.weight' has no elements (shape [0, 30000000])"
    _check_refused(capsys, argv, bad, words, outdir)


def test_declared_sizes_bound_verify_memory(tmp_path):
    """A real (6 MB) fp16 MLP with 3,000,000 input features: verify computes what one batch
    would take from the declared shapes and refuses before allocating it, with the numbers.

    Before, every batch's inputs were made up front (27 rows × 3M × 8 bytes = 0.65 GB) and
    run. Measured in a child process: its peak RSS must stay below 1 GB (a bare CLI start is
    ~0.4 GB; one batch of 16 rows alone would add 0.38 GB of inputs and 0.38 GB of copies).
    """
    import resource  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from devkit.proc import run_cli  # noqa: PLC0415

    bad = _wide(tmp_path / "wide.safetensors", 3_000_000, rows=1)
    r = run_cli("verify", bad, bad, "--act", "relu", "--memory-limit", "0.5GiB")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    # batch 16: inputs 16 × 3M × 8 bytes (fp64 as made) = 0.358 GiB; the run in fp16 (the
    # weights' precision): 4 live copies of the 16 × 3M input, 4 × 48M × 2 bytes = 0.358 GiB
    assert "needs ~0.715 GiB for one batch (16: inputs 0.358 GiB" in lines[0], lines[0]
    assert "activations and outputs 0.358 GiB), above the limit of 0.5 GiB" in lines[0]
    if sys.platform == "linux":  # ru_maxrss of children: KiB on Linux
        assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 1_000_000


def test_declared_sizes_bound_verify_memory_by_default(tmp_path, capsys):
    """Without --memory-limit verify holds a checkpoint's batch to the 4 GB ONNX Runtime is
    held to (3.73 GiB), on every machine alike: 16M fp16 features need 256 × 16M = 4.1 GB."""
    bad = _wide(tmp_path / "wide.safetensors", 16_000_000, rows=1)
    code, _, err = cli(capsys, "verify", bad, bad, "--act", "relu")
    assert code == 2 and "above the limit of 3.73 GiB (--memory-limit)" in err, err
