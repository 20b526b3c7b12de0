"""Direct-I/O output (``normtool.io.sink``): the bytes on disk are exactly the bytes written.

Why these cases: direct writes go through aligned staging blocks, so what can go wrong is at
the edges — a tail shorter than a block (padded, then cut), data crossing block boundaries,
the two blocks alternating, the header patched in place after the data, and file systems that
refuse ``O_DIRECT`` (written the ordinary way instead). Each is compared with the same stream
written through an ordinary buffered file.
"""

from __future__ import annotations

import errno
import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from normtool.io import sink
from normtool.io.safetensors_format import write_stream


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 3 alignment units and direct I/O from the first byte: every edge is reached
    with a few KiB."""
    monkeypatch.setattr(sink, "BLOCK", 3 * sink.ALIGN)
    monkeypatch.setattr(sink, "DIRECT_MIN_BYTES", 0)


def _direct_here(folder) -> bool:
    with (folder / "probe.bin").open("wb") as f:
        direct = isinstance(sink.appender(f, sink.DIRECT_MIN_BYTES), sink.Appender)
    (folder / "probe.bin").unlink()
    return direct


def _appended(path, chunks: list[bytes], patches: list[tuple[int, bytes]]) -> bytes:
    with path.open("wb") as f:
        out = sink.appender(f, sum(map(len, chunks)))
        assert isinstance(out, sink.Appender)  # the direct path is what is under test
        for c in chunks:
            out.write(c)
        out.close()
        for at, data in patches:
            out.patch(at, data)
    return path.read_bytes()


# the fixture only patches constants: the same for every example
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=st.lists(st.integers(0, 5 * 4096 + 7), min_size=1, max_size=6),
    patch_at=st.integers(0, 10**6),
)
def test_direct_bytes_equal_buffered(tmp_path_factory, small_blocks, sizes, patch_at):
    tmp = tmp_path_factory.mktemp("sink")
    if not _direct_here(tmp):
        pytest.skip("this file system refuses O_DIRECT")
    chunks = [os.urandom(n) for n in sizes]
    total = sum(sizes)
    patches = [(patch_at % total, b"xyz"[: total - patch_at % total])] if total else []
    want = bytearray(b"".join(chunks))
    for at, data in patches:
        want[at : at + len(data)] = data
    got = _appended(tmp / "d.bin", chunks, patches)
    assert got == bytes(want)


def test_direct_is_used_and_switched_off(tmp_path, small_blocks):
    """On this file system the appender really writes directly, and leaves the descriptor
    ordinary afterwards (later patches and appends need no alignment)."""
    if not _direct_here(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    with (tmp_path / "d.bin").open("wb") as f:
        out = sink.appender(f, 10)
        assert sink.fcntl.fcntl(f.fileno(), sink.fcntl.F_GETFL) & os.O_DIRECT
        out.write(b"a" * 5000)
        out.close()
        assert not sink.fcntl.fcntl(f.fileno(), sink.fcntl.F_GETFL) & os.O_DIRECT
        f.write(b"tail")
    assert (tmp_path / "d.bin").read_bytes() == b"a" * 5000 + b"tail"


def test_small_outputs_and_other_files_are_written_the_ordinary_way(tmp_path, monkeypatch):
    with (tmp_path / "s.bin").open("wb") as f:
        assert isinstance(sink.appender(f, sink.DIRECT_MIN_BYTES - 1), sink.FileAppender)
    assert isinstance(sink.appender(io.BytesIO(), 10**12), sink.FileAppender)
    with (tmp_path / "m.bin").open("wb") as f:
        f.write(b"x")  # not at its start: someone else wrote first
        assert isinstance(sink.appender(f, 10**12), sink.FileAppender)


@pytest.mark.parametrize("refuse_from", [0, 2 * 3 * 4096])
def test_refused_direct_write_falls_back(tmp_path, small_blocks, monkeypatch, refuse_from):
    """A file system that accepts the flag but refuses a direct write (EINVAL) — the first, or
    a later one (a device with larger blocks refusing the padded tail): the rest is written
    the ordinary way, and the file is whole."""
    real = os.pwrite
    refused = []

    def pwrite(fd, data, at):
        direct = sink.fcntl.fcntl(fd, sink.fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
        if direct and at >= refuse_from:
            refused.append(at)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)

    if not _direct_here(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(os, "pwrite", pwrite)
    data = [os.urandom(17000), os.urandom(9000)]
    assert _appended(tmp_path / "f.bin", data, []) == b"".join(data)
    assert refused == [refuse_from]  # refused once, then never asked again


@pytest.mark.parametrize("short_first", [False, True], ids=["refused", "short then refused"])
def test_disk_errors_reach_the_writer(tmp_path, small_blocks, monkeypatch, short_first):
    """A full disk: the OSError itself reaches ``write_stream``'s caller (which turns it into
    the one-line error) — also when it follows a short write, the usual way ENOSPC shows."""
    if not _direct_here(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real, calls = os.pwrite, []

    def full(fd, data, at):
        calls.append(at)
        if short_first and len(calls) == 1:
            return real(fd, data[: len(data) // 2], at)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    made, appender_class = [], sink.Appender
    monkeypatch.setattr(sink, "Appender", lambda fd: made.append(appender_class(fd)) or made[-1])
    big = torch.zeros(4 * sink.BLOCK // 4)
    with (tmp_path / "e.bin").open("wb") as f, pytest.raises(OSError, match="No space"):
        write_stream(f, [("a", torch.float32, tuple(big.shape))], lambda n: big, {})
    assert len(calls) >= 1 + short_first
    # no view of a staging block outlived the error: both were unmapped
    assert len(made) == 1 and all(b.closed for b in made[0].blocks)


def test_write_stream_direct_round_trip_and_check(tmp_path, small_blocks):
    """A safetensors file written directly reads back exactly; ``check`` sees every tensor
    (and block) before it is written, and an exception from it stops the write."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 29, generator=g), "b": torch.randn(5, generator=g).half()}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    seen = []
    with (tmp_path / "t.safetensors").open("wb") as f:
        write_stream(
            f,
            specs,
            lambda n: iter(tensors[n].split(10)) if n == "a" else tensors[n],
            {"k": "v"},
            check=lambda n, t: seen.append((n, t.shape[0])),
        )
    assert seen == [("a", 10), ("a", 10), ("a", 10), ("a", 7), ("b", 5)]
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as r:
        assert r.metadata() == {"k": "v"}
        assert all(torch.equal(r.get_tensor(k), v) for k, v in tensors.items())

    def refuse(name, t):
        if name == "b":
            raise ValueError("no b")

    with pytest.raises(ValueError, match="no b"), (tmp_path / "r.safetensors").open("wb") as f:
        write_stream(f, specs, lambda n: tensors[n], {}, check=refuse)
        assert False, "not reached"  # noqa: B011 - the check stops the direct write


def test_a_pipe_is_written_the_ordinary_way(small_blocks):
    """No descriptor to seek (a pipe): the ordinary path, not an 'illegal seek'."""
    r, w = os.pipe()
    with os.fdopen(w, "wb") as f:
        assert isinstance(sink.appender(f, 10**12), sink.FileAppender)
        write_stream(f, [("a", torch.float32, (3,))], lambda n: torch.ones(3), {})
    with os.fdopen(r, "rb") as f:
        assert f.read().endswith(torch.ones(3).numpy().tobytes())
