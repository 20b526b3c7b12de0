"""Save and load normtool's reference models as one self-describing ``.safetensors`` file.

Why one file: the config travels in the safetensors metadata (``normtool.config``), so the
checkpoint alone is enough for ``normtool`` to recognise the architecture and for
``load_reference`` to rebuild the trainable module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from normtool.errors import NormtoolError
from normtool.io.atomic import atomic_path
from normtool.nn import cnn, transformer

CONFIG_KEY = "normtool.config"

_BUILDERS = {
    transformer.MODEL_TYPE: transformer.ReferenceTransformer,
    cnn.MODEL_TYPE: cnn.SmallCNN,
}


def save_reference(model: nn.Module, path: str | Path, force: bool = False) -> Path:
    """Write ``model``'s state dict and config (``model.config``) to ``path`` atomically."""
    path = Path(path)
    config: dict[str, Any] = model.config  # type: ignore[assignment]
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path, force=force) as tmp:
        save_file(tensors, str(tmp), metadata={CONFIG_KEY: json.dumps(config)})
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``normtool.config`` dict stored in a reference checkpoint."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if CONFIG_KEY not in meta:
        raise NormtoolError(f"no {CONFIG_KEY!r} metadata: not a normtool reference model", path)
    return json.loads(meta[CONFIG_KEY])


def load_reference(path: str | Path) -> nn.Module:
    """Rebuild the reference module saved at ``path`` (in eval mode) with its weights."""
    config = read_config(path)
    build = _BUILDERS.get(config.get("model_type"))
    if build is None:
        raise NormtoolError(f"unknown reference model_type {config.get('model_type')!r}", path)
    model = build(config)
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    model.load_state_dict(state, strict=True)
    return model.eval()
