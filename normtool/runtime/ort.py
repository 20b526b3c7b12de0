"""ONNX Runtime sessions that say which provider really runs them.

Why this module: ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even on machines without a
GPU and silently falls back to the CPU when the CUDA libraries do not load, so a benchmark or a
verification could report "CUDA" while running on the CPU. Only ``session.get_providers()``
after the session exists tells the truth; every session here is checked that way.
``auto`` prefers CUDA and falls back to the CPU with the reason; an explicitly requested
provider that does not work raises ``DeviceUnavailable`` (exit 3). On CUDA, TF32 is off unless
asked for: Ampere and later GPUs otherwise run fp32 MatMuls with 10-bit mantissas, and
verification tolerances would no longer mean fp32.

Bounded runs: a file from a stranger may loop or allocate without end. What its constants
declare is refused before a session exists (``onnx_guard.check_declared_sizes``); what it
computes at run time meets two limits set per process (``set_limits``, the CLI's
``--time-limit`` and ``--memory-limit``). Time: each ``Session.call`` is stopped through ORT's
``RunOptions.terminate`` once it runs longer than the limit (checked between kernels, so one
long kernel finishes first). Memory: every session allocates its CPU working memory (not its
weights) from one arena registered with ORT's environment, capped at the limit; ORT then fails
the allocation instead of making it. ORT's own log lines are silenced (fatal only): normtool
reports every failure itself, in one line.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime

from normtool.errors import DeviceUnavailable, NormtoolError
from normtool.io.onnx_guard import check_declared_sizes, check_external_data, size_text

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_SHORT = {v: k for k, v in PROVIDERS.items()}
_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
#: ORT's default logger severity (warning); restored after probing an accelerator, whose
#: failure ORT reports with several lines on stderr that the caller reports in one instead.
#: Sessions and runs log at fatal (4) only, for the same reason.
_DEFAULT_SEVERITY, _QUIET_SEVERITY = 2, 4
T = TypeVar("T")

#: Per ORT call: no single inference of a model normtool handles takes 10 minutes on a CPU,
#: while a hung one would otherwise run until killed.
DEFAULT_TIME_LIMIT = 600.0
#: ORT's working memory (activations, not weights), all sessions of the process together. Fixed,
#: not a share of this machine's RAM, so a CI job refuses the same files on every runner; it
#: holds GPT-2's fp32 logits at bench's batch 8 x 512 tokens (0.82 GB) several times over.
DEFAULT_MEMORY_LIMIT = 4 * 10**9
_ARENA_FULL = re.compile(r"Available memory of (\d+) is smaller than requested bytes of (\d+)")


@dataclass(frozen=True)
class Limits:
    time_s: float = DEFAULT_TIME_LIMIT
    memory_bytes: int = DEFAULT_MEMORY_LIMIT


class _Process:
    """The limits of this process, and the arena size ORT's environment holds (fixed once set:
    ORT registers an environment allocator once and cannot replace it)."""

    limits = Limits()
    arena: int | None = None


def set_limits(time_s: float, memory_bytes: int) -> None:
    """Bound every later ``Session.call`` (seconds) and ORT's CPU working memory (bytes)."""
    if not time_s > 0:
        raise NormtoolError(f"--time-limit {time_s}: expected a positive number of seconds")
    if _Process.arena is not None and memory_bytes != _Process.arena:
        raise NormtoolError(
            f"--memory-limit {memory_bytes}: this process already runs ONNX Runtime with "
            f"{_Process.arena} bytes (set once per process)"
        )
    _Process.limits = Limits(time_s, memory_bytes)


def _register_arena() -> None:
    if _Process.arena is None:
        cpu = onnxruntime.OrtMemoryInfo(
            "Cpu",
            onnxruntime.OrtAllocatorType.ORT_ARENA_ALLOCATOR,
            0,
            onnxruntime.OrtMemType.DEFAULT,
        )
        limit = _Process.limits.memory_bytes
        onnxruntime.create_and_register_allocator(cpu, onnxruntime.OrtArenaCfg(limit, -1, -1, -1))
        _Process.arena = limit


