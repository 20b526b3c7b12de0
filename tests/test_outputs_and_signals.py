"""Outputs that never destroy data, runs that end cleanly, and errors a CI log can read.

Issues 14 (items 4, 5, 8) and 19 (items 1, 2, 5, 7): ``--force`` replaces only normtool's own
outputs and never anything the run reads; two runs racing for one new output never both
"win"; signals remove temporary files; FIFOs are refused, not waited on; every failure is one
line naming the file. Each test states the behaviour that was wrong before.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devkit.factories import make_gpt2, make_reference_transformer
from devkit.proc import run_cli
from normtool.errors import NormtoolError, one_line
from normtool.io import atomic, provenance, reads
from tests.conftest import cli

ROOT = Path(__file__).resolve().parent.parent


def _sha(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(
            b"".join(_sha(p).encode() + p.name.encode() for p in sorted(path.iterdir()))
        ).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_clean_line(r: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def ln(tmp_path_factory) -> Path:
    return make_reference_transformer(tmp_path_factory.mktemp("ln"), "ln", norm="layernorm")


# ---- --force replaces only what normtool wrote (14.4) --------------------------------------
def test_force_never_deletes_a_folder_holding_the_input(tmp_path, ln):
    """Before: ``-o DIR --force`` deleted DIR, the input checkpoint inside it included."""
    d = tmp_path / "work"
    d.mkdir()
    src = d / "model.safetensors"
    src.write_bytes(ln.read_bytes())
    (d / "notes.txt").write_text("mine")
    before = _sha(d)
    r = cli("convert-ln-to-rms", src, "-o", d, "--force")
    _one_clean_line(r, str(d), "input")
    assert _sha(d) == before


def test_force_never_deletes_a_folder_of_other_files(tmp_path, ln):
    d = tmp_path / "results"
    d.mkdir()
    (d / "paper.tex").write_text("months of work")
    r = cli("convert-ln-to-rms", ln, "-o", d, "--force")
    _one_clean_line(r, "results", "not written by normtool")
    assert (d / "paper.tex").read_text() == "months of work"


@pytest.mark.parametrize("name", ["notes.safetensors", "data.npz", "plain.onnx", "old.pt"])
def test_force_never_replaces_a_file_normtool_did_not_write(tmp_path, ln, name):
    out = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({"w": torch.ones(2)}, str(out))  # a safetensors file, but not normtool's
    elif name.endswith(".pt"):
        torch.save({"w": torch.ones(2)}, out)
    else:
        out.write_bytes(b"user data")
    before = _sha(out)
    r = cli("convert-ln-to-rms", ln, "-o", out, "--force")
    _one_clean_line(r, name, "--force replaces only normtool's own outputs")
    assert _sha(out) == before


def test_force_replaces_normtools_own_outputs(tmp_path, ln):
    """The CI loop ``convert … --force`` run twice: the second replaces the first."""
    out = tmp_path / "ln.rms.safetensors"
    for _ in range(2):
        r = cli("convert-ln-to-rms", ln, "-o", out, "--force", "--json")
        assert r.returncode == 0, r.stderr
    onnx_out = tmp_path / "ln.onnx"
    for _ in range(2):
        assert cli("export", out, "-o", onnx_out, "--force").returncode == 0
    assert _leftovers(tmp_path) == []


def test_force_replaces_a_folder_output_normtool_wrote(tmp_path):
    """A merged Hugging Face folder lists the files normtool put in it; replaced as a whole."""
    a, b = make_gpt2(tmp_path / "a", seed=0), make_gpt2(tmp_path / "b", seed=1)
    out = tmp_path / "merged"
    assert cli("merge", a, b, "-o", out, "--method", "average").returncode == 0
    written = json.loads(
        provenance.safetensors_metadata(out / "model.safetensors")[provenance.FILES_KEY]
    )
    assert sorted(written) == sorted(p.name for p in out.iterdir())
    assert provenance.not_replaceable(out) is None
    r = cli("merge", a, b, "-o", out, "--method", "average", "--force")
    assert r.returncode == 0, r.stderr
    (out / "extra.txt").write_text("the user's")
    r = cli("merge", a, b, "-o", out, "--method", "average", "--force")
    _one_clean_line(r, "extra.txt")
    assert (out / "extra.txt").read_text() == "the user's"


def test_torch_mark_keeps_the_file_loadable(tmp_path):
    p = tmp_path / "m.pt"
    torch.save({"w": torch.arange(4.0)}, p)
    assert provenance.not_replaceable(p) is not None
    provenance.mark_torch(p)
    assert provenance.not_replaceable(p) is None
    for mmap in (False, True):
        assert torch.equal(torch.load(p, weights_only=True, mmap=mmap)["w"], torch.arange(4.0))


# ---- nothing the run reads is overwritten (19.1) -------------------------------------------
def test_output_onto_a_shard_named_by_the_index_is_refused(tmp_path):
    """Before: ``-o gpt2s/model-00001-of-0000N.safetensors --force`` with the index as input
    replaced a shard; the sharded model no longer loaded."""
    src = make_gpt2(tmp_path / "gpt2s", save={"max_shard_size": "20KB"})
    index = src / "model.safetensors.index.json"
    shard = sorted(src.glob("model-0000*.safetensors"))[0]
    before = _sha(src)
    for cmd in (["convert-ln-to-rms", index], ["export", index]):
        for target in (shard, src / "config.json"):
            r = cli(*cmd, "-o", target, "--force")
            _one_clean_line(r, target.name, "input")
    assert _sha(src) == before


def test_loki_files_are_never_overwritten(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    src = tmp_path / "clf.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(src))
    (tmp_path / "tree.tsv").write_text("child\tparent\na\tr\nb\tr\nc\tr\n")
    (tmp_path / "observed.txt").write_text("a\nb\nc\n")
    for victim in ("tree.tsv", "observed.txt"):
        before = _sha(tmp_path / victim)
        r = cli(
            "loki-head", src, "--metric", tmp_path / "tree.tsv", "--observed",
            tmp_path / "observed.txt", "-o", tmp_path / victim, "--force",
        )  # fmt: skip
        _one_clean_line(r, victim)
        assert _sha(tmp_path / victim) == before


def test_special_file_outputs_are_refused(tmp_path, ln):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    r = cli("convert-ln-to-rms", ln, "-o", fifo, "--force")
    _one_clean_line(r, "FIFO")
    assert fifo.exists() and not fifo.is_file()
    r = cli("export", ln, "-o", "/dev/null", "--force")
    _one_clean_line(r, "character device")


# ---- no lost race (19.2) -------------------------------------------------------------------
def test_publish_never_replaces_an_output_that_appeared(tmp_path):
    """Before: the second of two concurrent runs silently replaced the first one's output."""
    out = tmp_path / "out.safetensors"
    tmp = atomic.temp_name(out)
    tmp.write_bytes(b"loser")
    out.write_bytes(b"winner")  # another run published while this one was writing
    with pytest.raises(NormtoolError, match="appeared while this run was writing"):
        atomic.publish(tmp, out, force=False)
    assert out.read_bytes() == b"winner"
    folder = tmp_path / "dir"
    tmpdir = atomic.temp_name(folder)
    tmpdir.mkdir()
    folder.mkdir()  # an empty folder: a plain rename would replace it
    with pytest.raises(NormtoolError, match="appeared"):
        atomic.publish(tmpdir, folder, force=False)


