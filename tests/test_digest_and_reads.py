"""Source digests started before the heavy imports, and copy-on-write reads of large tensors.

The digest must equal ``hashlib.sha256`` of the file bytes whatever path computed it (prefetched
or not), follow a file that changed, and never hash an output named on the command line. A
large tensor is mapped privately: writing to it must leave the file and later reads untouched.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from normtool.errors import NormtoolError
from normtool.io import digest
from normtool.io.store import MAP_MIN_BYTES, open_checkpoint


def sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_digest_matches_hashlib_and_follows_a_changed_file(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.randn(300, 7)}, p)
    first = digest.sha256_async([p], p).result(timeout=60)
    assert first == sha(p)
    assert digest.sha256_async([p], p) is digest.sha256_async([p], p)  # computed once
    save_file({"w": torch.randn(300, 7)}, p)
    os.utime(p, ns=(1, 1))  # a different mtime even on a coarse clock
    assert digest.sha256_async([p], p).result(timeout=60) == sha(p) != first


def test_prefetch_hashes_sources_of_recording_commands_only(tmp_path, monkeypatch):
    src, out, folder = tmp_path / "s.safetensors", tmp_path / "o.safetensors", tmp_path / "hf"
    for p in (src, out):
        save_file({"w": torch.randn(4, 4)}, p)
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"a": torch.ones(2)}, folder / "model-00002-of-00002.safetensors")
    save_file({"b": torch.ones(2)}, folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00002-of-00002.safetensors",
                    "b": "model-00001-of-00002.safetensors",
                }
            }
        )
    )
    seen: list[list[str]] = []
    monkeypatch.setattr(digest, "sha256_async", lambda files, name: seen.append(files))
    digest.prefetch(["inspect", str(src)])
    assert seen == []
    digest.prefetch(["convert-ln-to-rms", str(src), "-o", str(out), "--force", "--json"])
    assert seen == [[src]]
    seen.clear()
    digest.prefetch(["convert-ln-to-rms", "--json", str(src)])  # a flag: the path after it counts
    assert seen == [[src]]
    seen.clear()
    digest.prefetch(["merge", str(folder), "--output", str(out), str(tmp_path / "missing")])
    # shards in the order the loader hashes them (sorted names), the output never
    assert seen == [
        [folder / "model-00001-of-00002.safetensors", folder / "model-00002-of-00002.safetensors"]
    ]
    assert open_checkpoint(folder).files == seen[0]


def test_mapped_tensor_writes_never_reach_the_file(tmp_path):
    p = tmp_path / "big.safetensors"
    rows = MAP_MIN_BYTES // (4 * 64) + 9  # rows 5: still over the mapping threshold, fp32
    w = torch.randn(rows, 64)
    save_file({"small": torch.randn(5), "w": w}, p)
    before = sha(p)
    ck = open_checkpoint(p)
    t = ck.get("w")
    assert t.numel() * 4 >= MAP_MIN_BYTES and torch.equal(t, w)
    t.mul_(-3.0).add_(1.0)  # in place, as a pass may do to a tensor it owns
    part = ck.get_rows("w", 5, rows)  # a mapping that does not start on a page boundary
    assert part.numel() * 4 >= MAP_MIN_BYTES
    assert torch.equal(part, w[5:]) and torch.equal(ck.get("w"), w)
    del t, part
    assert sha(p) == before


def test_file_cut_short_after_opening_is_an_error_not_a_crash(tmp_path):
    p = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(MAP_MIN_BYTES // 4 + 64)}, p)
    ck = open_checkpoint(p)
    os.truncate(p, p.stat().st_size - 1024)
    with pytest.raises(NormtoolError, match="cut short"):
        ck.get("w")
