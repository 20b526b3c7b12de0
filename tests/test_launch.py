"""The entry point's allocator tuning: freed activations are reused, not faulted in afresh.

Checked in fresh interpreters by the kernel's count of minor page faults over two repeated
passes of a chain of elementwise steps (64 MiB float64 activations, the size class glibc maps
afresh by default): the tuned process reuses its freed blocks (few faults), the control — the
same code with glibc's defaults — takes a fresh page for every 4 KiB of every activation.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "tuned":
    from normtool.launch import _keep_freed_memory
    _keep_freed_memory()
def run():
    x = torch.ones(8 << 20, dtype=torch.float64)  # 64 MiB
    for _ in range(6):
        x = (x * 0.5 + 1.0).sin()  # two fresh 64 MiB activations per step
    return float(x[0])
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run(); run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


TUNED_ELSEWHERE = any(
    k == "LD_PRELOAD" or k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(TUNED_ELSEWHERE, reason="the control needs glibc's default allocator")
def test_freed_activations_are_reused():
    default = _faults("default")
    # 2 × 19 activations of 64 MiB: ~16k fresh 4 KiB pages each without reuse
    assert default > 100_000
    assert _faults("tuned") < 0.1 * default
