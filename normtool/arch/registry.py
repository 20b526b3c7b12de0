"""The known architecture families, in detection order (most specific first).

An explicit list rather than import-time self-registration: what normtool knows is visible in
one place and checked by a test.
"""

from __future__ import annotations

from normtool.arch import convnets, convnext, mlp, torch_cnns, transformer
from normtool.arch.family import BuildOptions, Family
from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.io.store import Checkpoint

FAMILIES: list[Family] = [
    convnets.CNN_FAMILY,
    convnets.RESNET_FAMILY,
    torch_cnns.RESNET_FAMILY,
    torch_cnns.MOBILENET_V2_FAMILY,
    convnext.FAMILY,
    mlp.FAMILY,
    *transformer.FAMILIES,
]


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def _known() -> str:
    return "; ".join(f"{f.name} ({f.description})" for f in FAMILIES)


def build_graph(ck: Checkpoint, arch: str | None, opts: BuildOptions) -> Graph:
    """Recognise ``ck``'s family (or use ``arch``) and build its graph."""
    if arch is not None:
        for f in FAMILIES:
            if f.name == arch:
                return f.build(ck, opts)
        raise NormtoolError(f"unknown --arch {arch!r}; known families: {', '.join(family_names())}")
    for f in FAMILIES:
        if f.detect(ck):
            return f.build(ck, opts)
    hint = ""
    if ck.config is not None:
        hint = (
            f" (config.json: architectures={ck.config.get('architectures')}, "
            f"model_type={ck.config.get('model_type')!r})"
        )
    raise NormtoolError(
        f"unknown architecture{hint}; use --arch NAME. Known families: {_known()}", ck.path
    )
