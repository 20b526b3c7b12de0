"""Benchmark ``normtool fold`` with ONNX Runtime: is a folded UN network as fast as no norm at all?

For a ViT-B/16-shaped and a GPT-2-small-shaped network (random weights, Unified Normalization
with random trained-looking running statistics) four variants of the SAME network are exported
with normtool's ONNX emitter and timed in interleaved rounds (``normtool.bench.run_bench``):

* ``un-folded``   — ``fold_norms`` output: the norms are gone, their maps live in the linears;
* ``un-unfolded`` — the original: each UN is a ``Mul`` + ``Add`` with precomputed scale/shift;
* ``layernorm``   — every UN replaced by a LayerNorm with the same γ, β (what UN replaces);
* ``no-norm``     — every norm deleted: the ceiling a fold can reach.

Reported per shape and batch: median and p90 latency, the ratios folded / no-norm (target ≤ 1.01)
and folded / LayerNorm, the ORT output difference folded vs unfolded, and the peak memory of
each ORT session (resident-set growth of a fresh process while the session is created and run
three times: weights, arena and activations; CPU provider only — a GPU's memory is not in RSS).

Usage: ``python scripts/bench_fold.py [--quick] [--provider auto|cpu|cuda] [--no-write]``.
``--quick`` uses tiny shapes and few runs (a smoke test; its numbers mean nothing). Results go
to the ``bench_fold`` section of BENCHMARKS.md (other sections are left untouched).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit.publish import write_section
from normtool.bench import run_bench
from normtool.export import export_model
from normtool.graph import Graph
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.model import Model
from normtool.nn import ReferenceTransformer, UnifiedNorm, transformer_config
from normtool.nn.save import save_reference
from normtool.passes.fold import fold_norms
from normtool.timing import percentile

START, END = "<!-- bench_fold:start -->", "<!-- bench_fold:end -->"

SHAPES = {
    # name: (builder kwargs, full, quick)
    "ViT-B/16": (
        {
            "d": 768,
            "heads": 12,
            "layers": 12,
            "d_ff": 3072,
            "image": 224,
            "patch": 16,
            "classes": 1000,
        },
        {"d": 64, "heads": 4, "layers": 2, "d_ff": 128, "image": 32, "patch": 8, "classes": 10},
    ),
    "GPT-2 small": (
        {"d": 768, "heads": 12, "layers": 12, "d_ff": 3072, "vocab": 50257, "max_len": 1024},
        {"d": 64, "heads": 4, "layers": 2, "d_ff": 128, "vocab": 500, "max_len": 64},
    ),
}


def _un_state(prefix: str, d: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A UnifiedNorm's state dict (reference keys) with trained-looking statistics."""
    sd = {f"{prefix}.{k}": v.clone() for k, v in UnifiedNorm(d).state_dict().items()}
    sd[f"{prefix}.weight"] = 1 + 0.3 * torch.randn(d, generator=g)
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(d, generator=g)
    sd[f"{prefix}.running_var"] = torch.rand(d, generator=g) * 2 + 0.2
    return sd