def test_concurrent_runs_one_wins(tmp_path, ln):
    out = tmp_path / "race.rms.safetensors"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "normtool", "convert-ln-to-rms", str(ln), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )  # fmt: skip
        for _ in range(3)
    ]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes[0] == 0 and all(c == 2 for c in codes[1:]), codes
    assert _leftovers(tmp_path) == []


# ---- hangs and odd inputs (19.5, 14.5) -----------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "export", "verify", "convert-ln-to-rms"])
def test_fifo_input_is_refused_not_waited_on(tmp_path, command):
    """Before: opening the FIFO blocked until killed."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    args = [fifo, fifo] if command == "verify" else [fifo]
    r = subprocess.run(
        [sys.executable, "-m", "normtool", command, *map(str, args)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    _one_clean_line(r, "model.safetensors", "FIFO")


def test_note_refuses_devices():
    with pytest.raises(NormtoolError, match="character device"):
        reads.note("/dev/zero")


@pytest.mark.parametrize("where", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_one_line(tmp_path, where):
    """Before: RecursionError, "unexpected RecursionError" without the file's name."""
    src = make_gpt2(tmp_path / "m")
    (src / where).write_text("[" * 200_000 + "]" * 200_000)
    if where.endswith("index.json"):
        (src / "model.safetensors").unlink()
    r = run_cli("inspect", src)
    _one_clean_line(r, where, "nested too deeply")


