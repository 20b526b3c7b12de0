"""BatchNorm CNNs as timm and torchvision store them: ResNet (``timm_resnet``) and torchvision's
MobileNetV2 (``tv_mobilenet_v2``), recognised from tensor names.

ResNet: timm's ``resnet*`` and torchvision's ``resnet*`` share one layout — ``conv1``/``bn1``
(7×7, stride 2), a 3×3 stride-2 max pool, ``layer{s}.{i}`` blocks, ``fc`` — basic blocks
(``conv1``–``conv2``, 3×3) or bottlenecks (``conv1``–``conv3``, 1×1–3×3–1×1, the stride in the
3×3), ``downsample.0``/``.1`` (1×1 conv and BN) on the shortcut where the shape changes;
stages after the first start with stride 2, ReLU throughout. A ``module.`` prefix
(``DataParallel``) is accepted. ResNeXt and Wide ResNet share the names: a grouped 3×3's group
count is its input width over its weight's input channels (``convnets.conv``).

MobileNetV2: ``features.0`` (3×3 stride-2 conv, BN, ReLU6), 17 inverted residual blocks
``features.{i}.conv`` — a 1×1 expansion (absent in the first block), a 3×3 depthwise conv, each
with BN and ReLU6, then a 1×1 projection and BN without activation, a residual add where the
stride is 1 and the width is kept — ``features.18`` (1×1 conv, BN, ReLU6), average pooling and
``classifier.1``. Strides are not stored: they are torchvision's ``inverted_residual_setting``,
the first block of each of its seven groups (1, 2, 3, 4, 3, 3, 1 blocks) strided 1, 2, 2, 2, 1,
2, 1; a checkpoint whose blocks do not fall into those groups is refused.

Spaces as in ``normtool.arch.convnets``: a residual add joins its inputs in one space, so a
stage's shortcut (or its input) and each block's last conv share it; a depthwise conv writes
into the space it reads (one channel in, one out), so its BatchNorm is permuted with it.
BatchNorm eps is not stored: ``nn.BatchNorm2d``'s 1e-5, stated as an assumption (``--eps``).
"""

from __future__ import annotations

from normtool.arch.builder import GraphBuilder
from normtool.arch.convnets import conv_bn
from normtool.arch.family import BuildOptions, Family
from normtool.arch.state_dicts import classify, config_fits, image_input, key_prefix, stated_eps
from normtool.errors import NormtoolError
from normtool.graph import Graph
from normtool.io.store import Checkpoint

#: nn.BatchNorm2d's default eps, which timm's and torchvision's CNNs keep.
TORCH_BN_EPS = 1e-5
_BN_WHY = "nn.BatchNorm2d's default, which timm and torchvision keep"


def _bn_eps(opts: BuildOptions) -> float:
    return stated_eps(opts, "BatchNorm eps", TORCH_BN_EPS, _BN_WHY)


# ---- ResNet --------------------------------------------------------------------------------


def _resnet_prefix(ck: Checkpoint) -> str | None:
    return key_prefix(ck, "layer1.0.conv1.weight", "fc.weight")


def detect_resnet(ck: Checkpoint) -> bool:
    return _resnet_prefix(ck) is not None and config_fits(ck, ("resnet",))


