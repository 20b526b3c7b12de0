"""Bad and hostile input: one line on stderr naming the file and the problem, exit 2, no
traceback, inputs unchanged, code in pickles never executed."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from devkit.proc import run_cli
from tests.conftest import cli


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _assert_clean_error(r, name: str, words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert name in lines[0], lines[0]
    assert words.lower() in lines[0].lower(), lines[0]


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good(tmp_path: Path) -> Path:
    p = tmp_path / "good.safetensors"
    save_file({"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4)}, str(p))
    return p


CASES = {
    "missing": (lambda d: d / "nope.safetensors", "no such file"),
    "wrong_extension": (lambda d: _write(d / "model.txt", b"hello"), "unsupported file type"),
    "too_short": (lambda d: _write(d / "short.safetensors", b"\x01\x02"), "shorter than 8 bytes"),
    "header_beyond_file": (
        lambda d: _write(d / "big.safetensors", struct.pack("<Q", 10_000) + b"{}"),
        "header length",
    ),
    "truncated": (
        lambda d: _write(d / "trunc.safetensors", _good(d).read_bytes()[:-10]),
        "outside the file",
    ),
    "not_json": (
        lambda d: _write(d / "nj.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{x"),
        "not UTF-8 JSON",
    ),
    "unknown_dtype": (
        lambda d: _raw_safetensors(
            d / "dt.safetensors",
            {"0.weight": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}},
            b"\0" * 4,
        ),
        "unknown dtype",
    ),
    "size_mismatch": (
        lambda d: _raw_safetensors(
            d / "sz.safetensors",
            {"0.weight": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 16]}},
            b"\0" * 16,
        ),
        "needs 36 bytes",
    ),
    "overlap": (
        lambda d: _raw_safetensors(
            d / "ov.safetensors",
            {
                "0.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "0.bias": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            b"\0" * 16,
        ),
        "overlap",
    ),
    "folder_without_config": (lambda d: _mkdir(d / "emptydir"), "no config.json"),
    "unknown_architecture": (
        lambda d: _safetensors(d / "weird.safetensors", {"encoder.blob": torch.randn(3, 3, 3)}),
        "unknown architecture",
    ),
}


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def _safetensors(p: Path, tensors: dict) -> Path:
    save_file(tensors, str(p))
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_bad_input(tmp_path, case):
    make, words = CASES[case]
    p = make(tmp_path)
    before = _sha(p) if p.is_file() else None
    r = cli("inspect", p)
    _assert_clean_error(r, p.name, words)
    if before is not None:
        assert _sha(p) == before


def test_unknown_architecture_lists_known_families(tmp_path):
    p = _safetensors(tmp_path / "w.safetensors", {"encoder.blob": torch.randn(3, 3, 3)})
    r = cli("inspect", p)
    assert "mlp" in r.stderr and "Known families" in r.stderr


def test_mismatched_shapes_with_arch(tmp_path):
    p = _safetensors(
        tmp_path / "chain.safetensors",
        {"0.weight": torch.randn(4, 3), "1.weight": torch.randn(2, 5)},
    )
    _assert_clean_error(cli("inspect", p, "--arch", "mlp"), p.name, "takes 5 inputs")


def test_debug_shows_traceback(tmp_path):
    r = cli("inspect", tmp_path / "nope.safetensors", "--debug")
    assert r.returncode == 2 and "Traceback" in r.stderr


class _Evil:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"0.weight": torch.randn(2, 2), "x": _Evil(str(marker))}, p)
    assert not marker.exists()
    before = _sha(p)
    r = run_cli("inspect", p)
    _assert_clean_error(r, p.name, "refused")
    assert not marker.exists(), "the pickle's code ran"
    assert _sha(p) == before