def test_deeply_nested_safetensors_header_is_one_line(tmp_path):
    text = ("[" * 100_000 + "]" * 100_000).encode()
    p = tmp_path / "deep.safetensors"
    p.write_bytes(len(text).to_bytes(8, "little") + text)
    _one_clean_line(cli("inspect", p), "deep.safetensors", "nested too deeply")


def test_unreadable_folder_is_one_line(tmp_path, monkeypatch):
    """A folder without read permission (EACCES from every stat inside it; root, who runs
    the tests, reads everything, so the kernel's answer is injected). Before: a traceback from
    the digest prefetch, which runs before the CLI's error handler."""
    from normtool.launch import _prefetch

    src = make_gpt2(tmp_path / "m")
    real_stat = os.stat

    def denied(path, *a, **k):
        if Path(path).parent == src:
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", denied)
    _prefetch(["convert-ln-to-rms", str(src)])
    _one_clean_line(cli("inspect", src), "m/", "Permission denied")


# ---- names and messages (19.7, 14.8) -------------------------------------------------------
def test_long_output_names(tmp_path, ln):
    """Before: a 240-character name failed with Errno 36 from the temporary's longer name."""
    ok = tmp_path / ("n" * 228 + ".safetensors")
    assert cli("convert-ln-to-rms", ln, "-o", ok).returncode == 0
    assert ok.is_file() and _leftovers(tmp_path) == []
    too_long = tmp_path / ("n" * 250 + ".safetensors")
    _one_clean_line(cli("convert-ln-to-rms", ln, "-o", too_long), "255")


def test_empty_output_name_is_refused(ln):
    _one_clean_line(
        cli("convert-ln-to-rms", ln, "-o", ""), "output path is empty or the current folder"
    )


def test_control_characters_in_names_stay_on_one_line(tmp_path):
    bad = tmp_path / "evil\nname.safetensors"
    bad.write_bytes(b"garbage")
    line = _one_clean_line(cli("inspect", bad), "evil\\nname")
    assert one_line("a\tb\x1b[31m") == "a\\tb\\x1b[31m"
    assert line.count("\n") == 0


def test_disk_full_during_export_names_the_output(tmp_path, ln, monkeypatch):
    import onnx

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx, "save_model", full)
    out = tmp_path / "m.onnx"
    _one_clean_line(cli("export", ln, "-o", out), "m.onnx", "No space left")
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args",
    [
        ["verify", "{m}", "{m}", "--seed", str(2**70)],
        ["verify", "{m}", "{m}", "--samples", "100000000000"],
        ["merge", "{m}", "{m}", "--seed", "-1"],
    ],
)
def test_out_of_range_numbers_are_usage_errors(ln, args):
    """Before: ``--seed 2**70`` ended in "unexpected ValueError: Overflow …"."""
    r = cli(*[a.format(m=ln) for a in args])
    _one_clean_line(r, "--")


def test_warnings_never_precede_the_error(tmp_path, monkeypatch):
    import warnings

    import normtool.commands.inspect as inspect_cmd

    def noisy(*a, **k):
        warnings.warn("a library's UserWarning", UserWarning, stacklevel=1)
        raise NormtoolError("the real problem", tmp_path / "x")

    monkeypatch.setattr(inspect_cmd, "load", noisy)
    _one_clean_line(cli("inspect", tmp_path / "x"), "the real problem")


