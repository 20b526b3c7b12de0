"""CNN state dicts as timm and torchvision name them, and their forwards in plain torch.

Why written here: timm and torchvision do not import on the test machines, and the tests need
an independent reference. Each ``*_state_dict`` builds a dict from tensor names with random
weights (He-scaled, so logits stay O(1) through the depth) and random BatchNorm statistics
and affines (far from their initial 0/1, so an adapter ignoring one fails); each ``*_forward``
runs such a dict with ``torch.nn.functional`` the way the original module computes it —
ConvNeXt's MLP as ``Linear`` layers on channels-last maps, as timm does, not as the 1×1
convs normtool's graph uses. ``eps`` defaults are the libraries' (BatchNorm 1e-5, timm's
ConvNeXt LayerNorm 1e-6).

Sizes are the tests': tiny widths, one or two blocks per stage, 32×32 images. ``FAMILIES``
maps each normtool family to its state dict maker and forward; ``save`` writes a dict as
``.safetensors`` or a ``.pt``/``.pth`` pickle, ``save_timm_folder`` as a Hugging Face hub
folder of a timm model (``config.json`` with ``architecture`` and ``pretrained_cfg``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

SD = dict[str, torch.Tensor]
#: torchvision's MobileNetV2 groups: blocks per group and the group's first stride.
MOBILENET_V2_GROUPS = ((1, 1), (2, 2), (3, 2), (4, 2), (3, 1), (3, 2), (1, 1))


class _Maker:
    """Random tensors under checkpoint names, from one seeded generator."""

    def __init__(self, seed: int, prefix: str = "") -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.sd: SD = {}
        self.prefix = prefix

    def conv(self, key: str, c_out: int, c_in: int, k: int, bias: bool = False) -> None:
        fan_in = c_in * k * k
        w = torch.randn(c_out, c_in, k, k, generator=self.g) * (2.0 / fan_in) ** 0.5
        self.sd[f"{self.prefix}{key}.weight"] = w
        if bias:
            self.sd[f"{self.prefix}{key}.bias"] = 0.1 * torch.randn(c_out, generator=self.g)

    def linear(self, key: str, c_out: int, c_in: int, bias: bool = True) -> None:
        w = torch.randn(c_out, c_in, generator=self.g) * (1.0 / c_in) ** 0.5
        self.sd[f"{self.prefix}{key}.weight"] = w
        if bias:
            self.sd[f"{self.prefix}{key}.bias"] = 0.1 * torch.randn(c_out, generator=self.g)

    def bn(self, key: str, c: int) -> None:
        g, p = self.g, f"{self.prefix}{key}"
        self.sd[f"{p}.weight"] = torch.rand(c, generator=g) + 0.5
        self.sd[f"{p}.bias"] = 0.2 * torch.randn(c, generator=g)
        self.sd[f"{p}.running_mean"] = 0.2 * torch.randn(c, generator=g)
        self.sd[f"{p}.running_var"] = torch.rand(c, generator=g) + 0.5
        self.sd[f"{p}.num_batches_tracked"] = torch.tensor(100)

    def ln(self, key: str, c: int) -> None:
        self.sd[f"{self.prefix}{key}.weight"] = 1 + 0.3 * torch.randn(c, generator=self.g)
        self.sd[f"{self.prefix}{key}.bias"] = 0.2 * torch.randn(c, generator=self.g)

    def vec(self, key: str, c: int, mean: float, std: float) -> None:
        self.sd[f"{self.prefix}{key}"] = mean + std * torch.randn(c, generator=self.g)


# ---- ResNet (timm / torchvision names) ------------------------------------------------------


def resnet_state_dict(
    block: str = "basic",
    depths: tuple[int, ...] = (1, 2),
    widths: tuple[int, ...] = (8, 16),
    stem: int = 8,
    classes: int = 5,
    seed: int = 0,
    prefix: str = "",
    groups: int = 1,
) -> SD:
    """A timm/torchvision ResNet state dict; bottleneck widths are the 3×3's (×4 out), which
    is grouped with ``groups`` > 1 (ResNeXt)."""
    m = _Maker(seed, prefix)
    m.conv("conv1", stem, 3, 7)
    m.bn("bn1", stem)
    c = stem
    for s, (depth, w) in enumerate(zip(depths, widths, strict=True), start=1):
        out = w * 4 if block == "bottleneck" else w
        for i in range(depth):
            key = f"layer{s}.{i}"
            if block == "bottleneck":
                convs = [(w, c, 1), (w, w // groups, 3), (out, w, 1)]
            else:
                convs = [(w, c, 3), (w, w, 3)]
            for j, (co, ci, k) in enumerate(convs, start=1):
                m.conv(f"{key}.conv{j}", co, ci, k)
                m.bn(f"{key}.bn{j}", co)
            if i == 0 and (s > 1 or c != out):
                m.conv(f"{key}.downsample.0", out, c, 1)
                m.bn(f"{key}.downsample.1", out)
            c = out
    m.linear("fc", classes, c)
    return m.sd


def _bn(
    x: torch.Tensor, sd: SD, key: str, eps: float, seen: dict[str, torch.Tensor] | None
) -> torch.Tensor:
    """Inference BatchNorm ``key``; ``seen`` (if given) records its input under ``key``."""
    if seen is not None:
        seen[key] = x
    return F.batch_norm(
        x,
        sd[f"{key}.running_mean"],
        sd[f"{key}.running_var"],
        sd[f"{key}.weight"],
        sd[f"{key}.bias"],
        training=False,
        eps=eps,
    )


def resnet_forward(sd: SD, x: torch.Tensor, eps: float = 1e-5, seen: dict | None = None):
    """torchvision's ``ResNet.forward`` (timm's ``resnet*`` computes the same); ``seen``
    receives every BatchNorm's input."""
    sd = {k: v.to(x.dtype) for k, v in sd.items() if v.is_floating_point()}
    x = F.relu(_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1", eps, seen))
    x = F.max_pool2d(x, 3, 2, 1)
    s = 1
    while f"layer{s}.0.conv1.weight" in sd:
        i = 0
        while f"layer{s}.{i}.conv1.weight" in sd:
            key, stride = f"layer{s}.{i}", 2 if s > 1 and i == 0 else 1
            n = 3 if f"{key}.conv3.weight" in sd else 2
            h = x
            for j in range(1, n + 1):
                w = sd[f"{key}.conv{j}.weight"]
                st = stride if (j == 2 if n == 3 else j == 1) else 1
                groups = h.shape[1] // w.shape[1]
                h = F.conv2d(h, w, stride=st, padding=w.shape[-1] // 2, groups=groups)
                h = _bn(h, sd, f"{key}.bn{j}", eps, seen)
                if j < n:
                    h = F.relu(h)
            skip = x
            if f"{key}.downsample.0.weight" in sd:
                skip = F.conv2d(x, sd[f"{key}.downsample.0.weight"], stride=stride)
                skip = _bn(skip, sd, f"{key}.downsample.1", eps, seen)
            x = F.relu(h + skip)
            i += 1
        s += 1
    return F.linear(x.mean((2, 3)), sd["fc.weight"], sd["fc.bias"])


# ---- MobileNetV2 (torchvision names) --------------------------------------------------------


def mobilenet_v2_state_dict(
    widths: tuple[int, ...] = (8, 8, 8, 16, 16, 16, 24),
    expand: int = 2,
    stem: int = 8,
    last: int = 32,
    classes: int = 5,
    seed: int = 0,
) -> SD:
    """torchvision's MobileNetV2 layout with the given group widths and expansion ratio
    (the first block never expands, as torchvision's ``t = 1``)."""
    m = _Maker(seed)
    m.conv("features.0.0", stem, 3, 3)
    m.bn("features.0.1", stem)
    c, i = stem, 1
    for (n, _), w in zip(MOBILENET_V2_GROUPS, widths, strict=True):
        for _ in range(n):
            p = f"features.{i}.conv"
            j = 0
            hidden = c if i == 1 else c * expand
            if i > 1:
                m.conv(f"{p}.0.0", hidden, c, 1)
                m.bn(f"{p}.0.1", hidden)
                j = 1
            m.conv(f"{p}.{j}.0", hidden, 1, 3)
            m.bn(f"{p}.{j}.1", hidden)
            m.conv(f"{p}.{j + 1}", w, hidden, 1)
            m.bn(f"{p}.{j + 2}", w)
            c, i = w, i + 1
    m.conv(f"features.{i}.0", last, c, 1)
    m.bn(f"features.{i}.1", last)
    m.linear("classifier.1", classes, last)
    return m.sd


def mobilenet_v2_forward(sd: SD, x: torch.Tensor, eps: float = 1e-5, seen: dict | None = None):
    """torchvision's ``MobileNetV2.forward`` (inverted residuals, ReLU6, depthwise 3×3);
    ``seen`` receives every BatchNorm's input."""
    sd = {k: v.to(x.dtype) for k, v in sd.items() if v.is_floating_point()}

    def conv(h: torch.Tensor, key: str, stride: int) -> torch.Tensor:
        """``key``.0: the conv of a Conv-BN-ReLU6 (grouped where its weight says so)."""
        w = sd[f"{key}.0.weight"]
        groups = h.shape[1] // w.shape[1]
        return F.conv2d(h, w, stride=stride, padding=w.shape[-1] // 2, groups=groups)

    x = F.relu6(_bn(conv(x, "features.0", 2), sd, "features.0.1", eps, seen))
    strides = [s if k == 0 else 1 for n, s in MOBILENET_V2_GROUPS for k in range(n)]
    for i, stride in enumerate(strides, start=1):
        p = f"features.{i}.conv"
        h, j = x, 0
        if f"{p}.3.weight" in sd:
            h = F.relu6(_bn(conv(h, f"{p}.0", 1), sd, f"{p}.0.1", eps, seen))
            j = 1
        h = F.relu6(_bn(conv(h, f"{p}.{j}", stride), sd, f"{p}.{j}.1", eps, seen))
        h = _bn(F.conv2d(h, sd[f"{p}.{j + 1}.weight"]), sd, f"{p}.{j + 2}", eps, seen)
        x = x + h if stride == 1 and h.shape[1] == x.shape[1] else h
    n = len(strides) + 1
    x = F.relu6(_bn(F.conv2d(x, sd[f"features.{n}.0.weight"]), sd, f"features.{n}.1", eps, seen))
    return F.linear(x.mean((2, 3)), sd["classifier.1.weight"], sd["classifier.1.bias"])


# ---- ConvNeXt (timm names) ------------------------------------------------------------------


def convnext_state_dict(
    depths: tuple[int, ...] = (2, 1),
    dims: tuple[int, ...] = (8, 16),
    classes: int = 5,
    layer_scale: bool = True,
    head_norm_first: bool = False,
    conv_mlp: bool = False,
    seed: int = 0,
) -> SD:
    """A timm ConvNeXt state dict (patch-4 stem, 7×7 depthwise, MLP ratio 4). ``conv_mlp``
    stores the MLP as 1×1 conv weights ``[O, I, 1, 1]``, as timm's ``conv_mlp=True``."""
    m = _Maker(seed)
    m.conv("stem.0", dims[0], 3, 4, bias=True)
    m.ln("stem.1", dims[0])
    for s, (depth, d) in enumerate(zip(depths, dims, strict=True)):
        if s > 0:
            m.ln(f"stages.{s}.downsample.0", dims[s - 1])
            m.conv(f"stages.{s}.downsample.1", d, dims[s - 1], 2, bias=True)
        for i in range(depth):
            key = f"stages.{s}.blocks.{i}"
            m.conv(f"{key}.conv_dw", d, 1, 7, bias=True)
            m.ln(f"{key}.norm", d)
            m.linear(f"{key}.mlp.fc1", 4 * d, d)
            m.linear(f"{key}.mlp.fc2", d, 4 * d)
            if conv_mlp:
                for fc in ("fc1", "fc2"):
                    w = m.sd[f"{key}.mlp.{fc}.weight"]
                    m.sd[f"{key}.mlp.{fc}.weight"] = w[:, :, None, None]
            if layer_scale:
                m.vec(f"{key}.gamma", d, 0.5, 0.3)
    m.ln("norm_pre" if head_norm_first else "head.norm", dims[-1])
    m.linear("head.fc", classes, dims[-1])
    return m.sd


def _ln2d(x: torch.Tensor, sd: SD, key: str, eps: float) -> torch.Tensor:
    """timm's LayerNorm2d: permute to channels-last, layer_norm, permute back."""
    y = F.layer_norm(
        x.permute(0, 2, 3, 1), (x.shape[1],), sd[f"{key}.weight"], sd[f"{key}.bias"], eps
    )
    return y.permute(0, 3, 1, 2)


def convnext_forward(sd: SD, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """timm's ``ConvNeXt.forward`` (blocks on the channels-last path: ``Linear`` MLP)."""
    sd = {k: v.to(x.dtype) for k, v in sd.items() if v.is_floating_point()}
    w = sd["stem.0.weight"]
    x = _ln2d(F.conv2d(x, w, sd["stem.0.bias"], stride=w.shape[-1]), sd, "stem.1", eps)
    s = 0
    while f"stages.{s}.blocks.0.conv_dw.weight" in sd:
        if f"stages.{s}.downsample.0.weight" in sd:
            x = _ln2d(x, sd, f"stages.{s}.downsample.0", eps)
            key = f"stages.{s}.downsample.1"
            x = F.conv2d(x, sd[f"{key}.weight"], sd[f"{key}.bias"], stride=2)
        i = 0
        while f"stages.{s}.blocks.{i}.conv_dw.weight" in sd:
            key = f"stages.{s}.blocks.{i}"
            w = sd[f"{key}.conv_dw.weight"]
            h = F.conv2d(x, w, sd[f"{key}.conv_dw.bias"], padding=3, groups=w.shape[0])
            h = h.permute(0, 2, 3, 1)
            n = f"{key}.norm"
            h = F.layer_norm(h, (h.shape[-1],), sd[f"{n}.weight"], sd[f"{n}.bias"], eps)
            fc1, fc2 = (sd[f"{key}.mlp.{fc}.weight"].flatten(1) for fc in ("fc1", "fc2"))
            h = F.linear(F.gelu(F.linear(h, fc1, sd[f"{key}.mlp.fc1.bias"])), fc2)
            h = (h + sd[f"{key}.mlp.fc2.bias"]).permute(0, 3, 1, 2)
            if f"{key}.gamma" in sd:
                h = h * sd[f"{key}.gamma"].reshape(1, -1, 1, 1)
            x = x + h
            i += 1
        s += 1
    if "norm_pre.weight" in sd:
        x = _ln2d(x, sd, "norm_pre", eps).mean((2, 3))
    else:
        x = x.mean((2, 3))
        x = F.layer_norm(x, (x.shape[1],), sd["head.norm.weight"], sd["head.norm.bias"], eps)
    return F.linear(x, sd["head.fc.weight"], sd["head.fc.bias"])


#: normtool family → (state dict maker, reference forward).
FAMILIES: dict[str, tuple[Callable[..., SD], Callable[..., torch.Tensor]]] = {
    "timm_resnet": (resnet_state_dict, resnet_forward),
    "tv_mobilenet_v2": (mobilenet_v2_state_dict, mobilenet_v2_forward),
    "timm_convnext": (convnext_state_dict, convnext_forward),
}


def save(sd: SD, path: Path) -> Path:
    """``sd`` as ``.safetensors``, or pickled with ``torch.save`` for any other suffix."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def make(family: str, dir: Path, name: str | None = None, **kw) -> Path:
    """``FAMILIES[family]``'s state dict (``kw`` to its maker) saved as ``<name>.safetensors``."""
    dir.mkdir(parents=True, exist_ok=True)
    return save(FAMILIES[family][0](**kw), dir / f"{name or family}.safetensors")


def save_timm_folder(sd: SD, folder: Path, architecture: str, input_size: int) -> Path:
    """A Hugging Face hub folder as timm writes one: ``config.json`` + ``model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": architecture,
        "num_classes": 5,
        "pretrained_cfg": {"input_size": [3, input_size, input_size], "crop_pct": 0.875},
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    save(sd, folder / "model.safetensors")
    return folder
