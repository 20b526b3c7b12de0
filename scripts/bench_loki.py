"""Benchmark ``loki-head`` at scale and evaluate it on a small real example; writes the Loki
section of BENCHMARKS.md.

Scale (issue 6): tree metrics with N = 1,000 … 100,000 leaf labels and K = 1,000 observed
classes, on a classifier whose only layer is Linear(64 → K), so the head dominates. Per N, in a
fresh subprocess (so peak memory is that configuration's alone): time to read the tree, build
D² (K × N, from LCA depths — never N × N), mask duplicate columns and self-verify; peak RSS;
checkpoint and ONNX sizes (fp32 and fp16 exports); latency of the ONNX model with and without
the head on ONNX Runtime CPU, interleaved (``normtool.timing``), batch 1 and 32.

Example: an MLP trained on scikit-learn digits with classes 7, 8, 9 held out; the tree over the
10 digits is the average-linkage clustering of the class-mean images of the training split
(side information about all labels, as Loki assumes). Reports argmax vs Loki mean squared
distance and accuracy on the test split: all digits, observed digits, held-out digits.

Usage: python scripts/bench_loki.py [--sizes 1000,10000,100000] [--k 1000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit.publish import write_section

BEGIN, END = "<!-- loki-head:begin -->", "<!-- loki-head:end -->"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_random_tree(path: Path, n_leaves: int, seed: int) -> list[str]:
    """Leaves grouped under parents of 2–16 children, level by level up to one root."""
    rng = random.Random(seed)
    level = [f"l{i}" for i in range(n_leaves)]
    lines, depth = [], 0
    while len(level) > 1:
        rng.shuffle(level)
        parents, i = [], 0
        while i < len(level):
            size = rng.randint(2, 16)
            p = f"g{depth}_{len(parents)}"
            lines += [f"{c}\t{p}" for c in level[i : i + size]]
            parents.append(p)
            i += size
        level, depth = parents, depth + 1
    path.write_text("\n".join(lines) + "\n")
    return [f"l{i}" for i in range(n_leaves)]


def one_size(n: int, k: int) -> dict:
    """Measure one configuration (runs in its own process)."""
    import onnxruntime as ort

    from normtool import runner
    from normtool.load import load_model
    from normtool.loki.head import LokiHead
    from normtool.loki.labels import resolve_labels
    from normtool.loki.metric_files import load_metric
    from normtool.runtime.onnx_emit import EmitOptions, emit_onnx
    from normtool.save import save_model
    from normtool.timing import interleaved, summarize

    res: dict = {"N": n, "K": k}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, k)
        save_file(
            {"0.weight": lin.weight.detach() * 8, "0.bias": lin.bias.detach()},
            str(d / "m.safetensors"),
        )
        leaves = write_random_tree(d / "tree.tsv", n, seed=n)
        observed = random.Random(1).sample(leaves, k)
        model = load_model(d / "m.safetensors")
        res["rss_baseline_mb"] = peak_mb()

        t = time.perf_counter()
        metric = load_metric(d / "tree.tsv")
        res["tree_nodes"] = len(metric.names)
        res["read_tree_s"] = time.perf_counter() - t
        space = resolve_labels(metric, k, None, observed)
        t = time.perf_counter()
        new = runner.apply(model, [LokiHead(space)]).model
        res["head_pass_s"] = time.perf_counter() - t  # D², masking and self-check
        res["masked_duplicates"] = new.graph.info["loki"]["duplicate_labels_masked"]
        res["self_check"] = new.history[-1]["errors"]
        res["peak_after_head_mb"] = peak_mb()
        save_model(new, d / "m.loki.safetensors")
        res["checkpoint_mb"] = (d / "m.loki.safetensors").stat().st_size / 1e6

        protos = {}
        for dtype in ("fp32", "fp16"):
            t = time.perf_counter()
            protos[dtype] = emit_onnx(new.graph, new.weights(), EmitOptions(dtype=dtype))
            raw = protos[dtype].SerializeToString()
            res[f"onnx_{dtype}_mb"] = len(raw) / 1e6
            res[f"onnx_{dtype}_export_s"] = time.perf_counter() - t
            (d / f"{dtype}.onnx").write_bytes(raw)
            del raw
        plain = emit_onnx(model.graph, model.weights(), EmitOptions()).SerializeToString()
        res["onnx_without_head_mb"] = len(plain) / 1e6
        del protos
        res["peak_after_export_mb"] = peak_mb()

        cpu = ["CPUExecutionProvider"]
        with_head = ort.InferenceSession(str(d / "fp32.onnx"), providers=cpu)
        without = ort.InferenceSession(plain, providers=cpu)
        lat = {}
        for batch in (1, 32):
            x = {"input": np.random.default_rng(0).standard_normal((batch, 64), dtype=np.float32)}
            iters = 40 if n <= 10_000 else 15
            tw, th = interleaved(
                [lambda x=x: without.run(None, x), lambda x=x: with_head.run(None, x)], 3, iters
            )
            a, b = summarize(tw, batch), summarize(th, batch)
            lat[f"batch{batch}"] = {
                "without_head_median_ms": a["median_ms"],
                "with_head_median_ms": b["median_ms"],
                "with_head_p90_ms": b["p90_ms"],
                "head_ms": b["median_ms"] - a["median_ms"],
            }
        res["ort_cpu"] = lat
        res["peak_after_ort_mb"] = peak_mb()
        res["load_average"] = os.getloadavg()[0]  # a shared machine: say how shared it was
    return res


def digits_example() -> dict:
    """Train on digits 0–6, evaluate argmax vs Loki on all / observed / held-out test digits."""
    from scipy.cluster.hierarchy import linkage
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from devkit.proc import run_cli

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.5, random_state=0, stratify=y)
    observed = list(range(7))
    keep = np.isin(ytr, observed)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 7))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(xtr[keep]), torch.from_numpy(ytr[keep])
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    means = np.stack([xtr[ytr == c].mean(0) for c in range(10)])
    z = linkage(means, method="average")  # merges: row i creates node 10 + i
    edges = []
    for i, (a, b, _, _) in enumerate(z):
        for c in (int(a), int(b)):
            edges.append(f"{c if c < 10 else f'c{c}'}\tc{10 + i}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_file(
            {k: v.detach().contiguous() for k, v in net.state_dict().items()},
            str(d / "m.safetensors"),
        )
        (d / "tree.tsv").write_text("\n".join(edges) + "\n")
        (d / "labels.txt").write_text("\n".join(str(c) for c in range(10)) + "\n")
        (d / "observed.txt").write_text("\n".join(str(c) for c in observed) + "\n")
        out: dict = {"tree": edges, "train_examples": int(keep.sum())}
        subsets = {"all": np.ones_like(yte, bool), "observed": yte < 7, "held_out": yte >= 7}
        for name, mask in subsets.items():
            np.savez(d / f"{name}.npz", inputs=xte[mask], labels=yte[mask].astype(np.int64))
            r = run_cli(
                "loki-head", d / "m.safetensors", "--metric", d / "tree.tsv",
                "--labels", d / "labels.txt", "--observed", d / "observed.txt",
                "--eval", d / f"{name}.npz", "-o", d / "out.safetensors", "--force", "--json",
            )  # fmt: skip
            if r.returncode != 0:
                raise RuntimeError(r.stderr)
            out[name] = json.loads(r.stdout)["eval"]
    return out


def markdown(sizes: list[dict], digits: dict) -> str:
    lines = [
        BEGIN,
        "## loki-head (issue 6)",
        "",
        "`python scripts/bench_loki.py` — CPU (2 shared cores), ONNX Runtime CPU provider, fp32 "
        "runs. Classifier: one Linear(64 → K) layer, so the timings are the head's. Tree metric: "
        "random tree, N leaf labels, parents of 2–16 children; K observed leaves sampled at "
        "random. D² is built from LCA depths in blocks (never N × N: at N = 100,000 that would "
        "be 40 GB in float32). Each N runs in a fresh process; peak = max RSS of that process "
        "(baseline = after imports and loading the model).",
        "",
        "| N | K | tree nodes | read tree s | head pass s | checkpoint MB | ONNX fp32 MB | "
        "ONNX fp16 MB | baseline MB | peak after head MB | peak after export MB | "
        "peak after ORT MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sizes:
        lines.append(
            f"| {r['N']:,} | {r['K']:,} | {r['tree_nodes']:,} | {r['read_tree_s']:.2f} | "
            f"{r['head_pass_s']:.2f} | {r['checkpoint_mb']:.1f} | {r['onnx_fp32_mb']:.1f} | "
            f"{r['onnx_fp16_mb']:.1f} | {r['rss_baseline_mb']:.0f} | {r['peak_after_head_mb']:.0f} | "
            f"{r['peak_after_export_mb']:.0f} | {r['peak_after_ort_mb']:.0f} |"
        )
    lines += [
        "",
        "Latency, ONNX Runtime CPU, interleaved, median ms (with head: p90 in brackets); "
        "head = with − without:",
        "",
        "| N | batch | without head | with head | head |",
        "|---|---|---|---|---|",
    ]
    for r in sizes:
        for b, v in r["ort_cpu"].items():
            lines.append(
                f"| {r['N']:,} | {b.removeprefix('batch')} | {v['without_head_median_ms']:.3f} | "
                f"{v['with_head_median_ms']:.3f} ({v['with_head_p90_ms']:.3f}) | {v['head_ms']:.3f} |"
            )
    loads = ", ".join(f"{r['load_average']:.1f}" for r in sizes)
    lines += [
        "",
        f"1-minute load average of the machine at the end of each N's run: {loads} (on 2 cores: "
        "other jobs shared them, so absolute times are inflated; the ratios within a row are "
        "interleaved and comparable).",
        "",
        "The ONNX export stores D² in float32 in both dtypes (the emitter runs the head in fp32), "
        "so fp16 exports are barely smaller. Duplicate D² columns masked (labels that can never "
        "be the first minimiser): "
        + ", ".join(f"N={r['N']:,}: {r['masked_duplicates']:,}" for r in sizes)
        + ".",
        "",
        "### Example: scikit-learn digits, classes 7, 8, 9 never seen in training",
        "",
        f"MLP 64 → 64 → 7 trained on digits 0–6 ({digits['train_examples']} training images, "
        "Adam, 300 full-batch steps); tree over the 10 digits = average-linkage clustering of "
        "the class-mean training images (edges: "
        + ", ".join(f"`{e.replace(chr(9), '→')}`" for e in digits["tree"])
        + "). Test split (50 %, stratified):",
        "",
        "| test subset | examples | argmax mean d² | Loki mean d² | argmax top-1 | Loki top-1 |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("all", "observed", "held_out"):
        e = digits[name]
        lines.append(
            f"| {name.replace('_', '-')} | {e['examples']} | "
            f"{e['argmax']['mean_squared_distance']:.3f} | {e['loki']['mean_squared_distance']:.3f} | "
            f"{e['argmax']['top1_accuracy']:.1%} | {e['loki']['top1_accuracy']:.1%} |"
        )
    lines.append(END)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print JSON, leave BENCHMARKS.md")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one_size(a.one, a.k)))
        return
    sizes = []
    for n in (int(s) for s in a.sizes.split(",")):
        r = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--k", str(a.k)],
            capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        sizes.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(sizes[-1]), flush=True)
    digits = digits_example()
    print(json.dumps({k: v for k, v in digits.items() if k != "tree"}), flush=True)
    if not a.no_write:
        write_section(ROOT / "BENCHMARKS.md", BEGIN, END, markdown(sizes, digits))


if __name__ == "__main__":
    main()
