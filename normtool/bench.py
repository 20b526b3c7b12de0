"""Benchmark ONNX models with ONNX Runtime: interleaved runs, medians, ratios to the first model.

Why these choices: every model in one call is timed in the same interleaved rounds
(``normtool.timing``), so ratios are measured under the same conditions; the provider reported
is the one the session actually runs on (``session.get_providers()``), never the one asked for;
on CUDA inputs and outputs live on the device (IO binding), so host copies are not timed, and
TF32 stays off unless asked so fp32 means fp32. Checkpoints are exported on the fly with the
same emitter ``normtool export`` uses.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from normtool import __version__
from normtool.arch.convnets import DEFAULT_IMAGE_SIZE
from normtool.arch.family import Assumption
from normtool.errors import NormtoolError
from normtool.export import export_model
from normtool.graph import InputSpec
from normtool.inputs import random_inputs
from normtool.io.onnx_guard import check_external_data
from normtool.load import load_model
from normtool.runtime.onnx_emit import INPUTS_KEY, input_signature
from normtool.runtime.ort import Session, create_session
from normtool.timing import BLOCKS_IN_ONE_SET, interleaved, paired_ratio, summarize


@dataclass
class Prepared:
    label: str
    onnx_path: Path
    signature: list[InputSpec]
    assumptions: list[Assumption] = field(default_factory=list)  # of a checkpoint's graph


#: Integer inputs of a foreign ONNX file that are not token ids, by their transformers names.
TOKEN_INPUTS = {"attention_mask": "mask", "position_ids": "positions", "token_type_ids": "types"}


def _signature(path: Path) -> list[InputSpec]:
    """The input signature of an ONNX file: normtool's metadata, or read off its declared inputs."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises untyped errors on a bad file
        raise NormtoolError(f"not a readable ONNX model ({type(e).__name__})", path) from e
    if any(p.key == INPUTS_KEY for p in proto.metadata_props):
        return input_signature(proto)
    specs = []
    for i in proto.graph.input:
        t = i.type.tensor_type
        # a float [B, C, H, W] input with free H/W is an image: timed at the usual size, not at
        # the --seq lengths
        tokens = t.elem_type == onnx.TensorProto.INT64
        image = not tokens and len(t.shape.dim) == 4
        dims: list[int | str] = []
        for k, d in enumerate(t.shape.dim):
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif k == 0:
                dims.append("batch")
            else:
                dims.append(DEFAULT_IMAGE_SIZE if image and k >= 2 else "seq")
        kind = "tokens" if tokens else "pixels" if image else "features"
        if tokens:  # a padding mask and positions by the names transformers gives them
            kind = TOKEN_INPUTS.get(i.name, kind)
        # a foreign model's vocabulary is unknown: id 0..1 is valid for any embedding table
        vocab = 2 if kind in ("tokens", "types") else 0
        specs.append(InputSpec(i.name, kind, tuple(dims), vocab=vocab))
    return specs


def prepare(
    paths: Sequence[Path],
    workdir: Path,
    dtype: str,
    arch: str | None,
    heads: int | None,
    act: str | None,
    pn_groups: int | None = None,
    eps: float | None = None,
) -> list[Prepared]:
    """ONNX files are used as they are; checkpoints are exported into ``workdir``."""
    out = []
    for i, p in enumerate(paths):
        p = Path(p)
        assumptions: list[Assumption] = []
        if p.suffix.lower() == ".onnx":
            if not p.is_file():
                raise NormtoolError("no such file", p)
            check_external_data(p)
            onnx_path = p
        else:
            onnx_path = workdir / f"{i}-{p.stem}.onnx"
            model = load_model(p, arch, heads, act, pn_groups, eps)
            assumptions = model.assumptions
            export_model(model, onnx_path, dtype=dtype, inputs=[p])
        out.append(Prepared(p.name, onnx_path, _signature(onnx_path), assumptions))
    return out


def _feeds(sig: list[InputSpec], batch: int, seq: int, seed: int, types: dict) -> dict:
    """Random inputs for ``sig`` as contiguous numpy arrays of the dtypes the session declares."""
    return {
        name: np.ascontiguousarray(x.numpy(), dtype=types.get(name) or x.numpy().dtype)
        for name, x in random_inputs(sig, batch, seq, seed).items()
    }


