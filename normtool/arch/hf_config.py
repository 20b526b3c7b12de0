"""Reading model configs: Hugging Face ``config.json`` or normtool's ``normtool.config`` metadata.

Why our own reader: the tool must not import ``transformers`` (a test-only peer), and the few
facts it needs (head count, eps, activation, placement) are plain JSON keys.
"""

from __future__ import annotations

import json
from typing import Any

from normtool.errors import NormtoolError
from normtool.graph import ACTIVATIONS
from normtool.io.store import Checkpoint

#: Metadata key under which normtool's reference models store their config (``normtool.nn.save``).
CONFIG_KEY = "normtool.config"

#: Hugging Face activation names → the executor's (``gelu_new`` and friends are the tanh form).
ACT_ALIASES = {
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "swish": "silu",
}


def model_config(ck: Checkpoint) -> dict[str, Any] | None:
    """The checkpoint's config: ``config.json`` if there is one, else ``normtool.config``."""
    if ck.config is not None:
        return ck.config
    text = ck.metadata.get(CONFIG_KEY)
    if text is None:
        return None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise NormtoolError(f"corrupt {CONFIG_KEY} metadata ({e})", ck.path) from e
    if not isinstance(cfg, dict):
        raise NormtoolError(f"{CONFIG_KEY} metadata is not a JSON object", ck.path)
    return cfg


def activation(name: str, ck: Checkpoint) -> str:
    """Map a config's activation name onto an executor activation, or refuse it by name."""
    fn = ACT_ALIASES.get(name, name)
    if fn not in ACTIVATIONS:
        raise NormtoolError(
            f"activation {name!r} is not supported (known: {', '.join(sorted(ACTIVATIONS))})",
            ck.path,
        )
    return fn
