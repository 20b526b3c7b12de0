"""The convert-ln-to-rms families, their independent forwards and the half-precision error
measure — shared by ``test_ln_to_rms`` and ``scripts/ln_to_rms_errors.py`` (which reports the
same measures per family and dtype).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devkit.factories import (
    load_hf,
    load_timm_vit,
    make_gpt2,
    make_opt,
    make_reference_transformer,
    make_timm_vit,
    make_vit,
)
from devkit.factories import make_family as make_hf_family
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.nn.save import load_reference
from normtool.runtime.torch_exec import run_graph

FAMILIES = ["gpt2", "opt", "vit", "timm_vit", "ref", "ref_parallel"]
#: Measured by ``scripts/ln_to_rms_errors.py`` only (``tests/test_arch_families`` tests them);
#: DINOv2 and CLIP's text tower output their final norm, so only RMS applies to them.
MORE_FAMILIES = ["deit", "dinov2", "clip_text", "gpt_neox", "phi"]
RMS_ONLY = frozenset({"dinov2", "clip_text"})
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: At least this many logits per input batch (4 batches): the RMS error averages over ~1000
#: values even for classifiers with 3-5 classes, whose 16 samples would give only 48.
LOGITS_PER_BATCH = 256


def make_family(kind: str, root: Path) -> tuple[Path, list[str]]:
    """A tiny original checkpoint of ``kind`` and the extra CLI flags it needs."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "gpt2":
        return make_gpt2(root / "gpt2"), []
    if kind == "opt":
        return make_opt(root / "opt", pre=True), []
    if kind == "vit":
        return make_vit(root / "vit"), []
    if kind == "timm_vit":
        return make_timm_vit(root / "timm"), ["--heads", "4"]
    if kind == "ref":
        return make_reference_transformer(root, tie_embeddings=True, bias=False), []
    if kind == "ref_parallel":
        return make_reference_transformer(root, parallel=True, num_classes=3), []
    if kind in MORE_FAMILIES:
        return make_hf_family(root / kind, kind), []
    raise ValueError(kind)


def reference_forward(kind: str, path: Path, dtype: torch.dtype = torch.float32):
    """The original model's own forward, independent of normtool: inputs -> logits."""
    if kind in ("gpt2", "opt", "clip_text", "gpt_neox", "phi"):
        m = load_hf(path, dtype)
        return lambda x: m(input_ids=x)[0]  # logits, or a base model's last_hidden_state
    if kind in ("vit", "deit", "dinov2"):
        m = load_hf(path, dtype)
        return lambda x: m(pixel_values=x.to(dtype))[0]
    if kind == "timm_vit":
        m = load_timm_vit(path, heads=4, dtype=dtype)
        return lambda x: m(x.to(dtype))
    m = load_reference(path).to(dtype)
    return lambda x: m(x)


def as_half(src: Path, dtype: torch.dtype, dst: Path) -> Path:
    """A copy of the original checkpoint stored in ``dtype`` (metadata and config kept): the
    original *is* this half-precision model, so its float64 run is the exact truth."""
    folder = src.is_dir()
    file = src / "model.safetensors" if folder else src
    dst.mkdir(parents=True, exist_ok=True)
    if folder:
        shutil.copy(src / "config.json", dst / "config.json")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    out = dst / file.name
    save_file(state, str(out), metadata=meta)
    return dst if folder else out


def sq_error(model, name, xs, want, dtype) -> float:
    """Sum of squared errors of ``model``'s first output (logits, or a base model's hidden
    states) run by normtool in ``dtype`` (weights read once)."""
    weights = {n: model.tensor(n) for n in model.graph.tensors}
    out = model.graph.outputs[0]
    return sum(
        float((run_graph(model.graph, weights, {name: x}, dtype)[out].double() - y).pow(2).sum())
        for x, y in zip(xs, want, strict=True)
    )


def half_truth(kind: str, src: Path, dt: str):
    """For a half-precision original: the model, its input name, seeded input batches, the
    independent float64 forward on them (exact on the stored weights), and the original's own
    squared error when normtool runs it in that dtype."""
    orig = load_model(src, heads=4 if kind == "timm_vit" else None)
    spec = orig.graph.inputs[0]
    truth = reference_forward(kind, src, torch.float64)
    seq = spec.max_len or 16
    with torch.no_grad():  # logits per sample: a few classes, or every token's vocab
        per = truth(random_inputs(orig.graph, 1, seq, 99)[spec.name]).numel()
    batch = max(4, -(-LOGITS_PER_BATCH // per))  # classifiers: enough samples to average
    xs = [random_inputs(orig.graph, batch, seq, 100 + k)[spec.name] for k in range(4)]
    with torch.no_grad():
        want = [truth(x) for x in xs]
    own = sq_error(orig, spec.name, xs, want, HALF[dt])
    return orig, spec.name, xs, want, own