def _runner(sess: Session, feeds: dict, cuda_graph: bool = False) -> Callable[[], object]:
    """A no-argument call running one inference, under the time limit (``Session.call``); on
    CUDA with device-resident IO.

    With a CUDA graph, ORT replays a captured graph into fixed addresses: a first, regular run
    allocates the outputs, and those device buffers are then bound for every later run.
    """
    s = sess.session
    feeds = sess.feed(feeds)
    if sess.provider == "cpu":
        return lambda: sess.call(s.run, None, feeds)
    binding = s.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(arr, "cuda", 0))
    for o in s.get_outputs():
        binding.bind_output(o.name, "cuda")
    if cuda_graph:
        sess.call(s.run_with_iobinding, binding)
        outputs = binding.get_outputs()
        binding.clear_binding_outputs()
        for o, value in zip(s.get_outputs(), outputs, strict=True):
            binding.bind_ortvalue_output(o.name, value)
    return lambda: sess.call(s.run_with_iobinding, binding)


def _uses_seq(sig: list[InputSpec]) -> bool:
    return any("seq" in s.shape for s in sig)


def device_name(provider: str) -> str:
    if provider in ("cuda", "tensorrt") and shutil.which("nvidia-smi"):
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    return {
        "normtool": __version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _rounds_per_set(iters: int, sets: int) -> list[int]:
    """``iters`` rounds split over at most ``sets`` sets of sessions, as evenly as possible."""
    n = min(iters, sets)
    return [iters // n + (k < iters % n) for k in range(n)]


def _ratio_fields(
    base: list[list[float]], other: list[list[float]], models: int, level: float
) -> dict[str, Any]:
    """The JSON fields of one model's ratio to the first model (``timing.paired_ratio``)."""
    r = paired_ratio(base, other, models, level)
    return {
        "ratio": r.ratio,
        "ratio_ci": list(r.ci) if r.ci else None,
        "ci_level": level,
        "distinguishable": r.distinguishable,
        "verdict": r.verdict,
    }


def _ci_method(sets: int) -> str:
    """What a ratio's interval is computed over, for the JSON (``timing.paired_ratio``)."""
    per = "log of the ratio of the models' medians over the same interleaved rounds"
    if sets > 1:
        return f"Student t over {sets} sets of fresh sessions ({per} in each set)"
    return (
        f"Student t over up to {BLOCKS_IN_ONE_SET} blocks of one set of sessions ({per} in "
        "each block): covers round-to-round noise, not where ORT placed a session (--sessions)"
    )


def _row(
    label: str,
    short: str,
    providers: list[str],
    per_set: list[list[float]],
    batch: int,
    keep: bool,
) -> dict[str, Any]:
    """One model's summary at one shape: its providers, short and exactly as ORT reports them
    for its session, and its times over all sets."""
    times = [x for t in per_set for x in t]
    head = {"model": label, "provider": short, "providers": providers}
    return head | summarize(times, batch) | ({"times_ms": [x * 1e3 for x in times]} if keep else {})


def run_bench(
    paths: Sequence[Path],
    provider: str = "auto",
    batches: Sequence[int] = (1, 8),
    seqs: Sequence[int] = (128, 512),
    warmup: int = 10,
    iters: int = 50,
    threads: int | None = None,
    dtype: str = "fp32",
    tf32: bool = False,
    arch: str | None = None,
    heads: int | None = None,
    act: str | None = None,
    seed: int = 0,
    on_shape: Callable[[int, int | None, int, int], None] | None = None,
    cuda_graph: bool = False,
    keep_times: bool = False,
    sessions: int = 1,
    ci_level: float = 0.95,
    pn_groups: int | None = None,
    eps: float | None = None,
) -> dict[str, Any]:
    """Time every model at every (batch, seq) shape; ratios are to the first model.

    ``sessions``: the ``iters`` rounds are split over this many sets of fresh sessions (each
    set warmed up ``warmup`` times, all shapes timed in it before the next set opens, so only
    one set is alive at a time). Several sets let each ratio's confidence interval cover where
    ORT placed a session's buffers, not only round-to-round noise (``timing.paired_ratio``).
    ``on_shape(batch, seq, set, sets)`` is called before each shape in each set.

    ``keep_times``: each row also carries its per-round times (``times_ms``, set after set, in
    round order), so a caller can pair the models' calls of the same round.

    ``cuda_graph``: ORT's CUDA graphs (CUDA provider only; refused for ``--provider cpu``, not
    used — and said so — where ``auto`` falls back to the CPU). A captured graph fixes every
    shape, so each (batch, seq) gets fresh sessions.
    """
    if not paths:
        raise NormtoolError("bench needs at least one model")
    if not 0 < ci_level < 1:
        raise NormtoolError(f"--ci-level {ci_level}: expected a number between 0 and 1")
    if sessions < 1:
        raise NormtoolError(f"--sessions {sessions}: expected a positive integer")
    if cuda_graph and provider not in ("auto", "cuda"):
        raise NormtoolError(f"--cuda-graph needs the CUDA provider, not --provider {provider}")
    options = {"enable_cuda_graph": "1"} if cuda_graph else None
    with tempfile.TemporaryDirectory(prefix="normtool-bench-") as work:
        prepared = prepare(paths, Path(work), dtype, arch, heads, act, pn_groups, eps)

        def open_sessions(k: int = 0) -> list[Session]:
            """Set ``k``'s sessions, created starting at model ``k``: the later-created of two
            sessions of one file ran 0.2 % faster here, every time, so the creation order
            rotates from set to set like the call order does from round to round."""
            n = len(prepared)
            order = [(k + j) % n for j in range(n)]
            made = {
                i: create_session(prepared[i].onnx_path, provider, threads, tf32, options)
                for i in order
            }
            opened = [made[i] for i in range(n)]
            used = {s.provider for s in opened}
            if len(used) > 1:
                raise NormtoolError(f"models ran on different providers: {sorted(used)}")
            return opened

        live = open_sessions()
        # what the first set ran on: every later set is held to the same providers
        short, fallback = live[0].provider, live[0].fallback
        providers = [s.session.get_providers() for s in live]
        graphs = cuda_graph and short == "cuda"
        seq_list: list[int | None] = (
            list(seqs) if any(_uses_seq(p.signature) for p in prepared) else [None]
        )
        shapes = [(b, s) for b in batches for s in seq_list]
        # times[shape][model][set]: seconds per call, in round order
        times: dict[tuple[int, int | None], list[list[list[float]]]] = {
            shape: [[] for _ in prepared] for shape in shapes
        }
        plan = _rounds_per_set(iters, sessions)
        for k, rounds in enumerate(plan):
            for i, (batch, seq) in enumerate(shapes):
                if on_shape is not None:
                    on_shape(batch, seq, k + 1, len(plan))
                if (k > 0 and i == 0) or (graphs and i > 0):
                    live = runners = []  # the old set is freed before the next one is made
                    live = open_sessions(k)
                    if [s.session.get_providers() for s in live] != providers:
                        raise NormtoolError("a fresh set of sessions ran on other providers")
                runners = [
                    _runner(s, _feeds(p.signature, batch, seq or 1, seed, s.input_types), graphs)
                    for p, s in zip(prepared, live, strict=True)
                ]
                timed = interleaved(runners, warmup, rounds)
                for acc, t in zip(times[(batch, seq)], timed, strict=True):
                    acc.append(t)
        results = []
        for (batch, seq), per_model in times.items():
            rows = [
                _row(p.label, short, pr, t, batch, keep_times)
                for p, pr, t in zip(prepared, providers, per_model, strict=True)
            ]
            base = rows[0]["median_ms"]
            # the baseline against itself: exactly 1, and no comparison to make
            rows[0] |= {"ratio_of_medians": 1.0, "ratio": 1.0, "ratio_ci": [1.0, 1.0]}
            rows[0] |= {"ci_level": ci_level, "distinguishable": False, "verdict": "baseline"}
            for r, t in zip(rows[1:], per_model[1:], strict=True):
                r["ratio_of_medians"] = r["median_ms"] / base
                r |= _ratio_fields(per_model[0], t, len(prepared), ci_level)
            results.append({"batch": batch, "seq": seq, "models": rows})
    if cuda_graph and not graphs:
        fallback = f"{fallback}; CUDA graph not used" if fallback else "CUDA graph not used"
    return {
        "provider": short,
        "requested_provider": provider,
        "fallback": fallback,
        "cuda_graph": graphs,
        "device": device_name(short),
        "threads": threads,
        "dtype": dtype,
        "tf32": tf32 if short != "cpu" else None,
        "warmup": warmup,
        "iters": iters,
        "sessions": len(plan),
        "ci_level": ci_level,
        "ci_method": _ci_method(len(plan)),
        "versions": versions(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "models": [str(p) for p in paths],
        "results": results,
        "assumptions": [
            {"file": str(path), **a.to_dict()}
            for path, p in zip(paths, prepared, strict=True)
            for a in p.assumptions
        ],
    }
