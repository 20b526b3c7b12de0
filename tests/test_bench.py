"""bench: JSON schema, provider fallback and exit 3, and a sanity check that two identical
models time alike (loose bounds: a sanity check of the interleaving, not a speed test)."""

from __future__ import annotations

import json
import statistics

import pytest

from normtool import bench as bench_mod
from normtool.errors import DeviceUnavailable
from normtool.runtime import ort
from normtool.timing import interleaved, percentile, summarize
from tests.conftest import cli, run_cli
from tests.factories_ref import make_reference_transformer


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_reference_transformer(tmp_path_factory.mktemp("bench"), name="lm", causal=True)


def test_json_schema_and_ratio_of_identical_models(tiny_lm):
    r = run_cli(
        "bench",
        tiny_lm,
        tiny_lm,
        "--provider",
        "cpu",
        "--batch",
        "1,2",
        "--seq",
        "4,8",
        "--warmup",
        "3",
        "--iters",
        "40",
        "--threads",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["provider"] == "cpu" and d["requested_provider"] == "cpu"
    assert set(d["versions"]) >= {"normtool", "onnxruntime", "onnx", "torch", "python"}
    assert [(x["batch"], x["seq"]) for x in d["results"]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    for res in d["results"]:
        first, second = res["models"]
        assert first["ratio"] == 1.0
        for m in (first, second):
            assert set(m) >= {
                "model",
                "median_ms",
                "p90_ms",
                "p99_ms",
                "throughput",
                "ratio",
                "runs",
            }
            assert 0 < m["median_ms"] <= m["p90_ms"] <= m["p99_ms"]
            assert m["runs"] == 40
        # the same model twice: interleaved medians agree within a generous factor
        assert 0.5 < second["ratio"] < 2.0


def test_auto_falls_back_to_cpu_and_says_so(tiny_lm, monkeypatch):
    def no_accelerator(model, provider, threads, tf32, options=None):
        return None, "simulated: no GPU"

    monkeypatch.setattr(ort, "_try_accelerator", no_accelerator)
    d = bench_mod.run_bench([tiny_lm], "auto", [1], [4], warmup=1, iters=3)
    assert d["provider"] == "cpu"
    assert "simulated: no GPU" in d["fallback"] and "CPU" in d["fallback"]


def test_kept_times_are_the_rounds_summarised(tiny_lm):
    d = bench_mod.run_bench([tiny_lm, tiny_lm], "cpu", [1], [4], warmup=0, iters=5, keep_times=True)
    for row in d["results"][0]["models"]:
        assert len(row["times_ms"]) == 5 == row["runs"]
        assert statistics.median(row["times_ms"]) == pytest.approx(row["median_ms"])
    plain = bench_mod.run_bench([tiny_lm], "cpu", [1], [4], warmup=0, iters=2)
    assert "times_ms" not in plain["results"][0]["models"][0]


def test_cuda_requested_without_gpu_is_exit_3(tiny_lm, monkeypatch):
    monkeypatch.setattr(ort, "_try_accelerator", lambda *a: (None, "simulated: no GPU"))
    with pytest.raises(DeviceUnavailable) as e:
        bench_mod.run_bench([tiny_lm], "cuda", [1], [4], warmup=1, iters=3)
    assert e.value.exit_code == 3


def test_cli_exit_3_when_cuda_unusable_here(tiny_lm):
    r = cli("bench", tiny_lm, "--provider", "cuda", "--iters", "2", "--warmup", "0")
    if r.returncode == 0:
        pytest.skip("a working CUDA provider is present on this machine")
    assert r.returncode == 3, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "cuda" in r.stderr.lower()


def test_bad_flags_exit_2(tiny_lm):
    assert cli("bench", tiny_lm, "--batch", "x").returncode == 2
    assert cli("bench", tiny_lm, "--dtype", "int8").returncode == 2
    assert cli("bench", tiny_lm.parent / "missing.onnx").returncode == 2


def test_timing_helpers():
    calls = []
    t = interleaved([lambda: calls.append("a"), lambda: calls.append("b")], warmup=1, iters=4)
    assert [len(x) for x in t] == [4, 4]
    assert calls[:2] == ["a", "b"] and calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile(list(range(1, 101)), 90) == 90
    s = summarize([0.001, 0.002, 0.003], items_per_call=8)
    assert s["median_ms"] == pytest.approx(2.0) and s["throughput"] == pytest.approx(4000)


def test_cuda_graph_refused_on_cpu_and_unused_after_fallback(tiny_lm, monkeypatch):
    """--cuda-graph with --provider cpu is a bad flag combination (exit 2); with auto on a
    machine without CUDA it runs on the CPU, reports cuda_graph false and says why."""
    r = cli("bench", tiny_lm, "--provider", "cpu", "--cuda-graph", "--iters", "1")
    assert r.returncode == 2 and "cuda-graph" in r.stderr
    asked = []

    def no_accelerator(model, provider, threads, tf32, options=None):
        asked.append(options)
        return None, "simulated: no GPU"

    monkeypatch.setattr(ort, "_try_accelerator", no_accelerator)
    d = bench_mod.run_bench([tiny_lm], "auto", [1], [4], warmup=0, iters=2, cuda_graph=True)
    assert asked == [{"enable_cuda_graph": "1"}]
    assert d["provider"] == "cpu" and d["cuda_graph"] is False
    assert "CUDA graph not used" in d["fallback"]
