"""Benchmark convert-ln-to-rms: ONNX Runtime latency of LayerNorm vs RMSNorm vs CRMSNorm vs no norm,
and the cost of converting a GPT-2-medium-sized checkpoint.

Latency: a GPT-2-small-shaped LM (12 layers, d=768, 12 heads; batch 1/8 × seq 128/512) and a
ViT-B/16-shaped classifier (batch 1/8), random weights (speed does not depend on their values).
Each model is exported by normtool's emitter in four forms — the original (LayerNormalization),
the RMS conversion, the CRMS conversion (stream width d−1 = 767) and the *ceiling*: the RMS
network with every norm removed — plus the RMS conversion emitted at opset 22 (the decomposed
norm ORT fuses into SimplifiedLayerNormalization) to check the emitter's choice of form. All
forms run interleaved round by round (normtool.timing) so drift hits them alike; medians, p90
and ratios against the original come from the same run.

Conversion cost: a GPT-2-medium-shaped fp32 checkpoint (24 layers, d=1024, ~1.4 GB; generated
here, deleted afterwards) converted with ``normtool convert-ln-to-rms --no-verify`` against a
plain ``safetensors`` load + save of the same file; wall time and peak RSS (``/usr/bin/time -v``)
of fresh processes, RSS reported above an idle ``python -c "import torch"``.

Writes the raw results as JSON and this script's own section of BENCHMARKS.md (other sections
are left untouched). ``--quick``: batch 1 × seq 128 only, few rounds, a 6-layer checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnxruntime
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit import factories
from devkit.proc import time_v
from devkit.publish import publish
from normtool.graph import Graph
from normtool.inputs import random_inputs
from normtool.io.safetensors_format import write_stream
from normtool.load import load_model
from normtool.model import Model
from normtool.passes.ln_to_rms import convert_ln_to_rms
from normtool.runtime.onnx_emit import EmitOptions, emit_onnx
from normtool.runtime.ort import create_session
from normtool.timing import interleaved, summarize

START, END = "<!-- bench_ln_to_rms:start -->", "<!-- bench_ln_to_rms:end -->"
FORMS = ["layernorm", "rms", "crms", "rms@opset22", "no-norm"]


# ---- models ---------------------------------------------------------------------------------


def gpt2_small(folder: Path) -> Path:
    return factories.make_gpt2(folder, noise=0, **factories.GPT2_SMALL)


def vit_base(folder: Path) -> Path:
    return factories.make_vit(folder, noise=0, **factories.VIT_B16)


def without_norms(graph: Graph) -> Graph:
    """The ceiling: the same network with every norm op removed (its readers read its input)."""
    g = graph.copy()
    for op in [o for o in g.ops if o.kind in ("layernorm", "rmsnorm", "crmsnorm")]:
        for c in g.ops:
            c.inputs = tuple(op.inputs[0] if v == op.output else v for v in c.inputs)
        g.outputs = [op.inputs[0] if v == op.output else v for v in g.outputs]
        g.ops.remove(op)
    used = {t for o in g.ops for t in o.params.values()}
    g.tensors = {k: v for k, v in g.tensors.items() if k in used}
    g.validate()
    return g


def forms(model: Model) -> dict[str, tuple[Graph, Any, EmitOptions]]:
    rms = convert_ln_to_rms(model, compressed=False).stored()
    crms = convert_ln_to_rms(model, compressed=True).stored()
    # materialise once: every form's export reads the tensors, the thunks recompute them
    rms_w = {k: rms.tensor(k) for k in rms.graph.tensors}
    crms_w = {k: crms.tensor(k) for k in crms.graph.tensors}
    return {
        "layernorm": (model.graph, model.weights(), EmitOptions()),
        "rms": (rms.graph, rms_w, EmitOptions()),
        "crms": (crms.graph, crms_w, EmitOptions()),
        "rms@opset22": (rms.graph, rms_w, EmitOptions(opset=22)),
        "no-norm": (without_norms(rms.graph), rms_w, EmitOptions()),
    }


def bench_model(
    label: str, folder: Path, shapes: list[tuple[int, int]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    model = load_model(folder)
    sessions, providers, node_types = {}, set(), {}
    for name, (graph, weights, opts) in forms(model).items():
        onnx_model = emit_onnx(graph, weights, opts)
        node_types[name] = sorted(
            {n.op_type for n in onnx_model.graph.node if "Norm" in n.op_type or n.op_type == "Pow"}
        )
        s = create_session(onnx_model.SerializeToString(), args.provider, args.threads)
        sessions[name] = s
        providers.add(s.provider)
        del onnx_model
    rows = []
    for batch, seq in shapes:
        feeds = random_inputs(model.graph, batch, seq, 0)
        feeds = {k: (v.float() if v.is_floating_point() else v) for k, v in feeds.items()}
        runners = [lambda s=sessions[f], x=feeds: s.run(x) for f in FORMS]
        big = batch * seq >= 2048
        iters = args.iters_big if big else args.iters
        times = interleaved(runners, warmup=1 if big else 2, iters=iters)
        stats = {f: summarize(t, batch) for f, t in zip(FORMS, times, strict=True)}
        base = stats["layernorm"]["median_ms"]
        rows.append(
            {
                "model": label,
                "batch": batch,
                "seq": seq,
                "stats": stats,
                "ratio_vs_layernorm": {f: stats[f]["median_ms"] / base for f in FORMS},
                "providers": sorted(providers),
            }
        )
        print(
            label, batch, seq, {f: round(r, 4) for f, r in rows[-1]["ratio_vs_layernorm"].items()}
        )
    for r in rows:
        r["norm_nodes"] = node_types
    return rows


# ---- conversion cost ------------------------------------------------------------------------


def gpt2_medium_checkpoint(folder: Path, layers: int) -> Path:
    """A GPT-2-medium-shaped HF folder of random fp32 weights, streamed to disk tensor by tensor."""
    config, shapes = factories.gpt2_shapes(
        n_layer=layers, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    g = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        t = torch.randn(shapes[name], generator=g) * 0.02
        return t + 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else t

    specs = [(k, torch.float32, s) for k, s in shapes.items()]
    with (folder / "model.safetensors").open("wb") as f:
        write_stream(f, specs, produce, {"format": "pt"})
    return folder


_PLAIN = (
    "import sys; from safetensors.torch import load_file, save_file; "
    "save_file(load_file(sys.argv[1]), sys.argv[2])"
)


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds, peak RSS (MB) and user/system CPU seconds of a fresh process."""
    r = time_v(cmd, env)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return {
        "wall_s": r.wall_s,
        "peak_rss_mb": r.peak_rss_kib / 1024,
        "user_s": r.user_s,
        "sys_s": r.sys_s,
    }


