"""``normtool demo``: build small models, run every command on them end to end, summarise.

Why the demo calls the registered command functions (with ``--json`` on, their output captured
and parsed) rather than re-assembling library calls: its promise is that each command works
end to end, self-checks and atomic writes included, so it must run exactly the code a user's
``normtool CMD`` runs, and cannot drift from it. Only argument parsing is skipped.

The models are made here with torch and ``normtool.nn`` (no download, no ``transformers``):
two seeded MLP classifiers, a Pre-LayerNorm reference transformer LM, a Post-UnifiedNorm
transformer classifier, and a Conv-BN CNN, plus the small files some commands need (a label
tree for Loki, labelled inputs for the barrier). Norm running statistics are set to random
positive values, as after training, so the folds change something.

``STEPS`` is the whole demo: one entry per command run. Adding a command to the demo is one
entry: the command name, the model it runs on, its arguments, and the number to show.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from normtool.errors import NormtoolError
from normtool.nn.cnn import SmallCNN, cnn_config
from normtool.nn.save import save_reference
from normtool.nn.transformer import ReferenceTransformer, transformer_config
from normtool.nn.unified_norm import UnifiedNorm

MLP_WIDTHS = (16, 64, 32, 10)
SMALL = {"vocab_size": 64, "max_len": 16, "d_model": 32, "heads": 4, "layers": 2, "d_ff": 64}
LABEL_GROUPS = {
    "vehicles": ["car", "bus", "bike", "train", "plane"],
    "animals": ["cat", "dog", "horse", "bird", "fish"],
}


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    pairs = list(zip(MLP_WIDTHS, MLP_WIDTHS[1:], strict=False))
    for i, (n_in, n_out) in enumerate(pairs):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(pairs) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _trained_statistics(model: nn.Module, seed: int) -> nn.Module:
    """Random positive running statistics and non-trivial affines, as a trained model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_var", "running_phi")):
                buf.copy_(torch.rand(buf.shape, generator=g) * 2 + 0.2)
            elif name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, UnifiedNorm | nn.BatchNorm2d):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def build_models(root: Path) -> dict[str, Path]:
    """Write the demo's models and data files into ``root``; returns name → path."""
    paths: dict[str, Path] = {}
    for name, seed in (("mlp", 0), ("mlp_b", 1)):
        net = _mlp(seed)
        paths[name] = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(paths[name]))
    torch.manual_seed(0)
    lm = ReferenceTransformer(transformer_config(**SMALL, norm="layernorm", placement="pre"))
    paths["transformer"] = save_reference(lm.eval(), root / "transformer.safetensors", True)
    torch.manual_seed(1)
    un = ReferenceTransformer(
        transformer_config(**SMALL, norm="un", placement="post", num_classes=10, causal=False)
    )
    paths["transformer_un"] = save_reference(
        _trained_statistics(un, 2), root / "transformer_un.safetensors", True
    )
    torch.manual_seed(3)
    cnn = _trained_statistics(SmallCNN(cnn_config()), 4)
    paths["cnn"] = save_reference(cnn, root / "cnn.safetensors", True)
    tree = ["all"] + [f"{group}\tall" for group in LABEL_GROUPS]
    tree += [f"{leaf}\t{group}" for group, leaves in LABEL_GROUPS.items() for leaf in leaves]
    paths["tree"] = root / "labels_tree.tsv"
    paths["tree"].write_text("\n".join(tree) + "\n")
    # labelled inputs for the barrier: labels are model A's own predictions (A is exact on them)
    x = torch.randn(256, MLP_WIDTHS[0], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = _mlp(0)(x).argmax(-1)
    paths["data"] = root / "mlp_data.safetensors"
    save_file({"inputs": x, "labels": y}, str(paths["data"]))
    return paths


@dataclass(frozen=True)
class Step:
    """One command run: ``args(paths)`` gives its keyword arguments (``as_json`` is added);
    ``key(payload)`` picks the number shown in the summary from its JSON output."""

    command: str
    model: str
    args: Callable[[dict[str, Path]], dict[str, Any]]
    key: Callable[[dict[str, Any]], str]


@dataclass
class StepResult:
    command: str
    model: str
    ok: bool
    key: str
    seconds: float
    error: str | None
    output: dict[str, Any] | None


def _err(x: float) -> str:
    return f"{x:.1e}"


def _path(p: dict[str, Path], ref: str) -> Path:
    """``"name"``: a built file; ``"name+suffix"``: the output ``<name's stem><suffix>``."""
    name, _, suffix = ref.partition("+")
    return p[name].with_name(p[name].stem + suffix) if suffix else p[name]


def _onnx(ref: str) -> str:
    """The ONNX export's ref for a model ref: ``cnn`` → ``cnn+.onnx``, ``x+.rms.safetensors`` →
    ``x+.rms.onnx``."""
    name, _, suffix = ref.partition("+")
    return f"{name}+{suffix.removesuffix('.safetensors')}.onnx"


def _export(ref: str) -> Step:
    return Step(
        "export",
        ref.replace("+", ""),
        lambda p: {"path": _path(p, ref), "output": _path(p, _onnx(ref)), "force": True},
        lambda j: f"opset {j['opset']}, {j['nodes']} nodes",
    )


def _verify(a: str, b: str) -> Step:
    name, _, suffix = b.partition("+")
    shown_b = suffix if suffix and a.partition("+")[0] == name else b.replace("+", "")
    return Step(
        "verify",
        f"{a.replace('+', '')} ↔ {shown_b}",
        lambda p: {"a": _path(p, a), "b": _path(p, b)},
        lambda j: f"max abs {_err(j['max_abs'])}, rel {_err(j['max_rel'])} ({j['dtype']})",
    )


def _transform_key(j: dict[str, Any]) -> str:
    e = j["errors"]
    return (
        f"{j['summary'].split(';')[0]}; fp64 rel {_err(e['fp64_max_rel'])}, "
        f"fp32 abs {_err(e['fp32_max_abs'])}"
    )


def _transform(command: str, name: str, suffix: str, **extra: Any) -> Step:
    """``command`` on ``name`` (a built file or a ``name+suffix`` output), written to the
    ``+suffix`` output of the same stem (suffixes stack: ``x+.rms.safetensors`` → ``x+.rms.rot…``)."""
    base, _, had = name.partition("+")
    out = f"{base}+{had.removesuffix('.safetensors')}{suffix}"
    return Step(
        command,
        name,
        lambda p: {"path": _path(p, name), "output": _path(p, out), "force": True, **extra},
        _transform_key,
    )


def _bench_key(j: dict[str, Any]) -> str:
    a, b = j["results"][0]["models"]
    return (
        f"{a['median_ms']:.2f} → {b['median_ms']:.2f} ms, ratio {b['ratio']:.2f} ({j['provider']})"
    )


STEPS: list[Step] = [
    Step(
        "inspect",
        "transformer",
        lambda p: {"path": p["transformer"]},
        lambda j: f"{j['family']}, {j['parameters']:,} parameters",
    ),
    Step(
        "inspect",
        "cnn",
        lambda p: {"path": p["cnn"]},
        lambda j: f"{j['family']}, {j['parameters']:,} parameters",
    ),
    _export("mlp"),
    _verify("mlp", "mlp+.onnx"),
    _export("transformer"),
    _verify("transformer", "transformer+.onnx"),
    _export("cnn"),
    _verify("cnn", "cnn+.onnx"),
    _transform("convert-ln-to-rms", "transformer", ".rms.safetensors"),
    _verify("transformer", "transformer+.rms.safetensors"),
    _export("transformer+.rms.safetensors"),
    _verify("transformer+.rms.safetensors", "transformer+.rms.onnx"),
    Step(
        "bench",
        "transformer ↔ .rms (onnx)",
        lambda p: {
            "models": [_path(p, "transformer+.onnx"), _path(p, "transformer+.rms.onnx")],
            "provider": "cpu",
            "batch": "1",
            "seq": "16",
            "warmup": 5,
            "iters": 30,
        },
        _bench_key,
    ),
    _transform("rotate", "transformer+.rms.safetensors", ".rot.safetensors"),
    _verify("transformer", "transformer+.rms.rot.safetensors"),
    _transform("convert-ln-to-rms", "transformer", ".crms.safetensors", compressed=True),
    _verify("transformer", "transformer+.crms.safetensors"),
    _transform("fold", "transformer_un", ".folded.safetensors"),
    _verify("transformer_un", "transformer_un+.folded.safetensors"),
    _transform("fold", "cnn", ".folded.safetensors"),
    _verify("cnn", "cnn+.folded.safetensors"),
    Step(
        "merge",
        "mlp + mlp_b",
        lambda p: {
            "models": [p["mlp"], p["mlp_b"]],
            "output": _path(p, "mlp+.merged.safetensors"),
            "force": True,
        },
        lambda j: f"{j['groups']} groups, permutation rel err {_err(j['permutation_rel_err'])}",
    ),
    Step(
        "barrier",
        "mlp ↔ mlp_b",
        lambda p: {"a": p["mlp"], "b": p["mlp_b"], "data": p["data"], "steps": 5},
        lambda j: ", ".join(f"{k} {v['barrier']:.3g}" for k, v in j.items() if isinstance(v, dict)),
    ),
    Step(
        "loki-head",
        "mlp",
        lambda p: {
            "path": p["mlp"],
            "metric": p["tree"],
            "output": _path(p, "mlp+.loki.safetensors"),
            "force": True,
        },
        lambda j: f"{j['observed']} outputs → {j['labels']} labels ({j['metric']})",
    ),
    _verify("mlp", "mlp+.loki.safetensors"),
    Step(
        "run",
        "transformer_un: fold → loki-head",
        lambda p: {
            "path": p["transformer_un"],
            "step_words": ["fold", f"loki-head:metric={p['tree']}"],
            "output": _path(p, "transformer_un+.folded.loki.safetensors"),
            "force": True,
        },
        lambda j: (
            f"{len(j['steps'])} passes, one check: fp64 rel {_err(j['errors']['fp64_max_rel'])}"
        ),
    ),
    _verify("transformer_un", "transformer_un+.folded.loki.safetensors"),
]


#: Command name → the function ``normtool NAME`` runs (given by the CLI layer, which owns them).
Commands = Mapping[str, Callable[..., None]]


def run_step(step: Step, paths: dict[str, Path], commands: Commands) -> StepResult:
    """Run one command with ``--json``; its stdout is captured and parsed, errors recorded."""
    buf = io.StringIO()
    t0 = time.perf_counter()
    output, error, key = None, None, ""
    try:
        fn = commands[step.command]
        args = step.args(paths)
        if step.model.startswith("mlp") and "act" in inspect.signature(fn).parameters:
            args["act"] = "relu"  # the demo built its MLP with ReLU: a fact, not an assumption
        with contextlib.redirect_stdout(buf):
            fn(**args, as_json=True)
    except NormtoolError as e:
        error = str(e)
    except Exception as e:  # noqa: BLE001 - one broken command must not hide the others
        error = f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - t0
    text = buf.getvalue().strip()
    if text:
        try:
            output = json.loads(text)
            key = step.key(output)
        except (ValueError, KeyError, TypeError) as e:
            error = error or f"unexpected output ({type(e).__name__}: {e})"
    return StepResult(step.command, step.model, error is None, key, seconds, error, output)


def run_demo(
    root: Path,
    commands: Commands,
    steps: list[Step] | None = None,
    each: Callable[[list[Step]], Iterable[Step]] = iter,
) -> list[StepResult]:
    """Build the models in ``root`` and run ``steps`` (default ``STEPS``) in order with
    ``commands``; ``each`` wraps the iteration (the CLI passes a progress bar).

    Why the commands are passed in rather than imported: they sit above this module (the demo
    command calls it), so importing them here would make an import cycle.
    """
    paths = build_models(root)
    return [run_step(step, paths, commands) for step in each(STEPS if steps is None else steps)]
