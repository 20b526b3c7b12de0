"""Numerical equivalence of two models: the CI gate (``normtool verify``) and every transform's
self-check (``compare_models``).

Both models run on the same seeded random inputs drawn from the input signature (token ids
inside the vocabulary, pixels, features; ``normtool.inputs``), over several batches that include
batch 1 at the longest sequence and a length-1 sequence. Model ``a`` is the reference. For each
output we report

* ``max_abs``: max |a − b| over every element of every batch;
* ``scale``: max |a| (the output's scale), and ``max_rel = max_abs / scale``;
* ``agreement``: for ``logits``, the fraction of rows whose argmax agrees (reported, not gated:
  near-ties flip the argmax under any rounding change, so it is information, not a criterion);
  for integer outputs, the fraction of equal values.

An output passes when ``max_abs <= atol + rtol · scale``: a tolerance relative to the output's
*scale*, not elementwise (elementwise-relative tests cannot be met near zero and fail for no
reason), with ``atol`` as a floor for outputs whose scale is ~0. Integer outputs (e.g. a Loki
head's predicted labels) must agree exactly. Any NaN fails.

Which dtype (``--dtype``, else the default): the lowest precision either model is stored or
exported in (a checkpoint's lowest float storage dtype, an ONNX file's export dtype). Both run
in it and its tolerances apply; ``--dtype fp64`` runs two checkpoints (almost) exactly.

Default tolerances per run dtype (unit roundoff u: fp64 1.1e-16, fp32 6.0e-8, fp16 4.9e-4,
bf16 3.9e-3). They sit above the rounding noise of an equal computation done differently
(≈ u·√width per layer, summed over depth) and below what a real change does. Measured on the
test families in fp32: ONNX Runtime vs the torch executor differ by ≤ 9e-7 of the logits'
scale, exact rewrites stored in fp32 (ln→rms, folds) by ≤ 3e-7; one weight moved by 1e-3
changes the logits by 8e-5 to 1e-3 of their scale when it is an attention, MLP or embedding
weight, but only ~1e-5 for one tap of a conv kernel before global pooling — at the fp32 noise
floor of large models, so only ``--dtype fp64`` resolves such a change reliably:

=======  =======  =======  =============================================================
dtype    atol     rtol     why
=======  =======  =======  =============================================================
fp64     1e-10    1e-9     ~1e7·u above rounding noise, ≥1e4 below a 1e-3 weight change
fp32     1e-6     1e-5     ~170·u: >10× the ORT-vs-torch and fp32-storage noise, >8× below
                           a 1e-3 change of any linear, attention or embedding weight
fp16     1e-3     1e-2     ~20·u: half-precision noise of a few layers, both sides rounded
bf16     1e-2     5e-2     ~13·u: bf16 keeps 8 mantissa bits; both sides rounded
=======  =======  =======  =============================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from normtool.arch.family import Assumption
from normtool.errors import NormtoolError
from normtool.graph import InputSpec
from normtool.inputs import max_seq, random_inputs
from normtool.load import load_model
from normtool.model import Model
from normtool.runtime.torch_exec import run_graph_batches

DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def limit(self, scale: float) -> float:
        return self.atol + self.rtol * scale


TOLERANCES: dict[str, Tolerance] = {
    "fp64": Tolerance(1e-10, 1e-9),
    "fp32": Tolerance(1e-6, 1e-5),
    "fp16": Tolerance(1e-3, 1e-2),
    "bf16": Tolerance(1e-2, 5e-2),
}

#: Significand bits: orders the dtypes by precision.
_BITS = {"fp64": 53, "fp32": 24, "fp16": 11, "bf16": 8}
_STORAGE = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}
_NP_PRECISION = {np.float64: "fp64", np.float32: "fp32", np.float16: "fp16"}

DEFAULT_SAMPLES = 4
#: Shapes of the first batches, as (batch, seq as a fraction of the longest): batch 1 at the
#: longest sequence first, then batch 2 there, a quarter length, and the length-1 edge with a
#: wide batch (cheap for token models; 27 rows in all for feature and image models, so units
#: that only some inputs activate are still exercised).
_FIRST_BATCHES = ((1, 1.0), (2, 1.0), (8, 0.25), (16, 0.0))


def dtype_name(dtype: str | torch.dtype) -> str:
    """``"fp32"`` for ``"fp32"`` or ``torch.float32``; NormtoolError for anything else."""
    if isinstance(dtype, torch.dtype):
        for name, d in DTYPES.items():
            if d == dtype:
                return name
    elif dtype in DTYPES:
        return dtype
    raise NormtoolError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


class Runner(Protocol):
    """Something that maps input tensors to named outputs: a graph in torch, an ONNX session."""

    label: str
    inputs: list[InputSpec] | None  # None: an ONNX file without a stored signature (yet)
    outputs: list[str]
    assumptions: list[Assumption]  # what a checkpoint's graph assumed (load_model); ONNX: none

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class TorchRunner:
    """A Model run by the torch executor in one dtype; weights are read and cast per op.

    Outputs carry the public names an ONNX export gives them (``logits``, ``prediction``), so a
    checkpoint and its export are compared output by output.
    """

    def __init__(self, model: Model, dtype: str | torch.dtype, label: str = "") -> None:
        self.graph = model.graph
        self.dtype = DTYPES[dtype_name(dtype)]
        self.label = label or (str(model.checkpoint.path) if model.checkpoint else "model")
        self.assumptions = model.assumptions
        self.inputs = list(model.graph.inputs)
        self._names = model.graph.output_names()
        self.outputs = list(self._names.values())
        # lazy: the executor fetches and casts each op's tensors when it runs the op, so a model
        # larger than memory (or a pass's thunks, recomputed per batch) is never held whole
        self._weights = model.weights()

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run_all([feeds])[0]

    def run_all(self, batches: list[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Several batches in one pass over the ops (each weight fetched once)."""
        outs = run_graph_batches(self.graph, self._weights, batches, self.dtype)
        return [{self._names[k]: v for k, v in out.items()} for out in outs]


