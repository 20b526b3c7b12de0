"""Shared fixtures. Models are made here, small and seeded: nothing is downloaded."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def cli(*args: object) -> subprocess.CompletedProcess:
    """``normtool ARGS`` through the CLI entry point in this process (exit code, stdout and
    stderr captured): the same code path as ``devkit.proc.run_cli`` without a fresh interpreter
    per call."""
    from normtool.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def mlp_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 5),
    ).eval()


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory, mlp_net) -> Path:
    p = tmp_path_factory.mktemp("mlp") / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in mlp_net.state_dict().items()}, str(p))
    return p