def _resnet_block(
    b: GraphBuilder, x: str, space: str, key: str, name: str, stride: int, eps: float
) -> tuple[str, str]:
    """One basic block or bottleneck (``conv3`` present); returns its output and space."""
    if f"{key}.downsample.0.weight" in b.ck:
        if len(b.ck.shape(f"{key}.downsample.0.weight")) != 4:
            raise NormtoolError(
                f"{key}.downsample is not a 1×1 conv and BatchNorm (timm's average-pool "
                "shortcut of resnet*d is not supported)",
                b.ck.path,
            )
        resid = f"{name}.resid"
        names = (f"{name}.downsample.0", f"{name}.downsample.1")
        keys = (f"{key}.downsample.0", f"{key}.downsample.1")
        skip = conv_bn(b, x, space, resid, names, keys, stride, eps)
    elif stride != 1 or f"{key}.downsample.1.weight" in b.ck:
        raise NormtoolError(
            f"{key} downsamples but has no 1×1 conv shortcut 'downsample.0' (timm's "
            "average-pool shortcut of resnet*d is not supported)",
            b.ck.path,
        )
    else:
        resid, skip = space, x
    n = 3 if f"{key}.conv3.weight" in b.ck else 2
    strided = 1 if n == 3 else 0  # bottleneck: the 3×3; basic block: the first conv
    h, h_space = x, space
    for j in range(1, n + 1):
        out = resid if j == n else f"{name}.conv{j}"
        names = (f"{name}.conv{j}", f"{name}.bn{j}")
        keys = (f"{key}.conv{j}", f"{key}.bn{j}")
        h = conv_bn(b, h, h_space, out, names, keys, stride if j - 1 == strided else 1, eps)
        if j < n:
            h = b.op("act", f"{name}.act{j}", [h], out, fn="relu")
        h_space = out
    x = b.op("add", f"{name}.add", [h, skip], resid)
    return b.op("act", f"{name}.act", [x], resid, fn="relu"), resid


def build_resnet(ck: Checkpoint, opts: BuildOptions) -> Graph:
    p = _resnet_prefix(ck)
    if p is None:
        raise NormtoolError(
            "not a timm/torchvision ResNet: 'layer1.0.conv1.weight' or 'fc.weight' is missing",
            ck.path,
        )
    if f"{p}conv1.weight" not in ck:
        raise NormtoolError(
            "ResNet stem without 'conv1.weight' (timm's deep stem of resnet*c/d/s is not "
            "supported)",
            ck.path,
        )
    eps = _bn_eps(opts)
    b = GraphBuilder("timm_resnet", ck)
    x, space = image_input(b, f"{p}conv1.weight")
    x = conv_bn(b, x, space, "stem", ("conv1", "bn1"), (f"{p}conv1", f"{p}bn1"), 2, eps)
    space = "stem"
    x = b.op("act", "act1", [x], space, fn="relu")
    x = b.op("maxpool2d", "maxpool", [x], space, kernel=3, stride=2, padding=1)
    depths, s = [], 1
    while f"{p}layer{s}.0.conv1.weight" in ck:
        i = 0
        while f"{p}layer{s}.{i}.conv1.weight" in ck:
            stride = 2 if s > 1 and i == 0 else 1
            x, space = _resnet_block(b, x, space, f"{p}layer{s}.{i}", f"layer{s}.{i}", stride, eps)
            i += 1
        depths.append(i)
        s += 1
    bottleneck = f"{p}layer1.0.conv3.weight" in ck
    b.info.update(layer_type="bottleneck" if bottleneck else "basic", depths=depths)
    x = b.op("global_avgpool", "pool", [x], space)
    return classify(b, x, space, f"{p}fc", "ResNet")


# ---- MobileNetV2 ---------------------------------------------------------------------------

#: torchvision's inverted_residual_setting: blocks per group and the group's first stride.
MOBILENET_V2_GROUPS = ((1, 1), (2, 2), (3, 2), (4, 2), (3, 1), (3, 2), (1, 1))


def _mobilenet_prefix(ck: Checkpoint) -> str | None:
    return key_prefix(ck, "features.1.conv.0.0.weight", "classifier.1.weight")


def detect_mobilenet_v2(ck: Checkpoint) -> bool:
    return _mobilenet_prefix(ck) is not None and ck.config is None


def _strides(ck: Checkpoint, n_blocks: int) -> list[int]:
    """Each block's stride (torchvision's setting); refuses another block count."""
    total = sum(n for n, _ in MOBILENET_V2_GROUPS)
    if n_blocks != total:
        raise NormtoolError(
            f"MobileNetV2 with {n_blocks} inverted residual blocks: strides are not stored in a "
            f"state dict, and normtool knows torchvision's setting of {total}",
            ck.path,
        )
    return [s if i == 0 else 1 for n, s in MOBILENET_V2_GROUPS for i in range(n)]