class OnnxRunner:
    """An ONNX file run by ONNX Runtime. Its dtype is fixed at export (``precision``); its input
    signature comes from the ``normtool.inputs`` metadata, or (a foreign file) from the model it
    is compared with (``inputs`` is then None until ``open_runners`` fills it)."""

    def __init__(self, path: Path, provider: str = "auto") -> None:
        # here, not at module level: onnx and onnxruntime take ~0.1 s to import, which every
        # command that only self-checks checkpoints (convert, fold) would otherwise pay
        import onnx

        from normtool.runtime.onnx_emit import INPUTS_KEY, input_signature
        from normtool.runtime.ort import create_session

        self.label = str(path)
        self.assumptions: list[Assumption] = []
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - onnx raises several untyped parse errors
            raise NormtoolError(f"not a readable ONNX model ({type(e).__name__})", path) from e
        props = {p.key: p.value for p in proto.metadata_props}
        self.inputs = input_signature(proto) if INPUTS_KEY in props else None
        self.session = create_session(path, provider)
        self.outputs = self.session.output_names
        float_types = [t for t in self.session.input_types.values() if t in _NP_PRECISION]
        self.precision = props.get("normtool.dtype") or (
            _NP_PRECISION[float_types[0]] if float_types else "fp32"
        )

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self.session.run(feeds).items()}


@dataclass
class OutputReport:
    name: str
    dtype: str  # of model a's output, e.g. "float32", "int64"
    max_abs: float
    scale: float
    max_rel: float
    limit: float
    agreement: float | None  # logits: top-1 agreement; integer outputs: fraction equal
    ok: bool


@dataclass
class Report:
    a: str
    b: str
    dtype: str
    seed: int
    batches: list[tuple[int, int | None]]  # (batch, seq); seq None without a sequence axis
    atol: float
    rtol: float
    outputs: list[OutputReport]
    not_compared: dict[str, list[str]] = field(default_factory=dict)  # "a"/"b": outputs only there

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def failures(self) -> list[str]:
        """One phrase per failing output, for the one-line error message."""
        return [
            f"{o.name}: max abs error {o.max_abs:.3g} > {o.limit:.3g}"
            if o.dtype.startswith("float")
            else f"{o.name}: only {o.agreement:.1%} of values agree"
            for o in self.outputs
            if not o.ok
        ]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["equivalent"] = self.ok
        d["max_abs"] = self.max_abs
        d["max_rel"] = self.max_rel
        d["batches"] = [{"batch": b, "seq": s} for b, s in self.batches]
        return _json_safe(d)


