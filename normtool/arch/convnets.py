"""Convolutional families: normtool's small CNN and Hugging Face ``ResNetForImageClassification``.

Spaces: every convolution's output channels are a space of kind ``channels`` (its BatchNorm and
activation stay in it). A residual add joins two values, so both sides live in one space: in a
ResNet stage the shortcut's output (or, without a shortcut conv, the stage's input) and the last
convolution of every layer share the stage's residual space — merge then permutes them together.

Graph names (checkpoint names live in ``TensorSpec.source``):

* CNN: ``blocks.{i}.conv``, ``blocks.{i}.bn``, ``blocks.{i}.act``, ``pool``, op ``logits`` with
  tensors ``head.*`` (its checkpoint names are already these). Its convs are ``ws_conv2d`` (attrs
  ``variant``, ``eps``) when the config's ``weight_standardization`` is set.
* ResNet: ``embedder.conv``/``bn``/``act``, ``embedder.pool``; per layer
  ``stages.{s}.layers.{l}.conv{j}``/``bn{j}``/``act{j}``, ``…shortcut.conv``/``bn``,
  ``…add``, ``…act``; ``pool``; op ``logits`` with tensors ``head.*`` (``classifier.1.*``).
"""

from __future__ import annotations

from normtool.arch.builder import GraphBuilder
from normtool.arch.family import BuildOptions, Family
from normtool.arch.hf_config import model_config
from normtool.errors import NormtoolError
from normtool.graph import ACTIVATIONS, Graph, InputSpec
from normtool.io.store import Checkpoint
from normtool.nn.ws_conv import ws_problem

CONFIG_KEY = "normtool.config"
BN_ROLES = ("weight", "bias", "running_mean", "running_var")
#: nn.BatchNorm2d's default, which transformers' ResNet uses (its config has no eps).
HF_BN_EPS = 1e-5
#: ResNet accepts any image size; verify and export use the standard one unless the config says.
DEFAULT_IMAGE_SIZE = 224


