"""``normtool demo``: runs every registered command end to end and every row succeeds."""

from __future__ import annotations

import json

import pytest

from devkit.proc import run_cli
from normtool import demo as demo_lib
from normtool.cli import main
from normtool.commands import COMMANDS
from normtool.demo import Step


def test_demo_every_step_succeeds_and_covers_every_command(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--dir", out, "--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    d = json.loads(r.stdout)
    failed = [(s["command"], s["model"], s["error"]) for s in d["steps"] if not s["ok"]]
    assert d["ok"] is True and not failed
    assert all(s["key"] for s in d["steps"])  # each row shows its number
    # a command added to the CLI without a demo step fails here
    assert {name for name, _ in COMMANDS} - {"demo"} <= {s["command"] for s in d["steps"]}
    verifies = [s for s in d["steps"] if s["command"] == "verify"]
    assert verifies and all(s["output"]["equivalent"] for s in verifies)
    # outputs were kept where asked: the exports and the transforms' checkpoints
    assert (out / "transformer.onnx").is_file() and (out / "cnn.folded.safetensors").is_file()
    assert d["seconds"] < 120  # the bound on 2 CPU cores


def test_failing_step_is_reported_and_exits_1(tmp_path, monkeypatch, capsys):
    """Two different MLPs are not equivalent: that verify row fails, the others still run."""
    steps = [
        Step("verify", "mlp ↔ mlp_b", lambda p: {"a": p["mlp"], "b": p["mlp_b"]}, str),
        Step("inspect", "mlp", lambda p: {"path": p["mlp"]}, lambda j: j["family"]),
    ]
    monkeypatch.setattr(demo_lib, "STEPS", steps)
    with pytest.raises(SystemExit) as e:
        main(["demo", "--dir", str(tmp_path), "--json"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    rows = json.loads(out)["steps"]
    assert [r["ok"] for r in rows] == [False, True]
    assert "not equivalent" in rows[0]["error"] and rows[1]["key"] == "mlp"
    assert "1 demo step(s) failed: verify mlp ↔ mlp_b" in err


def test_dir_that_is_a_file_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("demo", "--dir", blocker)
    assert r.returncode == 2 and "not a folder" in r.stderr