def make_vit(
    out: Path, d: int, heads: int, layers: int, d_ff: int, image: int, patch: int, classes: int
) -> Model:
    """A timm-layout ViT state dict with UN norms (random weights, std 0.02)."""
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return 0.02 * torch.randn(*shape, generator=g)

    tokens = (image // patch) ** 2 + 1
    sd = {
        "patch_embed.proj.weight": w(d, 3, patch, patch),
        "patch_embed.proj.bias": w(d),
        "cls_token": w(1, 1, d),
        "pos_embed": w(1, tokens, d),
        "head.weight": w(classes, d),
        "head.bias": w(classes),
        **_un_state("norm", d, g),
    }
    for i in range(layers):
        p = f"blocks.{i}"
        sd |= _un_state(f"{p}.norm1", d, g) | _un_state(f"{p}.norm2", d, g)
        sd |= {
            f"{p}.attn.qkv.weight": w(3 * d, d),
            f"{p}.attn.qkv.bias": w(3 * d),
            f"{p}.attn.proj.weight": w(d, d),
            f"{p}.attn.proj.bias": w(d),
            f"{p}.mlp.fc1.weight": w(d_ff, d),
            f"{p}.mlp.fc1.bias": w(d_ff),
            f"{p}.mlp.fc2.weight": w(d, d_ff),
            f"{p}.mlp.fc2.bias": w(d),
        }
    path = out / "vit_un.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return load_model(path, heads=heads)


def make_gpt(
    out: Path, d: int, heads: int, layers: int, d_ff: int, vocab: int, max_len: int
) -> Model:
    """normtool's reference transformer, GPT-2-shaped (causal LM, gelu), with UN norms."""
    cfg = transformer_config(
        vocab_size=vocab,
        max_len=max_len,
        d_model=d,
        heads=heads,
        layers=layers,
        d_ff=d_ff,
        norm="un",
        causal=True,
    )
    torch.manual_seed(0)
    model = ReferenceTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, UnifiedNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(d, generator=g))
                m.bias.copy_(0.1 * torch.randn(d, generator=g))
                m.running_var.copy_(torch.rand(d, generator=g) * 2 + 0.2)
    path = save_reference(model.eval(), out / "gpt_un.safetensors", force=True)
    return load_model(path)


def _variant(model: Model, kind: str) -> Model:
    """The same network with every UN replaced by a LayerNorm (same γ, β) or deleted."""
    g = model.graph.copy()
    alias: dict[str, str] = {}
    ops = []
    for op in g.ops:
        op.inputs = tuple(alias.get(v, v) for v in op.inputs)
        if op.kind != "unorm":
            ops.append(op)
        elif kind == "no-norm":
            alias[op.output] = op.inputs[0]
        else:
            op.kind = "layernorm"
            op.params = {"weight": op.params["weight"], "bias": op.params["bias"]}
            ops.append(op)
    g.ops = ops
    used = {t for o in g.ops for t in o.params.values()}
    g.tensors = {k: v for k, v in g.tensors.items() if k in used}
    g.validate()
    return Model(g, model.checkpoint, dict(model.overrides))


PROBE = """
import json, sys
import numpy as np, onnxruntime as ort

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # kB -> MiB

path, feeds = sys.argv[1], json.loads(sys.argv[2])
arrays = {n: (np.random.randint(0, v["vocab"], v["shape"]).astype(np.int64) if v["vocab"]
              else np.random.randn(*v["shape"]).astype(np.float32)) for n, v in feeds.items()}
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
base = status("VmRSS")
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
for _ in range(3):
    s.run(None, arrays)
print(status("VmHWM") - base)
"""


