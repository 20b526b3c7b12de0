"""Property-based fuzzing of the checkpoint reader: any byte string either opens as a checkpoint
whose every tensor reads back with its declared shape, or is refused with NormtoolError — never
another exception, never a crash. ``scripts/fuzz_reader.py`` runs the same property for longer."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devkit.fuzz_property import check_reader_on_bytes, mutations, safetensors_bytes

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(data=mutations())
def test_mutated_files_open_or_fail_cleanly(tmp_path: Path, data: bytes) -> None:
    check_reader_on_bytes(tmp_path / "f.safetensors", data)


@SETTINGS
@given(
    header=st.dictionaries(
        st.text(max_size=8),
        st.fixed_dictionaries(
            {
                "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X9", 3]),
                "shape": st.lists(st.integers(-2, 6), max_size=3),
                "data_offsets": st.lists(st.integers(-4, 200), min_size=0, max_size=3),
            }
        ),
        max_size=4,
    ),
    payload=st.binary(max_size=200),
)
def test_random_headers_open_or_fail_cleanly(tmp_path: Path, header: dict, payload: bytes) -> None:
    raw = json.dumps(header).encode()
    check_reader_on_bytes(tmp_path / "h.safetensors", struct.pack("<Q", len(raw)) + raw + payload)


def test_the_valid_seed_file_opens(tmp_path: Path) -> None:
    """The property is not vacuous: the unmutated seed file opens and reads back."""
    assert check_reader_on_bytes(tmp_path / "ok.safetensors", safetensors_bytes()) == "opened"