def test_prefetch_errors_never_escape(tmp_path):
    """The digest prefetch runs before the CLI's handler: a bad index must not traceback."""
    from normtool.launch import _prefetch

    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors.index.json").write_text("[" * 100_000)
    _prefetch(["convert-ln-to-rms", str(d)])


def test_version_bare_and_help():
    from normtool import __version__

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"normtool {__version__}"
    bare = run_cli()
    assert bare.returncode == 0 and "aborted" not in bare.stderr + bare.stdout
    assert "Commands:" in bare.stdout and "--debug" in bare.stdout and "--quiet" in bare.stdout
    for command in ("fold", "verify", "export", "bench", "merge", "loki-head"):
        text = run_cli(command, "--help").stdout
        assert "<bool>" not in text and "{" not in text.splitlines()[0], text
        assert "--debug" in text and "--quiet" in text, text


def test_memory_limit_too_small_is_one_line(tmp_path, ln):
    """Before: under ``ulimit -v`` torch's import aborted (std::bad_alloc, exit 134) or
    printed a traceback."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (400 << 20, resource.RLIM_INFINITY))

    r = subprocess.run(
        [sys.executable, "-m", "normtool", "inspect", str(ln)],
        capture_output=True, text=True, timeout=120, cwd=ROOT, preexec_fn=limit,
    )  # fmt: skip
    _one_clean_line(r, "out of memory", "400 MiB")


# ---- signals (14.5) ------------------------------------------------------------------------
_KILL_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import normtool.io.safetensors_format as fmt
    real = fmt.write_stream
    def write_then_signal(f, *a, **k):
        f.write(b"partial")
        f.flush()
        os.kill(os.getpid(), signal.{sig})
        return real(f, *a, **k)
    fmt.write_stream = write_then_signal
    import normtool.io.writer as w
    w.write_stream = write_then_signal
    from normtool.launch import main
    sys.argv = ["normtool", "convert-ln-to-rms", {src!r}, "-o", {out!r}]
    main()
    """
)


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_signal_mid_write_leaves_nothing(tmp_path, ln, sig, code):
    """Before: SIGTERM and SIGHUP killed the process with its ``.tmp-*`` file left behind."""
    out = tmp_path / "out.safetensors"
    script = _KILL_MID_WRITE.format(sig=sig, src=str(ln), out=str(out))
    r = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    _one_clean_line(r, "interrupted", sig, code=code)
    assert not out.exists() and _leftovers(tmp_path) == []


def _wait_for_handler(pid: int, sig: int, timeout: float = 60.0) -> None:
    """Until process ``pid`` catches ``sig`` (its SigCgt mask in /proc): a fixed sleep would
    send the signal before the interpreter is up on a loaded machine, or after the import."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(
            next(ln for ln in status.splitlines() if ln.startswith("SigCgt:")).split()[1], 16
        )
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} never installed a handler for signal {sig}")


def test_ctrl_c_while_importing(ln):
    """Before: a KeyboardInterrupt traceback from inside torch's import (exit 1)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "normtool", "inspect", str(ln)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    _wait_for_handler(p.pid, signal.SIGTERM)  # launch's handlers are in; torch is importing
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    _one_clean_line(r, "interrupted", "while starting", code=130)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("n_head", 0),
        ("n_head", -4),
        ("n_head", None),
        ("n_head", "x"),
        ("n_head", 3.5),
        ("layer_norm_epsilon", -1.0),
        ("layer_norm_epsilon", None),
        ("layer_norm_epsilon", 0),
    ],
)
def test_config_values_are_checked_where_read(tmp_path, key, value):
    """Before: ZeroDivisionError, negative shapes or TypeError deep in the executor ("unexpected
    …"), 3.5 heads silently read as 3, a negative eps computed into NaN outputs."""
    src = make_gpt2(tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    cfg[key] = value
    (src / "config.json").write_text(json.dumps(cfg))
    for command in ("inspect", "verify"):
        args = [src, src] if command == "verify" else [src]
        _one_clean_line(cli(command, *args), "m", f"config {key} = ")
