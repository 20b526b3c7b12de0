"""convert-ln-to-rms: measured errors per family and dtype, against each original's own forward.

For every supported family (tiny seeded models made by the test factories: Hugging Face GPT-2,
OPT Pre-LN, ViT, DeiT, DINOv2, CLIP's text tower; a timm-style ViT state dict; normtool's
reference transformer, tied, and with parallel blocks) and both targets (RMS, CRMS; RMS only for
DINOv2 and CLIP text, whose final norm is their output and keeps its γ/β):

- the CLI's self-check figures (``--json``): fp64 max error relative to the logit scale, fp32
  max-abs on the logits;
- independent fp32: the converted checkpoint run by normtool, and exported and run by ONNX
  Runtime, against the *original* model run by its own code (transformers, the timm-style
  module, ``normtool.nn.ReferenceTransformer``) — max-abs logit error over 4 seeded batches;
- fp16 and bf16: the original stored in that dtype; RMS logit error of the converted model
  run in that dtype against the original's float64 forward, divided by the original's own
  error in that dtype (the issue's bar: ≤ 1.5).

Writes ``bench/ln_to_rms_errors.json`` and its section of BENCHMARKS.md. CPU only, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit import ln_to_rms_cases as cases
from devkit.publish import publish
from normtool.cli import main as cli_main
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.passes import ln_to_rms
from normtool.runtime.onnx_emit import emit_onnx
from normtool.runtime.torch_exec import run_graph

START, END = "<!-- ln_to_rms_errors:start -->", "<!-- ln_to_rms_errors:end -->"
TARGETS = {"rms": [], "crms": ["--compressed"]}


def convert_cli(src: Path, out: Path, flags: list[str]) -> dict:
    """The command as a user runs it (in this process), its JSON report."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        cli_main(["convert-ln-to-rms", str(src), "-o", str(out), "--json", "--force", *flags])
    return json.loads(buf.getvalue())


def fp32_errors(kind: str, src: Path, out: Path) -> dict[str, float]:
    """Max-abs logit error of the converted model (normtool; ONNX Runtime) against the
    original's own fp32 forward, over 4 seeded batches of 2 at the longest sequence."""
    conv = load_model(out)
    spec = conv.graph.inputs[0]
    ref = cases.reference_forward(kind, src)
    weights = conv.weights()
    sess = ort.InferenceSession(
        emit_onnx(conv.graph, weights).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    worst = {"normtool": 0.0, "onnxruntime": 0.0, "logit_scale": 0.0}
    for seed in range(4):
        x = random_inputs(conv.graph, 2, spec.max_len or 16, seed)[spec.name]
        with torch.no_grad():
            want = ref(x)
        out = conv.graph.outputs[0]  # logits, or a base model's last_hidden_state
        got = run_graph(conv.graph, weights, {spec.name: x})[out]
        feed = x.numpy() if x.dtype == torch.int64 else x.float().numpy()
        (y,) = sess.run([out], {spec.name: feed})
        worst["normtool"] = max(worst["normtool"], float((got - want).abs().max()))
        worst["onnxruntime"] = max(worst["onnxruntime"], float(np.abs(y - want.numpy()).max()))
        worst["logit_scale"] = max(worst["logit_scale"], float(want.abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "ln_to_rms_errors.json")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ln_to_rms_errors_") as tmp:
        root = Path(tmp)
        for kind in cases.FAMILIES + cases.MORE_FAMILIES:
            src, flags = cases.make_family(kind, root / kind)
            halves = {
                dt: cases.as_half(src, cases.HALF[dt], root / f"{kind}_{dt}") for dt in cases.HALF
            }
            truths = {dt: cases.half_truth(kind, halves[dt], dt) for dt in cases.HALF}
            for target, extra in TARGETS.items():
                if target == "crms" and kind in cases.RMS_ONLY:
                    continue
                out = root / f"{kind}.{target}.safetensors"
                rep = convert_cli(src, out, flags + extra)
                row = {
                    "family": kind,
                    "target": target,
                    "self_check": rep["errors"],
                    "fp32_vs_original": fp32_errors(kind, src, out),
                }
                for dt, (orig, name, xs, want, own) in truths.items():
                    conv = ln_to_rms.convert_ln_to_rms(orig, target == "crms").stored()
                    new = cases.sq_error(conv, name, xs, want, cases.HALF[dt])
                    row[f"{dt}_rms_ratio"] = (new / own) ** 0.5
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"when": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "ort": ort.__version__}
    md_path = None if args.no_write else ROOT / "BENCHMARKS.md"
    publish(args.json, {"meta": meta, "rows": rows}, markdown(rows, meta), md_path)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        START,
        "## convert-ln-to-rms: errors per family and dtype (`scripts/ln_to_rms_errors.py`)",
        "",
        f"{meta['when']}, torch {meta['torch']}, ONNX Runtime {meta['ort']}. Tiny seeded models "
        "of each family (d=32). Self-check: the CLI's own figures (fp64 max error / logit "
        "scale; fp32 max-abs). fp32 vs original: the converted checkpoint run by normtool and by "
        "ONNX Runtime against the original run by its own code (transformers, the timm-style "
        "module, ReferenceTransformer), max-abs over 4 batches. fp16/bf16: RMS logit error of "
        "the converted model in that dtype against the original's float64 forward, over the "
        "original's own error in that dtype (bar ≤ 1.5). Base models (dinov2, clip_text) are "
        "measured on last_hidden_state, 'logit scale' being its scale; their CRMS is refused "
        "(the final norm's output is the model's and needs all d coordinates).",
        "",
        "| family | target | self-check fp64 rel | self-check fp32 abs | fp32 normtool "
        "| fp32 ORT | logit scale | fp16 ratio | bf16 ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, f = r["self_check"], r["fp32_vs_original"]
        lines.append(
            f"| {r['family']} | {r['target']} | {e['fp64_max_rel']:.1e} | "
            f"{e['fp32_max_abs']:.1e} | {f['normtool']:.1e} | {f['onnxruntime']:.1e} | "
            f"{f['logit_scale']:.2f} | {r['fp16_rms_ratio']:.3f} | {r['bf16_rms_ratio']:.3f} |"
        )
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
