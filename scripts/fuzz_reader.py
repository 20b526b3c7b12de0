"""Long fuzzing run of the checkpoint reader (the CI tests run a few hundred cases).

Usage: python scripts/fuzz_reader.py [--cases 10000]
Prints how many mutated files opened and how many were refused cleanly; any other exception
fails the run with hypothesis's minimal failing example.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from devkit.fuzz_property import check_reader_on_bytes, mutations


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=10_000)
    args = ap.parse_args()
    outcomes: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "f.safetensors"

        @settings(
            max_examples=args.cases,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(data=mutations())
        def run(data: bytes) -> None:
            outcomes[check_reader_on_bytes(target, data)] += 1

        run()
    total = sum(outcomes.values())
    print(
        f"{total} cases: {outcomes['opened']} opened, {outcomes['refused']} refused cleanly, 0 crashed"
    )


if __name__ == "__main__":
    main()
