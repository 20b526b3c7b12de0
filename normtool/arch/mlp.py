"""Plain MLP chains: the state dict of an ``nn.Sequential`` of ``Linear`` layers with one
elementwise activation between consecutive layers (``--act``, relu by default).

Recognised from tensor names alone (``[prefix.]<index>.weight`` / ``.bias``, 2-D weights whose
widths chain); the activation cannot be read from a state dict, hence the flag.
"""

from __future__ import annotations

import re

from normtool.arch.builder import GraphBuilder
from normtool.arch.family import BuildOptions, Family
from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec
from normtool.io.store import Checkpoint

_KEY = re.compile(r"^(?P<prefix>(?:[A-Za-z_]\w*\.)*)(?P<idx>\d+)\.(?P<kind>weight|bias)$")


def _layers(ck: Checkpoint) -> list[tuple[str, str | None]] | None:
    """``[(weight key, bias key or None)]`` in layer order, or None if this is not an MLP chain."""
    found: dict[int, dict[str, str]] = {}
    prefixes = set()
    for k in ck.keys():  # noqa: SIM118 - Checkpoint is not a dict
        m = _KEY.match(k)
        if not m:
            return None
        prefixes.add(m["prefix"])
        found.setdefault(int(m["idx"]), {})[m["kind"]] = k
    if len(prefixes) != 1 or not found:
        return None
    layers = []
    for idx in sorted(found):
        d = found[idx]
        if "weight" not in d or len(ck.shape(d["weight"])) != 2:
            return None
        layers.append((d["weight"], d.get("bias")))
    return layers


def detect(ck: Checkpoint) -> bool:
    layers = _layers(ck)
    if ck.config is not None or not layers:
        return False
    return all(
        ck.shape(a)[0] == ck.shape(b)[1] for (a, _), (b, _) in zip(layers, layers[1:], strict=False)
    )


def build(ck: Checkpoint, opts: BuildOptions) -> Graph:
    layers = _layers(ck)
    if not layers:
        raise NormtoolError(
            "not an MLP chain: expected only '<index>.weight' / '<index>.bias' tensors", ck.path
        )
    b = GraphBuilder("mlp", ck)
    act = opts.act or "relu"
    if opts.act is None:
        opts.assume("mlp activation", act, "a state dict does not record it, pass --act")
    b.info.update(act=act, layers=len(layers))
    n_in = ck.shape(layers[0][0])[1]
    x = b.input(InputSpec("input", "features", ("batch", n_in)), b.space("input", n_in, "input"))
    for i, (wk, bk) in enumerate(layers):
        out, inp = ck.shape(wk)
        last = i == len(layers) - 1
        if i > 0 and inp != b.spaces[f"hidden{i - 1}"].size:
            raise NormtoolError(
                f"layer {wk!r} takes {inp} inputs but the previous layer gives "
                f"{b.spaces[f'hidden{i - 1}'].size}",
                ck.path,
            )
        in_space = "input" if i == 0 else f"hidden{i - 1}"
        out_space = b.space("logits" if last else f"hidden{i}", out, "output" if last else "hidden")
        params = {"weight": b.tensor(f"{i}.weight", wk, (out_space, in_space))}
        if bk is not None:
            params["bias"] = b.tensor(f"{i}.bias", bk, (out_space,))
        x = b.op("linear", "logits" if last else f"fc{i}", [x], out_space, params)
        if not last:
            x = b.op("act", f"act{i}", [x], out_space, fn=act)
    return b.build(["logits"])


FAMILY = Family(
    name="mlp",
    description="plain MLP chain: nn.Sequential of Linear layers (state dict), --act sets the activation",
    detect=detect,
    build=build,
)