def conversion_cost(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    layers = 6 if args.quick else 24
    folder = gpt2_medium_checkpoint(work / "gpt2m", layers)
    ck = folder / "model.safetensors"
    size_mb = ck.stat().st_size / 2**20
    py = sys.executable
    cmds = {
        "idle": [py, "-c", "import torch"],
        "plain": [py, "-c", _PLAIN, str(ck), str(work / "plain.safetensors")],
        "convert": [
            py, "-m", "normtool", "--quiet", "convert-ln-to-rms", str(folder),
            "-o", str(work / "conv.safetensors"), "--no-verify", "--force",
        ],
    }  # fmt: skip
    envs: dict[str, dict[str, str]] = {}
    if args.baseline_tree is not None:  # the same command from another checkout (-P: not cwd's)
        cmds["baseline"] = [py, "-P", *cmds["convert"][1:]]
        envs["baseline"] = {**os.environ, "PYTHONPATH": str(args.baseline_tree.resolve())}
    outputs = [work / "plain.safetensors", work / "conv.safetensors"]
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in cmds}
    for _ in range(args.cost_repeats):  # interleaved, like the latency rounds
        for k, cmd in cmds.items():
            for o in outputs:  # neither process pays for deleting a previous output
                o.unlink(missing_ok=True)
            runs[k].append(measured(cmd, envs.get(k)))
    # once, the default command: conversion plus its self-check (fp64 and fp32 runs of both
    # models on every position and a batch of short sequences) — a model run, reported apart
    outputs[1].unlink(missing_ok=True)
    verified = measured([c for c in cmds["convert"] if c != "--no-verify"])
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in runs.items()}
    idle = med["idle"]["peak_rss_mb"]
    return {
        "layers": layers,
        "max_seq": 1024,
        "checkpoint_mb": size_mb,
        "runs": runs,
        "median": med,
        "wall_ratio": med["convert"]["wall_s"] / med["plain"]["wall_s"],
        # the fastest of each: what the work costs when the machine gets in its way least
        "best_wall_ratio": min(x["wall_s"] for x in runs["convert"])
        / min(x["wall_s"] for x in runs["plain"]),
        "user_cpu_ratio": med["convert"]["user_s"] / med["plain"]["user_s"],
        "convert_rss_above_idle_mb": med["convert"]["peak_rss_mb"] - idle,
        "plain_rss_above_idle_mb": med["plain"]["peak_rss_mb"] - idle,
        "convert_rss_ratio": (med["convert"]["peak_rss_mb"] - idle) / size_mb,
        "verified": verified,
        "baseline_tree": str(args.baseline_tree) if args.baseline_tree else None,
        "baseline_wall_ratio": (
            med["convert"]["wall_s"] / med["baseline"]["wall_s"] if "baseline" in med else None
        ),
    }