class _Watchdog:
    """One daemon thread that sets ``terminate`` on ORT calls running past their deadline.

    Why one polling thread, not a timer per call: bench makes thousands of calls of some
    microseconds each, and starting a thread per call would cost more than the call. Arming is
    one dict store; the thread looks every ``POLL_S``, so a limit holds to within that.
    """

    POLL_S = 0.05

    def __init__(self) -> None:
        self._calls: dict[int, tuple[float, onnxruntime.RunOptions]] = {}
        self._thread: threading.Thread | None = None

    def arm(self, key: int, opts: onnxruntime.RunOptions, seconds: float) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ort-watchdog", daemon=True)
            self._thread.start()
        self._calls[key] = (time.monotonic() + seconds, opts)

    def disarm(self, key: int) -> None:
        self._calls.pop(key, None)

    def _watch(self) -> None:
        while True:
            time.sleep(self.POLL_S)
            now = time.monotonic()
            for deadline, opts in list(self._calls.values()):
                if now >= deadline:
                    opts.terminate = True


_WATCHDOG = _Watchdog()


@dataclass
class Session:
    """A created session, the provider that actually runs it, and why, if not the requested one."""

    session: onnxruntime.InferenceSession
    provider: str  # short name of get_providers()[0]: cpu | cuda | tensorrt
    requested: str
    fallback: str | None = None  # reason for running on another provider than requested (auto)
    source: str | None = None  # the file, for messages
    limits: Limits = field(default_factory=lambda: _Process.limits)

    @property
    def input_types(self) -> dict[str, Any]:
        return {i.name: _NP_TYPES.get(i.type) for i in self.session.get_inputs()}

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on numpy (or torch) inputs, cast to the dtypes the model declares."""
        outs = self.call(self.session.run, None, self.feed(inputs))
        return dict(zip(self.output_names, outs, strict=True))

    def feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``inputs`` as contiguous arrays of the dtypes and under the names the model declares.

        A model with one input takes the one input normtool draws whatever that input is called
        (a foreign file's ``data`` for a checkpoint's ``input``), if both are integer or both
        floating point and of the same rank; other name mismatches are refused, listing both.
        """
        arrays = {
            k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
            for k, v in inputs.items()
        }
        declared = self.session.get_inputs()
        if len(declared) == len(arrays) == 1 and _fits(declared[0], *arrays.values()):
            arrays = {declared[0].name: next(iter(arrays.values()))}
        names = [i.name for i in declared]
        if sorted(names) != sorted(arrays):
            raise NormtoolError(
                f"the model's inputs are {names}; normtool feeds {list(arrays)} (the names its "
                "checkpoint or export declares): rename the ONNX inputs to match",
                self.source,
            )
        feed = {}
        for i in declared:
            want = _NP_TYPES.get(i.type)
            if want is None:
                raise NormtoolError(
                    f"input {i.name!r} is a {i.type}; normtool feeds only "
                    f"{', '.join(_NP_TYPES)} inputs",
                    self.source,
                )
            feed[i.name] = np.ascontiguousarray(arrays[i.name], dtype=want)
        return feed

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args, run_options)``: one ORT call, stopped once it runs past the time limit;
        ORT's failures become one-line ``NormtoolError``s naming the file."""
        opts = onnxruntime.RunOptions()
        opts.log_severity_level = _QUIET_SEVERITY
        _WATCHDOG.arm(id(opts), opts, self.limits.time_s)
        try:
            return fn(*args, opts)
        except Exception as e:  # noqa: BLE001 - ORT raises several untyped errors
            raise self._failure(e, opts.terminate) from e
        finally:
            _WATCHDOG.disarm(id(opts))

    def _failure(self, e: Exception, terminated: bool) -> NormtoolError:
        limit = self.limits
        if terminated:
            return NormtoolError(
                f"ONNX Runtime ran longer than {limit.time_s:g} s on one call (--time-limit); "
                "stopped",
                self.source,
            )
        full = _ARENA_FULL.search(str(e))
        if full:
            left, asked = (int(g) for g in full.groups())
            return NormtoolError(
                f"ONNX Runtime asked for {size_text(asked)} of working memory with "
                f"{size_text(left)} left of the {size_text(limit.memory_bytes)} memory limit "
                "(--memory-limit); refused before allocating it",
                self.source,
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return NormtoolError(f"ONNX Runtime failed running the model: {first}", self.source)


def _fits(declared: Any, array: np.ndarray) -> bool:
    """Whether ``array`` can stand for the declared input: rank and integer-ness agree."""
    want = _NP_TYPES.get(declared.type)
    if want is None or len(declared.shape) != array.ndim:
        return False
    return np.issubdtype(want, np.integer) == np.issubdtype(array.dtype, np.integer)


def available() -> list[str]:
    """Short names of the providers this onnxruntime build lists (not necessarily working)."""
    return [_SHORT[p] for p in onnxruntime.get_available_providers() if p in _SHORT]


def _provider_list(provider: str, tf32: bool, options: Mapping[str, str] | None) -> list[Any]:
    cuda = ("CUDAExecutionProvider", {"use_tf32": "1" if tf32 else "0", **(options or {})})
    if provider == "tensorrt":
        return ["TensorrtExecutionProvider", cuda, "CPUExecutionProvider"]
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _options(threads: int | None) -> onnxruntime.SessionOptions:
    so = onnxruntime.SessionOptions()
    so.log_severity_level = _QUIET_SEVERITY
    _register_arena()
    so.add_session_config_entry("session.use_env_allocators", "1")  # the capped arena
    if threads:
        so.intra_op_num_threads = threads
    return so


def _source(model: str | Path | bytes) -> str | bytes:
    return model if isinstance(model, bytes) else str(model)


def _cpu_session(model: str | Path | bytes, threads: int | None) -> onnxruntime.InferenceSession:
    try:
        return onnxruntime.InferenceSession(
            _source(model), _options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # noqa: BLE001 - ORT raises several untyped errors for a bad model
        where = None if isinstance(model, bytes) else model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NormtoolError(f"ONNX Runtime cannot load the model: {first}", where) from e


def _try_accelerator(
    model: str | Path | bytes,
    provider: str,
    threads: int | None,
    tf32: bool,
    options: Mapping[str, str] | None = None,
) -> tuple[onnxruntime.InferenceSession | None, str]:
    """A session whose first provider is ``provider``, or ``(None, reason it is not)``."""
    name = PROVIDERS[provider]
    if name not in onnxruntime.get_available_providers():
        return None, (
            f"this onnxruntime {onnxruntime.__version__} build has no {name} "
            f"(it lists: {', '.join(available())})"
        )
    onnxruntime.set_default_logger_severity(_QUIET_SEVERITY)
    try:
        sess = onnxruntime.InferenceSession(
            _source(model), _options(threads), providers=_provider_list(provider, tf32, options)
        )
    except Exception as e:  # noqa: BLE001 - reported as the reason; the CPU check follows
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"{name} failed to start: {first}"
    finally:
        onnxruntime.set_default_logger_severity(_DEFAULT_SEVERITY)
    got = sess.get_providers()
    if got and got[0] == name:
        return sess, ""
    return None, (
        f"{name} is listed by onnxruntime {onnxruntime.__version__} but did not start "
        "(no usable GPU, or its CUDA/cuDNN libraries are missing)"
    )


def create_session(
    model: str | Path | bytes,
    provider: str = "auto",
    threads: int | None = None,
    tf32: bool = False,
    cuda_options: Mapping[str, str] | None = None,
) -> Session:
    """Create a session on ``provider`` (auto | cuda | tensorrt | cpu) and check what runs it.

    ``cuda_options``: extra CUDA provider options (e.g. ``enable_cuda_graph``); a CPU session
    has no use for them and ignores them.

    ``auto`` tries CUDA, then the CPU (``Session.fallback`` says why). ``cuda``/``tensorrt``
    raise ``DeviceUnavailable`` when that provider does not actually run the session; a model
    ONNX Runtime cannot load at all is a ``NormtoolError`` (bad input), not a device problem.
    """
    if provider not in ("auto", *PROVIDERS):
        raise NormtoolError(f"--provider {provider!r}: use auto, {', '.join(PROVIDERS)}")
    source = None if isinstance(model, bytes) else str(model)
    if source is not None:
        proto = check_external_data(model)  # before ONNX Runtime reads any external data
        limits = _Process.limits
        check_declared_sizes(proto, model, limits.memory_bytes, limits.time_s)
    if provider == "cpu":
        return Session(_cpu_session(model, threads), "cpu", provider, source=source)
    sess, reason = _try_accelerator(
        model, "cuda" if provider == "auto" else provider, threads, tf32, cuda_options
    )
    if sess is not None:
        return Session(sess, _SHORT[sess.get_providers()[0]], provider, source=source)
    cpu = _cpu_session(model, threads)  # raises NormtoolError if the model itself is the problem
    if provider == "auto":
        fallback = f"{reason}; running on the CPU"
        return Session(cpu, "cpu", provider, fallback=fallback, source=source)
    raise DeviceUnavailable(f"--provider {provider}: {reason}")
