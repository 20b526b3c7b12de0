"""Benchmark weight matching: time and sweeps for model pairs; writes the ``bench_merge``
section of BENCHMARKS.md (other sections are left untouched).

Pairs (random weights, built here — nothing is downloaded):
* two GPT-2-small-shaped models (Hugging Face GPT2LMHeadModel, 124M distinct parameters,
  12 layers of 12 heads, d=768, vocabulary 50257) from different seeds — the issue's target: ≤ 60 s;
* the same, B being a random head-structured permutation of A (weight matching must recover it
  exactly);
* two 4-layer 512-wide MLPs (784 → 512 → 512 → 512 → 512 → 10) from different seeds.

Matching runs with ``torch.set_num_threads(2)`` (the issue's "2 CPU cores"). Timed: the weight
matching call alone (loading excluded), and a whole ``merge_models`` (load weights, match,
verify the permutation, interpolate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit import factories
from devkit.publish import write_section
from normtool.load import load_model
from normtool.merge.groups import permutation_groups
from normtool.merge.matching import distinct_tensors, weight_matching
from normtool.merge.merge import MergeOptions, as_float32, load_weights, merge_models
from normtool.merge.permute import invert, permute_weights, random_perms
from normtool.model import Model

START, END = "<!-- bench_merge:start -->", "<!-- bench_merge:end -->"
GPT2_QUICK = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 500, "n_positions": 64}


def make_gpt2(folder: Path, seed: int, shape: dict[str, int]) -> Path:
    return factories.make_gpt2(folder, seed, noise=0, **shape)


def make_mlp(path: Path, seed: int, widths: list[int]) -> Path:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)]
    sd = {f"{2 * i}.{k}": v for i, m in enumerate(layers) for k, v in m.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def time_matching(a: Model, b: Model, known: dict | None = None) -> dict[str, Any]:
    g = a.graph
    groups, _ = permutation_groups(g)
    wa, wb = as_float32(load_weights(a)), as_float32(load_weights(b))
    if known is not None:
        wb = permute_weights(g, wa, known)
    t0, c0 = time.perf_counter(), time.process_time()
    r = weight_matching(g, groups, wa, wb, max_iter=100, seed=0)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {
        "params": sum(wa[n].numel() for n in distinct_tensors(g)),
        "groups": len(groups),
        "head_groups": sum(1 for gr in groups if gr.heads),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "sweeps": r.sweeps,
        "objective_before": r.objective_before,
        "objective_after": r.objective_after,
    }
    if known is not None:
        undo = invert(known)
        out["recovered"] = all(torch.equal(r.perms[s], undo[s]) for s in undo)
    return out


def time_merge(a: Model, b: Model) -> float:
    t0 = time.perf_counter()
    merge_models([a, b], MergeOptions())
    return time.perf_counter() - t0


def run(quick: bool) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        shape = GPT2_QUICK if quick else factories.GPT2_SMALL
        ga = load_model(make_gpt2(d / "gpt2_a", 0, shape))
        gb = load_model(make_gpt2(d / "gpt2_b", 1, shape))
        name = "GPT-2-small-shaped" if not quick else "GPT-2 (quick shape)"
        r = time_matching(ga, gb)
        r.update(pair=f"{name}, seeds 0 and 1", merge_seconds=time_merge(ga, gb))
        results.append(r)
        groups, _ = permutation_groups(ga.graph)
        known = random_perms(ga.graph, groups, torch.Generator().manual_seed(7))
        r = time_matching(ga, ga, known)
        r.update(pair=f"{name}, B = random permutation of A")
        results.append(r)
        widths = [784, 512, 512, 512, 512, 10] if not quick else [32, 64, 64, 64, 64, 10]
        ma = load_model(make_mlp(d / "mlp_a.safetensors", 0, widths))
        mb = load_model(make_mlp(d / "mlp_b.safetensors", 1, widths))
        r = time_matching(ma, mb)
        r.update(pair=f"MLP {'-'.join(map(str, widths))}, seeds 0 and 1")
        r["merge_seconds"] = time_merge(ma, mb)
        results.append(r)
    return results


def to_markdown(results: list[dict[str, Any]], quick: bool) -> str:
    lines = [
        START,
        "## merge: weight matching",
        "",
        f"`python scripts/bench_merge.py` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, `torch.set_num_threads(2)`; random weights built by the "
        "script. Matching: identity start, seeded random group order, stop after a sweep "
        "without improvement (max 100).",
        "",
        "| pair | parameters | groups (head groups) | sweeps | matching s (wall) | "
        "matching CPU s | whole merge s (wall) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rec = ""
        if "recovered" in r:
            rec = " (permutation recovered exactly)" if r["recovered"] else " (NOT recovered)"
        merge_s = f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "—"
        lines.append(
            f"| {r['pair']}{rec} | {r['params']:,} | {r['groups']} ({r['head_groups']}) | "
            f"{r['sweeps']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {merge_s} |"
        )
    lines += [
        "",
        "- Target: the GPT-2-small-shaped pair in ≤ 60 s of matching.",
        '- "whole merge": load weights, match, verify that the permuted model computes its '
        "original function (fp64 executor), interpolate; writing excluded.",
        "- CPU s: process CPU time of both threads; the work never waits on I/O, so it bounds "
        "the wall time on two idle cores from above. 1-minute load average when the run "
        f"ended: {os.getloadavg()[0]:.2f}.",
    ]
    if quick:
        lines.append("- `--quick`: tiny shapes — a smoke run, not a measurement.")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    results = run(args.quick)
    print(json.dumps(results, indent=2))
    md = to_markdown(results, args.quick)
    print(md)
    if not args.no_write:
        write_section(args.output, START, END, md)


if __name__ == "__main__":
    main()
