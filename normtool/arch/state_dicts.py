"""What families recognised from tensor names share: timm's ``config.json``, the input size,
eps values a state dict does not record, and the check that every stored tensor was used.

Why the used-tensor check: a variant with an extra part (a squeeze-excitation module in a
ResNet block, ConvNeXt-V2's global response norm) has every tensor the plain family reads, so
a builder reading only those would compute another function and verify it against itself.
Refusing a checkpoint with tensors the graph does not read names what is unknown instead.
"""

from __future__ import annotations

import math

from normtool.arch.builder import GraphBuilder
from normtool.arch.convnets import linear_head
from normtool.arch.family import BuildOptions
from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec
from normtool.io.store import Checkpoint

#: ImageNet's training size, used by verify and bench unless a timm config gives its own.
DEFAULT_IMAGE_SIZE = 224
#: Buffers a state dict keeps that no inference computation reads.
UNUSED_SUFFIXES = (".num_batches_tracked",)
#: Key prefixes of the same layout: none, or ``DataParallel``'s ``module.``.
PREFIXES = ("", "module.")


def key_prefix(ck: Checkpoint, *keys: str) -> str | None:
    """The prefix under which ``ck`` holds all of ``keys`` (None: it does not)."""
    for p in PREFIXES:
        if all(f"{p}{k}" in ck for k in keys):
            return p
    return None


def timm_architecture(ck: Checkpoint) -> str | None:
    """The ``architecture`` of a timm ``config.json`` (Hugging Face hub folders of timm models),
    None without one."""
    arch = (ck.config or {}).get("architecture")
    return arch if isinstance(arch, str) else None


def config_fits(ck: Checkpoint, prefixes: tuple[str, ...]) -> bool:
    """Whether ``ck``'s config allows a family detected from tensor names: no config (a plain
    state dict), or a timm config naming an architecture starting with one of ``prefixes``."""
    if ck.config is None:
        return True
    arch = timm_architecture(ck)
    return arch is not None and arch.startswith(prefixes)


def image_size(ck: Checkpoint) -> int:
    """The square input size verify and bench feed: a timm config's ``pretrained_cfg``
    ``input_size`` ``[C, H, W]`` where it is square, else 224 (exports take any size)."""
    cfg = (ck.config or {}).get("pretrained_cfg")
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if (
        isinstance(size, list)
        and len(size) == 3
        and all(isinstance(v, int) and v > 0 for v in size)
        and size[1] == size[2]
    ):
        return size[1]
    return DEFAULT_IMAGE_SIZE


def image_input(b: GraphBuilder, stem_key: str) -> tuple[str, str]:
    """The ``pixel_values`` input (channels from the stem conv ``stem_key``, square size from
    ``image_size``) and its space."""
    c_in = b.ck.shape(stem_key)[1]
    size = image_size(b.ck)
    b.info["image_size"] = size
    space = b.space("pixels", c_in, "input")
    return b.input(InputSpec("pixel_values", "pixels", ("batch", c_in, size, size)), space), space


def stated_eps(opts: BuildOptions, what: str, value: float, why: str) -> float:
    """A norm eps a state dict does not record: ``--eps`` where given (finite, above 0), else
    ``value``, recorded as an assumption."""
    if opts.eps is None:
        opts.assume(what, value, f"{why}; a state dict does not record it, pass --eps")
        return value
    if not (math.isfinite(opts.eps) and opts.eps > 0):
        raise NormtoolError(f"--eps {opts.eps!r}: expected a finite number above 0")
    return float(opts.eps)


def require_all_used(b: GraphBuilder, family: str) -> None:
    """Refuse a checkpoint holding tensors the graph does not read (a variant of ``family``
    that would otherwise be computed without its extra parts), naming a few of them."""
    used = {spec.source.key for spec in b.tensors.values()}
    extra = [
        k
        for k in b.ck.keys()  # noqa: SIM118 - Checkpoint is not a dict
        if k not in used and not k.endswith(UNUSED_SUFFIXES)
    ]
    if extra:
        shown = ", ".join(repr(k) for k in extra[:3])
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise NormtoolError(
            f"{len(extra)} tensor(s) that a {family} does not have: {shown}{more} "
            "(a variant normtool does not know)",
            b.ck.path,
        )


def classify(b: GraphBuilder, x: str, space: str, head_key: str, family: str) -> Graph:
    """The graph ending in the linear classifier ``head_key`` on ``x``, once every stored
    tensor is known to be read (``require_all_used``)."""
    out = linear_head(b, x, space, head_key)
    require_all_used(b, family)
    return b.build([out])
