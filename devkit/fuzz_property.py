"""The reader's fuzzing property, shared by the CI tests and the long fuzzing script.

Property: whatever bytes a file holds, ``open_checkpoint`` plus reading every tensor either
succeeds with the declared shapes or raises ``NormtoolError`` (exit 2 at the CLI). Any other
exception would surface as a traceback or a crash on a stranger's file.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from hypothesis import strategies as st

from normtool.errors import NormtoolError
from normtool.io.safetensors_format import write_stream
from normtool.io.store import open_checkpoint


def safetensors_bytes() -> bytes:
    """A small valid safetensors file (an MLP chain) to mutate."""
    tensors = {
        "0.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
        "0.bias": torch.ones(4, dtype=torch.float16),
        "1.weight": torch.zeros(2, 4, dtype=torch.bfloat16),
    }
    buf = io.BytesIO()
    write_stream(
        buf,
        [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
        tensors.__getitem__,
        {"note": "seed"},
    )
    return buf.getvalue()


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    """Byte flips, truncations, insertions and header-length rewrites of the seed file."""
    data = bytearray(safetensors_bytes())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "length"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) >= 8:
            data[:8] = draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    return bytes(data)


def check_reader_on_bytes(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` and apply the property; returns "opened" or "refused"."""
    path.write_bytes(data)
    try:
        ck = open_checkpoint(path)
        for k in ck.keys():  # noqa: SIM118 - Checkpoint is not a dict
            t = ck.get(k)
            assert tuple(t.shape) == ck.shape(k), k
        return "opened"
    except NormtoolError:
        return "refused"
