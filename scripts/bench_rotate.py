"""rotate: outliers and int8 weight error of the residual stream before and after rotation.

For each model, the same function twice: the chain up to ``rotate`` (convert-ln-to-rms and
fold:only=rms-gain: weightless RMSNorms) and that chain followed by ``rotate`` (Hadamard, random,
and PCA on calibration tokens). Measured on seeded inputs, in float32 on the stored tensors:

* the stream as its RMSNorms read it: max |x| and the kurtosis of its entries (3 for a Gaussian;
  large when a few channels carry outliers — what rotation spreads out), the largest over norms;
* a per-tensor symmetric int8 round-trip of every linear weight (``s = max|W|/127``): the max
  logit error against the unquantised float32 model, relative to the logit scale.

Models: the tiny seeded test models (random weights plus noise, not trained: their stream has no
outlier channels), and a Llama given two (``_outliers``: the pattern of trained LLMs, made by
hand — not a trained model).
Writes ``bench/rotate.json`` and its section of BENCHMARKS.md. CPU, seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit.factories import make_decoder
from devkit.ln_to_rms_cases import make_family
from devkit.publish import publish
from normtool import runner, steps
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.runtime.torch_exec import run_graph

START, END = "<!-- bench_rotate:start -->", "<!-- bench_rotate:end -->"
KINDS = ("hadamard", "random", "pca")


def _models(root: Path) -> dict[str, tuple[Path, list[str]]]:
    lead = ["convert-ln-to-rms", "fold:only=rms-gain"]
    return {
        "gpt2": (make_family("gpt2", root)[0], lead),
        "opt": (make_family("opt", root)[0], lead),
        "vit": (make_family("vit", root)[0], lead),
        "llama": (make_decoder(root / "llama"), ["fold:only=rms-gain"]),
        "llama, outlier channels": (
            _outliers(make_decoder(root / "llama_out")),
            ["fold:only=rms-gain"],
        ),
    }


def _outliers(src: Path, channels: tuple[int, ...] = (3, 17), factor: float = 30.0) -> Path:
    """A Llama whose stream carries large outlier channels, as trained LLMs' do: every writer's
    (embedding, o_proj, down_proj) ``channels`` multiplied by ``factor`` — a different model,
    the same one before and after rotation."""
    file = src / "model.safetensors"
    tensors = load_file(file)
    for name, t in tensors.items():
        if name.endswith("embed_tokens.weight"):
            t[:, list(channels)] *= factor
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            t[list(channels), :] *= factor
    save_file(tensors, file, metadata={"format": "pt"})
    return src


def _measure(model, x: dict[str, torch.Tensor]) -> dict[str, float]:
    g = model.graph.copy()
    logits = g.outputs[0]
    read = list(dict.fromkeys(o.inputs[0] for o in g.ops_of("rmsnorm")))
    g.outputs = [logits, *read]
    w = model.weights()
    vals = run_graph(g, w, x, torch.float32)
    ref = vals[logits].double()
    acts = [vals[v].double().reshape(-1) for v in read]
    kurt = max(float(((a - a.mean()) ** 4).mean() / a.var(unbiased=False) ** 2) for a in acts)
    q = dict(w)
    for op in g.ops_of("linear"):
        t = w[op.params["weight"]].float()
        s = t.abs().max() / 127
        q[op.params["weight"]] = (t / s).round().clamp(-127, 127) * s
    y = run_graph(model.graph, q, x, torch.float32)[logits].double()
    return {
        "stream_max_abs": max(float(a.abs().max()) for a in acts),
        "stream_kurtosis": kurt,
        "int8_logit_max_rel": float((y - ref).abs().max() / ref.abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "rotate.json")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_rotate_") as tmp:
        root = Path(tmp)
        for name, (src, lead) in _models(root).items():
            orig = load_model(src)
            spec = orig.graph.inputs[0]
            x = random_inputs(orig.graph, 4, spec.max_len or 16, seed=7)
            calib = root / f"{name}_calib.npz"
            np.savez(
                calib,
                inputs=random_inputs(orig.graph, 8, spec.max_len or 16, seed=3)[spec.name].numpy(),
            )
            for kind in (None, *KINDS):
                words = lead + ([] if kind is None else [f"rotate:kind={kind}:calib={calib}"])
                if kind != "pca":
                    words = [w.replace(f":calib={calib}", "") for w in words]
                passes = [(s := steps.parse(w)).kind.make(s.options, orig) for w in words]
                planned = runner.plan(orig, passes)
                row = {"model": name, "rotation": kind or "none", **_measure(planned.stored, x)}
                rows.append(row)
                print(row, flush=True)
    lines = [
        START,
        "## rotate: stream outliers and int8 weight error",
        "",
        "`python scripts/bench_rotate.py`. Tiny seeded test models (not trained); the same function "
        "before (`none`: convert-ln-to-rms + fold:only=rms-gain) and after `rotate`. Stream: the "
        "values RMSNorms read, float32, 4 seeded inputs; kurtosis of their entries (Gaussian: 3), "
        "largest over norms. int8: per-tensor symmetric round-trip of every linear weight, max "
        "logit error / logit scale.",
        "",
        "| model | rotation | stream max \\|x\\| | stream kurtosis | int8 logit err (rel) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['rotation']} | {r['stream_max_abs']:.3g} | "
        f"{r['stream_kurtosis']:.3g} | {r['int8_logit_max_rel']:.2e} |"
        for r in rows
    ]
    lines.append(END)
    md = None if args.no_write else ROOT / "BENCHMARKS.md"
    publish(args.json, {"rows": rows}, "\n".join(lines) + "\n", md)


if __name__ == "__main__":
    main()