def conv(
    b: GraphBuilder,
    x: str,
    spaces: tuple[str, str],
    name: str,
    key: str,
    stride: int,
    padding: int | None = None,
    bias: str | None = None,
    reshape: tuple[int, ...] | None = None,
    ws: dict | None = None,
) -> str:
    """Add a ``conv2d`` (``ws_conv2d`` with ``ws``: ``variant``, ``eps``) named ``name`` from
    ``spaces`` ``(in, out)``, weight ``<key>.weight`` (read as ``reshape`` if given), bias the
    checkpoint key ``bias``; returns its output.

    ``padding`` None: "same" padding of an odd kernel. The group count is the input width over
    the weight's input channels, so a depthwise conv needs no flag; the out space is created
    from the weight's shape (a depthwise conv may write into its input's space).
    """
    in_space, out_space = spaces
    wkey = f"{key}.weight"
    if wkey not in b.ck:
        raise NormtoolError(f"expected tensor {wkey!r} is missing", b.ck.path)
    shape = reshape or b.ck.shape(wkey)
    if len(shape) != 4 or shape[2] != shape[3] or (padding is None and shape[2] % 2 == 0):
        kind = "square conv kernel" if padding is not None else "square odd-sized conv kernel"
        raise NormtoolError(f"tensor {wkey!r} has shape {shape}: expected a {kind}", b.ck.path)
    width = b.spaces[in_space].size
    if width % shape[1]:
        raise NormtoolError(
            f"tensor {wkey!r} has shape {shape}: {shape[1]} input channels per group do not "
            f"divide the {width} channels it reads",
            b.ck.path,
        )
    groups = width // shape[1]
    b.space(out_space, shape[0], "channels")
    axes = (out_space, in_space if groups == 1 else None, None, None)
    params = {"weight": b.tensor(f"{name}.weight", wkey, axes, reshape=reshape)}
    if bias is not None:
        params["bias"] = b.tensor(f"{name}.bias", bias, (out_space,))
    attrs: dict = {"stride": stride, "padding": shape[2] // 2 if padding is None else padding}
    if groups > 1:
        attrs["groups"] = groups
    if ws is not None:
        problem = ws_problem(ws["variant"], ws["eps"], shape[1] * shape[2] * shape[3])
        if problem:
            raise NormtoolError(f"{name}: {problem}", b.ck.path)
        attrs.update(variant=ws["variant"], eps=float(ws["eps"]))
    return b.op("ws_conv2d" if ws else "conv2d", name, [x], out_space, params, **attrs)


def conv_bn(
    b: GraphBuilder,
    x: str,
    in_space: str,
    out_space: str,
    names: tuple[str, str],
    keys: tuple[str, str],
    stride: int,
    eps: float,
    conv_bias: str | None = None,
    ws: dict | None = None,
) -> str:
    """Add ``conv`` (same padding, ``stride``) then ``batchnorm``; returns the BN's output.

    ``names`` are the graph names of the conv and BN ops (their tensors are ``<name>.<role>``);
    ``keys`` are the checkpoint prefixes of the conv weight and the BN tensors; ``conv_bias`` the
    checkpoint key of a conv bias, if any; ``ws`` (``variant``, ``eps``) makes the conv a
    ``ws_conv2d``.
    """
    x = conv(b, x, (in_space, out_space), names[0], keys[0], stride, bias=conv_bias, ws=ws)
    bn_params = {r: b.tensor(f"{names[1]}.{r}", f"{keys[1]}.{r}", (out_space,)) for r in BN_ROLES}
    return b.op("batchnorm", names[1], [x], out_space, bn_params, eps=eps)


def linear_head(b: GraphBuilder, x: str, in_space: str, key: str) -> str:
    """The classifier: op ``logits`` (the graph's first output) with tensors ``head.*``."""
    n = b.ck.shape(f"{key}.weight")[0]
    out = b.space("logits", n, "output")
    params = {"weight": b.tensor("head.weight", f"{key}.weight", (out, in_space))}
    if b.has(f"{key}.bias"):
        params["bias"] = b.tensor("head.bias", f"{key}.bias", (out,))
    return b.op("linear", "logits", [x], out, params)


# ---- normtool's small CNN ------------------------------------------------------------------


def _cnn_config(ck: Checkpoint) -> dict | None:
    cfg = model_config(ck)
    return cfg if cfg is not None and cfg.get("model_type") == "normtool_cnn" else None


def _ws_config(ws: object) -> dict | None:
    """The config's ``weight_standardization`` (``None``: plain convs, also for configs saved
    before the key existed); ValueError when it is not ``{"variant": …, "eps": …}``."""
    if ws is None:
        return None
    if not isinstance(ws, dict) or set(ws) != {"variant", "eps"}:
        raise ValueError(f"weight_standardization {ws!r}: expected null or variant and eps")
    return ws


def detect_cnn(ck: Checkpoint) -> bool:
    return _cnn_config(ck) is not None


def build_cnn(ck: Checkpoint, opts: BuildOptions) -> Graph:
    cfg = _cnn_config(ck)
    if cfg is None:
        raise NormtoolError(f"not a normtool CNN (no {CONFIG_KEY} metadata)", ck.path)
    try:
        c_in, size = int(cfg["in_channels"]), int(cfg["image_size"])
        strides = [int(s) for s in cfg["strides"]]
        eps = float(cfg["bn_eps"])
        ws = _ws_config(cfg.get("weight_standardization"))
    except (KeyError, TypeError, ValueError) as e:
        raise NormtoolError(f"normtool_cnn config is incomplete or invalid ({e!r})", ck.path) from e
    b = GraphBuilder("normtool_cnn", ck)
    b.info.update(channels=cfg.get("channels"), strides=strides, image_size=size)
    space = b.space("input", c_in, "input")
    x = b.input(InputSpec("input", "pixels", ("batch", c_in, size, size)), space)
    for i, stride in enumerate(strides):
        p = f"blocks.{i}"
        bias = f"{p}.conv.bias" if b.has(f"{p}.conv.bias") else None
        out = f"{p}.conv"
        names = (f"{p}.conv", f"{p}.bn")
        x = conv_bn(b, x, space, out, names, names, stride, eps, bias, ws)
        x = b.op("act", f"{p}.act", [x], out, fn="relu")
        space = out
    x = b.op("global_avgpool", "pool", [x], space)
    return b.build([linear_head(b, x, space, "head")])


# ---- Hugging Face ResNet -------------------------------------------------------------------


def _resnet_prefix(ck: Checkpoint) -> str | None:
    for prefix in ("resnet.", ""):
        if f"{prefix}embedder.embedder.convolution.weight" in ck:
            return prefix
    return None


def detect_resnet(ck: Checkpoint) -> bool:
    cfg = ck.config or {}
    named = cfg.get("model_type") == "resnet" or "ResNetForImageClassification" in (
        cfg.get("architectures") or []
    )
    return named and _resnet_prefix(ck) is not None


def build_resnet(ck: Checkpoint, opts: BuildOptions) -> Graph:
    cfg = ck.config or {}
    prefix = _resnet_prefix(ck)
    if prefix is None:
        raise NormtoolError(
            "not a Hugging Face ResNet: 'resnet.embedder.embedder.convolution.weight' is missing",
            ck.path,
        )
    if "classifier.1.weight" not in ck:
        raise NormtoolError(
            "ResNet without a classifier ('classifier.1.weight'): only "
            "ResNetForImageClassification checkpoints are supported",
            ck.path,
        )
    act = cfg.get("hidden_act", "relu")
    if act not in ACTIVATIONS:
        raise NormtoolError(f"unsupported ResNet hidden_act {act!r}", ck.path)
    layer_type = cfg.get("layer_type", "bottleneck")
    if layer_type not in ("basic", "bottleneck"):
        raise NormtoolError(f"unsupported ResNet layer_type {layer_type!r}", ck.path)
    depths = cfg.get("depths")
    if not isinstance(depths, list) or not depths:
        raise NormtoolError("ResNet config.json has no 'depths' list", ck.path)
    in_bottleneck = bool(cfg.get("downsample_in_bottleneck", False))
    stem = f"{prefix}embedder.embedder"
    c_in = ck.shape(f"{stem}.convolution.weight")[1]
    size = int(cfg.get("image_size", DEFAULT_IMAGE_SIZE))

    b = GraphBuilder("resnet", ck)
    b.info.update(layer_type=layer_type, depths=depths, image_size=size)
    space = b.space("pixels", c_in, "input")
    x = b.input(InputSpec("pixel_values", "pixels", ("batch", c_in, size, size)), space)
    keys = (f"{stem}.convolution", f"{stem}.normalization")
    x = conv_bn(b, x, space, "embedder", ("embedder.conv", "embedder.bn"), keys, 2, HF_BN_EPS)
    space = "embedder"
    x = b.op("act", "embedder.act", [x], space, fn=act)
    x = b.op("maxpool2d", "embedder.pool", [x], space, kernel=3, stride=2, padding=1)

    n_convs = 3 if layer_type == "bottleneck" else 2
    for s, depth in enumerate(depths):
        first_stride = 2 if s > 0 or cfg.get("downsample_in_first_stage", False) else 1
        for layer in range(depth):
            stride = first_stride if layer == 0 else 1
            name = f"stages.{s}.layers.{layer}"
            key = f"{prefix}encoder.stages.{s}.layers.{layer}"
            if b.has(f"{key}.shortcut.convolution.weight"):
                resid = f"stages.{s}.resid"
                sk = (f"{key}.shortcut.convolution", f"{key}.shortcut.normalization")
                sn = (f"{name}.shortcut.conv", f"{name}.shortcut.bn")
                skip = conv_bn(b, x, space, resid, sn, sk, stride, HF_BN_EPS)
            elif stride != 1:
                raise NormtoolError(f"{key} downsamples but has no shortcut convolution", ck.path)
            else:
                resid, skip = space, x
            h, h_space = x, space
            for j in range(n_convs):
                if layer_type == "bottleneck":
                    strided = 0 if in_bottleneck else 1
                    conv_stride = stride if j == strided else 1
                else:
                    conv_stride = stride if j == 0 else 1
                last = j == n_convs - 1
                out = resid if last else f"{name}.conv{j}"
                lk = (f"{key}.layer.{j}.convolution", f"{key}.layer.{j}.normalization")
                ln = (f"{name}.conv{j}", f"{name}.bn{j}")
                h = conv_bn(b, h, h_space, out, ln, lk, conv_stride, HF_BN_EPS)
                if not last:
                    h = b.op("act", f"{name}.act{j}", [h], out, fn=act)
                h_space = out
            x = b.op("add", f"{name}.add", [h, skip], resid)
            x = b.op("act", f"{name}.act", [x], resid, fn=act)
            space = resid
    x = b.op("global_avgpool", "pool", [x], space)
    return b.build([linear_head(b, x, space, "classifier.1")])


CNN_FAMILY = Family(
    name="normtool_cnn",
    description="normtool's small CNN (Conv-BN-ReLU blocks, config in the file's metadata)",
    detect=detect_cnn,
    build=build_cnn,
)

RESNET_FAMILY = Family(
    name="resnet",
    description="Hugging Face ResNetForImageClassification (basic or bottleneck layers)",
    detect=detect_resnet,
    build=build_resnet,
)
