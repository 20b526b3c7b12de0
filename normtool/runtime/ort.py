"""ONNX Runtime sessions that say which provider really runs them.

Why this module: ``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even on machines without a
GPU and silently falls back to the CPU when the CUDA libraries do not load, so a benchmark or a
verification could report "CUDA" while running on the CPU. Only ``session.get_providers()``
after the session exists tells the truth; every session here is checked that way.
``auto`` prefers CUDA and falls back to the CPU with the reason; an explicitly requested
provider that does not work raises ``DeviceUnavailable`` (exit 3). On CUDA, TF32 is off unless
asked for: Ampere and later GPUs otherwise run fp32 MatMuls with 10-bit mantissas, and
verification tolerances would no longer mean fp32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from normtool.errors import DeviceUnavailable, NormtoolError
from normtool.io.onnx_guard import check_external_data

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
_DEFAULT_SEVERITY, _QUIET_SEVERITY = 2, 4


@dataclass
class Session:
    """A created session, the provider that actually runs it, and why, if not the requested one."""

    session: onnxruntime.InferenceSession
    provider: str  # short name of get_providers()[0]: cpu | cuda | tensorrt
    requested: str
    fallback: str | None = None  # reason for running on another provider than requested (auto)

    @property
    def input_types(self) -> dict[str, Any]:
        return {i.name: _NP_TYPES.get(i.type) for i in self.session.get_inputs()}

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run on numpy (or torch) inputs, cast to the dtypes the model declares."""
        types = self.input_types
        feed = {}
        for name, value in inputs.items():
            arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
            want = types.get(name)
            feed[name] = np.ascontiguousarray(arr, dtype=want) if want is not None else arr
        outs = self.session.run(None, feed)
        return dict(zip(self.output_names, outs, strict=True))


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
    so.log_severity_level = 3
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
    if not isinstance(model, bytes):
        check_external_data(model)  # before ONNX Runtime reads any external data
    if provider == "cpu":
        return Session(_cpu_session(model, threads), "cpu", provider)
    sess, reason = _try_accelerator(
        model, "cuda" if provider == "auto" else provider, threads, tf32, cuda_options
    )
    if sess is not None:
        return Session(sess, _SHORT[sess.get_providers()[0]], provider)
    cpu = _cpu_session(model, threads)  # raises NormtoolError if the model itself is the problem
    if provider == "auto":
        return Session(cpu, "cpu", provider, fallback=f"{reason}; running on the CPU")
    raise DeviceUnavailable(f"--provider {provider}: {reason}")
