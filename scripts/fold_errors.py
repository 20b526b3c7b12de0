"""fold: measured errors per family and placement, against each original's own forward.

Each case is a small seeded model (the test factories) or a trained fixture (``fixtures/``,
made by ``scripts/make_fixtures.py``: a few hundred training steps, so running statistics are
realistic). The fold is checked against the ORIGINAL network run by code independent of the
pass (``devkit/fold_cases.errors``): float64 max error relative to the logit scale, float32
max-abs on the logits of the tensors as stored. Also reported: what folded, what was skipped
(with its reason), and for Post-Norm re-basing the range of the accumulated scale |D|.

Writes ``bench/fold_errors.json`` and its section of BENCHMARKS.md. CPU only, seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit import fold_cases as fc
from devkit import torch_cnns
from devkit.factories import (
    load_hf,
    load_timm_vit,
    make_cnn,
    make_reference_transformer,
    make_resnet,
    make_timm_vit,
    make_ws_cnn,
)
from devkit.publish import publish
from normtool.load import load_model
from normtool.nn.save import load_reference
from normtool.passes.fold import fold_norms

START, END = "<!-- fold_errors:start -->", "<!-- fold_errors:end -->"


def _reference_module(path: Path) -> fc.Reference:
    return fc.module_ref(load_reference(path).eval())


def _hf_resnet(path: Path) -> fc.Reference:
    hf = load_hf(path)

    def run(dtype: torch.dtype, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return hf.to(dtype)(pixel_values=x).logits

    return run


def cases(root: Path) -> list[tuple[str, str, str, Path, int | None, fc.Reference]]:
    """(family, norm, placement, checkpoint, heads, reference) per case."""
    out = []
    for norm in ("un", "powernorm", "batchnorm"):
        for placement in ("pre", "post"):
            p = make_reference_transformer(root, norm=norm, placement=placement, layers=3)
            out.append(("reference transformer", norm, placement, p, None, _reference_module(p)))
    p = make_reference_transformer(root, norm="un", placement="post", parallel=True)
    out.append(("reference transformer, parallel", "un", "post", p, None, _reference_module(p)))
    for norm in ("un", "batchnorm"):
        p, module = fc.deep_post(root, norm, seed=3)
        out.append(("depth 12, γ~N(0,1)", norm, "post", p, None, fc.module_ref(module)))
    for norm in ("un", "powernorm"):
        p = make_timm_vit(root / f"timm_{norm}", heads=4, norm=norm)
        ref = fc.module_ref(load_timm_vit(p, heads=4).eval())
        out.append(("timm-style ViT", norm, "pre", p, 4, ref))
    p = make_cnn(root, conv_bias=True, channels=[6, 10, 12], strides=[1, 2, 2])
    out.append(("SmallCNN", "batchnorm", "conv→BN", p, None, _reference_module(p)))
    for variant in ("var", "std"):
        p = make_ws_cnn(root, variant, name=f"ws_{variant}", conv_bias=True)
        out.append(("SmallCNN + WS", f"ws ({variant}) + batchnorm", "conv→BN", p, None,
                    _reference_module(p)))  # fmt: skip
    for layer_type in ("basic", "bottleneck"):
        p = make_resnet(root / layer_type, layer_type)
        out.append((f"HF ResNet ({layer_type})", "batchnorm", "conv→BN", p, None, _hf_resnet(p)))
    for family, kw in (("timm_resnet", {"block": "basic"}), ("timm_resnet", {"block": "bottleneck"}),
                       ("tv_mobilenet_v2", {})):  # fmt: skip
        maker, forward = torch_cnns.FAMILIES[family]
        sd = maker(**kw)
        p = torch_cnns.save(sd, root / f"{family}_{len(out)}.safetensors")
        out.append((f"{family} {kw.get('block', '')}".strip(), "batchnorm", "conv→BN", p, None,
                    lambda dtype, x, sd=sd, forward=forward: forward(sd, x)))  # fmt: skip
    for name in ("ref_un_pre", "ref_un_post", "ref_powernorm_pre", "ref_powernorm_post",
                 "cnn_bn", "cnn_ws_bn"):  # fmt: skip
        p = fc.FIXTURES / f"{name}.safetensors"
        out.append((f"trained fixture {name}", "", "", p, None, _reference_module(p)))
    return out


def inputs(model) -> tuple[str, torch.Tensor]:
    spec = model.graph.inputs[0]
    if spec.kind == "tokens":
        return spec.name, fc.ids(13, vocab=spec.vocab, shape=(2, min(12, spec.max_len)))
    return spec.name, fc.pixels((2, *spec.shape[1:]), 13)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "fold_errors.json")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fold_errors_") as tmp:
        for family, norm, placement, path, heads, ref in cases(Path(tmp)):
            model = load_model(path, heads=heads)
            r = fold_norms(model)
            name, x = inputs(model)
            row = {
                "case": family,
                "norm": norm,
                "placement": placement,
                **fc.errors(r.stored(), r.exact(), ref, x, name),
                "folded": len(r.report["folded"]),
                "baked": len(r.report["baked"]),
                "skipped": [f"{s.name}: {s.reason}" for s in r.report["skipped"]],
                "scale_range": r.report["scale_range"],
                "norms_left": r.stored().graph.norm_kinds(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"when": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    md_path = None if args.no_write else ROOT / "BENCHMARKS.md"
    publish(args.json, {"meta": meta, "rows": rows}, markdown(rows, meta), md_path)


def _skips(skipped: list[str]) -> str:
    """How many norms were skipped, with the first one's reason (the others read alike)."""
    return f"{len(skipped)}, e.g. {skipped[0]}" if skipped else "-"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        START,
        "## fold: errors per family and placement (`scripts/fold_errors.py`)",
        "",
        f"{meta['when']}, torch {meta['torch']}. The folded model against the original run by "
        "its own code (normtool.nn modules, transformers, the timm-style module, "
        "devkit.torch_cnns' plain-torch timm/torchvision forwards): fp64 max "
        "error / logit scale (bar 1e-9), fp32 max-abs on the logits (the self-check's bar: 1e-4, "
        "or 4x the original's own fp32 error where larger). |D|: range of "
        "the accumulated scale of a re-based Post-Norm stream. Norms left: what runs at "
        "inference after the fold (PowerNorm keeps a weightless group RMS).",
        "",
        "| case | norm | placement | fp64 rel | fp32 abs | logit scale | folded / baked "
        "| norms left | |D| range | skipped (reason) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["scale_range"]
        rng = f"{d[0]:.1e} … {d[1]:.1e}" if d else "-"
        lines.append(
            f"| {r['case']} | {r['norm'] or '-'} | {r['placement'] or '-'} | {r['fp64_rel']:.1e} "
            f"| {r['fp32_abs']:.1e} | {r['logit_scale']:.2f} | {r['folded']} / {r['baked']} "
            f"| {', '.join(r['norms_left']) or 'none'} | {rng} "
            f"| {_skips(r['skipped'])} |"
        )
    lines.append(END)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
