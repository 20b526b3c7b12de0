"""timm's ConvNeXt (``convnext_*``), recognised from tensor names (``timm_convnext``).

Layout (timm's names): ``stem.0`` (a k×k stride-k "patchify" conv) and ``stem.1`` (LayerNorm
over channels); stages ``stages.{s}``, each after the first opened by ``downsample.0``
(LayerNorm over channels) and ``downsample.1`` (2×2 stride-2 conv); blocks
``stages.{s}.blocks.{i}``: ``conv_dw`` (depthwise k×k, same padding), ``norm`` (LayerNorm over
channels), ``mlp.fc1`` → GELU (erf) → ``mlp.fc2``, layer scale ``gamma`` where stored, and the
residual add; the head: global average pool, ``head.norm`` (LayerNorm), ``head.fc`` — or, with
``head_norm_first``, ``norm_pre`` before the pool.

Graph: LayerNorm over the channels of a map is ``layernorm2d``; the MLP's ``Linear`` weights
``[O, I]`` are read as 1×1 convs ``[O, I, 1, 1]`` (timm's ``conv_mlp`` variant stores them so),
which is what a linear over the channels of every pixel computes — the maps stay ``[B, C, H,
W]`` and every op works at any image size; layer scale is an ``affine`` with ``scale`` only.

Not a per-channel affine at inference: LayerNorm uses each pixel's own statistics, so ``fold``
has nothing to remove and says so; merge permutes each stage's residual space and each MLP's
hidden space (LayerNorm is permutation-equivariant).

eps is not stored: timm's 1e-6 for every ConvNeXt LayerNorm, stated as an assumption (``--eps``).
"""

from __future__ import annotations

from normtool.arch.builder import GraphBuilder
from normtool.arch.convnets import conv
from normtool.arch.family import BuildOptions, Family
from normtool.arch.state_dicts import classify, config_fits, image_input, key_prefix, stated_eps
from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.io.store import Checkpoint

#: timm's ConvNeXt LayerNorm eps (``LayerNorm2d`` and ``LayerNorm`` defaults).
TIMM_CONVNEXT_EPS = 1e-6


def _prefix(ck: Checkpoint) -> str | None:
    return key_prefix(ck, "stem.0.weight", "stages.0.blocks.0.conv_dw.weight")


def detect(ck: Checkpoint) -> bool:
    return _prefix(ck) is not None and config_fits(ck, ("convnext",))


def _norm(b: GraphBuilder, x: str, space: str, name: str, key: str, kind: str, eps: float) -> str:
    """LayerNorm ``name`` (``layernorm2d`` on maps, ``layernorm`` on pooled vectors)."""
    wkey = f"{key}.weight"
    if wkey not in b.ck or len(b.ck.shape(wkey)) != 1:
        raise NormtoolError(
            f"expected {wkey!r} to be a LayerNorm weight (1-D): timm's overlapping stems and "
            "other norm layers are not supported",
            b.ck.path,
        )
    params = {r: b.tensor(f"{name}.{r}", f"{key}.{r}", (space,)) for r in ("weight", "bias")}
    return b.op(kind, name, [x], space, params, eps=eps)


def _bias(b: GraphBuilder, key: str) -> str | None:
    return f"{key}.bias" if f"{key}.bias" in b.ck else None


def _pointwise(b: GraphBuilder, x: str, spaces: tuple[str, str], name: str, key: str) -> str:
    """An MLP ``Linear`` (or timm's ``conv_mlp`` 1×1 conv) as a 1×1 conv over the map."""
    wkey = f"{key}.weight"
    if wkey not in b.ck:
        raise NormtoolError(f"expected tensor {wkey!r} is missing", b.ck.path)
    shape = b.ck.shape(wkey)
    reshape = (*shape, 1, 1) if len(shape) == 2 else None
    return conv(b, x, spaces, name, key, 1, 0, _bias(b, key), reshape)


def _block(b: GraphBuilder, x: str, space: str, key: str, name: str, eps: float) -> str:
    dw = f"{key}.conv_dw"
    h = conv(b, x, (space, space), f"{name}.conv_dw", dw, 1, None, _bias(b, dw))
    h = _norm(b, h, space, f"{name}.norm", f"{key}.norm", "layernorm2d", eps)
    hidden = f"{name}.mlp"
    h = _pointwise(b, h, (space, hidden), f"{name}.mlp.fc1", f"{key}.mlp.fc1")
    h = b.op("act", f"{name}.mlp.act", [h], hidden, fn="gelu")
    h = _pointwise(b, h, (hidden, space), f"{name}.mlp.fc2", f"{key}.mlp.fc2")
    if f"{key}.gamma" in b.ck:
        scale = b.tensor(f"{name}.gamma", f"{key}.gamma", (space,))
        h = b.op("affine", f"{name}.layer_scale", [h], space, {"scale": scale})
    return b.op("add", f"{name}.add", [h, x], space)


def build(ck: Checkpoint, opts: BuildOptions) -> Graph:
    p = _prefix(ck)
    if p is None:
        raise NormtoolError(
            "not a timm ConvNeXt: 'stem.0.weight' or 'stages.0.blocks.0.conv_dw.weight' is missing",
            ck.path,
        )
    eps = stated_eps(opts, "LayerNorm eps", TIMM_CONVNEXT_EPS, "timm's ConvNeXt default")
    b = GraphBuilder("timm_convnext", ck)
    x, space = image_input(b, f"{p}stem.0.weight")
    patch = ck.shape(f"{p}stem.0.weight")[-1]
    x = conv(b, x, (space, "stages.0"), "stem.0", f"{p}stem.0", patch, 0, _bias(b, f"{p}stem.0"))
    space = "stages.0"
    x = _norm(b, x, space, "stem.1", f"{p}stem.1", "layernorm2d", eps)
    depths, s = [], 0
    while f"{p}stages.{s}.blocks.0.conv_dw.weight" in ck:
        name, key = f"stages.{s}", f"{p}stages.{s}"
        if f"{key}.downsample.0.weight" in ck:
            ds = f"{name}.downsample"
            x = _norm(b, x, space, f"{ds}.0", f"{key}.downsample.0", "layernorm2d", eps)
            wkey = f"{key}.downsample.1.weight"
            stride = ck.shape(wkey)[-1] if wkey in ck else 1
            dk = f"{key}.downsample.1"
            x = conv(b, x, (space, name), f"{ds}.1", dk, stride, 0, _bias(b, dk))
            space = name
        i = 0
        while f"{key}.blocks.{i}.conv_dw.weight" in ck:
            x = _block(b, x, space, f"{key}.blocks.{i}", f"{name}.blocks.{i}", eps)
            i += 1
        depths.append(i)
        s += 1
    b.info["depths"] = depths
    if f"{p}norm_pre.weight" in ck:  # head_norm_first: norm, then pool
        x = _norm(b, x, space, "norm_pre", f"{p}norm_pre", "layernorm2d", eps)
        x = b.op("global_avgpool", "pool", [x], space)
    else:
        x = b.op("global_avgpool", "pool", [x], space)
        x = _norm(b, x, space, "head.norm", f"{p}head.norm", "layernorm", eps)
    return classify(b, x, space, f"{p}head.fc", "ConvNeXt")


FAMILY = Family(
    name="timm_convnext",
    description="timm ConvNeXt state dict (stem/stages.N.blocks.M/head tensor names)",
    detect=detect,
    build=build,
)