def peak_memory_mib(onnx_path: Path, graph: Graph, batch: int, seq: int) -> float:
    """RSS growth (MiB) of a fresh process creating the CPU session and running it 3 times."""
    x = random_inputs(graph, batch, seq, seed=0)
    feeds = {
        s.name: {"shape": list(x[s.name].shape), "vocab": s.vocab if s.kind == "tokens" else 0}
        for s in graph.inputs
    }
    r = subprocess.run(
        [sys.executable, "-c", PROBE, str(onnx_path), json.dumps(feeds)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(r.stdout.strip())


def ort_difference(a: Path, b: Path, graph: Graph, batch: int, seq: int) -> float:
    """Max |Δ| of the ORT logits of two exports on the same random inputs (CPU, fp32)."""
    feeds = {
        k: v.float().numpy() if v.is_floating_point() else v.numpy()
        for k, v in random_inputs(graph, batch, seq, seed=1).items()
    }
    ya, yb = (
        onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        for p in (a, b)
    )
    return float(np.abs(ya - yb).max())


def op_types(path: Path) -> list[str]:
    """The sorted op types of an ONNX file's nodes (weights not loaded)."""
    return sorted(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def ort_optimized(path: Path, work: Path) -> tuple[list[str], list[tuple[int, ...]]]:
    """Op types and initializer shapes of the graph ONNX Runtime actually runs (CPU, default
    optimisation level): what two exports share after ORT's fusions, not just as written."""
    opts = onnxruntime.SessionOptions()
    opts.optimized_model_filepath = str(work / f"{path.stem}.ort-optimized.onnx")
    opts.log_severity_level = 3  # its note that such a file is hardware-specific: known
    onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    m = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    return sorted(n.op_type for n in m.graph.node), sorted(
        tuple(i.dims) for i in m.graph.initializer
    )


def bench_shape(name: str, model: Model, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = fold_norms(model)
    variants = {
        "un-folded": result.stored(),
        "un-unfolded": model,
        "layernorm": _variant(model, "layernorm"),
        "no-norm": _variant(model, "no-norm"),
    }
    paths = {}
    for label, m in variants.items():
        paths[label] = work / f"{name.replace('/', '_').replace(' ', '_')}-{label}.onnx"
        export_model(m, paths[label])
    seq = args.seq if any(s.kind == "tokens" for s in model.graph.inputs) else 1
    delta = ort_difference(paths["un-folded"], paths["un-unfolded"], model.graph, 1, seq)
    # an A/A control: the ceiling's file again, in a session of its own. Its ratio to the
    # ceiling is one sample of how far two sessions of one network differ on this machine.
    paths["no-norm-again"] = paths["no-norm"]
    labels = list(paths)
    rows, report = [], {}
    for batch, (warmup, iters) in args.rounds.items():
        print(
            f"  batch {batch}: {args.trials} x ({warmup} warm-up, {iters} rounds)",
            file=sys.stderr,
            flush=True,
        )
        # Trials with fresh sessions: two sessions of the very same file differed by up to 3%
        # for as long as they lived (where ORT placed their weights), so a model's speed is
        # pooled over several sessions, not taken from one.
        times: dict[str, list[float]] = {lab: [] for lab in labels}
        for _ in range(args.trials):
            report = run_bench(
                list(paths.values()),
                provider=args.provider,
                batches=(batch,),
                seqs=(seq,),
                warmup=warmup,
                iters=iters,
                threads=args.threads,
                keep_times=True,
            )
            for lab, r in zip(labels, report["results"][0]["models"], strict=True):
                times[lab] += r["times_ms"]
        med = {lab: statistics.median(t) for lab, t in times.items()}
        p90 = {lab: percentile(t, 90) for lab, t in times.items()}
        mem = {lab: peak_memory_mib(paths[lab], model.graph, batch, seq) for lab in variants}
        rows.append(
            {
                "batch": batch,
                "seq": seq if seq > 1 else None,
                "rounds": iters * args.trials,
                "trials": args.trials,
                "median_ms": med,
                "p90_ms": p90,
                "peak_mib": mem,
                "folded_vs_ceiling": med["un-folded"] / med["no-norm"],
                # the median of the per-round ratios: both calls of a round met the same
                # machine, so drift between rounds cancels (the ratio of medians does not)
                "folded_vs_ceiling_paired": statistics.median(
                    a / b for a, b in zip(times["un-folded"], times["no-norm"], strict=True)
                ),
                "ceiling_vs_itself_paired": statistics.median(
                    a / b for a, b in zip(times["no-norm-again"], times["no-norm"], strict=True)
                ),
                "folded_vs_layernorm": med["un-folded"] / med["layernorm"],
                "folded_vs_unfolded": med["un-folded"] / med["un-unfolded"],
            }
        )
    return {
        "shape": name,
        "params": model.param_count(),
        "fold": result.summary(),
        "ort_max_abs_folded_vs_unfolded": delta,
        "nodes": {lab: len(op_types(paths[lab])) for lab in variants},
        "folded_ops_equal_ceiling": op_types(paths["un-folded"]) == op_types(paths["no-norm"]),
        "ort_graph_equal_ceiling": ort_optimized(paths["un-folded"], work)
        == ort_optimized(paths["no-norm"], work),
        "provider": report["provider"],
        "device": report["device"],
        "versions": report["versions"],
        "date": report["date"],
        "threads": args.threads,
        "rows": rows,
    }


def to_markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    r0 = results[0]
    lines = [
        START,
        "## fold: folded Unified Normalization vs unfolded, LayerNorm and no norm (ONNX Runtime)",
        "",
        f"`python scripts/bench_fold.py{' --quick' if args.quick else ''}` — provider "
        f"**{r0['provider']}** ({r0['device']}), {r0['date']}, onnxruntime "
        f"{r0['versions'].get('onnxruntime', onnxruntime.__version__)}, fp32, ORT threads "
        f"{args.threads or 'default'}; interleaved rounds (after warm-up) per row as listed, pooled over "
        f"{args.trials} trials with fresh sessions, "
        "median (p90) ms. Same network in every "
        "column (random weights; UN with random trained-looking statistics); `folded` is the "
        "output of `normtool fold`. Ratios are of medians measured in the same rounds; "
        "folded / ceiling (paired) is the median of each round's ratio of the two calls; A/A: "
        "the same for the ceiling's own file in a second session — one sample of how far two "
        "sessions of one network differ on this machine (such pairs measured 0.965-1.035 "
        "across runs; session placement, not rounds, dominates). Peak "
        "memory: RSS growth of a fresh process while the CPU session is created and run once. "
        "ORT max abs Δ: logits of the folded vs the unfolded export, batch 1.",
        "",
        "| shape | batch | rounds | UN folded | UN unfolded | LayerNorm | no norm (ceiling) | folded / ceiling "
        "| folded / ceiling (paired) | A/A (paired) | folded / LN | folded / unfolded | peak MiB folded / unfolded / LN / none | ORT max abs Δ |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            cell = {k: f"{r['median_ms'][k]:.2f} ({r['p90_ms'][k]:.2f})" for k in r["median_ms"]}
            mem = " / ".join(
                f"{r['peak_mib'][k]:.0f}"
                for k in ("un-folded", "un-unfolded", "layernorm", "no-norm")
            )
            seq = f", seq {r['seq']}" if r["seq"] and r["seq"] > 1 else ""
            lines.append(
                f"| {res['shape']}{seq} | {r['batch']} | {r['rounds']} | {cell['un-folded']} | {cell['un-unfolded']} "
                f"| {cell['layernorm']} | {cell['no-norm']} | {r['folded_vs_ceiling']:.3f} "
                f"| {r['folded_vs_ceiling_paired']:.3f} | {r['ceiling_vs_itself_paired']:.3f} "
                f"| {r['folded_vs_layernorm']:.3f} | {r['folded_vs_unfolded']:.3f} | {mem} "
                f"| {res['ort_max_abs_folded_vs_unfolded']:.1e} |"
            )
    lines.append("")
    for r in results:
        same = "the same" if r["folded_ops_equal_ceiling"] else "NOT the same"
        ort_same = "identical" if r["ort_graph_equal_ceiling"] else "NOT identical"
        nodes = ", ".join(f"{k} {v}" for k, v in r["nodes"].items())
        lines.append(
            f"- {r['shape']}: {r['params']:,} parameters; {r['fold']}; ONNX nodes: {nodes} — "
            f"the folded export has {same} op multiset as the no-norm ceiling, and the graph ONNX "
            f"Runtime runs after its fusions is {ort_same} to the ceiling's in ops and weight "
            "shapes: only weight values differ."
        )
    if args.quick:
        lines.append("- `--quick`: tiny shapes and few rounds — a smoke run, not a measurement.")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke test)")
    ap.add_argument(
        "--provider", default="auto", help="auto (CUDA if it runs, else CPU), cpu, cuda"
    )
    ap.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = ap.parse_args()
    # batch → (warm-up calls, interleaved rounds per trial), each trial with fresh sessions:
    # many short trials beat one long one, since a session keeps its speed for its lifetime
    args.rounds = {1: (1, 3), 8: (1, 3)} if args.quick else {1: (2, 10), 8: (1, 5)}
    args.trials = 1 if args.quick else 6
    args.seq = 16 if args.quick else 64
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fold-") as tmp:
        work = Path(tmp)
        for name, (full, quick) in SHAPES.items():
            kw = quick if args.quick else full
            model = make_vit(work, **kw) if name.startswith("ViT") else make_gpt(work, **kw)
            print(f"{name}: {model.param_count():,} parameters", file=sys.stderr, flush=True)
            results.append(bench_shape(name, model, work, args))
    md = to_markdown(results, args)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if not args.no_write:
        write_section(args.output, START, END, md)


if __name__ == "__main__":
    main()