def _inverted_residual(
    b: GraphBuilder, x: str, space: str, p: str, i: int, stride: int, eps: float
) -> tuple[str, str]:
    """Block ``features.{i}``: [1×1 expansion], depthwise 3×3, 1×1 projection, [residual add]."""
    key, name = f"{p}features.{i}.conv", f"features.{i}.conv"

    def conv_bn_act(h: str, spaces: tuple[str, str], j: int, stride: int) -> str:
        names, keys = (f"{name}.{j}.0", f"{name}.{j}.1"), (f"{key}.{j}.0", f"{key}.{j}.1")
        h = conv_bn(b, h, spaces[0], spaces[1], names, keys, stride, eps)
        return b.op("act", f"{name}.{j}.2", [h], spaces[1], fn="relu6")

    h, h_space, j = x, space, 0
    if f"{key}.3.weight" in b.ck:  # the expansion (every block but the first)
        h_space = f"features.{i}.expand"
        h, j = conv_bn_act(h, (space, h_space), 0, 1), 1
    h = conv_bn_act(h, (h_space, h_space), j, stride)  # depthwise: one channel in, one out
    j += 1
    if f"{key}.{j}.weight" not in b.ck:
        raise NormtoolError(
            f"expected tensor {key}.{j}.weight (the projection) is missing", b.ck.path
        )
    c_out = b.ck.shape(f"{key}.{j}.weight")[0]
    residual = stride == 1 and c_out == b.spaces[space].size
    out = space if residual else f"features.{i}"
    names, keys = (f"{name}.{j}", f"{name}.{j + 1}"), (f"{key}.{j}", f"{key}.{j + 1}")
    h = conv_bn(b, h, h_space, out, names, keys, 1, eps)
    if not residual:
        return h, out
    return b.op("add", f"features.{i}.add", [h, x], space), space


def build_mobilenet_v2(ck: Checkpoint, opts: BuildOptions) -> Graph:
    p = _mobilenet_prefix(ck)
    if p is None:
        raise NormtoolError(
            "not a torchvision MobileNetV2: 'features.1.conv.0.0.weight' or "
            "'classifier.1.weight' is missing",
            ck.path,
        )
    eps = _bn_eps(opts)
    b = GraphBuilder("tv_mobilenet_v2", ck)
    x, space = image_input(b, f"{p}features.0.0.weight")
    names = ("features.0.0", "features.0.1")
    x = conv_bn(b, x, space, "features.0", names, (f"{p}{names[0]}", f"{p}{names[1]}"), 2, eps)
    space = "features.0"
    x = b.op("act", "features.0.2", [x], space, fn="relu6")
    n = 1
    while f"{p}features.{n}.conv.0.0.weight" in ck:
        n += 1
    for i, stride in enumerate(_strides(ck, n - 1), start=1):
        x, space = _inverted_residual(b, x, space, p, i, stride, eps)
    names = (f"features.{n}.0", f"features.{n}.1")
    keys = (f"{p}{names[0]}", f"{p}{names[1]}")
    x = conv_bn(b, x, space, f"features.{n}", names, keys, 1, eps)
    space = f"features.{n}"
    x = b.op("act", f"features.{n}.2", [x], space, fn="relu6")
    x = b.op("global_avgpool", "pool", [x], space)
    return classify(b, x, space, f"{p}classifier.1", "MobileNetV2")


RESNET_FAMILY = Family(
    name="timm_resnet",
    description="timm or torchvision ResNet state dict (conv1/bn1/layerN.M/fc tensor names)",
    detect=detect_resnet,
    build=build_resnet,
)

MOBILENET_V2_FAMILY = Family(
    name="tv_mobilenet_v2",
    description="torchvision MobileNetV2 state dict (features.N/classifier.1 tensor names)",
    detect=detect_mobilenet_v2,
    build=build_mobilenet_v2,
)