def _json_safe(x: Any) -> Any:
    """NaN/inf are not JSON: report them as strings so the output stays parseable."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def batch_plan(samples: int, seq: int | None, seed: int) -> list[tuple[int, int | None]]:
    """``samples`` (batch, seq) pairs: the fixed edge shapes first, then seeded random ones.

    ``seq`` is the longest sequence, or None for inputs without a sequence axis.
    """
    if samples < 1:
        raise NormtoolError(f"--samples must be at least 1, got {samples}")
    plan = [(b, None if seq is None else max(1, round(f * seq))) for b, f in _FIRST_BATCHES]
    g = torch.Generator().manual_seed(seed)
    while len(plan) < samples:
        b = int(torch.randint(1, 9, (), generator=g))
        s = int(torch.randint(1, seq + 1, (), generator=g)) if seq is not None else None
        plan.append((b, s))
    return plan[:samples]


def _describe(spec: InputSpec) -> str:
    extra = f", vocab {spec.vocab}" if spec.kind == "tokens" else ""
    return f"{spec.name} ({spec.kind} {list(spec.shape)}{extra})"


def shared_inputs(a: Runner, b: Runner) -> list[InputSpec]:
    """The input signature both models accept; NormtoolError naming the first difference.

    The longest sequence is the shorter of the two position tables (both must accept it).
    """
    names_a, names_b = [s.name for s in a.inputs], [s.name for s in b.inputs]
    if names_a != names_b:
        raise NormtoolError(f"inputs differ: {a.label} takes {names_a}, {b.label} takes {names_b}")
    specs = []
    for sa, sb in zip(a.inputs, b.inputs, strict=True):
        if (sa.kind, tuple(sa.shape), sa.vocab) != (sb.kind, tuple(sb.shape), sb.vocab):
            raise NormtoolError(
                f"input {sa.name!r} differs: {a.label} takes {_describe(sa)}, "
                f"{b.label} takes {_describe(sb)}"
            )
        lens = [n for n in (sa.max_len, sb.max_len) if n]
        specs.append(InputSpec(sa.name, sa.kind, tuple(sa.shape), sa.vocab, min(lens, default=0)))
    return specs


class _Acc:
    """Running statistics of one output over all batches."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.max_abs = 0.0
        self.scale = 0.0
        self.agree = 0
        self.rows = 0

    def add(self, ya: torch.Tensor, yb: torch.Tensor, logits: bool) -> None:
        a, b = ya.double(), yb.double()
        if a.numel():
            # in place on two temporaries: a language model's logits run to 10^8 values
            diff = (a - b).abs_().masked_fill_(a == b, 0.0)  # equal infinities count as equal
            m = float(diff.max())
            if math.isnan(m) or m > self.max_abs:  # a NaN sticks (max() would drop it) and fails
                self.max_abs = m
            del diff
            mag = a.abs()
            self.scale = max(self.scale, float(mag.masked_fill_(~mag.isfinite(), 0.0).max()))
        if not self.dtype.is_floating_point:
            self.agree += int((ya == yb).sum())
            self.rows += ya.numel()
        elif logits and a.dim() >= 1 and a.shape[-1] > 1:
            self.agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            self.rows += a[..., 0].numel()

    def report(self, name: str, tol: Tolerance) -> OutputReport:
        agreement = self.agree / self.rows if self.rows else None
        if self.scale > 0:
            rel = self.max_abs / self.scale
        else:
            rel = 0.0 if self.max_abs == 0 else math.inf
        if self.dtype.is_floating_point:
            limit = tol.limit(self.scale)
            ok = self.max_abs <= limit  # False for NaN
        else:
            limit, ok = 0.0, self.max_abs == 0
        dtype = str(self.dtype).removeprefix("torch.")
        return OutputReport(name, dtype, self.max_abs, self.scale, rel, limit, agreement, ok)


def compare(
    a: Runner,
    b: Runner,
    dtype: str | torch.dtype = "fp32",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    each: Callable[[list[tuple[int, int | None]]], Iterable[tuple[int, int | None]]] = iter,
    plan: list[tuple[int, int | None]] | None = None,
    together: bool = False,
) -> Report:
    """Run ``a`` (the reference) and ``b`` on the same random inputs and measure the difference.

    ``dtype`` selects the default tolerances (and is recorded); the runners already run in
    their own dtype. ``each`` wraps the loop over input batches (the CLI's progress bar).
    ``plan``: the (batch, seq) shapes to run instead of ``batch_plan``'s ``samples``.
    ``together``: run all batches in one pass of each executor model (``TorchRunner.run_all``).
    Raises NormtoolError when the inputs, the outputs or their shapes differ.
    """
    name = dtype_name(dtype)
    default = TOLERANCES[name]
    tol = Tolerance(default.atol if atol is None else atol, default.rtol if rtol is None else rtol)
    specs = shared_inputs(a, b)
    common = [o for o in a.outputs if o in b.outputs]
    if not common:
        raise NormtoolError(
            f"no output in common: {a.label} gives {a.outputs}, {b.label} gives {b.outputs}"
        )
    only = {
        "a": [o for o in a.outputs if o not in common],
        "b": [o for o in b.outputs if o not in common],
    }
    not_compared = {k: v for k, v in only.items() if v}
    has_seq = any("seq" in s.shape for s in specs)
    if plan is None:
        plan = batch_plan(samples, max_seq(specs) if has_seq else None, seed)
    acc: dict[str, _Acc] = {}
    feeds = [random_inputs(specs, batch, seq or 1, seed + k) for k, (batch, seq) in enumerate(plan)]
    if together:
        ys = [r.run_all(feeds) if isinstance(r, TorchRunner) else map(r.run, feeds) for r in (a, b)]
        results = iter(zip(*ys, strict=True))
    else:
        results = ((a.run(f), b.run(f)) for f in feeds)
    for batch, seq in each(plan):
        ya, yb = next(results)
        for o in common:
            if tuple(ya[o].shape) != tuple(yb[o].shape):
                raise NormtoolError(
                    f"output {o!r} shapes differ on input batch {batch}, seq {seq}: {a.label} gives "
                    f"{list(ya[o].shape)}, {b.label} gives {list(yb[o].shape)}"
                )
            if ya[o].dtype.is_floating_point != yb[o].dtype.is_floating_point:
                raise NormtoolError(
                    f"output {o!r} types differ: {a.label} gives {ya[o].dtype}, "
                    f"{b.label} gives {yb[o].dtype}"
                )
            acc.setdefault(o, _Acc(ya[o].dtype)).add(ya[o], yb[o], logits=o == "logits")
    outputs = [acc[o].report(o, tol) for o in common]
    return Report(a.label, b.label, name, seed, plan, tol.atol, tol.rtol, outputs, not_compared)


