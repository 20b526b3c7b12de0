"""Greedy decoding with a ``--kv-cache`` export (``normtool.runtime.onnx_kv``'s interface).

Why here: the cached export is only right if prefill plus one-token steps reproduce what the
model generates; this loop is the smallest driver that feeds the file as Optimum does (mask over
past + current tokens, positions continuing from the past, presents fed back as the next past),
so tests and ``bench`` exercise exactly that interface.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from normtool.errors import NormtoolError

#: ONNX element types of the past inputs → numpy
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def empty_past(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    """Every ``past_key_values.*`` input of ``session`` with a past of length 0."""
    past = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, dim = i.shape
            past[i.name] = np.zeros((batch, heads, 0, dim), _DTYPES[i.type])
    if not past:
        raise NormtoolError("the ONNX model has no past_key_values inputs (export --kv-cache)")
    return past


def step(
    session: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One call: ``ids`` ``[B, T]`` after the cached ``past``; the logits ``[B, T, V]`` and the
    next past (the presents)."""
    batch, seq = ids.shape
    done = next(iter(past.values())).shape[2]
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, done + seq), np.int64), **past}
    names = {i.name for i in session.get_inputs()}
    if "position_ids" in names:
        feed["position_ids"] = np.broadcast_to(np.arange(done, done + seq), (batch, seq)).copy()
    outs = [o.name for o in session.get_outputs()]
    values = dict(zip(outs, session.run(None, feed), strict=True))
    nxt = {
        n.replace("present.", "past_key_values.", 1): v for n, v in values.items() if n != "logits"
    }
    return values["logits"], nxt


def greedy(
    session: ort.InferenceSession,
    ids: np.ndarray,
    new_tokens: int,
    on_step: Callable[[int], None] | None = None,
) -> np.ndarray:
    """``ids`` ``[B, T]`` followed by ``new_tokens`` tokens, each the argmax of the last logits
    (the first one from the prefill, each further one from a one-token step). ``on_step(i)`` is
    called after call ``i`` (0: the prefill), for timing."""
    ids = np.asarray(ids, np.int64)
    past = empty_past(session, ids.shape[0])
    out, chunk = ids, ids
    for i in range(new_tokens):
        logits, past = step(session, chunk, past)
        if on_step is not None:
            on_step(i)
        chunk = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        out = np.concatenate([out, chunk], axis=1)
    return out
