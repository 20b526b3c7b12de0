"""Numerical equivalence of two models: the CI gate (``normtool verify``) and every transform's
self-check (``compare_models``).

Both models run on the same seeded random inputs drawn from the input signature (token ids
inside the vocabulary, pixels, features; ``normtool.inputs``), over several batches that include
batch 1 at the longest sequence and a length-1 sequence; token models get padded batches
(``inputs.random_inputs``), and per-token outputs are compared at the positions the
``attention_mask`` keeps (``inputs.unpadded``: a padded query's value is defined by no one).
Model ``a`` is the reference. For each output we report

* ``max_abs``: max |a − b| over every element of every batch;
* ``scale``: max |a| (the output's scale), and ``max_rel = max_abs / scale``;
* ``agreement``: for ``logits``, the fraction of rows whose argmax agrees (reported, not gated:
  near-ties flip the argmax under any rounding change, so it is information, not a criterion);
  for integer outputs, the fraction of equal values.

An output passes when ``max_abs <= atol + rtol · scale``: a tolerance relative to the output's
*scale*, not elementwise (elementwise-relative tests cannot be met near zero and fail for no
reason), with ``atol`` as a floor for outputs whose scale is ~0. Integer outputs (e.g. a Loki
head's predicted labels) must agree exactly. Any NaN fails.

Which dtype (``--dtype``, else the default): the lower of the two models' precisions, the
precision each computes in — an ONNX file's export dtype; a checkpoint's, the stored dtype of
most of its weights (``checkpoint_precision``, from the safetensors header, never from
metadata). Both run in it and its tolerances apply; ``--dtype fp64`` runs two checkpoints
(almost) exactly. The report says which precision and why (``precision``, ``precision_reason``).

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
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from normtool.arch.family import Assumption
from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec
from normtool.inputs import (
    complete_inputs,
    input_shape,
    max_seq,
    optional,
    random_inputs,
    unpadded,
)
from normtool.io.safetensors_format import DTYPE_NAMES
from normtool.load import load_model
from normtool.model import Model
from normtool.opspec import SPECS
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
#: ONNX TensorProto element types (DOUBLE, FLOAT, FLOAT16, BFLOAT16) → precision.
_ONNX_PRECISION = {11: "fp64", 1: "fp32", 10: "fp16", 16: "bf16"}

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
        self.precision = onnx_precision(proto)

    def run(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.inputs is not None:  # optional inputs the other model does not take
            feeds = complete_inputs(self.inputs, feeds)
        return {k: torch.from_numpy(v) for k, v in self.session.run(feeds).items()}


def onnx_precision(proto: Any) -> str:
    """The precision an ONNX model computes in, from its graph's declared types: the lowest of
    its float outputs' (what is compared), else of its float inputs', else fp32.

    Why not the ``normtool.dtype`` metadata an export writes: a file may claim fp16 for an
    fp32 graph and so loosen every tolerance ~1000×; the declared types are what ONNX Runtime
    runs. A foreign model that computes in fp16 but casts its outputs to fp32 is then held to
    fp32 tolerances: a false alarm (``--dtype fp16`` states the intent), never a false pass.
    """
    for values in (proto.graph.output, proto.graph.input):
        found = [
            _ONNX_PRECISION[v.type.tensor_type.elem_type]
            for v in values
            if v.type.tensor_type.elem_type in _ONNX_PRECISION
        ]
        if found:
            return min(found, key=_BITS.__getitem__)
    return "fp32"


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
    """The inputs both models take, in ``a``'s order; NormtoolError naming the first difference.

    An optional input (a padding mask, position ids, token types: ``inputs.optional``) that
    only one side takes is left out, and that side gets its default (an unpadded batch): a
    model exported before masks were inputs still compares with one that takes them. The
    longest sequence is the shorter of the two position tables (both must accept it).
    """
    by_name_b = {s.name: s for s in b.inputs}
    names_a = {s.name for s in a.inputs}
    lone = [s for s in a.inputs if s.name not in by_name_b]
    lone += [s for s in b.inputs if s.name not in names_a]
    if any(not optional(s) for s in lone):
        names_a, names_b = ([s.name for s in r.inputs] for r in (a, b))
        raise NormtoolError(f"inputs differ: {a.label} takes {names_a}, {b.label} takes {names_b}")
    specs = []
    for sa in a.inputs:
        sb = by_name_b.get(sa.name)
        if sb is None:
            continue
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


#: Live copies of the largest activation assumed at the peak: an op's input and output, the
#: residual stream kept for the next add, and one temporary (norm statistics, a cast).
LIVE_ACTIVATIONS = 4
#: Bytes per output element the comparison itself holds (``_Acc.add``): both outputs widened to
#: float64, their difference, and a boolean mask.
COMPARE_BYTES = 3 * 8 + 1
#: ``verify``'s bound when ``--memory-limit`` is not given: the default ONNX Runtime is held to
#: (``runtime.ort.DEFAULT_MEMORY_LIMIT``; not imported, onnxruntime costs every checkpoint-only
#: run ~0.1 s): one limit, fixed rather than a share of RAM so CI runners refuse the same files.
#: It holds GPT-2's batch of 2 × 1024 tokens (50,257-way logits: ~3.3 GB by ``batch_bytes``).
VERIFY_MEMORY_LIMIT = 4 * 10**9


def memory_limit() -> int:
    """The bound of a comparison not given one (a transform's self-check): half of physical
    memory. Why not ``VERIFY_MEMORY_LIMIT``: a self-check takes no flag, and refusing a model
    that fits would stop a conversion that works; this only refuses what cannot run well."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def activation_sizes(graph: Graph, batch: int, seq: int) -> tuple[int, int]:
    """(elements of the largest tensor the executor makes for one batch, elements of the
    graph's outputs), from the declared shapes alone, before anything is allocated.

    The largest tensor: a graph input, an op's output (positions per row × the width of its
    space) or attention's score matrices. Positions per row: a token sequence's length, a
    feature row's 1, an image's H·W, divided by each conv, pool or patch stride squared, 1
    after pooling.
    """
    pos: dict[str, int] = {}
    for spec in graph.inputs:
        shape = input_shape(spec, 1, seq)
        rows = shape[2:] if spec.kind == "pixels" else shape[1:-1]
        if spec.kind in ("tokens", "mask", "positions", "types"):
            rows = shape[1:]
        pos[spec.name] = math.prod(rows)
    size = {s.name: math.prod(input_shape(s, batch, seq)) for s in graph.inputs}
    biggest = max(size.values(), default=0)
    for op in graph.ops:
        n = max((pos.get(v, 1) for v in op.inputs), default=1)
        spec = SPECS[op.kind]
        n = spec.positions(op.attrs, n)
        if spec.scores:
            biggest = max(biggest, batch * op.attrs.get("heads", 1) * n * n)
        pos[op.output] = n
        space = graph.spaces.get(graph.value_spaces.get(op.output, ""))
        size[op.output] = batch * n * (space.size if space else 1)
        biggest = max(biggest, size[op.output])
    return biggest, sum(size.get(o, 0) for o in graph.outputs)


def batch_bytes(
    specs: list[InputSpec], graphs: list[Graph], batch: int, seq: int, itemsize: int
) -> tuple[int, int]:
    """(bytes of one batch's random inputs as made, bytes of the rest at the peak): whichever
    is larger of running a model (``LIVE_ACTIVATIONS`` copies of the largest tensor, beside
    the other model's outputs) and comparing the outputs (both, and ``COMPARE_BYTES`` each)."""
    made = sum(math.prod(input_shape(s, batch, seq)) * 8 for s in specs)  # fp64 or int64
    sizes = [activation_sizes(g, batch, seq) for g in graphs] or [(0, 0)]
    act, out = max(a for a, _ in sizes), max(o for _, o in sizes)
    running = LIVE_ACTIVATIONS * act * itemsize + out * itemsize
    return made, max(running, out * (2 * itemsize + COMPARE_BYTES))


def check_memory(
    a: Runner,
    b: Runner,
    specs: list[InputSpec],
    plan: list[tuple[int, int | None]],
    dtype: torch.dtype,
    limit: int | None,
    together: bool,
) -> bool:
    """Refuse a comparison whose declared sizes need more than ``limit`` bytes (default
    ``memory_limit()``) for one batch, before any input is made; returns whether the batches
    may run in one pass (``together``: all batches' inputs and activations live at once) or
    must go one by one.

    Why from declared sizes: a 300-byte checkpoint of zero-element tensors can declare
    30,000,000 input features; its random inputs alone would take gigabytes per batch. ONNX
    models' activations are not visible here; the executor's graph (the same function) stands
    in for them, and where both are ONNX files only the inputs are counted.
    """
    limit = memory_limit() if limit is None else limit
    graphs = [r.graph for r in (a, b) if isinstance(r, TorchRunner)]
    sizes = [batch_bytes(specs, graphs, bs, sq or 1, dtype.itemsize) for bs, sq in plan]
    worst = max(range(len(plan)), key=lambda k: sum(sizes[k]))
    made, rest = sizes[worst]
    if made + rest > limit:
        batch, seq = plan[worst]
        shape = f"{batch}×{seq}" if seq is not None else str(batch)
        raise NormtoolError(
            f"comparing needs ~{_gib(made + rest)} for one batch ({shape}: inputs {_gib(made)}, "
            f"activations and outputs {_gib(rest)}), above the limit of {_gib(limit)} "
            "(--memory-limit)",
            a.label,
        )
    return together and sum(m + x for m, x in sizes) <= limit


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


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
    max_memory: int | None = None,
) -> Report:
    """Run ``a`` (the reference) and ``b`` on the same random inputs and measure the difference.

    ``dtype`` selects the default tolerances (and is recorded); the runners already run in
    their own dtype. ``each`` wraps the loop over input batches (the CLI's progress bar).
    ``plan``: the (batch, seq) shapes to run instead of ``batch_plan``'s ``samples``.
    ``together``: run all batches in one pass of each executor model (``TorchRunner.run_all``)
    where they fit in ``max_memory`` bytes together, else one by one (``check_memory``).
    Raises NormtoolError when the inputs, the outputs or their shapes differ, or when one batch
    would need more than ``max_memory`` bytes. Inputs are made batch by batch as they run.
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
    together = check_memory(a, b, specs, plan, DTYPES[name], max_memory, together)
    feeds = (random_inputs(specs, batch, seq or 1, seed + k) for k, (batch, seq) in enumerate(plan))
    if together:
        feeds = list(feeds)
        ys = [r.run_all(feeds) if isinstance(r, TorchRunner) else map(r.run, feeds) for r in (a, b)]
        results = iter(zip(feeds, *ys, strict=True))
    else:
        results = ((f, a.run(f), b.run(f)) for f in feeds)
    for batch, seq in each(plan):
        feed, ya, yb = next(results)
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
            kept = unpadded(feed, ya[o]), unpadded(feed, yb[o])
            acc.setdefault(o, _Acc(ya[o].dtype)).add(*kept, logits=o == "logits")
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


@dataclass(frozen=True)
class Precision:
    """The dtype a comparison runs in (``fp32``…) and why, for the report."""

    name: str
    reason: str


def checkpoint_precision(model: Model, label: str = "") -> Precision:
    """The precision a checkpoint computes in: the stored dtype of most of its weight values.

    Why not always fp64: a transform's output stored in fp32 equals the original only up to the
    rounding of its rewritten weights to fp32 (~1e-7 of the output's scale), so two fp32 files
    are compared at fp32 tolerances even though the executor could run them in fp64.

    Why the majority of values, not the lowest dtype present: the executor runs every op in one
    dtype, casting each weight to it. A stray bf16 buffer in an fp32 model is widened to fp32
    exactly, so the model still computes in fp32, and taking its dtype would loosen every
    tolerance ~1000× and pass real changes. The other way round, a bf16 model that keeps its
    norm weights in fp32 computes in bf16 — the precision of nearly all its arithmetic. The
    cost of the rule is a false alarm, never a false pass: a rewrite that changes a minority
    low-precision tensor rounds it at that precision, which the majority's tolerances may flag
    (``--dtype`` then states the intended precision). Ties go to the more precise dtype.

    Dtypes come from the safetensors header (``Checkpoint.dtype``); the graph's own record is
    metadata a file may forge (``load_model`` refuses one that disagrees with the header).
    Tied tensors (one stored key read by several graph tensors) count once.
    """
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for spec in model.graph.tensors.values():
        key = spec.source.key
        if key in seen:
            continue
        seen.add(key)
        ck = model.checkpoint
        stored = DTYPE_NAMES[ck.dtype(key)] if ck is not None and key in ck else spec.dtype
        counts[stored] = counts.get(stored, 0) + math.prod(spec.shape)
    floats = {_STORAGE[k]: n for k, n in counts.items() if k in _STORAGE}
    if not floats:
        return Precision("fp32", f"{label}: no float weights; fp32 assumed")
    name = max(floats, key=lambda d: (floats[d], _BITS[d]))
    total = sum(floats.values())
    if len(floats) == 1:
        return Precision(name, f"{label}: every weight is stored in {name}")
    rest = ", ".join(
        f"{d} {n / total:.1%}" for d, n in sorted(floats.items(), key=lambda x: -x[1]) if d != name
    )
    return Precision(
        name,
        f"{label}: {floats[name] / total:.1%} of its {total} weight values are stored in {name} "
        f"(also {rest}, widened or rounded to {name} to run)",
    )


def open_runners(
    paths: list[Path],
    dtype: str | None = None,
    arch: str | None = None,
    heads: int | None = None,
    act: str | None = None,
    provider: str = "auto",
    pn_groups: int | None = None,
    eps: float | None = None,
) -> tuple[list[Runner], Precision]:
    """Runners for checkpoints (torch executor) and ``.onnx`` files (ONNX Runtime), and the
    precision to compare them in.

    ``dtype`` None: the lowest of the models' precisions (``checkpoint_precision`` for
    checkpoints, the export dtype for ONNX files): the comparison cannot be finer than the
    coarser side computes. An ONNX file computes in its exported dtype only, so a ``dtype``
    more precise than that is refused: the comparison would measure the export's rounding
    against tolerances it cannot meet.
    """
    onnx_runners = {p: OnnxRunner(p, provider) for p in paths if p.suffix.lower() == ".onnx"}
    models = {
        p: load_model(p, arch=arch, heads=heads, act=act, pn_groups=pn_groups, eps=eps)
        for p in paths
        if p not in onnx_runners
    }

    def precision_of(p: Path) -> Precision:
        if p in onnx_runners:
            name = onnx_runners[p].precision
            return Precision(name, f"{p}: an ONNX model exported in {name}")
        return checkpoint_precision(models[p], str(p))

    precisions = [precision_of(p) for p in paths]
    if dtype:
        chosen = Precision(dtype_name(dtype), f"--dtype {dtype_name(dtype)} given")
    else:
        low = min(precisions, key=lambda x: _BITS[x.name])
        why = "; ".join(x.reason for x in precisions)
        if any(x.name != low.name for x in precisions):
            why += f"; compared in the lower, {low.name}"
        chosen = Precision(low.name, why)
    name = chosen.name
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
            # the optional inputs (a mask…) this file does not declare are not fed to it
            declared = {i.name for i in r.session.session.get_inputs()}
            r.inputs = [s for s in known if s.name in declared or not optional(s)]
    return runners, chosen
