"""The hostile battery script stays runnable and its classes mean what they say.

The whole matrix (``scripts/hostile_battery.py``, minutes) is a benchmark; here a few of its
cases run through two commands each, and the classifier is checked on runs whose class is
known: a pickle payload must never run, a FIFO must never hang, and every run must end in a
clean refusal.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import hostile_battery as hb  # noqa: E402


def test_a_few_cases_end_in_clean_refusals():
    runs = hb.battery(ROOT, quick=True, limit=60, workers=2, only=["pickle", "FIFO input"])
    assert {r["case"] for r in runs} == {"pickle payload", "FIFO input"}
    assert len(runs) == 4
    assert all(r["class"] == "clean refusal" for r in runs), runs


def test_classes_are_assigned_worst_first(tmp_path):
    case = hb.Case("c", tmp_path / "m.safetensors", must_fail={"verify"})
    case.dir = tmp_path
    args = ["verify", str(case.model)]
    one = "normtool: error: m.safetensors: bad\n"
    assert hb.classify(case, "verify", args, 2, one, {}, {}) == "clean refusal"
    assert hb.classify(case, "verify", args, 0, "", {}, {}) == "data written wrongly"
    assert hb.classify(case, "inspect", args, 0, "", {}, {}) == "accepted"
    assert hb.classify(case, "verify", args, None, "", {}, {}) == "hang"
    assert hb.classify(case, "inspect", args, 1, "Traceback (most", {}, {}) == "traceback"
    assert hb.classify(case, "inspect", args, 134, "", {}, {}) == "traceback"
    leaked = "normtool: error: unexpected KeyError: 'x'\n"
    assert hb.classify(case, "inspect", args, 2, leaked, {}, {}) == "leaked exception"
    assert hb.classify(case, "inspect", args, 2, "normtool: error: bad\n", {}, {}) == "unnamed"
    assert hb.classify(case, "inspect", args, 2, one, {"f": "a"}, {"f": "b"}) == (
        "data written wrongly"
    )
    (tmp_path / ".out.tmp-1-abc").write_bytes(b"")
    assert hb.classify(case, "inspect", args, 2, one, {}, {}) == "temp files left"
    (tmp_path / hb.MARKER).write_bytes(b"")
    assert hb.classify(case, "inspect", args, 2, one, {}, {}) == "code executed"