# ---- report ---------------------------------------------------------------------------------


def to_markdown(
    rows: list[dict[str, Any]], cost: dict[str, Any] | None, meta: dict, cost_meta: dict
) -> str:
    lines = [
        START,
        "## convert-ln-to-rms (`scripts/bench_ln_to_rms.py`)",
        "",
        f"{meta['when']}, {meta['machine']}; ONNX Runtime {meta['ort']}, provider(s): "
        f"{', '.join(sorted({p for r in rows for p in r['providers']})) or '-'}; "
        f"threads: {meta['threads'] or 'ORT default'}; 1-min load average "
        f"{meta['load_avg_start']:.1f} → {meta['load_avg_end']:.1f} (other jobs share the "
        "CPUs when it exceeds the CPU count). Median ms of interleaved rounds "
        "(p90 in brackets); ratio = median / LayerNorm median in the same run.",
        "",
        "| model | batch×seq | LayerNorm | RMS | CRMS | RMS@opset22 | no norm | RMS ratio | "
        "CRMS ratio | opset22 ratio | ceiling ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cell = {
            f: f"{r['stats'][f]['median_ms']:.1f} ({r['stats'][f]['p90_ms']:.1f})" for f in FORMS
        }
        q = r["ratio_vs_layernorm"]
        lines.append(
            f"| {r['model']} | {r['batch']}×{r['seq']} | {cell['layernorm']} | {cell['rms']} "
            f"| {cell['crms']} | {cell['rms@opset22']} | {cell['no-norm']} | {q['rms']:.3f} "
            f"| {q['crms']:.3f} | {q['rms@opset22']:.3f} | {q['no-norm']:.3f} |"
        )
    if rows:
        lines.append("")
        lines.append(f"- rounds per shape: {meta['iters']} (≥2048 tokens: {meta['iters_big']}).")
        for label in dict.fromkeys(r["model"] for r in rows):
            nodes = next(r["norm_nodes"] for r in rows if r["model"] == label)
            lines.append(
                f"- {label} norm nodes per form: "
                + "; ".join(f"{f}: {', '.join(v) or 'none'}" for f, v in nodes.items())
            )
    if cost is not None:
        m = cost["median"]

        def span(k: str) -> str:
            walls = [x["wall_s"] for x in cost["runs"][k]]
            return f"{min(walls):.2f}-{max(walls):.2f}"

        lines += [
            "",
            f"Conversion cost ({cost_meta['when']}; 1-min load average "
            f"{cost_meta['load_avg_cost']:.1f} before), GPT-2-medium-shaped fp32 checkpoint "
            f"({cost['layers']} layers, "
            f"{cost['checkpoint_mb']:.0f} MiB), medians of {len(cost['runs']['idle'])} "
            "interleaved fresh processes:",
            "",
            "| process | wall s | user CPU s | system CPU s | peak RSS MiB | RSS above idle MiB |",
            "|---|---|---|---|---|---|",
        ]
        for k, label in (
            ("idle", "python -c 'import torch'"),
            ("plain", "safetensors load_file + save_file"),
            ("convert", "normtool convert-ln-to-rms --no-verify"),
            ("baseline", f"the same, from {cost['baseline_tree']}"),
        ):
            if k not in m:
                continue
            above = m[k]["peak_rss_mb"] - m["idle"]["peak_rss_mb"]
            lines.append(
                f"| {label} | {m[k]['wall_s']:.2f} | {m[k]['user_s']:.2f} | {m[k]['sys_s']:.2f} "
                f"| {m[k]['peak_rss_mb']:.0f} | {above:.0f} |"
            )
        lines += [
            "",
            f"- wall time ratio convert / plain: **{cost['wall_ratio']:.2f}** (target ≤ 1.5); "
            f"fastest run against fastest run: {cost['best_wall_ratio']:.2f}; user CPU: "
            f"{cost['user_cpu_ratio']:.2f}; "
            f"convert peak RSS above idle: **{cost['convert_rss_ratio']:.2f}×** the checkpoint "
            "size (target ≤ 0.5).",
            "- The self-check (fp64 and fp32 runs of both models) is excluded from the ratio: it "
            "is a model run, not conversion, and scales with the verification batches. The "
            f"default command with it, once: {cost['verified']['wall_s']:.1f} s, peak RSS "
            f"{cost['verified']['peak_rss_mb']:.0f} MiB (float64 logits of "
            f"{cost['max_seq']} positions × 50,257 tokens dominate).",
            *(
                [
                    f"- This tree against {cost['baseline_tree']}, same run: convert wall-time "
                    f"ratio **{cost['baseline_wall_ratio']:.2f}**, peak RSS "
                    f"{m['convert']['peak_rss_mb']:.0f} vs {m['baseline']['peak_rss_mb']:.0f} MiB."
                ]
                if cost.get("baseline_wall_ratio")
                else []
            ),
            "- Every process starts with no output file present (deleting a previous 1.4 GB "
            "output would be charged to whichever process replaces it).",
            f"- Wall time per run, fastest-slowest: plain {span('plain')} s, convert "
            f"{span('convert')} s. The plain save writes through the page cache, whose new pages this virtual "
            "machine hands out at an erratic price (its system CPU: the kernel filling them); "
            "normtool writes outputs from 256 MiB on with direct I/O (`normtool/io/sink.py`), "
            "which runs at the disk's speed every time; so the median ratio moves with the plain "
            "save's luck, and the fastest-against-fastest ratio compares both at their least "
            "disturbed.",
        ]
    if meta["quick"]:
        lines.append("- `--quick`: one shape, few rounds, a 6-layer checkpoint — a smoke run.")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one shape, few rounds, small checkpoint")
    ap.add_argument("--provider", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    ap.add_argument("--iters", type=int, default=None, help="rounds per shape")
    ap.add_argument(
        "--skip-latency", action="store_true", help="keep the latency rows of the last --json"
    )
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--cost-repeats", type=int, default=None)
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="also time the conversion from this checkout (e.g. a worktree of the previous "
        "release), interleaved, for a ratio measured in the same run",
    )
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "ln_to_rms.json")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    args.iters = args.iters or (5 if args.quick else 20)
    args.iters_big = max(3, args.iters // 4)
    args.cost_repeats = args.cost_repeats or (1 if args.quick else 2)
    gpt_shapes = [(1, 128)] if args.quick else [(1, 128), (1, 512), (8, 128), (8, 512)]
    vit_shapes = [(1, 197)] if args.quick else [(1, 197), (8, 197)]
    meta = {
        "when": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "ort": onnxruntime.__version__,
        "threads": args.threads,
        "iters": args.iters,
        "iters_big": args.iters_big,
        "quick": args.quick,
        "load_avg_start": os.getloadavg()[0],
    }
    rows: list[dict[str, Any]] = []
    cost = None
    with tempfile.TemporaryDirectory(prefix="bench_ln_to_rms_") as tmp:
        work = Path(tmp)
        if not args.skip_latency:
            rows += bench_model("GPT-2-small", gpt2_small(work / "gpt2s"), gpt_shapes, args)
            rows += bench_model("ViT-B/16", vit_base(work / "vitb"), vit_shapes, args)
        if args.skip_latency and args.json.is_file():
            prior = json.loads(args.json.read_text(encoding="utf-8"))
            rows, meta = prior["latency"], prior["meta"]
        cost_meta = {"when": time.strftime("%Y-%m-%d"), "load_avg_cost": os.getloadavg()[0]}
        if not args.skip_cost:
            cost = conversion_cost(work, args)
            print(json.dumps({k: v for k, v in cost.items() if k != "runs"}, indent=1))
    if not args.skip_latency:
        meta["load_avg_end"] = os.getloadavg()[0]
    publish(
        args.json,
        {"meta": meta, "latency": rows, "cost_meta": cost_meta, "cost": cost},
        to_markdown(rows, cost, meta, cost_meta),
        None if args.no_write else args.output,
    )


if __name__ == "__main__":
    main()