def compare_models(
    a: Model,
    b: Model,
    dtype: str | torch.dtype = "fp32",
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    plan: list[tuple[int, int | None]] | None = None,
    together: bool = False,
) -> Report:
    """Compare two Models, both run by the torch executor in ``dtype``.

    What the transforms use to self-verify: e.g. ``compare_models(orig, new, "fp64").max_rel``
    and ``compare_models(orig, new, "fp32").max_abs``; ``.ok`` applies the dtype's defaults.
    """
    return compare(
        TorchRunner(a, dtype, "a"),
        TorchRunner(b, dtype, "b"),
        dtype,
        samples,
        seed,
        atol,
        rtol,
        plan=plan,
        together=together,
    )


def stored_precision(model: Model) -> str:
    """The precision a checkpoint's function is defined to: its lowest float storage dtype.

    Why not always fp64: a transform's output stored in fp32 equals the original only up to the
    rounding of its rewritten weights to fp32 (~1e-7 of the output's scale), so two fp32 files
    are compared at fp32 tolerances even though the executor could run them in fp64.
    """
    stored = {spec.dtype for spec in model.graph.tensors.values()}
    names = [name for key, name in _STORAGE.items() if key in stored]
    return min(names, key=_BITS.__getitem__) if names else "fp32"


def open_runners(
    paths: list[Path],
    dtype: str | None = None,
    arch: str | None = None,
    heads: int | None = None,
    act: str | None = None,
    provider: str = "auto",
    pn_groups: int | None = None,
    eps: float | None = None,
) -> tuple[list[Runner], str]:
    """Runners for checkpoints (torch executor) and ``.onnx`` files (ONNX Runtime), and the dtype.

    ``dtype`` None: the lowest of the models' precisions (``stored_precision`` for checkpoints,
    the export dtype for ONNX files). An ONNX file computes in its exported dtype only, so a
    ``dtype`` more precise than that is refused: the comparison would measure the export's
    rounding against tolerances it cannot meet.
    """
    onnx_runners = {p: OnnxRunner(p, provider) for p in paths if p.suffix.lower() == ".onnx"}
    models = {
        p: load_model(p, arch=arch, heads=heads, act=act, pn_groups=pn_groups, eps=eps)
        for p in paths
        if p not in onnx_runners
    }
    precisions = [r.precision for r in onnx_runners.values()]
    precisions += [stored_precision(m) for m in models.values()]
    name = dtype_name(dtype) if dtype else min(precisions, key=_BITS.__getitem__)
    for p, r in onnx_runners.items():
        if _BITS[r.precision] < _BITS[name]:
            raise NormtoolError(
                f"this ONNX model computes in {r.precision}; compare it with --dtype {r.precision}",
                p,
            )
    runners: list[Runner] = [
        onnx_runners[p] if p in onnx_runners else TorchRunner(models[p], name, str(p))
        for p in paths
    ]
    known = next((r.inputs for r in runners if r.inputs is not None), None)
    for p, r in onnx_runners.items():
        if r.inputs is None:
            if known is None:
                raise NormtoolError(
                    "ONNX model has no normtool.inputs metadata (not a normtool export) and no "
                    "checkpoint to take the input signature from",
                    p,
                )
            r.inputs = list(known)
    return runners, name
