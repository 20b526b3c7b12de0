"""One-shot GPU check: export, verify and bench normtool's demo models on CUDA and the CPU.

Made for a CUDA machine with no network where nothing may be installed: every model is built
here by normtool's own code (``normtool.demo.build_models`` — the demo's reference transformers
and CNN — and a GPT-2-small-shaped ``normtool.nn.ReferenceTransformer``: 12 layers, d=768,
12 heads, vocab 50257, tanh GELU, tied head; random weights), so neither transformers nor any
download is needed. Budget: under 8 minutes on a one-GPU machine.

Steps, each a row of the final table:
1. export (fp32; fp16 for the GPT-2-shaped model) — normtool's default ``ort`` target;
2. verify every export against the torch executor (fp32 on the CPU, the reference) with the
   dtype's default tolerances, on the CPU provider and — TF32 off — on CUDA;
3. bench with ``normtool.bench.run_bench`` on the CPU and on CUDA (IO binding; also with CUDA
   graphs for the GPT-2-shaped model).
Where ONNX Runtime has no working CUDA provider it says why and times normtool's torch executor
on CUDA instead (weights on the device, CUDA events, warm-up, medians). On a machine without a
GPU it says so and exits 0 after the CPU part. ``--quick``: a 2-layer GPT-2-shaped model and
fewer rounds (for checking the script itself).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from normtool.bench import device_name, run_bench, versions
from normtool.demo import build_models
from normtool.errors import NormtoolError
from normtool.export import export_model
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.nn.save import save_reference
from normtool.nn.transformer import ReferenceTransformer, transformer_config
from normtool.runtime.ort import create_session
from normtool.runtime.torch_exec import run_graph
from normtool.verify import OnnxRunner, TorchRunner, compare

ROWS: list[dict[str, Any]] = []


def row(model: str, step: str, provider: str, shape: str, result: str, **extra: Any) -> None:
    ROWS.append(
        {"model": model, "step": step, "provider": provider, "shape": shape, "result": result}
        | extra
    )
    print(f"  {model:<22} {step:<14} {provider:<5} {shape:<10} {result}", flush=True)


def gpt2_small(root: Path, layers: int) -> Path:
    torch.manual_seed(0)
    cfg = transformer_config(
        vocab_size=50257,
        max_len=1024,
        d_model=768,
        heads=12,
        layers=layers,
        d_ff=3072,
        act="gelu_tanh",
        tie_embeddings=True,
    )
    return save_reference(ReferenceTransformer(cfg).eval(), root / "gpt2_small.safetensors", True)


def exports(root: Path, layers: int) -> list[tuple[str, Path, Path, str]]:
    """(label, checkpoint, onnx, dtype) for every export; each export is a table row."""
    demo = build_models(root)
    ckpts = {k: demo[k] for k in ("transformer", "transformer_un", "cnn")}
    ckpts["gpt2_small"] = gpt2_small(root, layers)
    out = []
    for name, ck in ckpts.items():
        for dtype in ("fp32", "fp16") if name == "gpt2_small" else ("fp32",):
            path = root / f"{name}_{dtype}.onnx"
            t0 = time.perf_counter()
            res = export_model(load_model(ck), path, dtype=dtype)
            row(f"{name} {dtype}", "export", "-", "-", f"{res.nodes} nodes, {_s(t0)}")
            out.append((f"{name} {dtype}", ck, path, dtype))
    return out


def _s(t0: float) -> str:
    return f"{time.perf_counter() - t0:.1f} s"


def verify(label: str, ck: Path, onnx_path: Path, dtype: str, provider: str) -> None:
    t0 = time.perf_counter()
    rep = compare(
        TorchRunner(load_model(ck), "fp32", "torch"), OnnxRunner(onnx_path, provider), dtype
    )
    verdict = "ok" if rep.ok else "FAILED"
    row(label, "verify", provider, "4 batches", f"{verdict}: max abs {rep.max_abs:.2e} ({_s(t0)})")


def bench(label: str, onnx_path: Path, provider: str, shapes: dict, graph: bool = False) -> None:
    step = "bench+graph" if graph else "bench"
    try:
        r = run_bench([onnx_path], provider, cuda_graph=graph, **shapes)
    except NormtoolError as e:  # e.g. a CUDA graph ORT cannot capture: report it, go on
        row(label, step, provider, "-", f"not run: {e.message}")
        return
    for res in r["results"]:
        m = res["models"][0]
        shape = f"{res['batch']}x{res['seq'] or '-'}"
        row(label, step, r["provider"], shape, f"{m['median_ms']:.2f} ms (p90 {m['p90_ms']:.2f})")


def torch_cuda_timing(label: str, ck: Path, dtype: str, batch: int, seq: int, iters: int) -> None:
    """Median latency of the torch executor on CUDA, timed with CUDA events after a warm-up."""
    model = load_model(ck)
    tdtype = torch.float16 if dtype == "fp16" else torch.float32
    w = model.weights()
    weights = {
        k: w[k].to(device="cuda", dtype=tdtype if w[k].is_floating_point() else w[k].dtype)
        for k in w
    }
    feeds = {k: v.to("cuda") for k, v in random_inputs(model.graph, batch, seq, 0).items()}
    with torch.inference_mode():
        for _ in range(3):
            run_graph(model.graph, weights, feeds, tdtype, "cuda")
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_graph(model.graph, weights, feeds, tdtype, "cuda")
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    row(label, "torch-cuda", "cuda", f"{batch}x{seq}", f"{statistics.median(times):.2f} ms")


def table() -> str:
    lines = ["| model | step | provider | shape | result |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['model']} | {r['step']} | {r['provider']} | {r['shape']} | {r['result']} |"
        for r in ROWS
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2-layer GPT-2 shape, fewer rounds")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every comparison
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    iters = 5 if args.quick else 20
    small = {"batches": [1], "seqs": [16], "warmup": 2, "iters": iters}
    big_cpu = {"batches": [1], "seqs": [128], "warmup": 1, "iters": 3 if args.quick else 10}
    big_gpu = {"batches": [1, 8], "seqs": [128, 512], "warmup": 5, "iters": iters}
    notes = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        print("building and exporting ...", flush=True)
        made = exports(Path(tmp), 2 if args.quick else 12)
        print("CPU ...", flush=True)
        for label, ck, path, dtype in made:
            verify(label, ck, path, dtype, "cpu")
            bench(label, path, "cpu", big_cpu if label.startswith("gpt2") else small)
        gpu = torch.cuda.is_available()
        if not gpu:
            notes.append(
                "no CUDA GPU on this machine (torch.cuda.is_available() is False): CPU part only"
            )
        else:
            print(f"GPU: {torch.cuda.get_device_name(0)} ...", flush=True)
            try:
                create_session(made[0][2], "cuda")
                ort_cuda = None
            except NormtoolError as e:
                ort_cuda = e.message
            if ort_cuda is None:
                for label, ck, path, dtype in made:
                    verify(label, ck, path, dtype, "cuda")
                    is_big = label.startswith("gpt2")
                    bench(label, path, "cuda", big_gpu if is_big else small)
                    if is_big:
                        bench(label, path, "cuda", big_gpu, graph=True)
            else:
                notes.append(
                    f"ONNX Runtime has no working CUDA provider ({ort_cuda}); "
                    "timed normtool's torch executor on CUDA instead"
                )
                for label, ck, _, dtype in made:
                    shapes = [(1, 128), (8, 512)] if label.startswith("gpt2") else [(1, 16)]
                    for b, s in shapes:
                        torch_cuda_timing(label, ck, dtype, b, s, iters)
    v = versions()
    head = [
        f"gpu_check: {time.strftime('%Y-%m-%d %H:%M')}, {time.perf_counter() - t_start:.0f} s; "
        f"CPU {device_name('cpu')}; GPU {torch.cuda.get_device_name(0) if gpu else 'none'}; "
        + ", ".join(f"{k} {x}" for k, x in v.items()),
        *[f"note: {n}" for n in notes],
    ]
    print("\n" + "\n".join(head) + "\n\n" + table())
    if args.json:
        args.json.write_text(json.dumps({"header": head, "rows": ROWS}, indent=1))
    return 1 if any("FAILED" in r["result"] for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
